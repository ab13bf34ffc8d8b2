"""Who is calling: the one function that maps a request's source to a VM.

On a router the VM is the TCP source address, as on CloudStack's VR (:func:`vm_of`).
On a hypervisor (``vr hypervisor``) it is the switch port the request came through
(:func:`port_of`), turned into a VM by :mod:`vr.http.port_identity`.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network, IPv6Address, ip_address


@dataclass(frozen=True)
class Source:
    """What the transport tells us about the caller. Never a request header."""

    address: str


def vm_of(source: Source) -> IPv4Address | None:
    """The VM address a request comes from, or None when it cannot be a guest."""
    try:
        addr = ip_address(source.address)
    except ValueError:
        return None
    if isinstance(addr, IPv6Address):
        mapped = addr.ipv4_mapped
        if mapped is None:
            return None
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
