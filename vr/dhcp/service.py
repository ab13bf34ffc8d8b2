"""``vr serve-dhcp``: dnsmasq for the guest networks, as one supervised service.

Renders the files from the config and the store, then runs dnsmasq in the
foreground as its child. SIGHUP (sent by a push, :func:`vr.dhcp.state.notify`):
when the main configuration changed (guest networks), dnsmasq is restarted;
otherwise the SIGHUP is passed on and dnsmasq re-reads hosts, options and names
without dropping a lease. When dnsmasq dies, this service exits non-zero and
``vr up`` restarts it with backoff; the leases file is kept.

Signal handlers only record the signal; the loop acts (as gunicorn's arbiter).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from ipaddress import IPv6Address
from types import FrameType

from vr import atomic, subp
from vr.dhcp import state
from vr.paths import Paths

LOG = logging.getLogger(__name__)

DNSMASQ = "/usr/sbin/dnsmasq"
LINK_LOCAL_METADATA = IPv6Address("fe80::a9fe:a9fe")
STALE_METADATA = IPv6Address("fd00:ec2::254")
STOP_TIMEOUT = 3.0

Spawn = Callable[[list[str]], "subprocess.Popen[bytes]"]


def _spawn(argv: list[str]) -> subprocess.Popen[bytes]:
    return subp.spawn(argv, new_session=False, die_with_parent=True)


def dnsmasq_argv(paths: Paths, binary: str = DNSMASQ) -> list[str]:
    return [
        binary,
        "--keep-in-foreground",
        f"--conf-file={state.DhcpPaths(paths).conf}",
        "--pid-file",  # no pid file: this service is the one that knows the pid
        "--log-facility=-",
    ]


@dataclass
class DhcpService:
    paths: Paths
    binary: str = DNSMASQ
    spawn: Spawn = _spawn
    poll: float = 0.05
    _signals: list[int] = field(default_factory=list)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals.append(signum)

    def run(self) -> int:
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        dp = state.DhcpPaths(self.paths)
        self._render()
        self._metadata_addresses()
        atomic.atomic_write(dp.service_pid, f"{os.getpid()}\n".encode())
        conf = dp.conf.read_bytes()
        proc = self._start()
        try:
            while True:
                while self._signals:
                    sig = self._signals.pop(0)
                    if sig != signal.SIGHUP:
                        LOG.info("dnsmasq service: signal %d, stopping", sig)
                        return 0
                    now = dp.conf.read_bytes()
                    if now != conf:
                        LOG.info("dnsmasq: guest networks changed, restarting it")
                        self._metadata_addresses()
                        self._stop(proc)
                        conf = now
                        proc = self._start()
                    else:
                        proc.send_signal(signal.SIGHUP)
                        LOG.debug("dnsmasq (pid %d): reloaded hosts", proc.pid)
                code = proc.poll()
                if code is not None:
                    LOG.error("dnsmasq (pid %d) exited with %s", proc.pid, code)
                    return 1
                time.sleep(self.poll)
        finally:
            self._stop(proc)
            with contextlib.suppress(OSError):
                dp.service_pid.unlink()

    def _metadata_addresses(self) -> None:
        """Give every IPv6 guest device the link-local fe80::a9fe:a9fe, so the router
        answers neighbour solicitations for it on that link (guests reach it on-link).

        The metadata and password services are reached by the ip6tables redirect
        (:func:`vr.firewall.model._redirects6`), which maps ports 80/8080 to the
        configured ports; fd00:ec2::254 is not on-link for a guest, which sends it to
        its default router (the RA of dnsmasq), as on AWS, so it is no address of
        ours: one left on a device by an older version is removed.
        """
        from vr import config, store
        from vr.dhcp import model
        from vr.errors import CommandError

        cfg = config.load(self.paths)
        for n in model.served_networks(cfg, store.read_networks(self.paths, removals=True)):
            if n.cidr6 is None:
                continue
            for argv, ok in (
                (["replace", f"{LINK_LOCAL_METADATA}/64", "dev", n.device, "nodad"], (0,)),
                # absent (exit code 2) is the usual case
                (["del", f"{STALE_METADATA}/128", "dev", n.device], (0, 2)),
            ):
                try:
                    subp.run(["ip", "-6", "addr", *argv], timeout=10, ok_codes=ok)
                except CommandError as exc:
                    LOG.warning("dhcp: ip -6 addr %s: %s", " ".join(argv), exc)

    def _render(self) -> None:
        # the directory appears with the first write: from then on pushes maintain it
        from vr import config
        from vr.store import Store

        with Store(self.paths).locked():
            state.write(self.paths, state.compute(self.paths, config.load(self.paths)))

    def _start(self) -> subprocess.Popen[bytes]:
        proc = self.spawn(dnsmasq_argv(self.paths, self.binary))
        LOG.info("dnsmasq started (pid %d)", proc.pid)
        return proc

    def _stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
