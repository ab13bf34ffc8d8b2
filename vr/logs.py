"""Logging set-up for every vr process: stderr plus a bounded ``cloud.log``."""

from __future__ import annotations

import logging
import logging.handlers
import sys

from vr.paths import Paths

FORMAT = "%(asctime)s %(process)d %(name)s %(levelname)s %(message)s"
MAX_BYTES = 5 * 1024 * 1024
BACKUPS = 3


class _FileHandler(logging.handlers.RotatingFileHandler):
    """Drops a line it cannot write (disk full) instead of printing a traceback to
    stderr: the command's own one-line error is what the operator must see."""

    def handleError(self, record: logging.LogRecord) -> None:
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
            fh = _FileHandler(paths.log_file, maxBytes=MAX_BYTES, backupCount=BACKUPS)
        except OSError as exc:
            logging.getLogger(__name__).warning("cannot open %s: %s", paths.log_file, exc)
        else:
            fh.setFormatter(fmt)
            root.addHandler(fh)
    for noisy in ("paramiko.transport", "watchdog"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
