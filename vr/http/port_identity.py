"""Who is calling on a hypervisor: switch port -> MAC -> tenant network and VM address.

The sibling of :mod:`vr.http.identity` for ``vr hypervisor``. A request's source
address is the NAT address Open vSwitch gave the VM's switch port
(:func:`vr.http.identity.port_of`); the port's ``attached-mac`` (the port table the
flow controller writes) names the VM; the network whose pushed DHCP entries hold
that MAC is the VM's tenant network, and the entry's address is the VM in that
network's store. Two VMs with the same IP in two networks are two stores, so each
gets its own data; a MAC found in two networks is refused (logged), never guessed.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from vr import store
from vr.http.identity import Source, port_of
from vr.hypervisor.ports import PortTable
from vr.paths import Paths

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Network:
    """A tenant network on this hypervisor: a name and its own vr store root."""

    name: str
    paths: Paths


@dataclass(frozen=True)
class Caller:
    network: Network
    ip: IPv4Address
    ofport: int


class _Macs:
    """MAC -> VM address of one network's DHCP entries, re-read when the file changes."""

    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self._version: tuple[int, int, int, int] | None = None
        self._macs: dict[str, IPv4Address] = {}

    def get(self, mac: str) -> IPv4Address | None:
        try:
            st = os.stat(self.paths.dhcp)
            version = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        except FileNotFoundError:
            version = None
        if version != self._version:
            # read first, then remember the version seen before reading: a change in
            # between is read again on the next lookup
            self._macs = {e.mac_address: e.ipv4_address for e in store.read_dhcp(self.paths)}
            self._version = version
        return self._macs.get(mac)


class PortResolver:
    """Map a request's source address to the calling VM (see the module docstring)."""

    def __init__(self, table: PortTable, networks: Sequence[Network]) -> None:
        self.table = table
        self.networks = list(networks)
        self._macs = [(n, _Macs(n.paths)) for n in self.networks]

    def resolve(self, remote_addr: str) -> Caller | None:
        ofport = port_of(Source(remote_addr))
        if ofport is None:
            return None
        port = self.table.get(ofport)
        if port is None:
            return None
        found = [(n, ip) for n, macs in self._macs if (ip := macs.get(port.mac)) is not None]
        if len(found) != 1:
            if found:
                LOG.error(
                    "port %s (%s): MAC %s has DHCP entries in networks %s; expected one, "
                    "not served",
                    ofport,
                    port.name,
                    port.mac,
                    ", ".join(n.name for n, _ in found),
                )
            return None
        network, ip = found[0]
        return Caller(network, ip, ofport)
