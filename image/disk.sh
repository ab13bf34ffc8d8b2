# The SystemVM disk image, made from a built root filesystem (sourced by image/build).
#
# An MBR disk with one ext4 partition made by `mkfs.ext4 -d ROOTFS` straight into a plain
# file, and GRUB's BIOS boot loader assembled by the image's own grub-mkimage and written
# into the gap before the partition: no loop device, no mount, no grub-install (which
# needs a block device). Then `qemu-img convert -c` makes the compressed qcow2.

# Kernel arguments of the SystemVM: serial console (CloudStack shows it as the VM's
# console log), classic NIC names so the NICs are eth0, eth1, eth2 as CloudStack's boot
# arguments name them.
KERNEL_ARGS="console=tty0 console=ttyS0,115200n8 net.ifnames=0 biosdevname=0"

# make_qcow2 ROOTFS FILE SCRATCH [SIZE_MB]
make_qcow2() {
  local rootfs=$1 out=$2 scratch=$3 mb=${4:-2048}
  local uuid disk=$scratch/disk.raw grubdir=usr/lib/grub/i386-pc stage rel
  [ -e "$rootfs/vmlinuz" ] && [ -e "$rootfs/initrd.img" ] \
    || die "$rootfs has no /vmlinuz or /initrd.img (is linux-image-cloud-amd64 installed?)"
  [ -f "$rootfs/$grubdir/boot.img" ] || die "$rootfs has no /$grubdir/boot.img (grub-pc-bin)"
  uuid=$(python3 -c 'import uuid; print(uuid.uuid4())')
  echo "UUID=$uuid / ext4 defaults,errors=remount-ro 0 1" >"$rootfs/etc/fstab"
  rm -rf --one-file-system -- "$rootfs/boot/grub"
  mkdir -p "$rootfs/boot/grub"
  cp -a "$rootfs/$grubdir" "$rootfs/boot/grub/i386-pc"
  # /vmlinuz and /initrd.img are the links the kernel package keeps on the newest kernel,
  # so an upgraded kernel inside a VM boots without regenerating this file.
  {
    echo "serial --unit=0 --speed=115200"
    echo "terminal_input serial console"
    echo "terminal_output serial console"
    echo "set timeout=0"
    echo "menuentry 'vr SystemVM' {"
    echo "  search --no-floppy --fs-uuid --set=root $uuid"
    echo "  linux /vmlinuz root=UUID=$uuid ro $KERNEL_ARGS"
    echo "  initrd /initrd.img"
    echo "}"
  } >"$rootfs/boot/grub/grub.cfg"
  # The first stage finds the root filesystem by UUID, whatever BIOS disk number it has.
  stage=$(mktemp -d "$rootfs/var/tmp/vr-grub.XXXXXX")
  rel=/${stage#"$rootfs"/}
  # shellcheck disable=SC2016 # $root is GRUB's variable, not ours
  printf 'search --no-floppy --fs-uuid --set=root %s\nset prefix=($root)/boot/grub\n' "$uuid" \
    >"$stage/early.cfg"
  chroot "$rootfs" grub-mkimage -O i386-pc -o "$rel/core.img" -c "$rel/early.cfg" -p /boot/grub \
    biosdisk part_msdos ext2 search search_fs_uuid normal linux configfile echo test serial \
    || die "grub-mkimage failed in $rootfs"
  mv "$stage/core.img" "$scratch/core.img"
  rm -rf -- "$stage"
  # boot.img's built-in pointer is sector 1 and diskboot's block list the sectors after
  # it: the core image sits in the gap before the partition, which must hold it.
  [ "$(stat -c %s "$scratch/core.img")" -le $((2047 * 512)) ] \
    || die "the GRUB core image does not fit the 1 MiB before the partition"
  rm -f -- "$disk"
  truncate -s "${mb}M" "$disk"
  printf 'label: dos\nstart=2048, type=83, bootable\n' | sfdisk -q "$disk" >/dev/null
  # 440 bytes: the boot code only, never the partition table after it.
  dd if="$rootfs/$grubdir/boot.img" of="$disk" bs=440 count=1 conv=notrunc status=none
  dd if="$scratch/core.img" of="$disk" bs=512 seek=1 conv=notrunc status=none
  mkfs.ext4 -q -F -L vr-root -U "$uuid" -d "$rootfs" -E offset=$((2048 * 512)) \
    "$disk" "$(((mb - 1) * 1024))k" || die "mkfs.ext4 -d $rootfs failed"
  mkdir -p -- "$(dirname "$out")"
  qemu-img convert -c -O qcow2 "$disk" "$out.tmp" || die "qemu-img convert to $out failed"
  mv -- "$out.tmp" "$out"
  rm -f -- "$disk"
}
