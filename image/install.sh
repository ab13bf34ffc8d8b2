#!/usr/bin/env bash
# Install the vr appliance on a Debian 12 system, or into a Debian 12 root filesystem.
#
#   image/install.sh [--wheels DIR] [--no-apt] [TARGET]
#
# TARGET (default /) is the root to install into. For a TARGET other than /, this
# script copies the checkout into TARGET, mounts /proc, /sys, /dev and /run there
# (always unmounted on exit) and runs itself inside `chroot TARGET`, so every tool
# that runs is the target's own (its python3 builds the venv, its dpkg is asked).
#
# --wheels DIR  install vr and its dependencies from the wheels in DIR only (no index).
#               Without it, a TARGET other than / gets wheels built by this host's pip
#               (so the chroot needs no PyPI access of its own); on / pip installs the
#               checkout, fetching dependencies from the configured index.
# --no-apt      fail instead of running apt-get when a runtime package is missing.
# --systemvm    also make it a SystemVM template (what image/build does): enable
#               vr-boot.service (boot arguments -> interfaces, key, vr.json before vr up)
#               and vr-boot-key.path, and lock root's password (no console login; the
#               only way in is vr's agent on 3922 with the management server's key).
#
# What lands in the target:
#   Debian packages in image/packages (no OpenSSH server: vr's agent owns port 3922)
#   /opt/vr/venv               virtualenv with vr installed (not editable)
#   /usr/local/bin/vr          -> /opt/vr/venv/bin/vr
#   /opt/cloud/bin/update_config.py, vr_cfg.sh   CloudStack's entry points (scripts/)
#   /var/www/html              document-root skeleton (html/); pushed data is never touched
#   /usr/local/lib/systemd/system/vr.service, vr-firewall.service, enabled by symlink
#   /etc/vr/vr.json            default configuration, only if there is none
# Idempotent: running it again upgrades vr in place and keeps configuration and data.
set -euo pipefail
src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=image/lib.sh
. "$src/image/lib.sh"

wheels="" apt=1 systemvm=0 target=/
while [ $# -gt 0 ]; do
  case $1 in
    --wheels) wheels=$(realpath "${2:?--wheels needs a directory}"); shift 2 ;;
    --no-apt) apt=0; shift ;;
    --systemvm) systemvm=1; shift ;;
    -h|--help) sed -n '2,/^set -e/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) target=$1; shift ;;
  esac
done
[ "$(id -u)" = 0 ] || die "must run as root"
[ -z "$wheels" ] || [ -n "$(find "$wheels" -maxdepth 1 -name 'vr-*.whl' -print -quit)" ] \
  || die "--wheels $wheels: no vr-*.whl in it (build them with pip wheel -w DIR <checkout>)"

install_into_root() {
  local root
  root=$(realpath "$target")
  [ -f "$root/etc/debian_version" ] || die "$root: not a Debian root filesystem (no etc/debian_version)"
  local stage
  stage=$(mktemp -d "$root/var/tmp/vr-install.XXXXXX")
  # A global: the EXIT trap runs after this function has returned.
  stage_dir=$stage
  trap 'chroot_umount; rm -rf --one-file-system -- "$stage_dir"' EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  stage_source "$src" "$stage/src"
  local args=(--wheels "/${stage#"$root"/}/wheels")
  if [ -n "$wheels" ]; then
    cp -r "$wheels" "$stage/wheels"
  else
    # The chroot may have no route, proxy or CA for PyPI; this host's pip does.
    log "building wheels on this host for $root"
    build_wheels "$src" "$root" "$stage/wheels" "$stage/wheelbuild"
  fi
  [ "$apt" = 1 ] || args+=(--no-apt)
  [ "$systemvm" = 0 ] || args+=(--systemvm)
  chroot_mount "$root"
  log "installing into $root (chroot)"
  chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    bash "/${stage#"$root"/}/src/image/install.sh" "${args[@]}" /
}

