"""RefusalCounters of the metadata service (and of the password service, in its own
folder), one small JSON file per gunicorn worker.

Where: ``Paths.metadata_counters / <pid>.json`` (``<root>/run/vr/metadata/``), e.g.
``{"pid": 123, "forwarded_refused": 4, "updated": 1700000000.0}``. A worker
rewrites its file at most once per :data:`FLUSH_INTERVAL` seconds while a count
changes, and at exit, so counting costs requests nothing. A count that comes
within the interval of the last write is written by a timer when the interval
ends, so ``vr status`` lags by at most :data:`FLUSH_INTERVAL` even if no other
request follows. ``serve-metadata`` clears the folder when it starts, so
:func:`totals` is "since the service started", including workers that have since
been replaced. ``vr status`` reads :func:`totals`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from vr import atomic
from vr.errors import StoreError
from vr.paths import Paths

LOG = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0
FIELDS = ("forwarded_refused",)


class Timer(Protocol):
    def cancel(self) -> None: ...


TimerFactory = Callable[[float, Callable[[], None]], Timer]
"""``start(delay, fn)``: call ``fn`` once after ``delay`` seconds unless cancelled."""


def thread_timer(delay: float, fn: Callable[[], None]) -> Timer:
    """A daemon :class:`threading.Timer`, started (a worker exits without waiting
    for it; the exit flush writes what it would have)."""
    t = threading.Timer(delay, fn)
    t.daemon = True
    t.start()
    return t


class RefusalCounters:
    """This worker's counts; :meth:`flush` writes them when due.

    Create after fork (one per worker). ``start_timer`` arms the delayed write
    (tests pass a fake); ``clock`` is :func:`time.monotonic` unless given;
    ``folder`` is :attr:`Paths.metadata_counters` unless given.
    """

    def __init__(
        self,
        paths: Paths,
        pid: int | None = None,
        start_timer: TimerFactory = thread_timer,
        clock: Callable[[], float] = time.monotonic,
        folder: Path | None = None,
    ) -> None:
        self._dir = paths.metadata_counters if folder is None else folder
        self.pid = os.getpid() if pid is None else pid
        self.forwarded_refused = 0
        self.dirty = False
        self._last_write: float | None = None
        self._atexit_registered = False
        self._start_timer = start_timer
        self._clock = clock
        self._timer: Timer | None = None
        # The timer's thread and the request path both flush.
        self._lock = threading.Lock()

    def count_forwarded(self) -> None:
        """Count one refused forwarded request: written now if the last write is
        :data:`FLUSH_INTERVAL` old (or there was none), else when the interval ends."""
        with self._lock:
            self.forwarded_refused += 1
            self.dirty = True
            if not self._atexit_registered:
                atexit.register(self.flush, force=True)
                self._atexit_registered = True
            if self._write_if_due(False) or self._timer is not None:
                return
            assert self._last_write is not None  # not due: there was a write
            delay = max(0.0, self._last_write + FLUSH_INTERVAL - self._clock())
            self._timer = self._start_timer(delay, self._on_timer)

    def _on_timer(self) -> None:
        with self._lock:
            self._timer = None
            self._write_if_due(True)

    def flush(self, force: bool = False) -> None:
        """Write the file if something changed and the last write is old enough."""
        if not self.dirty:
            return
        with self._lock:
            self._write_if_due(force)

    def _write_if_due(self, force: bool) -> bool:
        """(Lock held.) Write if dirty and due; True if nothing is left unwritten."""
        if not self.dirty:
            return True
        now = self._clock()
        if not force and self._last_write is not None and now - self._last_write < FLUSH_INTERVAL:
            return False
        self._last_write = now
        self.dirty = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._write()
        return True

    def _write(self) -> None:
        doc = {"pid": self.pid, "forwarded_refused": self.forwarded_refused, "updated": time.time()}
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            atomic.atomic_write(self._dir / f"{self.pid}.json", json.dumps(doc).encode())
        except (OSError, StoreError) as exc:
            LOG.warning("counters of worker %s not written to %s: %s", self.pid, self._dir, exc)


def reset(paths: Paths, folder: Path | None = None) -> None:
    """Forget the counts of an earlier run (called once before workers start)."""
    d = paths.metadata_counters if folder is None else folder
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for n in names:
        if n.endswith(".json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / n)


def totals(paths: Paths, folder: Path | None = None) -> dict[str, int]:
    """Sum of every worker's counters since the service started."""
    d = paths.metadata_counters if folder is None else folder
    out = dict.fromkeys(FIELDS, 0)
    try:
        names = sorted(os.listdir(d))
    except FileNotFoundError:
        return out
    for n in names:
        if not n.endswith(".json"):
            continue
        try:
            doc = json.loads((d / n).read_bytes())
        except (OSError, ValueError) as exc:
            LOG.warning("skipping unreadable counters file %s: %s", d / n, exc)
            continue
        for f in FIELDS:
            value = doc.get(f) if isinstance(doc, dict) else None
            if isinstance(value, int):
                out[f] += value
    return out
