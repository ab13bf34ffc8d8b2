"""Write dnsmasq's files from the config and the store, and tell the running service.

The files live in ``<root>/run/vr/dnsmasq/`` (rendered anew at every start), the
leases in ``<root>/var/lib/misc/dnsmasq.leases`` (kept across restarts, as on
Debian). Each file is replaced atomically and only when its bytes change. A host
change then costs one SIGHUP (dnsmasq re-reads hosts, options and names); only a
change of the main configuration (guest networks) restarts dnsmasq. Leases of
removed hosts are released first with ``dhcp_release`` (and ``dhcp_release6`` for their
DHCPv6 leases), as CloudStack and neutron do, so their address can go to another MAC
at once.

dnsmasq is *managed* on a root once ``vr serve-dhcp`` ran there (the directory
exists); before that, pushes only update the store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address
from pathlib import Path

from vr import atomic, config, store, subp
from vr.config import Config
from vr.dhcp import model
from vr.errors import CommandError
from vr.paths import Paths
from vr.payloads import HOSTNAME_PATTERN, Payload
from vr.store import ApplyResult, Store

LOG = logging.getLogger(__name__)

DHCP_RELEASE = "dhcp_release"
DHCP_RELEASE6 = "dhcp_release6"


@dataclass(frozen=True)
class DhcpPaths:
    paths: Paths

    @property
    def dir(self) -> Path:
        return self.paths.run / "dnsmasq"

    @property
    def conf(self) -> Path:
        return self.dir / "dnsmasq.conf"

    @property
    def service_pid(self) -> Path:
        return self.dir / "service.pid"

    @property
    def leases(self) -> Path:
        return self.paths.root / "var/lib/misc/dnsmasq.leases"

    def file(self, name: str) -> Path:
        return self.dir / name

    def locations(self) -> model.Locations:
        return model.Locations(
            hosts=str(self.file("hosts")),
            opts=str(self.file("opts")),
            names=str(self.file("names")),
            leases=str(self.leases),
        )


def router_name() -> str:
    """This router's host name as a DNS label (CloudStack names it ``r-<id>-VM``)."""
    label = socket.gethostname().split(".")[0]
    return label if HOSTNAME_PATTERN.fullmatch(label) else "router"


def compute(paths: Paths, cfg: Config) -> model.DnsmasqFiles:
    """The files for ``cfg`` and the store (read with the lock held)."""
    return model.render(
        cfg,
        store.read_networks(paths, removals=True),
        store.read_dhcp(paths),
        router_name(),
        DhcpPaths(paths).locations(),
    )


@dataclass(frozen=True)
class Written:
    conf: bool
    reloadable: bool


def write(paths: Paths, files: model.DnsmasqFiles) -> Written:
    """Replace the files whose bytes differ; which kinds changed."""
    dp = DhcpPaths(paths)
    dp.dir.mkdir(parents=True, exist_ok=True, mode=0o755)
    dp.leases.parent.mkdir(parents=True, exist_ok=True)
    changed = {name: _replace(dp.file(name), data) for name, data in files.reloadable().items()}
    return Written(conf=_replace(dp.conf, files.conf), reloadable=any(changed.values()))


def _replace(path: Path, data: bytes) -> bool:
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        pass
    atomic.atomic_write(path, data, 0o644)
    return True


HOST_LINE = re.compile(r"(?P<mac>[0-9a-f:]{17}),(?:set:[^,]+,)?(?P<ip>\d+\.\d+\.\d+\.\d+),")


def hosts_of(data: bytes) -> set[tuple[str, IPv4Address]]:
    """The (MAC, IPv4) pairs a rendered hosts file holds."""
    out = set()
    for line in data.decode(errors="replace").splitlines():
        m = HOST_LINE.match(line)
        if m:
            out.add((m["mac"], IPv4Address(m["ip"])))
    return out


def released(old: bytes, new: bytes) -> set[tuple[str, IPv4Address]]:
    return hosts_of(old) - hosts_of(new)


HOST_IPV6 = re.compile(r",\[(?P<ip>[0-9a-fA-F:]+)\]")


def ipv6_of(data: bytes) -> set[IPv6Address]:
    """The IPv6 addresses a rendered hosts file hands out."""
    out = set()
    for line in data.decode(errors="replace").splitlines():
        for m in HOST_IPV6.finditer(line):
            with contextlib.suppress(ValueError):
                out.add(IPv6Address(m["ip"]))
    return out


def released6(old: bytes, new: bytes) -> set[IPv6Address]:
    return ipv6_of(old) - ipv6_of(new)


@dataclass(frozen=True)
class Lease6:
    """One DHCPv6 lease of dnsmasq's leases file: what ``dhcp_release6`` needs."""

    address: IPv6Address
    iaid: str
    client_duid: str


