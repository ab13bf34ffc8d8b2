"""Exclusive ``flock`` on a lock file, waited for up to a deadline.

Used for the store's lock and for the xtables lock the iptables tools share.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import time
from collections.abc import Iterator
from pathlib import Path

from vr.errors import LockTimeout


@contextlib.contextmanager
def exclusive(path: Path, timeout: float, what: str, poll: float = 0.005) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (created 0600 if missing).

    Raises :class:`LockTimeout` naming ``what`` after ``timeout`` seconds, and
    ``OSError`` if the file cannot be opened. Not re-entrant within a process:
    each call opens its own file description, so a nested call waits for itself.
    """
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
                if time.monotonic() > deadline:
                    raise LockTimeout(f"{what} {path} still held after {timeout}s") from None
                time.sleep(poll)
        yield
    finally:
        os.close(fd)
