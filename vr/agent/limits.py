"""Bounds of the push agent, and the slow-down of repeated failed logins."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class AgentLimits:
    max_upload_bytes: int = 64 * 1024 * 1024
    """One uploaded file; a 5,000-VM batch with user-data fits comfortably."""
    max_sessions: int = 64
    """Connections at once from addresses that have logged in before (the management
    server) and connections that have logged in; more wait (see :class:`Admission`)."""
    max_unauthenticated: int = 32
    """Connections at once, not logged in yet, from all other addresses together."""
    max_unauthenticated_per_address: int = 16
    """Of those, from one address (like OpenSSH's MaxStartups, per source): one host
    cannot hold every place through the auth timeout."""
    max_waiting: int = 256
    """Accepted connections waiting for a place (no thread, no SSH banner yet), each
    at most ``auth_timeout``; beyond this a stranger's newcomer is closed."""
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


@dataclass(eq=False)
class Ticket:
    """One started connection's place in :class:`Admission`: which pool it counts in."""

    address: str
    known: bool
    """Counted among the ``max_sessions`` of known addresses (else among strangers)."""
    ended: bool = False


@dataclass(eq=False)
class _Waiting(Generic[T]):
    item: T
    address: str
    since: float


@dataclass
class Decisions(Generic[T]):
    """What the caller must do after asking :class:`Admission`: start these, close those."""

    start: list[tuple[T, Ticket]] = field(default_factory=list)
    close: list[tuple[T, str]] = field(default_factory=list)
    waiting: list[tuple[T, str]] = field(default_factory=list)
    """Connections that now wait for a place, with the reason (for the log)."""


class Admission(Generic[T]):
    """Which accepted connections may start their SSH handshake now; the rest wait.

    Addresses that have logged in with an authorized key (the management server after
    its first push; the last ``max_known`` such addresses) are *known*: up to
    ``max_sessions`` of their connections run at once, and strangers never take these
    places. Other addresses share ``max_unauthenticated`` places, at most
    ``max_unauthenticated_per_address`` each. A connection that finds no place waits
    (accepted, no thread, no SSH banner yet) at most ``max_wait`` seconds, then is
    closed. Known addresses go first; strangers take turns, the address with the
    fewest connections running first. At most ``max_waiting`` wait: when that is full,
    a newcomer from a known address, or from an address with fewer waiting than the
    address with the most, takes the place of that address's newest waiting one;
    otherwise the newcomer is closed. A connection that logs in moves into the known
    pool (which may then run over ``max_sessions`` by at most the strangers' places).

    Pure bookkeeping: the caller does the I/O, with the answers in :class:`Decisions`.
    """

    def __init__(
        self,
        limits: AgentLimits,
        clock: Callable[[], float] = time.monotonic,
        max_known: int = 64,
    ) -> None:
        self.limits = limits
        self.max_wait = limits.auth_timeout
        self.max_known = max_known
        self._clock = clock
        self._lock = threading.Lock()
        self._known: OrderedDict[str, None] = OrderedDict()
        self._known_running = 0
        self._strangers: dict[str, int] = {}
        self._waiting: list[_Waiting[T]] = []

    # --- questions ---------------------------------------------------------------------

    def is_known(self, address: str) -> bool:
        with self._lock:
            return address in self._known

    def running(self) -> tuple[int, int]:
        """(connections in the known pool, connections of strangers)."""
        with self._lock:
            return self._known_running, sum(self._strangers.values())

    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    # --- events ------------------------------------------------------------------------

    def arrive(self, item: T, address: str) -> Decisions[T]:
        """A connection was accepted from ``address``."""
        out: Decisions[T] = Decisions()
        with self._lock:
            ticket = self._try_start(address)
            if ticket is not None:
                out.start.append((item, ticket))
                return out
            reason = self._why_full(address)
            if len(self._waiting) >= self.limits.max_waiting and not self._evict_for(address, out):
                out.close.append(
                    (item, f"{reason} and {len(self._waiting)} connections already wait")
                )
                return out
            self._waiting.append(_Waiting(item, address, self._clock()))
            out.waiting.append((item, reason))
        return out

    def login(self, ticket: Ticket) -> Decisions[T]:
        """The connection of ``ticket`` authenticated with an authorized key."""
        with self._lock:
            self._known[ticket.address] = None
            self._known.move_to_end(ticket.address)
            while len(self._known) > self.max_known:
                self._known.popitem(last=False)
            if not ticket.ended and not ticket.known:
                self._release_stranger(ticket.address)
                ticket.known = True
                self._known_running += 1
            return self._schedule()

    def done(self, ticket: Ticket) -> Decisions[T]:
        """The connection of ``ticket`` ended (its place is free)."""
        with self._lock:
            if not ticket.ended:
                ticket.ended = True
                if ticket.known:
                    self._known_running -= 1
                else:
                    self._release_stranger(ticket.address)
            return self._schedule()

    def expire(self) -> Decisions[T]:
        """Close connections that waited longer than ``max_wait``."""
        out: Decisions[T] = Decisions()
        now = self._clock()
        with self._lock:
            keep = []
            for w in self._waiting:
                if now - w.since > self.max_wait:
                    out.close.append((w.item, f"waited {self.max_wait:.0f}s for a free place"))
                else:
                    keep.append(w)
            self._waiting = keep
        return out

    def drain(self) -> list[T]:
        """Every waiting connection, removed (the agent is stopping)."""
        with self._lock:
            items = [w.item for w in self._waiting]
            self._waiting = []
        return items

    # --- inside the lock ---------------------------------------------------------------

    def _try_start(self, address: str) -> Ticket | None:
        limits = self.limits
        if address in self._known:
            if self._known_running < limits.max_sessions:
                self._known_running += 1
                return Ticket(address, known=True)
            return None
        mine = self._strangers.get(address, 0)
        if (
            mine < limits.max_unauthenticated_per_address
            and sum(self._strangers.values()) < limits.max_unauthenticated
        ):
            self._strangers[address] = mine + 1
            return Ticket(address, known=False)
        return None

    def _why_full(self, address: str) -> str:
        limits = self.limits
        if address in self._known:
            return f"{self._known_running} sessions already open"
        mine = self._strangers.get(address, 0)
        if mine >= limits.max_unauthenticated_per_address:
            return f"{mine} connections from {address} not logged in yet"
        return f"{sum(self._strangers.values())} connections not logged in yet"

    def _release_stranger(self, address: str) -> None:
        left = self._strangers[address] - 1
        if left:
            self._strangers[address] = left
        else:
            del self._strangers[address]

    def _evict_for(self, address: str, out: Decisions[T]) -> bool:
        """Make room in the full waiting list for a newcomer from ``address``, if fair."""
        counts: dict[str, int] = {}
        for w in self._waiting:
            if w.address not in self._known:
                counts[w.address] = counts.get(w.address, 0) + 1
        if not counts:
            return False
        hoarder = max(counts, key=lambda a: counts[a])
        newcomer_known = address in self._known
        if not newcomer_known and counts[hoarder] <= counts.get(address, 0) + 1:
            return False
        for i in range(len(self._waiting) - 1, -1, -1):
            if self._waiting[i].address == hoarder:
                victim = self._waiting.pop(i)
                out.close.append(
                    (victim.item, f"its place in the wait went to a connection from {address}")
                )
                return True
        return False  # pragma: no cover - counts came from the list

    def _schedule(self) -> Decisions[T]:
        """Start waiting connections that now have a place: known first, then strangers
        with the fewest running, oldest first."""
        out: Decisions[T] = Decisions()
        while self._waiting:
            order = sorted(
                range(len(self._waiting)),
                key=lambda i: (
                    self._waiting[i].address not in self._known,
                    self._strangers.get(self._waiting[i].address, 0),
                    self._waiting[i].since,
                    i,
                ),
            )
            for i in order:
                ticket = self._try_start(self._waiting[i].address)
                if ticket is not None:
                    out.start.append((self._waiting.pop(i).item, ticket))
                    break
            else:
                break
        return out