install_packages() {
  local missing=() p
  for p in $(image_packages); do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
  done
  [ "${#missing[@]}" -gt 0 ] || return 0
  [ "$apt" = 1 ] || die "missing Debian packages: ${missing[*]} (and --no-apt given)"
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_venv() {
  local venv=/opt/vr/venv
  mkdir -p /opt/vr
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  if [ -n "$wheels" ]; then
    "$venv/bin/pip" install -q --no-index --find-links "$wheels" vr
    # Same version number, new code: replace vr itself, keep the dependencies.
    "$venv/bin/pip" install -q --no-index --find-links "$wheels" --force-reinstall --no-deps vr
  else
    local stage
    stage=$(mktemp -d)
    stage_source "$src" "$stage"
    "$venv/bin/pip" install -q "$stage"
    rm -rf "$stage"
  fi
  ln -sfn "$venv/bin/vr" /usr/local/bin/vr
  install -m 0644 "$src/README.md" /opt/vr/README.md
}

install_shims() {
  install -d -m 0755 /opt/cloud/bin
  # The shim imports vr: run it with the venv's interpreter, not the system python3.
  sed '1s|^#!.*|#!/opt/vr/venv/bin/python3|' "$src/scripts/update_config.py" \
    >/opt/cloud/bin/update_config.py.new
  chmod 0755 /opt/cloud/bin/update_config.py.new
  mv /opt/cloud/bin/update_config.py.new /opt/cloud/bin/update_config.py
  install -m 0755 "$src/scripts/vr_cfg.sh" /opt/cloud/bin/vr_cfg.sh
  # pushed files include vm_password.json.*: root only
  install -d -m 0700 /var/cache/cloud /var/cache/cloud/processed /var/cache/cloud/failed
}

install_docroot() {
  install -d -m 0755 /var/www/html /var/www/html/latest
  # Skeleton files only; the store owns latest/metadata, latest/userdata and latest/.vms.
  (cd "$src/html" && find . -type f ! -name .gitkeep -print0) | while IFS= read -r -d '' f; do
    install -D -m 0644 "$src/html/$f" "/var/www/html/$f"
  done
}

install_units() {
  local unit dir=/usr/local/lib/systemd/system wanted units=(vr-firewall.service vr.service)
  install -d -m 0755 "$dir"
  if [ "$systemvm" = 1 ]; then
    # vr-boot-key.service has no [Install]: the path unit starts it.
    install -m 0644 "$src/image/systemd/vr-boot-key.service" "$dir/vr-boot-key.service"
    units+=(vr-boot.service vr-boot-key.path)
  fi
  for unit in "${units[@]}"; do
    install -m 0644 "$src/image/systemd/$unit" "$dir/$unit"
    # Enable by symlink, as `systemctl enable` would, without asking any running systemd.
    for wanted in $(sed -n 's/^WantedBy=//p' "$dir/$unit"); do
      install -d -m 0755 "/etc/systemd/system/$wanted.wants"
      ln -sfn "$dir/$unit" "/etc/systemd/system/$wanted.wants/$unit"
    done
  done
}

install_config() {
  install -d -m 0700 /etc/vr
  [ -e /etc/vr/vr.json ] && return 0
  cat >/etc/vr/vr.json.new <<'EOF'
{
  "control_device": "eth1",
  "public_devices": ["eth2"],
  "ssh_port": 3922,
  "ssh_legacy_algorithms": true,
  "metadata_port": 80,
  "password_port": 8080
}
EOF
  chmod 0644 /etc/vr/vr.json.new
  mv /etc/vr/vr.json.new /etc/vr/vr.json
}

if [ "$(realpath "$target")" != / ]; then
  install_into_root
  log "installed into $(realpath "$target")"
  exit 0
fi

install_packages
# python-iptables programs the legacy tables; keep iptables(8) on the same backend.
update-alternatives --set iptables /usr/sbin/iptables-legacy >/dev/null
install_venv
install_shims
install_docroot
install_units
install_config
if [ "$systemvm" = 1 ]; then
  # No password login anywhere (console, serial): root's password is locked, and the
  # image has no sshd; the management server comes in through vr's agent with its key.
  usermod --lock root
  # SSH host keys of the agent are made at first start in each VM, never shipped.
  rm -rf /etc/vr/ssh
fi
if [ -d /run/systemd/system ] && ! systemd-detect-virt -q --chroot; then
  systemctl daemon-reload
  log "installed; start with: systemctl start vr-firewall.service vr.service"
else
  log "installed $(/usr/local/bin/vr --version); units enabled for the next boot"
fi
