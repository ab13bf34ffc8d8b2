"""Logging set-up for every vr process: stderr, a bounded ``cloud.log`` and ``audit.log``.

Two kinds of line must not share one fate. Audit lines (a push applied, a password
served, acknowledged or saved) are marked with ``extra=AUDIT``; they go to
``cloud.log`` like every line and also to ``audit.log``, which nothing else reaches,
so a guest that makes the services log (bad requests, errors) can rotate
``cloud.log`` but never an audit line away. Errors a guest can cause are logged
through :class:`GuestErrors`: one line per source address per minute, never a
traceback.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import logging.handlers
import os
import sys
import time
from collections.abc import Callable, Iterator

from vr.paths import Paths

FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 3
AUDIT: dict[str, object] = {"audit": True}
"""``extra`` of a log call that writes an audit line (read-only: never modify)."""
GUEST_INTERVAL = 60.0
GUEST_ADDRESSES = 4096


def is_audit(record: logging.LogRecord) -> bool:
    """The filter of ``audit.log``: only lines logged with ``extra=AUDIT``."""
    return getattr(record, "audit", False) is True


class Throttle:
    """At most one event per key (a source address, a VM) per ``interval`` seconds
    (in this process). At most ``keys`` keys are remembered; past that, those quiet
    for ``interval`` are forgotten."""

    def __init__(
        self,
        interval: float = GUEST_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        keys: int = GUEST_ADDRESSES,
    ) -> None:
        self.interval = interval
        self.clock = clock
        self.keys = keys
        self._seen: dict[str, tuple[float, int]] = {}

    def allow(self, key: str) -> int | None:
        """None if ``key`` had its event in this interval (it is counted), else the
        number of events held back since its last one."""
        now = self.clock()
        last = self._seen.get(key)
        if last is not None and now - last[0] < self.interval:
            self._seen[key] = (last[0], last[1] + 1)
            return None
        if last is None and len(self._seen) >= self.keys:
            self._seen = {k: v for k, v in self._seen.items() if now - v[0] < self.interval}
            if len(self._seen) >= self.keys:
                self._seen.clear()
        self._seen[key] = (now, 0)
        return last[1] if last is not None else 0

    def held(self, count: int) -> str:
        """The tail of a line that follows ``count`` held-back ones."""
        return f"; {count} more in the last {self.interval:.0f} s not logged" if count else ""


class GuestErrors:
    """Logs errors that a guest's request can cause: at most one line per source
    address per ``interval`` seconds (:class:`Throttle`), counting the lines it held
    back in the next one, and never a traceback (only the exception's type), so a
    guest's flood cannot fill or rotate the log."""

    def __init__(
        self,
        logger: logging.Logger,
        interval: float = GUEST_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        addresses: int = GUEST_ADDRESSES,
    ) -> None:
        self.logger = logger
        self.throttle = Throttle(interval, clock, addresses)

    def error(
        self,
        addr: str,
        what: str,
        exc: BaseException | None = None,
        outcome: str = "failed",
    ) -> None:
        """``what`` from the guest at ``addr`` ended in ``outcome`` (with ``exc``)."""
        held = self.throttle.allow(addr)
        if held is None:
            return
        self.logger.warning(
            "%s from %s %s%s%s",
            what,
            addr,
            outcome,
            f" ({type(exc).__name__})" if exc is not None else "",
            self.throttle.held(held),
        )


class SharedRotatingFileHandler(logging.handlers.RotatingFileHandler):
    """A size-rotated log that several processes (gunicorn workers) write together.

    The stock handler rotates per process: after one worker renames the file, the
    others keep writing into the renamed copy and then rotate again themselves,
    scattering lines and deleting files still being written. Here each emit first
    follows the file name (reopens when another process rotated), and a rotation
    happens under an ``flock`` and only if nobody rotated meanwhile.
    """

    def _replaced(self) -> bool:
        if self.stream is None:
            return False
        try:
            st = os.stat(self.baseFilename)
        except FileNotFoundError:
            return True
        mine = os.fstat(self.stream.fileno())
        return (mine.st_ino, mine.st_dev) != (st.st_ino, st.st_dev)

    def _reopen(self) -> None:
        if self.stream is not None:
            self.stream.close()
        self.stream = self._open()

    def shouldRollover(self, record: logging.LogRecord) -> bool:
        if self._replaced():
            self._reopen()
        return bool(super().shouldRollover(record))

    @contextlib.contextmanager
    def _rotation_lock(self) -> Iterator[None]:
        fd = os.open(self.baseFilename + ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def doRollover(self) -> None:
        with self._rotation_lock():
            if self._replaced():
                self._reopen()  # another process rotated while we waited
                return
            super().doRollover()

    def handleError(self, record: logging.LogRecord) -> None:
        """Drop a line that cannot be written (disk full) instead of printing a
        traceback to stderr: the command's own one-line error is what must be seen."""
        if isinstance(sys.exc_info()[1], OSError):
            return
        super().handleError(record)


def setup(paths: Paths | None, verbose: bool = False, stderr: bool = True) -> None:
    """Log to stderr and, when ``paths`` is given, to ``<root>/var/log/cloud.log``
    and (audit lines only) ``<root>/var/log/audit.log``.

    Each file rotates at 5 MiB keeping 3 old files, so it stays bounded.
    """
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    fmt = logging.Formatter(FORMAT)
    if stderr:
        h = logging.StreamHandler(sys.stderr)
        h.setFormatter(fmt)
        root.addHandler(h)
    if paths is not None:
        try:
            paths.log_file.parent.mkdir(parents=True, exist_ok=True)
            fh = SharedRotatingFileHandler(paths.log_file, maxBytes=MAX_BYTES, backupCount=BACKUPS)
        except OSError as exc:
            logging.getLogger(__name__).warning("cannot open %s: %s", paths.log_file, exc)
        else:
            fh.setFormatter(fmt)
            root.addHandler(fh)
        try:
            ah = SharedRotatingFileHandler(paths.audit_log, maxBytes=MAX_BYTES, backupCount=BACKUPS)
        except OSError as exc:
            logging.getLogger(__name__).warning("cannot open %s: %s", paths.audit_log, exc)
        else:
            ah.setFormatter(fmt)
            ah.addFilter(is_audit)
            root.addHandler(ah)
    for noisy in ("watchdog",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # paramiko logs a traceback at ERROR for every connection that closes before the
    # SSH banner (port probes, scanners); the agent logs one line for those itself.
    logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)
