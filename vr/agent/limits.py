"""Bounds of the push agent, and the slow-down of repeated failed logins."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class AgentLimits:
    max_upload_bytes: int = 64 * 1024 * 1024
    """One uploaded file; a 5,000-VM batch with user-data fits comfortably."""
    max_sessions: int = 64
    """SSH connections at once; more are closed right after accept."""
    max_unauthenticated_per_address: int = 16
    """Connections from one address not yet logged in (like OpenSSH's MaxStartups, per
    source): one host cannot hold every session slot through the auth timeout."""
    max_channels: int = 16
    """Channels open at once on one connection."""
    idle_timeout: float = 300.0
    """A connection with no traffic and no command running is closed after this."""
    session_timeout: float = 1800.0
    """Any connection is closed after this (CloudStack's script timeout is 10 minutes)."""
    auth_timeout: float = 30.0
    """Time to authenticate after the key exchange."""
    stop_grace: float = 10.0
    """On SIGTERM, running applies get this long to finish before connections close."""


DEFAULT_AGENT_LIMITS = AgentLimits()


@dataclass
class _Failures:
    count: int
    last: float


class AuthThrottle:
    """Counts failed logins per source address and says how long to stall the next answer.

    The delay doubles with each failure inside ``window`` seconds (``base``, 2x, 4x,
    ... up to ``cap``) and resets on success or after a quiet ``window``. At most
    ``max_tracked`` addresses are remembered so a scan cannot grow memory.
    """

    def __init__(
        self,
        base: float = 0.5,
        cap: float = 8.0,
        window: float = 600.0,
        max_tracked: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = base
        self.cap = cap
        self.window = window
        self.max_tracked = max_tracked
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[str, _Failures] = {}

    def failure(self, address: str) -> tuple[int, float]:
        """Record a failure; return (failures in the window, seconds to stall)."""
        now = self._clock()
        with self._lock:
            entry = self._seen.get(address)
            if entry is None or now - entry.last > self.window:
                entry = _Failures(0, now)
                if len(self._seen) >= self.max_tracked:
                    self._forget_oldest()
                self._seen[address] = entry
            entry.count += 1
            entry.last = now
            count = entry.count
        delay = min(self.cap, self.base * 2 ** min(count - 1, 30))
        return count, delay

    def success(self, address: str) -> None:
        with self._lock:
            self._seen.pop(address, None)

    def failures(self, address: str) -> int:
        with self._lock:
            entry = self._seen.get(address)
            if entry is None or self._clock() - entry.last > self.window:
                return 0
            return entry.count

    def _forget_oldest(self) -> None:
        oldest = min(self._seen, key=lambda a: self._seen[a].last)
        del self._seen[oldest]


class PreAuthSlot:
    """One connection's place in :class:`PreAuthSlots`; released once, at login or close."""

    def __init__(self, owner: PreAuthSlots, address: str) -> None:
        self._owner = owner
        self.address = address
        self._held = True

    def release(self) -> None:
        with self._owner._lock:
            if not self._held:
                return
            self._held = False
            left = self._owner._count[self.address] - 1
            if left:
                self._owner._count[self.address] = left
            else:
                del self._owner._count[self.address]


class PreAuthSlots:
    """Counts connections per source address that have not authenticated yet."""

    def __init__(self, per_address: int) -> None:
        self.per_address = per_address
        self._lock = threading.Lock()
        self._count: dict[str, int] = {}

    def take(self, address: str) -> PreAuthSlot | None:
        """A slot for a new connection from ``address``, or None if it has too many."""
        with self._lock:
            n = self._count.get(address, 0)
            if n >= self.per_address:
                return None
            self._count[address] = n + 1
        return PreAuthSlot(self, address)

    def waiting(self, address: str) -> int:
        with self._lock:
            return self._count.get(address, 0)
