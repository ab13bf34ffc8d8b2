# Shell helpers shared by image/install.sh, image/build and image/check (sourced, not run).
#
# The one rule: every mount made under a root filesystem is recorded and undone by
# `chroot_umount`, which the callers run from an EXIT trap, so an interrupted build
# never leaves the host's /dev or /proc mounted inside a directory someone may delete.

# Packages listed in image/packages, or in image/packages-boot with `image_packages boot`
# (comments and blank lines skipped).
image_packages() {
  sed -e 's/#.*//' -e 's/[[:space:]]//g' -e '/^$/d' "$(dirname "${BASH_SOURCE[0]}")/packages${1:+-$1}"
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
  local root d
  root=$(realpath "$1")
  for d in proc sys dev run; do
    mkdir -p "$root/$d"
    ! mountpoint -q "$root/$d" || die "$root/$d is already a mount point; refusing to stack mounts"
  done
  _mount "$root/proc" -t proc -o nosuid,nodev,noexec proc
  _mount "$root/sys" -t sysfs -o ro,nosuid,nodev,noexec sysfs
  _mount "$root/dev" --bind /dev
  _mount "$root/dev/pts" --bind /dev/pts
  _mount "$root/run" -t tmpfs -o nosuid,nodev,mode=755 tmpfs
}

# _mount POINT ARGS...: mount and record it; a failed mount is fatal (the trap undoes the rest).
_mount() {
  local point=$1
  shift
  mount "$@" "$point" || die "mount $* $point failed"
  _CHROOT_MOUNTS+=("$point")
}

# overlay_mount LOWER MERGED SCRATCH: a writable view of LOWER at MERGED whose changes
# go to SCRATCH (LOWER is never written); undone by chroot_umount like the others.
overlay_mount() {
  mkdir -p "$2" "$3/upper" "$3/work"
  _mount "$(realpath "$2")" -t overlay -o "lowerdir=$1,upperdir=$3/upper,workdir=$3/work" overlay
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

# Copy a checkout without build products or VCS data: stage_source SRC DEST.
stage_source() {
  mkdir -p "$2"
  tar -C "$1" --exclude=.git --exclude=.venv --exclude=__pycache__ --exclude='*.egg-info' \
    --exclude=./build --exclude=./dist --exclude=.mypy_cache --exclude=.ruff_cache \
    --exclude=.pytest_cache -cf - . | tar -C "$2" -xf -
}

# build_wheels SRC ROOT OUT SCRATCH: wheels for the checkout SRC and all its dependencies
# into OUT, built with this host's pip (its index, proxy and CA configuration) for the
# python3 of the Debian root ROOT, which must be the same minor version as the host's:
# compiled wheels (python-iptables) only load in the interpreter they were built for.
build_wheels() {
  local src=$1 root=$2 out=$3 scratch=$4 host_py target_py
  host_py=$(python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
  target_py=$(chroot "$root" /usr/bin/python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
    || die "$root has no working /usr/bin/python3"
  [ "$host_py" = "$target_py" ] \
    || die "host python3 is $host_py but $root has $target_py: build on Debian 12, or pass --wheels"
  python3 -m venv "$scratch/pyenv" || die "python3 -m venv failed (install python3-venv)"
  stage_source "$src" "$scratch/src"
  "$scratch/pyenv/bin/pip" wheel -q --disable-pip-version-check -w "$out" "$scratch/src" \
    >"$scratch/wheels.log" 2>&1 || {
    grep -v '^WARNING: Location' "$scratch/wheels.log" >&2
    die "pip wheel failed (python-iptables needs gcc and python3-dev on this host)"
  }
}
