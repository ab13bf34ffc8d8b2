"""Logging set-up for every vr process: stderr plus a bounded ``cloud.log``."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import logging.handlers
import os
import sys
from collections.abc import Iterator

from vr.paths import Paths

FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 3


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
    """Log to stderr and, when ``paths`` is given, to ``<root>/var/log/cloud.log``.

    The file rotates at 5 MiB keeping 3 old files, so it stays bounded.
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
    for noisy in ("watchdog",):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # paramiko logs a traceback at ERROR for every connection that closes before the
    # SSH banner (port probes, scanners); the agent logs one line for those itself.
    logging.getLogger("paramiko.transport").setLevel(logging.CRITICAL)
