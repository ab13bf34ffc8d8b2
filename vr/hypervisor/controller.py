"""The flow controller of ``vr hypervisor``: follow the bridge's ports, keep the flows.

One loop, like the supervisor's: signal handlers only record the signal. The loop
wakes on every line of ``ovsdb-client monitor`` (a port plugged, unplugged, or given
a number or MAC) and at least every ``resync`` seconds, and then reconciles: read the
Interface table, compute the desired flows (:mod:`vr.hypervisor.flows`), write the
port table the services read, diff the switch's cookies against the desired ones and
apply the difference in one bundle. The periodic pass is what restores the flows
after ``ovs-vswitchd`` restarted (it comes back with an empty flow table) and
re-addresses the metadata port it recreated.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from vr import subp
from vr.errors import VRError
from vr.http.identity import NAT_NETWORK
from vr.hypervisor import flows, ports
from vr.hypervisor.ovs import Ovs
from vr.paths import Paths

LOG = logging.getLogger(__name__)

DEFAULT_META_PORT = "vr-meta"
DEFAULT_RESYNC = 1.0
DEFAULT_FULL_PASS = 30.0
MONITOR_RETRY = 1.0


def ports_file(paths: Paths) -> Path:
    """The port table the services read (written by the controller)."""
    return paths.run / "hypervisor" / "ports.json"


def configure_meta_address(name: str) -> None:
    """Give the metadata port 169.254.169.254/32 and route the NAT range through it."""
    subp.run(["ip", "link", "set", name, "up"])
    subp.run(["ip", "addr", "replace", f"{flows.METADATA_IP}/32", "dev", name])
    subp.run(
        ["ip", "route", "replace", str(NAT_NETWORK), "dev", name, "scope", "link"]
    )  # fmt: skip


def _ifindex(name: str) -> int | None:
    try:
        return socket.if_nametoindex(name)
    except OSError:
        return None


@dataclass
class Controller:
    ovs: Ovs
    paths: Paths
    meta_name: str = DEFAULT_META_PORT
    service_ports: tuple[int, ...] = (80, 8080)
    return_table: int = flows.DEFAULT_RETURN_TABLE
    resync: float = DEFAULT_RESYNC
    _signal: int | None = None
    _meta_ifindex: int | None = None
    _failing: bool = False
    _monitor: subprocess.Popen[bytes] | None = None
    _monitor_next: float = 0.0
    _expected: int | None = None
    """Our flow count after the last full pass (None: none done yet)."""
    full_every: float = DEFAULT_FULL_PASS
    applied: int = field(default=0)

    # --- one reconciliation ------------------------------------------------------

    def setup_meta(self, interfaces: list[ports.Interface] | None = None) -> flows.MetaPort | None:
        """Make sure the metadata port exists and holds its address; None until
        ovs-vswitchd gave it a number and a MAC. ``interfaces``: the bridge's rows
        when the caller has read them already."""
        rows = interfaces if interfaces is not None else self._interfaces()
        row = next((i for i in rows if i.name == self.meta_name), None)
        if row is None or row.ofport is None or row.ofport < 1 or not row.mac_in_use:
            return None
        meta = flows.MetaPort(row.ofport, row.mac_in_use)
        index = _ifindex(self.meta_name)
        if index is not None and index != self._meta_ifindex:
            configure_meta_address(self.meta_name)
            self._meta_ifindex = index
            LOG.info(
                "metadata port %s (ofport %s, %s) holds %s",
                self.meta_name,
                meta.ofport,
                meta.mac,
                flows.METADATA_IP,
            )
        return meta

    def _interfaces(self) -> list[ports.Interface]:
        """The bridge's Interface rows, the metadata port added first if missing."""
        rows = self.ovs.interfaces()
        if not any(i.name == self.meta_name for i in rows):
            self.ovs.ensure_meta_port(self.meta_name)
            rows = self.ovs.interfaces()
        return rows

    def sync(self) -> bool:
        """Reconcile once; whether the switch needed a change. Raises VRError."""
        interfaces = self._interfaces()
        meta = self.setup_meta(interfaces)
        if meta is None:
            self._expected = None
            return False
        vms = ports.vm_ports(interfaces, skip=self.meta_name)
        want = flows.desired(
            (p.vm_port for p in vms), meta, self.service_ports, self.return_table
        )  # fmt: skip
        table_changed = ports.write(ports_file(self.paths), vms)
        change = flows.diff(want, self.ovs.cookies())
        if change:
            self.ovs.apply(change)
            self.applied += 1
            LOG.info(
                "bridge %s: %d flows added, %d removed (%d VM ports)",
                self.ovs.bridge,
                len(change.add),
                len(change.delete),
                len(vms),
            )
        elif table_changed:
            LOG.info("bridge %s: %d VM ports", self.ovs.bridge, len(vms))
        self._expected = len(want)
        return bool(change)

    def in_step(self) -> bool:
        """The cheap check between full passes: our flow count on the bridge (a
        restarted ovs-vswitchd has none) and the metadata port's interface (it
        recreates it). Raises VRError."""
        if self._expected is None or _ifindex(self.meta_name) != self._meta_ifindex:
            return False
        return self.ovs.flow_count() == self._expected

    def _sync_logged(self, full: bool = True) -> None:
        try:
            if full or not self.in_step():
                self.sync()
        except VRError as exc:
            if not self._failing:
                LOG.warning("bridge %s: cannot reconcile (retrying): %s", self.ovs.bridge, exc)
            self._failing = True
            return
        if self._failing:
            LOG.info("bridge %s: reconciled again", self.ovs.bridge)
        self._failing = False

    # --- the loop ----------------------------------------------------------------

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum

    def run(self) -> int:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        sel = selectors.DefaultSelector()
        try:
            self._sync_logged()
            next_check = time.monotonic() + self.resync
            next_full = time.monotonic() + self.full_every
            while self._signal is None:
                self._keep_monitor(sel)
                woke = False
                for key, _ in sel.select(timeout=min(0.2, self.resync)):
                    woke |= self._drain(sel, key.fileobj)
                now = time.monotonic()
                if woke or now >= next_check:
                    full = woke or now >= next_full or self._failing
                    self._sync_logged(full)
                    next_check = time.monotonic() + self.resync
                    if full:
                        next_full = time.monotonic() + self.full_every
            LOG.info(
                "received signal %d, removing the flows of bridge %s", self._signal, self.ovs.bridge
            )
        finally:
            self._stop_monitor(sel)
            sel.close()
            with contextlib.suppress(VRError):
                self.ovs.delete_ours()
            ports_file(self.paths).unlink(missing_ok=True)
        return 0

    def _keep_monitor(self, sel: selectors.BaseSelector) -> None:
        if self._monitor is not None or time.monotonic() < self._monitor_next:
            return
        try:
            self._monitor = self.ovs.monitor()
        except VRError as exc:
            LOG.warning("cannot monitor OVSDB (retrying): %s", exc)
            self._monitor_next = time.monotonic() + MONITOR_RETRY
            return
        assert self._monitor.stdout is not None
        os.set_blocking(self._monitor.stdout.fileno(), False)
        sel.register(self._monitor.stdout, selectors.EVENT_READ)

    def _drain(self, sel: selectors.BaseSelector, stream: object) -> bool:
        """Read what the monitor printed; False (and the monitor restarted later) at EOF."""
        assert self._monitor is not None and self._monitor.stdout is not None
        try:
            data = os.read(self._monitor.stdout.fileno(), 65536)
        except BlockingIOError:
            return False
        if data:
            return True
        LOG.warning("OVSDB monitor ended (ovsdb-server restarted?); reconnecting")
        self._stop_monitor(sel)
        self._monitor_next = time.monotonic() + MONITOR_RETRY
        return True

    def _stop_monitor(self, sel: selectors.BaseSelector) -> None:
        proc, self._monitor = self._monitor, None
        if proc is None:
            return
        assert proc.stdout is not None
        with contextlib.suppress(KeyError, ValueError):
            sel.unregister(proc.stdout)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(2)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stdout.close()
