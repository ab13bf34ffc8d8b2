#!/usr/bin/env bash
# Install what vr needs on Debian 12 (as root) and build the virtualenv .venv.
# Idempotent: packages already present and an up-to-date venv are left alone.
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"

# libtrilead-ssh2-java and a JDK: the tests push with CloudStack's own Java SSH library
# net-tools: `netstat -tulpn` is one of the diagnostics an operator types over SSH
# openvswitch-switch and ethtool: the hypervisor mode (vr hypervisor) and its tests, which
# run their own ovsdb-server/ovs-vswitchd (userspace datapath), never the system service
packages=(python3-venv python3-dev gcc iproute2 iptables conntrack kmod procps
          openssh-client openssh-server curl wget cloud-init debootstrap
          libtrilead-ssh2-java openjdk-17-jdk-headless
          openvswitch-switch ethtool
          dnsmasq-base dnsmasq-utils isc-dhcp-client dnsutils
          net-tools ipset
          qemu-system-x86 qemu-utils
          keepalived)
missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  # cloud-init must never act on this host: disable it before it is installed.
  mkdir -p /etc/cloud && touch /etc/cloud/cloud-init.disabled
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
# The appliance programs the legacy netfilter tables through python-iptables and the
# tests inspect them with iptables-legacy explicitly: the host's own iptables
# alternative (nft or legacy) is left as it is.

py=/usr/bin/python3
if [ ! -x .venv/bin/python ]; then
  "$py" -m venv .venv
fi
stamp=.venv/.vr-installed
if [ ! -f "$stamp" ] || [ setup.cfg -nt "$stamp" ]; then
  .venv/bin/pip install -q --upgrade pip >/dev/null
  .venv/bin/pip install -q -e '.[test]'
  touch "$stamp"
fi
