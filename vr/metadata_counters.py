"""Counters of the metadata service, one small JSON file per gunicorn worker.

Where: ``Paths.metadata_counters / <pid>.json`` (``<root>/run/vr/metadata/``), e.g.
``{"pid": 123, "forwarded_refused": 4, "updated": 1700000000.0}``. A worker
rewrites its file at most once per :data:`FLUSH_INTERVAL` seconds while a count
changes, and at exit, so counting costs requests nothing. ``serve-metadata`` clears
the folder when it starts, so :func:`totals` is "since the service started",
including workers that have since been replaced. ``vr status`` reads :func:`totals`.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import time

from vr import atomic
from vr.errors import StoreError
from vr.paths import Paths

LOG = logging.getLogger(__name__)

FLUSH_INTERVAL = 1.0
FIELDS = ("forwarded_refused",)


class Counters:
    """This worker's counts; :meth:`flush` writes them when due."""

    def __init__(self, paths: Paths, pid: int | None = None) -> None:
        self._dir = paths.metadata_counters
        self.pid = os.getpid() if pid is None else pid
        self.forwarded_refused = 0
        self.dirty = False
        self._last_write = 0.0
        self._atexit_registered = False

    def count_forwarded(self) -> None:
        self.forwarded_refused += 1
        self.dirty = True
        if not self._atexit_registered:
            atexit.register(self.flush, force=True)
            self._atexit_registered = True
        self.flush()

    def flush(self, force: bool = False) -> None:
        """Write the file if something changed and the last write is old enough."""
        if not self.dirty:
            return
        now = time.monotonic()
        if not force and now - self._last_write < FLUSH_INTERVAL:
            return
        self._last_write = now
        self.dirty = False
        doc = {"pid": self.pid, "forwarded_refused": self.forwarded_refused, "updated": time.time()}
        try:
            self._dir.mkdir(parents=True, exist_ok=True)
            atomic.atomic_write(self._dir / f"{self.pid}.json", json.dumps(doc).encode())
        except (OSError, StoreError) as exc:
            LOG.warning(
                "metadata counters of worker %s not written to %s: %s", self.pid, self._dir, exc
            )


def reset(paths: Paths) -> None:
    """Forget the counts of an earlier run (called once before workers start)."""
    d = paths.metadata_counters
    try:
        names = os.listdir(d)
    except FileNotFoundError:
        return
    for n in names:
        if n.endswith(".json"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(d / n)


def totals(paths: Paths) -> dict[str, int]:
    """Sum of every worker's counters since the service started."""
    out = dict.fromkeys(FIELDS, 0)
    try:
        names = sorted(os.listdir(paths.metadata_counters))
    except FileNotFoundError:
        return out
    for n in names:
        if not n.endswith(".json"):
            continue
        try:
            doc = json.loads((paths.metadata_counters / n).read_bytes())
        except (OSError, ValueError) as exc:
            LOG.warning(
                "skipping unreadable counters file %s: %s", paths.metadata_counters / n, exc
            )
            continue
        for f in FIELDS:
            value = doc.get(f) if isinstance(doc, dict) else None
            if isinstance(value, int):
                out[f] += value
    return out
