"""Per-VM request rate limit of the metadata service, shared by every worker.

Azure's IMDS answers 429 when one VM asks too fast; so does this service. Each
calling VM (its IPv4 source address) has a token bucket: ``burst`` requests at once,
refilled at ``rate`` per second; a request finding the bucket empty gets 429 with
``Retry-After`` (whole seconds until a token is back) and is counted
(``vr_refused_total{reason="rate"}``).

Shared, not per worker: the buckets live in one file (``run/metadata-rate``, made
empty by ``serve-metadata`` before it forks) that every worker maps; a bucket is
updated under ``flock`` on the worker's own descriptor of that file (opened after
fork: flock is per open file), so N workers never grant a VM N times its rate. The
kernel drops a dead worker's lock; nothing can stay locked.

Safe against a boot storm: buckets are per VM, so a thousand VMs booting at once
each spend their own burst. The table is a fixed array of :data:`SLOTS` slots
(open addressing, :data:`PROBES` probes). A slot whose bucket would be full again
(idle for ``burst / rate`` seconds) is as good as empty and is reused; if every
slot of a probe window is busy, the longest-idle one is taken over — that VM starts
again with a full bucket: the limit errs towards serving, never refuses a VM for
another's requests. Time is ``CLOCK_MONOTONIC``, one clock for every process.
"""

from __future__ import annotations

import fcntl
import math
import mmap
import os
import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path

SLOTS = 65536
PROBES = 16
_SLOT = struct.Struct("=Idd")  # VM address (0: empty), tokens left, last update
SIZE = SLOTS * _SLOT.size


def create(path: Path) -> None:
    """An empty table at ``path`` (before the workers fork)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, SIZE)
    finally:
        os.close(fd)


class RateLimiter:
    """One worker's handle on the shared table at ``path`` (made by :func:`create`)."""

    def __init__(
        self,
        path: Path,
        rate: float,
        burst: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate {rate!r}/s, burst {burst!r}: expected both positive")
        self.rate = rate
        self.burst = float(burst)
        self._idle = burst / rate  # seconds after which a bucket is full again
        self._clock = clock
        self._fd = os.open(path, os.O_RDWR)
        if os.fstat(self._fd).st_size != SIZE:
            os.close(self._fd)
            raise ValueError(f"{path}: {SIZE} bytes expected: not a rate table")
        self._map = mmap.mmap(self._fd, SIZE)

    def close(self) -> None:
        self._map.close()
        os.close(self._fd)

    def take(self, address: int) -> float:
        """Spend one request of VM ``address`` (an IPv4 address as int, not 0):
        0.0 when allowed, else the seconds until one is allowed again."""
        now = self._clock()
        start = zlib.crc32(address.to_bytes(4, "big")) % SLOTS
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            mine = reuse = oldest = -1
            oldest_at = math.inf
            for i in range(PROBES):
                slot = (start + i) % SLOTS
                owner, tokens, at = _SLOT.unpack_from(self._map, slot * _SLOT.size)
                if owner == address:
                    mine = slot
                    break
                if reuse < 0 and (owner == 0 or now - at >= self._idle):
                    reuse = slot
                if at < oldest_at:
                    oldest, oldest_at = slot, at
            if mine < 0:
                mine = reuse if reuse >= 0 else oldest
                tokens, at = self.burst, now
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            wait = 0.0
            if tokens >= 1.0:
                tokens -= 1.0
            else:
                wait = (1.0 - tokens) / self.rate
            _SLOT.pack_into(self._map, mine * _SLOT.size, address, tokens, now)
            return wait
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)


def retry_after(wait: float) -> str:
    """``Retry-After`` in whole seconds, at least 1."""
    return str(max(1, math.ceil(wait)))
