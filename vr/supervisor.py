"""``vr up``: run the whole appliance in the foreground and keep it running.

Modelled on gunicorn's arbiter: signal handlers only record the signal; the main
loop acts on it. Start-up work (the firewall step) runs as a child the loop polls,
so a signal during start-up is acted on at once too. Each service is a child process
(``python -m vr <service>``) in its own process group, started with a parent-death
signal so that even a SIGKILLed supervisor leaves no orphans. A crashed child is
restarted with exponential backoff.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

from vr import atomic, subp
from vr.config import Config
from vr.errors import ConfigError, VRError
from vr.paths import Paths

LOG = logging.getLogger(__name__)

STOP_TIMEOUT = 4.0
BACKOFF_START = 0.5
BACKOFF_MAX = 30.0
STABLE_AFTER = 60.0
FIREWALL_TIMEOUT = 60.0

Spawn = Callable[[list[str]], "subprocess.Popen[bytes]"]
KillGroup = Callable[[int, int], None]


def _spawn_service(argv: list[str]) -> subprocess.Popen[bytes]:
    """A service in its own process group that gets SIGTERM if ``vr up`` dies."""
    return subp.spawn(argv, die_with_parent=True)


def _kill_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


@dataclass
class Service:
    name: str
    argv: list[str]
    port: int
    host: str = "127.0.0.1"
    """Where readiness is probed: the address the service binds (any -> loopback)."""
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    started: float = 0.0
    next_start: float = 0.0
    backoff: float = BACKOFF_START
    """The wait before the next restart: doubled after each exit up to
    :data:`BACKOFF_MAX`, back to :data:`BACKOFF_START` once a run lasted
    :data:`STABLE_AFTER` seconds."""

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def answers(self) -> bool:
        """Port 0: a service without a port (keepalived, the pair sync) answers while it runs."""
        return self.port == 0 or port_answers(self.port, self.host)

    def restart_delay(self, now: float) -> float:
        """The service exited at ``now``: how long to wait before starting it again."""
        if now - self.started >= STABLE_AFTER:
            self.backoff = BACKOFF_START
        delay = self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        return delay


def services_for(paths: Paths, cfg: Config) -> list[Service]:
    vr = [sys.executable, "-m", "vr"]
    root = ["--root", str(paths.root)]
    return [
        Service(
            "agent",
            [*vr, "agent", *root, "--listen", cfg.ssh_listen, "--port", str(cfg.ssh_port)],
            cfg.ssh_port,
            probe_address(cfg.ssh_listen),
        ),
        Service(
            "metadata",
            [
                *vr,
                "serve-metadata",
                *root,
                "--bind",
                f"0.0.0.0:{cfg.metadata_port}",
                "--workers",
                str(cfg.metadata_workers),
            ],
            cfg.metadata_port,
        ),
        Service(
            "passwords",
            [
                *vr,
                "serve-passwords",
                *root,
                "--bind",
                f"0.0.0.0:{cfg.password_port}",
                "--workers",
                str(cfg.password_workers),
            ],
            cfg.password_port,
        ),
        *pair_services(paths, cfg),
    ]


def pair_services(paths: Paths, cfg: Config) -> list[Service]:
    """A router of a redundant pair also runs keepalived and the pair sync (no port)."""
    if not cfg.pair_peer:
        return []
    from vr.pair.manager import keepalived_argv

    sync = [sys.executable, "-m", "vr", "pair", "run", "--root", str(paths.root)]
    return [Service("keepalived", keepalived_argv(paths), 0), Service("pair-sync", sync, 0)]


@contextlib.contextmanager
def single_instance(paths: Paths) -> Iterator[None]:
    """Hold ``run/vr/up.lock`` for the life of this ``vr up``; refuse a second one."""
    paths.run.mkdir(parents=True, exist_ok=True)
    lock = paths.up_lock
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise ConfigError(
                f"another vr up (pid {holder}) is running on root {paths.root}; "
                f"expected at most one per root"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)


def instance_running(paths: Paths) -> bool:
    """Whether a ``vr up`` holds this root's lock now (a status file outlives a killed one)."""
    try:
        fd = os.open(paths.up_lock, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return True
        raise
    finally:
        os.close(fd)
    return False


def probe_address(listen: str) -> str:
    """A bind address -> where to connect to check it answers."""
    return "127.0.0.1" if listen in ("", "0.0.0.0") else listen


def port_answers(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


@dataclass
class Supervisor:
    """``firewall``: the command of the start-up firewall step (None: no firewall).

    ``spawn`` and ``kill_group`` start a service and signal its process group; tests
    pass fakes to drive :meth:`step` with their own clock.
    """

    paths: Paths
    cfg: Config
    firewall: list[str] | None
    services: list[Service] = field(default_factory=list)
    spawn: Spawn = _spawn_service
    kill_group: KillGroup = _kill_group
    _signal: int | None = None
    _ready: bool = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit status.

        A signal during the firewall step stops that step and ends the run (0);
        a failed firewall step raises :class:`vr.errors.CommandError`.
        """
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        with single_instance(self.paths):
            if not self.services:
                self.services = services_for(self.paths, self.cfg)
            try:
                self._write_status()  # starting: every service down
                if self._firewall_step():
                    self._loop()
                else:
                    LOG.info("received signal %d during the firewall step, stopping", self._signal)
            finally:
                self._stop_all()
                self._write_status(stopped=True)
        LOG.info("vr up stopped")
        return 0

    def _firewall_step(self) -> bool:
        """Apply the firewall before any service starts; False if a signal came first.

        The step is ``vr firewall apply``: the rules recomputed from the config and
        the saved pushes (the store), the same desired state ``vr firewall restore``
        re-applies at boot, and also right when a push's firewall follow-up never ran.
        """
        if self.firewall is None:
            return self._signal is None
        res = subp.run_stoppable(
            self.firewall, stop=lambda: self._signal is not None, timeout=FIREWALL_TIMEOUT
        )
        if res is None:
            return False
        LOG.info("firewall applied from the config and the saved pushes")
        return self._signal is None

    def _loop(self) -> None:
        while self._signal is None:
            changed = self.step(time.monotonic())
            if changed:
                self._write_status()
            time.sleep(0.1)
        LOG.info("received signal %d, stopping", self._signal)

    def step(self, now: float) -> bool:
        """Check every service once at time ``now``: restart what is due; whether
        anything changed (the status file is then rewritten)."""
        changed = False
        for svc in self.services:
            changed |= self._check(svc, now)
        if not self._ready and all(s.pid is not None and s.answers() for s in self.services):
            self._ready = True
            changed = True
            LOG.info(
                "ready: %s",
                ", ".join(f"{s.name} on port {s.port} (pid {s.pid})" for s in self.services),
            )
        return changed

    def _check(self, svc: Service, now: float) -> bool:
        if svc.proc is not None:
            code = svc.proc.poll()
            if code is None:
                return False
            delay = svc.restart_delay(now)
            LOG.error(
                "service %s (pid %d) exited with %s; restarting in %.1fs",
                svc.name,
                svc.proc.pid,
                code,
                delay,
            )
            # Its workers (same process group) may outlive it and keep the port:
            # remove them so the restarted service can bind at once.
            self.kill_group(svc.proc.pid, signal.SIGKILL)
            svc.proc = None
            svc.next_start = now + delay
            svc.restarts += 1
            self._ready = False
            return True
        if now < svc.next_start:
            return False
        svc.proc = self.spawn(svc.argv)
        svc.started = now
        LOG.info("started service %s (pid %d)", svc.name, svc.proc.pid)
        return True

    def _stop_all(self) -> None:
        running = [s for s in self.services if s.proc is not None and s.proc.poll() is None]
        for svc in running:
            assert svc.proc is not None
            self.kill_group(svc.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for svc in running:
            assert svc.proc is not None
            try:
                svc.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                LOG.warning("service %s (pid %d) ignored SIGTERM; killing", svc.name, svc.proc.pid)
                self.kill_group(svc.proc.pid, signal.SIGKILL)
                svc.proc.wait()
            # gunicorn workers share the arbiter's group: make sure none is left behind
            self.kill_group(svc.proc.pid, signal.SIGKILL)
            LOG.info("stopped service %s", svc.name)

    def _write_status(self, stopped: bool = False) -> None:
        status = {
            "pid": os.getpid(),
            "ready": self._ready and not stopped,
            "stopped": stopped,
            "time": time.time(),
            "services": {
                s.name: {
                    "pid": None if stopped else s.pid,
                    "up": (not stopped) and s.pid is not None and s.answers(),
                    "host": s.host,
                    "port": s.port,
                    "restarts": s.restarts,
                }
                for s in self.services
            },
        }
        try:
            atomic.atomic_write(self.status_file(self.paths), json.dumps(status).encode())
        except (OSError, VRError) as exc:
            LOG.warning("cannot write %s: %s", self.status_file(self.paths), exc)

    @staticmethod
    def status_file(paths: Paths) -> Path:
        return paths.run / "status.json"
