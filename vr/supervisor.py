"""``vr up``: run the whole appliance in the foreground and keep it running.

Modelled on gunicorn's arbiter: signal handlers only record the signal; the main
loop acts on it. Start-up work (the firewall step) runs as a child the loop polls,
so a signal during start-up is acted on at once too. Each service is a child process
(``python -m vr <service>``) in its own process group, started with a parent-death
signal so that even a SIGKILLed supervisor leaves no orphans. A crashed child is
restarted with exponential backoff.

Edits of ``vr.json`` and ``authorized_keys`` are noticed by a watchdog thread that
only records them (:class:`vr.ops.reconfig.Watcher`); the loop validates the new
configuration, keeps the running one if it is invalid, and otherwise restarts only
the services whose own settings changed and re-applies the firewall when its rules
do (:func:`vr.ops.reconfig.plan`).
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
from typing import Any

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
    reconfigured: int = 0
    """Restarts because its settings in ``vr.json`` changed (not counted in ``restarts``)."""
    down_since: float | None = None
    """Wall-clock time it stopped answering; None while it answers."""
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


def any_address() -> str:
    """Where the HTTP services listen: ``[::]`` (IPv4 and IPv6, IPv4 callers seen as
    mapped addresses) when this kernel has dual-stack IPv6, else ``0.0.0.0``."""
    try:
        dual = Path("/proc/sys/net/ipv6/bindv6only").read_text().strip() == "0"
    except OSError:
        dual = False
    return "[::]" if dual and socket.has_ipv6 else "0.0.0.0"


DNS_PORT = 53


def services_for(paths: Paths, cfg: Config) -> list[Service]:
    vr = [sys.executable, "-m", "vr"]
    root = ["--root", str(paths.root)]
    listen = any_address()
    dhcp = [Service("dhcp", [*vr, "serve-dhcp", *root], DNS_PORT)] if cfg.dnsmasq else []
    return [*_http_services(vr, root, cfg, listen), *dhcp, *pair_services(paths, cfg)]


def _http_services(vr: list[str], root: list[str], cfg: Config, listen: str) -> list[Service]:
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
                f"{listen}:{cfg.metadata_port}",
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
                f"{listen}:{cfg.password_port}",
                "--workers",
                str(cfg.password_workers),
            ],
            cfg.password_port,
        ),
        Service(
            "ops",
            [*vr, "serve-ops", *root, "--bind", f"0.0.0.0:{cfg.metrics_port}"],
            cfg.metrics_port,
        ),
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
    _watcher: Any = None
    _started: float = 0.0

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
            self._started = time.time()
            for svc in self.services:
                svc.down_since = self._started
            self._metrics_folder()
            try:
                self._write_status()  # starting: every service down
                if self._firewall_step():
                    self._watch()
                    self._loop()
                else:
                    LOG.info("received signal %d during the firewall step, stopping", self._signal)
            finally:
                if self._watcher is not None:
                    self._watcher.stop()
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

    def _metrics_folder(self) -> None:
        """Every service counts into this root's metrics folder, emptied now: the
        figures are "since this vr up started" (see :mod:`vr.ops.metrics`)."""
        from vr.ops import metrics

        self.paths.metrics.mkdir(parents=True, exist_ok=True)
        metrics.clean(self.paths.metrics)
        os.environ[metrics.ENV] = str(self.paths.metrics)

    def _watch(self) -> None:
        from vr.ops.reconfig import Watcher

        watcher = Watcher([self.paths.config, self.paths.authorized_keys])
        try:
            watcher.start()
        except OSError as exc:
            LOG.error("cannot watch %s: %s; edits need a restart", self.paths.etc, exc)
            return
        self._watcher = watcher

    def _loop(self) -> None:
        while self._signal is None:
            changed = self.step(time.monotonic())
            if self._watcher is not None:
                for path in self._watcher.due():
                    changed |= self._edited(path)
            if changed:
                self._write_status()
            time.sleep(0.1)
        LOG.info("received signal %d, stopping", self._signal)

    def _edited(self, path: Path) -> bool:
        """A watched file changed (and settled): act on it; whether services changed."""
        if path == self.paths.authorized_keys:
            self._keys_edited()
            return False
        return self.reconfigure()

    def _keys_edited(self) -> None:
        # The agent checks the file at every login; this line is the operator's record.
        from vr.agent.keys import parse_authorized_keys

        try:
            parsed = parse_authorized_keys(self.paths.authorized_keys.read_text("utf-8", "replace"))
        except FileNotFoundError:
            LOG.warning("%s removed: no key can log in", self.paths.authorized_keys)
            return
        except OSError as exc:
            LOG.error("cannot read %s: %s", self.paths.authorized_keys, exc.strerror)
            return
        LOG.info(
            "%s changed: %d keys may log in from the next login on%s",
            self.paths.authorized_keys,
            len(parsed.blobs),
            f" ({len(parsed.problems)} lines ignored)" if parsed.problems else "",
        )

    def reconfigure(self) -> bool:
        """Follow an edited ``vr.json``; an invalid one changes nothing. Whether any
        service was restarted."""
        from vr import config
        from vr.ops.reconfig import plan

        try:
            new = config.load(self.paths)
        except VRError as exc:
            LOG.error(
                "%s edit refused, the running configuration stays: %s", self.paths.config, exc
            )
            return False
        todo = plan(self.cfg, new, [s.name for s in self.services])
        if not todo.changed:
            return False
        LOG.info("%s changed (%s): %s", self.paths.config, ", ".join(todo.changed), todo.describe())
        if todo.firewall and self.firewall is not None:
            try:
                res = subp.run_stoppable(
                    self.firewall,
                    stop=lambda: self._signal is not None,
                    timeout=FIREWALL_TIMEOUT,
                    ok_codes=range(256),
                )
            except VRError as exc:
                LOG.error("firewall not re-applied: %s", exc)
                res = None
            if res is not None and res.code != 0:
                LOG.error("firewall not re-applied: %s", (res.stderr or res.stdout).strip())
            elif res is not None:
                LOG.info("firewall re-applied for the edited configuration")
        self.cfg = new
        fresh = {s.name: s for s in services_for(self.paths, new)}
        # The set of services itself may change (dnsmasq switched on or off, a pair
        # declared or dissolved): stop those the new settings do not run, add the new.
        gone = [s for s in self.services if s.name not in fresh]
        for svc in gone:
            LOG.info("stopping service %s: the new settings do not run it", svc.name)
            self._stop(svc)
        running = {s.name for s in self.services}
        added = [s for name, s in fresh.items() if name not in running]
        self.services = [s for s in self.services if s.name in fresh] + added
        for svc in added:
            LOG.info("starting service %s for the new settings", svc.name)
            svc.next_start = 0.0
            svc.down_since = time.time()
        for svc in self.services:
            if svc.name in todo.restart and svc.name in fresh:
                self._stop(svc)
                svc.argv, svc.port, svc.host = (
                    fresh[svc.name].argv,
                    fresh[svc.name].port,
                    fresh[svc.name].host,
                )
                svc.reconfigured += 1
                svc.next_start = 0.0
                svc.down_since = time.time()
                LOG.info("restarting service %s for its new settings", svc.name)
        if todo.restart or gone or added:
            self._ready = False
        return bool(todo.restart or gone or added)

    def step(self, now: float) -> bool:
        """Check every service once at time ``now``: restart what is due; whether
        anything changed (the status file is then rewritten)."""
        changed = False
        for svc in self.services:
            changed |= self._check(svc, now)
            if svc.down_since is not None and svc.pid is not None and svc.answers():
                svc.down_since = None
                changed = True
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
            svc.down_since = time.time()
            self._ready = False
            return True
        if now < svc.next_start:
            return False
        svc.proc = self.spawn(svc.argv)
        svc.started = now
        LOG.info("started service %s (pid %d)", svc.name, svc.proc.pid)
        return True

    def _stop(self, svc: Service) -> None:
        """Stop one service (SIGTERM, then SIGKILL after :data:`STOP_TIMEOUT`)."""
        if svc.proc is None:
            return
        if svc.proc.poll() is None:
            self.kill_group(svc.proc.pid, signal.SIGTERM)
            try:
                svc.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                LOG.warning("service %s (pid %d) ignored SIGTERM; killing", svc.name, svc.proc.pid)
                self.kill_group(svc.proc.pid, signal.SIGKILL)
                svc.proc.wait()
        self.kill_group(svc.proc.pid, signal.SIGKILL)
        LOG.info("stopped service %s", svc.name)
        svc.proc = None

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
            "started": self._started,
            "services": {
                s.name: {
                    "pid": None if stopped else s.pid,
                    "up": (not stopped) and s.pid is not None and s.answers(),
                    "host": s.host,
                    "port": s.port,
                    "restarts": s.restarts,
                    "reconfigured": s.reconfigured,
                    "down_since": s.down_since,
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
