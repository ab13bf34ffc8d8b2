"""Who is calling: the one function that maps a request's source to a VM.

Today the VM is the TCP source address, as on CloudStack's VR. Later sources
(ingress MAC/port, session tokens) plug in here so every server asks the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address, ip_address


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
