"""Per-worker in-memory copy of the VMs guests ask about, never staler than the store.

Every lookup costs one ``stat`` of the store's change stamp (``store.stamp_token``).
When the stamp moved, each cached VM is revalidated lazily on its next lookup with
one ``readlink`` (``store.current_gen``) and re-read only when its generation
changed. Because the store swaps a VM's symlinks before it replaces the stamp, a
request that starts after ``update_config`` returned always sees the new data; no
file watcher, no timing window.

Memory is bounded: at most :data:`MAX_VMS` VMs (and :data:`MAX_UNKNOWN` unknown callers) per worker,
the least recently asked dropped first. A guest's boot asks a dozen URLs within a
second, so a boot storm of any size is served from memory; a VM asked again after it
was dropped is re-read (a few small files). Without the bound each worker grew by the
whole store (~3.6 KB per VM: 10,000 VMs cost 36 MiB per worker).

Thread-safe for gunicorn's threaded worker without a lock: every shared structure
is a dict replaced or updated by single operations (atomic under the GIL; an entry
another thread dropped meanwhile is simply not found); two threads racing to reload
the same VM both load a correct generation.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from collections import OrderedDict
from collections.abc import Callable
from ipaddress import IPv4Address
from typing import Protocol

from vr import store
from vr.http.identity import by_address
from vr.metadata.views import NO_LAN, Lan, VmView, build_view, lan_of
from vr.paths import Paths
from vr.payloads import DhcpEntry, GuestNetwork

LOG = logging.getLogger(__name__)

MAX_ADDRESSES = 65536
"""Bound on remembered source-address strings (cleared wholesale when reached)."""
MAX_VMS = 1024
"""Bound on the VMs one worker keeps, least recently asked dropped first: 10,000 VMs
cannot grow a worker's memory."""
MAX_UNKNOWN = 4096
"""Bound on remembered unknown callers (kept apart, least recently asked dropped
first), so a scan of addresses cannot grow memory nor push known VMs out."""


class _Entry:
    __slots__ = ("epoch", "gen", "view")

    def __init__(self, epoch: int, gen: int | None, view: VmView | None) -> None:
        self.epoch = epoch
        self.gen = gen
        self.view = view


Loader = Callable[[Paths, IPv4Address], "store.VmRecord | None"]


class VmLookup(Protocol):
    """What the metadata application asks: :class:`VmCache` on a router, the port-based
    lookup of ``vr hypervisor`` (vr.hypervisor.services) on a hypervisor."""

    def view_for_address(self, remote_addr: str) -> VmView | None: ...

    def warm(self) -> int: ...


class VmCache:
    """Answer "which VM data does this source address get?" from memory."""

    def __init__(self, paths: Paths, loader: Loader = store.read_vm) -> None:
        self._paths = paths
        self._load = loader
        self._stamp = store.stamp_token(paths)
        self._epoch = 0
        self._entries: OrderedDict[IPv4Address, _Entry] = OrderedDict()
        self._unknown: OrderedDict[IPv4Address, _Entry] = OrderedDict()
        self._addresses: dict[str, IPv4Address | None] = {}
        self._identify = by_address(paths)
        self.loads = 0
        """VM reads from disk so far (tests and benchmarks look at it)."""

    def __len__(self) -> int:
        return len(self._entries)  # only VMs with a view: len() is asked per request

    def view_for_address(self, remote_addr: str) -> VmView | None:
        """The VM calling from ``remote_addr`` (the TCP peer), or None if unknown."""
        ip = self._addresses.get(remote_addr, False)
        if ip is False:
            ip = self._identify(remote_addr)
            if ":" not in remote_addr:
                # an IPv4 caller is always its own VM; an IPv6 one follows the entries
                if len(self._addresses) >= MAX_ADDRESSES:
                    self._addresses = {}
                self._addresses[remote_addr] = ip
        if ip is None:
            return None
        assert isinstance(ip, IPv4Address)
        return self.view(ip)

    def view(self, ip: IPv4Address) -> VmView | None:
        """The current data of VM ``ip``: from memory unless the store changed it."""
        stamp = store.stamp_token(self._paths)
        if stamp != self._stamp:
            self._stamp = stamp
            self._epoch += 1
        epoch = self._epoch
        entry = self._entries.get(ip)
        if entry is None:
            entry = self._unknown.get(ip)
        else:
            with contextlib.suppress(KeyError):  # dropped by another thread meanwhile
                self._entries.move_to_end(ip)
        if entry is not None and entry.epoch == epoch:
            return entry.view
        gen = store.current_gen(self._paths, ip)
        if entry is not None and entry.gen == gen:
            entry.epoch = epoch
            return entry.view
        return self._reload(ip, epoch, gen)

    def _reload(self, ip: IPv4Address, epoch: int, gen: int | None) -> VmView | None:
        rec = self._load(self._paths, ip) if gen is not None else None
        if rec is None:
            self._keep(self._unknown, MAX_UNKNOWN, ip, _Entry(epoch, None, None))
            self._entries.pop(ip, None)
            return None
        self.loads += 1
        view = build_view(rec.gen, rec.metadata, rec.userdata)
        # rec.gen may be newer than ``gen`` (a commit in between); both are at least
        # as new as the stamp read above, which is all a reader may ask for.
        self._keep(self._entries, MAX_VMS, ip, _Entry(epoch, rec.gen, view))
        self._unknown.pop(ip, None)
        LOG.debug("VM %s: loaded generation %s", ip, rec.gen)
        return view

    @staticmethod
    def _keep(
        entries: OrderedDict[IPv4Address, _Entry], bound: int, ip: IPv4Address, entry: _Entry
    ) -> None:
        """Remember ``ip``'s entry as the most recently asked; drop the least recently
        asked beyond ``bound``."""
        entries[ip] = entry
        with contextlib.suppress(KeyError):
            entries.move_to_end(ip)
            while len(entries) > bound:
                entries.popitem(last=False)

    def warm(self) -> int:
        """Load stored VMs now (e.g. at worker start), at most :data:`MAX_VMS` kept;
        returns how many are held."""
        for ip in itertools.islice(store.list_vms(self._paths), MAX_VMS):
            self.view(ip)
        return len(self)


class Lans:
    """Each VM's NIC as the pushed guest networks and DHCP entries describe it
    (:func:`vr.metadata.views.lan_of`), re-read when the store's stamp moved; asked
    only by the DigitalOcean tree."""

    def __init__(self, paths: Paths) -> None:
        self._paths = paths
        self._stamp: object = None
        self._lans: dict[str, Lan] = {}
        self._networks: list[GuestNetwork] = []
        self._dhcp: list[DhcpEntry] = []

    def lan_for(self, remote_addr: str) -> Lan:
        stamp = store.stamp_token(self._paths)
        if stamp != self._stamp or stamp is None:
            self._stamp = stamp
            self._networks = store.read_networks(self._paths)
            self._dhcp = store.read_dhcp(self._paths)
            self._lans = {}
        lan = self._lans.get(remote_addr)
        if lan is None:
            try:
                ip = IPv4Address(remote_addr)
            except ValueError:
                return NO_LAN
            if len(self._lans) >= MAX_ADDRESSES:
                self._lans = {}
            lan = self._lans[remote_addr] = lan_of(ip, self._networks, self._dhcp)
        return lan
