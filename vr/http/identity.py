"""Who is calling: the one function that maps a request's source to a VM.

On a router the VM is the TCP source address, as on CloudStack's VR (:func:`vm_of`):
an IPv4 caller is its own VM; an IPv6 caller is the VM whose DHCP entry holds that
``ipv6_address`` (or, from a link-local address built from a MAC by EUI-64, the VM
whose entry holds that MAC), so it gets the same VM record as its IPv4 address
(:func:`by_address`). The firewall's MAC binding keeps a guest from borrowing
another's address, for IPv4 and IPv6 alike. On a hypervisor (``vr hypervisor``) it
is the switch port the request came through (:func:`port_of`), turned into a VM by
:mod:`vr.http.port_identity`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address

from vr.paths import Paths

Lookup6 = Callable[[IPv6Address], "IPv4Address | None"]


@dataclass(frozen=True)
class Source:
    """What the transport tells us about the caller. Never a request header."""

    address: str


def vm_of(source: Source, lookup6: Lookup6 | None = None) -> IPv4Address | None:
    """The VM address a request comes from, or None when it cannot be a guest.

    ``lookup6`` maps an IPv6 caller to its VM (:class:`Ipv6Map`); without it an
    IPv6 caller is nobody (unless IPv4-mapped).
    """
    try:
        addr = ip_address(source.address.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(addr, IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is None:
            return lookup6(addr) if lookup6 is not None else None
        addr = mapped
    assert isinstance(addr, IPv4Address)
    return addr


NAT_NETWORK = IPv4Network("100.127.0.0/16")
"""On a hypervisor (``vr hypervisor``) Open vSwitch NATs every metadata connection of
the VM on switch port P to the source 100.127.<P >> 8>.<P & 255> (vr.hypervisor.flows)."""
MAX_OFPORT = 0xFEFF


def port_of(source: Source) -> int | None:
    """The switch port a request came through on a hypervisor, or None if its source is
    not a port's NAT address. The guest cannot choose it: the switch sets it by port."""
    addr = vm_of(source)
    if addr is None or addr not in NAT_NETWORK:
        return None
    port = int(addr) - int(NAT_NETWORK.network_address)
    return port if 1 <= port <= MAX_OFPORT else None


def mac_of_eui64(addr: IPv6Address) -> str | None:
    """The MAC a link-local address was built from by modified EUI-64, if it was."""
    if not addr.is_link_local:
        return None
    iid = addr.packed[8:]
    if iid[3:5] != b"\xff\xfe":
        return None
    mac = bytes([iid[0] ^ 0x02, *iid[1:3], *iid[5:8]])
    return ":".join(f"{b:02x}" for b in mac)


class Ipv6Map:
    """IPv6 caller -> VM from the pushed DHCP entries; costs one ``stat`` per call
    and re-reads the entries only when the store replaced them."""

    def __init__(self, paths: Paths) -> None:
        self._paths = paths
        self._key: tuple[int, int, int] | None = None
        self._by_ip: dict[IPv6Address, IPv4Address] = {}
        self._by_mac: dict[str, IPv4Address] = {}

    def __call__(self, addr: IPv6Address) -> IPv4Address | None:
        self._refresh()
        vm = self._by_ip.get(addr)
        if vm is None:
            mac = mac_of_eui64(addr)
            if mac is not None:
                vm = self._by_mac.get(mac)
        return vm

    def _refresh(self) -> None:
        from vr import store

        try:
            st = os.stat(self._paths.dhcp)
        except FileNotFoundError:
            self._key, self._by_ip, self._by_mac = None, {}, {}
            return
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key == self._key:
            return
        entries = store.read_dhcp(self._paths)
        self._by_ip = {e.ipv6_address: e.ipv4_address for e in entries if e.ipv6_address}
        self._by_mac = {e.mac_address: e.ipv4_address for e in entries}
        self._key = key


Identify = Callable[[str], "IPv4Address | None"]
"""A request's source address (``REMOTE_ADDR``) -> the VM it comes from (None: not a guest)."""


def by_address(paths: Paths) -> Identify:
    """The router's identity for the store under ``paths``: the caller's IPv4 address,
    or the VM whose DHCP entry holds its IPv6 address."""
    lookup6 = Ipv6Map(paths)

    def identify(caller: str) -> IPv4Address | None:
        return vm_of(Source(caller), lookup6)

    return identify
