# Shell helpers shared by image/install.sh, image/build and image/check (sourced, not run).
#
# The one rule: every mount made under a root filesystem is recorded and undone by
# `chroot_umount`, which the callers run from an EXIT trap, so an interrupted build
# never leaves the host's /dev or /proc mounted inside a directory someone may delete.

# Packages listed in image/packages (comments and blank lines skipped).
image_packages() {
  sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$(dirname "${BASH_SOURCE[0]}")/packages"
}

log() { printf '%s: %s\n' "${0##*/}" "$*" >&2; }
die() { log "error: $*"; exit 1; }

# Mount points under a directory (deepest first), read from the kernel's own table.
mounts_under() {
  local dir
  dir=$(realpath -m "$1")
  awk -v d="$dir" '{ gsub(/\\040/, " ", $5); if ($5 == d || index($5, d "/") == 1) print $5 }' \
    /proc/self/mountinfo | sort -r
}

_CHROOT_MOUNTS=()

# Mount what programs inside the chroot expect: /proc, /sys, /dev, /dev/pts, /run (tmpfs).
chroot_mount() {
  local root
  root=$(realpath "$1")
  [ -z "$(mounts_under "$root")" ] || die "$root already has mounts under it: $(mounts_under "$root" | tr '\n' ' ')"
  mkdir -p "$root/proc" "$root/sys" "$root/dev" "$root/run"
  mount -t proc -o nosuid,nodev,noexec proc "$root/proc" && _CHROOT_MOUNTS+=("$root/proc")
  mount -t sysfs -o ro,nosuid,nodev,noexec sysfs "$root/sys" && _CHROOT_MOUNTS+=("$root/sys")
  mount --bind /dev "$root/dev" && _CHROOT_MOUNTS+=("$root/dev")
  mkdir -p "$root/dev/pts"
  mount --bind /dev/pts "$root/dev/pts" && _CHROOT_MOUNTS+=("$root/dev/pts")
  mount -t tmpfs -o nosuid,nodev,mode=755 tmpfs "$root/run" && _CHROOT_MOUNTS+=("$root/run")
}

# Undo chroot_mount (newest first); falls back to a lazy unmount for a busy mount point.
# Returns non-zero if anything is still mounted under a root we mounted into.
chroot_umount() {
  local i m rc=0
  for ((i = ${#_CHROOT_MOUNTS[@]} - 1; i >= 0; i--)); do
    m=${_CHROOT_MOUNTS[$i]}
    umount "$m" 2>/dev/null || umount -l "$m" || { log "could not unmount $m"; rc=1; }
  done
  _CHROOT_MOUNTS=()
  return "$rc"
}

# Remove a root filesystem directory, refusing while anything is mounted under it
# (a bind-mounted /dev would otherwise be emptied), never crossing into other filesystems.
remove_rootfs() {
  local root=$1 left
  [ -e "$root" ] || return 0
  left=$(mounts_under "$root")
  [ -z "$left" ] || die "refusing to remove $root: still mounted: $(echo "$left" | tr '\n' ' ')"
  rm -rf --one-file-system -- "$root"
}
