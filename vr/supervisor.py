"""``vr up``: run the whole appliance in the foreground and keep it running.

Modelled on gunicorn's arbiter: signal handlers only record the signal; the main
loop acts on it. Each service is a child process (``python -m vr <service>``) in its
own process group, started with a parent-death signal so that even a SIGKILLed
supervisor leaves no orphans. A crashed child is restarted with exponential backoff.
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

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc and self.proc.poll() is None else None


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
    ]


@contextlib.contextmanager
def single_instance(paths: Paths) -> Iterator[None]:
    """Hold ``run/vr/up.lock`` for the life of this ``vr up``; refuse a second one."""
    paths.run.mkdir(parents=True, exist_ok=True)
    lock = paths.run / "up.lock"
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
    paths: Paths
    cfg: Config
    firewall: Callable[[], None] | None
    services: list[Service] = field(default_factory=list)
    _signal: int | None = None
    _ready: bool = False

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum

    def run(self) -> int:
        """Run until SIGTERM/SIGINT; return the exit status."""
        for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(s, self._on_signal)
        with single_instance(self.paths):
            if self.firewall is not None:
                self.firewall()
                LOG.info("firewall applied")
            if not self.services:
                self.services = services_for(self.paths, self.cfg)
            try:
                self._loop()
            finally:
                self._stop_all()
                self._write_status(stopped=True)
        LOG.info("vr up stopped")
        return 0

    def _loop(self) -> None:
        while self._signal is None:
            now = time.monotonic()
            changed = False
            for svc in self.services:
                changed |= self._check(svc, now)
            if not self._ready and all(
                s.pid is not None and port_answers(s.port, s.host) for s in self.services
            ):
                self._ready = True
                changed = True
                LOG.info(
                    "ready: %s",
                    ", ".join(f"{s.name} on port {s.port} (pid {s.pid})" for s in self.services),
                )
            if changed:
                self._write_status()
            time.sleep(0.1)
        LOG.info("received signal %d, stopping", self._signal)

    def _check(self, svc: Service, now: float) -> bool:
        if svc.proc is not None:
            code = svc.proc.poll()
            if code is None:
                if now - svc.started > STABLE_AFTER:
                    svc.backoff = BACKOFF_START
                return False
            LOG.error(
                "service %s (pid %d) exited with %s; restarting in %.1fs",
                svc.name,
                svc.proc.pid,
                code,
                svc.backoff,
            )
            # Its workers (same process group) may outlive it and keep the port:
            # remove them so the restarted service can bind at once.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(svc.proc.pid, signal.SIGKILL)
            svc.proc = None
            svc.next_start = now + svc.backoff
            svc.backoff = min(svc.backoff * 2, BACKOFF_MAX)
            svc.restarts += 1
            self._ready = False
            return True
        if now < svc.next_start:
            return False
        svc.proc = subp.spawn(svc.argv, die_with_parent=True)
        svc.started = now
        LOG.info("started service %s (pid %d)", svc.name, svc.proc.pid)
        return True

    def _stop_all(self) -> None:
        running = [s for s in self.services if s.proc is not None and s.proc.poll() is None]
        for svc in running:
            assert svc.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(svc.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for svc in running:
            assert svc.proc is not None
            try:
                svc.proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                LOG.warning("service %s (pid %d) ignored SIGTERM; killing", svc.name, svc.proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(svc.proc.pid, signal.SIGKILL)
                svc.proc.wait()
            # gunicorn workers share the arbiter's group: make sure none is left behind
            with contextlib.suppress(ProcessLookupError):
                os.killpg(svc.proc.pid, signal.SIGKILL)
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
                    "up": (not stopped) and s.pid is not None and port_answers(s.port, s.host),
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