def leases6(text: str) -> tuple[str | None, list[Lease6]]:
    """(dnsmasq's server DUID, its DHCPv6 leases) from its leases file.

    After the ``duid <server-duid>`` line, a lease is
    ``<expiry> <iaid> <ipv6> <hostname|*> <client-duid>``; IPv4 leases come before it.
    """
    server: str | None = None
    out: list[Lease6] = []
    for line in text.splitlines():
        f = line.split()
        if len(f) == 2 and f[0] == "duid":
            server = f[1]
        elif server is not None and len(f) >= 5 and f[1].isdigit():
            with contextlib.suppress(ValueError):
                out.append(Lease6(IPv6Address(f[2]), f[1], f[4]))
    return server, out


def service_pid(paths: Paths) -> int | None:
    """The pid of this root's running ``vr serve-dhcp``, checked against its command
    line so that a stale pid file never signals another process."""
    try:
        pid = int(DhcpPaths(paths).service_pid.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    if b"serve-dhcp" in cmdline and str(paths.root).encode() in cmdline:
        return pid
    return None


def notify(paths: Paths) -> bool:
    """Ask the running service to reload (SIGHUP); False when none runs."""
    pid = service_pid(paths)
    if pid is None:
        return False
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        return False
    return True


def release(paths: Paths, cfg: Config, leases: set[tuple[str, IPv4Address]]) -> None:
    """Release the leases of hosts that are gone, on the device of their network."""
    nets = model.served_networks(cfg, store.read_networks(paths, removals=True))
    for mac, ip in sorted(leases, key=lambda x: x[1]):
        dev = next((n.device for n in nets if ip in n.cidr), None)
        if dev is None:
            continue
        try:
            subp.run([DHCP_RELEASE, dev, str(ip), mac], timeout=10)
            LOG.info("dhcp: released the lease of %s (%s) on %s", ip, mac, dev)
        except CommandError as exc:
            LOG.warning("dhcp: cannot release the lease of %s on %s: %s", ip, dev, exc)


def release6(paths: Paths, cfg: Config, addresses: set[IPv6Address]) -> None:
    """Release the DHCPv6 leases of ``addresses`` (hosts that are gone) with
    ``dhcp_release6``, from the lease's IAID and client DUID in the leases file."""
    try:
        server, leases = leases6(DhcpPaths(paths).leases.read_text(errors="replace"))
    except FileNotFoundError:
        return
    nets = model.served_networks(cfg, store.read_networks(paths, removals=True))
    for lease in leases:
        if lease.address not in addresses or server is None:
            continue
        dev = next((n.device for n in nets if n.cidr6 and lease.address in n.cidr6), None)
        if dev is None:
            continue
        argv = [
            DHCP_RELEASE6, "--ip", str(lease.address), "--iface", dev,
            "--server-id", server, "--client-id", lease.client_duid, "--iaid", lease.iaid,
        ]  # fmt: skip
        try:
            subp.run(argv, timeout=10)
            LOG.info("dhcp: released the DHCPv6 lease of %s on %s", lease.address, dev)
        except CommandError as exc:
            LOG.warning("dhcp: cannot release the lease of %s on %s: %s", lease.address, dev, exc)


def managed(paths: Paths) -> bool:
    return DhcpPaths(paths).dir.is_dir()


def refresh_locked(paths: Paths, cfg: Config, *, signal_service: bool = True) -> Written:
    """Render from the store, release removed hosts' leases, write, and HUP the
    service; the caller holds the store lock."""
    files = compute(paths, cfg)
    try:
        before = DhcpPaths(paths).file("hosts").read_bytes()
    except FileNotFoundError:
        before = b""
    gone = released(before, files.hosts)
    gone6 = released6(before, files.hosts)
    if signal_service and service_pid(paths) is not None:
        if gone:
            release(paths, cfg, gone)
        if gone6:
            release6(paths, cfg, gone6)
    written = write(paths, files)
    if signal_service and (written.conf or written.reloadable):
        notify(paths)
    return written


def refresh(paths: Paths) -> Written:
    """``refresh_locked`` taking the store lock and reading the config itself."""
    with Store(paths).locked():
        return refresh_locked(paths, config.load(paths))


@dataclass(frozen=True)
class DhcpHooks:
    """dnsmasq's part of a push (:class:`vr.applier.PushHooks`): after a commit that
    changed guest networks or DHCP entries, rewrite the files and HUP the service."""

    paths: Paths

    def before_commit(self, cfg: Config, payloads: Sequence[Payload]) -> None:
        return None

    def after_commit(self, cfg: Config, result: ApplyResult) -> None:
        if not (result.networks_changed or result.dhcp_changed):
            return
        if not cfg.dnsmasq or not managed(self.paths):
            return
        written = refresh_locked(self.paths, cfg)
        LOG.info(
            "dhcp: %s after push",
            "configuration rewritten, dnsmasq restarts"
            if written.conf
            else "hosts rewritten, dnsmasq reloaded"
            if written.reloadable
            else "no change",
        )
