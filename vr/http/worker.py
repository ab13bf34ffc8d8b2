"""A single-threaded event-loop gunicorn worker for the metadata and password services.

Why: a guest's boot is a dozen tiny GETs, and hundreds of guests boot at once. With
gunicorn's threaded worker most of the time per request goes to handing the socket
between the poller thread and a pool thread and to its general-purpose HTTP parser,
not to the application. This worker keeps every connection in one ``selectors``
loop, parses requests with llhttp (:mod:`vr.http.parser`) and calls the WSGI application
directly. Everything else stays gunicorn's: the arbiter, worker supervision,
heartbeat, signals and graceful stop.

What a client cannot do to a worker (each a constant or setting below):

* grow its memory: a connection buffers at most one request (:data:`BUF_LIMIT`) and
  one reply; while a reply is pending nothing is read, so TCP pushes back on a
  client that sends without reading;
* pin kernel memory: the bytes one source address has in this worker's kernel send
  queues (sent to the kernel, not yet acknowledged by the client) are at most
  :data:`UNSENT_PER_ADDRESS`, and one connection's at most about twice
  :data:`SNDBUF`. A connection whose address is over that budget waits (its reply is
  not dropped) until the address's clients read; if they never do, the reply is
  dropped after ``timeout`` as any unread reply, and the connection reset so the
  kernel frees its queue at once;
* pin connections: a new or idle connection closes after ``keepalive`` seconds, a
  begun request must be complete within :data:`REQUEST_TIME`, a reply nobody reads
  is dropped after ``timeout``;
* lock others out: one address holds at most ``vr_connections_per_address``
  (:data:`PER_ADDRESS`) connections per worker, and at ``worker_connections`` the
  oldest idle connection makes room for a new one (a connection whose request has
  arrived but is not read yet is not idle: it is served, never closed unanswered).

A client that half-closes still gets every answer it asked for; ``Expect:
100-continue`` is honoured; error replies are followed by a lingering close so a
client still sending reads them.

:class:`EventLoop` is the loop itself and knows nothing of gunicorn (tests run it
in-process against a loopback listener); :class:`EventWorker` is the gunicorn
worker that runs it. Use it with ``worker_class="vr.http.worker.EventWorker"``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import selectors
import socket
import struct
import sys
import termios
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gunicorn.config import Setting, validate_pos_int
from gunicorn.workers.base import Worker

from vr.http.parser import (
    CONTINUE,
    CONTINUE_RESPONSE,
    MAX_BODY,
    MAX_HEAD,
    REASONS,
    BadRequest,
    Date,
    HttpRequest,
    RequestParser,
    build_environ,
    render_response,
)
from vr.http.wsgi import WSGIApp
from vr.logs import GuestErrors

LOG = logging.getLogger(__name__)

PARK = "vr.park"
"""environ key of the callable that holds a request (vr.metadata.changes)."""
HELD = "vr.held"
"""environ key: true when the application's last call parked the request (its empty
answer is not one: vr.ops.metrics does not count it)."""

RECV_SIZE = 65536
ACCEPT_BATCH = 64
# The largest request the parser accepts: a connection's input buffer never holds
# more (it stops reading at this size), so a client cannot grow a worker's memory.
BUF_LIMIT = MAX_HEAD + 4 + MAX_BODY
# A request that has begun (its first byte arrived) must be complete within this, at
# most: a client trickling a head byte by byte cannot pin a connection (slowloris).
REQUEST_TIME = 10.0
# Connections one source address (one VM) may hold open in one worker: one guest's
# idle connections cannot fill the worker and lock other guests out.
PER_ADDRESS = 64
# After an error reply the client may still be sending; its bytes are read and
# dropped for this long (at most LINGER_BYTES) so that closing with unread input
# does not send a reset that destroys the reply in flight.
LINGER_TIME = 2.0
LINGER_BYTES = 1 << 20
# The kernel send buffer of one connection (the kernel doubles it for its own
# bookkeeping): a client that does not read holds no more than that of it.
SNDBUF = 64 * 1024
# The bytes one source address (one VM) may have in this worker's kernel send queues
# across its connections: a guest opening many connections and reading none of its
# answers pins no more kernel memory than this (per worker).
UNSENT_PER_ADDRESS = 1 << 20
# While connections wait for their address's budget, it is checked this often.
PARKED_POLL = 0.05


class ConnectionsPerAddress(Setting):  # type: ignore[misc]
    """gunicorn setting ``vr_connections_per_address`` (registered on import)."""

    name = "vr_connections_per_address"
    section = "Worker Processes"
    cli = None
    validator = validate_pos_int
    type = int
    default = PER_ADDRESS
    desc = """\
        The most connections one client address may hold open in one worker
        (vr.http.worker.EventWorker only). Above it the client's oldest idle
        connection is closed, or the new one refused with 503.
        """


@dataclass(frozen=True)
class WorkerLimits:
    """How long and how many, per worker."""

    keepalive: float  # an idle connection (also a new one before its first byte) closes then
    request_time: float  # a request that has begun must be complete within this
    timeout: float  # a response the client does not read for this long is dropped
    connections: int  # open connections at most; at the limit the oldest idle one goes
    per_address: int  # open connections from one source address (one VM) at most
    graceful: float  # on stop, pending responses get this long to finish
    linger: float = LINGER_TIME  # after an error reply, extra client bytes are drained this long
    unsent: int = UNSENT_PER_ADDRESS  # kernel send-queue bytes of one address at most

    @classmethod
    def from_cfg(cls, cfg: Any) -> WorkerLimits:
        """From gunicorn's settings: ``keepalive``, ``timeout``, ``worker_connections``,
        ``graceful_timeout`` and ``vr_connections_per_address``."""
        return cls(
            # keepalive 0 (gunicorn: "off") must not close a new connection at once.
            keepalive=max(float(cfg.keepalive), 1.0),
            request_time=min(float(cfg.timeout), REQUEST_TIME),
            timeout=float(cfg.timeout),
            connections=int(cfg.worker_connections),
            per_address=_per_address(cfg),
            graceful=float(cfg.graceful_timeout),
        )


def _per_address(cfg: Any) -> int:
    # The setting exists once this module is imported before gunicorn builds its
    # config (vr.http.runner does); a plain gunicorn run gets the default.
    setting = cfg.settings.get(ConnectionsPerAddress.name)
    return PER_ADDRESS if setting is None else int(setting.get())


_READ = selectors.EVENT_READ
_WRITE = selectors.EVENT_WRITE


class _Conn:
    """One client connection. At any time it is in one of these states:

    * reading: no reply pending; registered for reading. ``started`` says whether a
      request has begun (bytes in ``buf``) — else the connection is idle;
    * writing: a reply (``out`` from offset ``sent``) pending; registered for writing
      only, nothing is read, so a client that does not read is pushed back by TCP;
    * lingering: the last reply went out, our side is shut down; the client's
      remaining bytes are read and dropped until it closes or ``deadline``;
    * parked: writing, but its address is over its send-queue budget; not
      registered at all until the budget has room (``parked`` is true).
    ``closing`` means no further request is served; ``eof`` that the client
    half-closed: buffered requests are still answered, then the connection closes.
    """

    __slots__ = (
        "addr",
        "buf",
        "closing",
        "continued",
        "deadline",
        "eof",
        "events",
        "hold",
        "linger",
        "lingered",
        "lingering",
        "out",
        "parked",
        "parser",
        "peer",
        "sent",
        "server",
        "sock",
        "started",
    )

    def __init__(self, sock: socket.socket, peer: tuple[str, int], server: tuple[str, int]) -> None:
        self.sock = sock
        self.peer = peer
        self.addr = peer[0]
        self.server = server
        self.buf = bytearray()
        self.parser = RequestParser()
        self.out = b""
        self.sent = 0
        self.deadline = 0.0
        self.events = _READ
        self.started = False
        self.continued = False
        self.closing = False
        self.eof = False
        self.linger = False
        self.lingering = False
        self.lingered = 0
        self.parked = False
        self.hold: _Hold | None = None


@dataclass
class _Hold:
    """A request the application parked (``environ["vr.park"]``) until ``probe()``
    differs from ``token`` or ``deadline`` passed; then it is called again."""

    req: HttpRequest
    keep_alive: bool
    environ: dict[str, Any]
    deadline: float
    probe: Callable[[], object]
    token: object


HELD_POLL = 0.05
"""Seconds between looks at what held requests wait for (a push wakes them within
about this long)."""


class EventLoop:
    """Every connection of one worker in one ``selectors`` loop.

    ``listeners`` are listening sockets; ``app`` the WSGI application; ``wake_fd``
    (optional) the read end of a pipe that wakes the loop (gunicorn's signal pipe).
    """

    def __init__(
        self,
        listeners: list[Any],
        app: WSGIApp,
        limits: WorkerLimits,
        wake_fd: int | None = None,
        on_refused: Callable[[str], None] = lambda reason: None,
    ) -> None:
        self.listeners = listeners
        self.on_refused = on_refused
        """Told each refused connection's reason (metrics): ``rate_limit`` (the
        per-address limit) or ``connections_full``."""
        self.app = app
        self.limits = limits
        self.wake_fd = wake_fd
        self.selector = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        # Idle connections by file descriptor, oldest idle first (dicts keep order).
        self.idle: dict[int, _Conn] = {}
        self.per_address: dict[str, int] = {}
        self.refused: dict[str, int] = {}
        self.refused_full = 0  # at the worker's connection limit with nothing idle
        # Bytes each address has handed to the kernel: never less than what its send
        # queues hold (acknowledged bytes are subtracted only by _queued's ioctls).
        self.queued: dict[str, int] = {}
        # Connections waiting for their address's budget, by fd, in the order they came.
        self.parked: dict[int, _Conn] = {}
        # Connections whose request the application holds (long-poll), by fd.
        self.held: dict[int, _Conn] = {}
        self.held_per_address: dict[str, int] = {}
        self.date = Date()
        self.guest_errors = GuestErrors(LOG)
        self.accepting = False
        self.running = True

    def run(self, alive: Callable[[], bool], tick: Callable[[], bool]) -> None:
        """Serve until ``alive()`` is false or ``tick()`` (called about twice a
        second: gunicorn's heartbeat) returns false, then stop gracefully."""
        for s in self.listeners:
            s.setblocking(False)
        if self.wake_fd is not None:
            self.selector.register(self.wake_fd, _READ, self._wakeup)
        last_sweep = last_tick = last_unpark = time.monotonic()
        while True:
            self.running = alive()
            if not self.running:
                break
            # At the limit, accept only while an idle connection can make room.
            self._set_accepting(len(self.conns) < self.limits.connections or bool(self.idle))
            wait = PARKED_POLL if self.parked else HELD_POLL if self.held else 1.0
            for key, mask in self.selector.select(wait):
                key.data(key.fileobj, mask)
            now = time.monotonic()
            if self.held:
                self._wake_held(now)
            if self.parked and now - last_unpark >= PARKED_POLL:
                last_unpark = now
                self._unpark()
            if now - last_tick >= 0.5:
                # The heartbeat costs a syscall: not once per loop turn under load.
                last_tick = now
                if not tick():
                    break
            if now - last_sweep >= 1.0:
                last_sweep = now
                self._sweep(now)
        self.running = False
        self._stop(tick)

    def _stop(self, tick: Callable[[], bool]) -> None:
        """Graceful stop: no new connections; finish pending replies, close the rest."""
        self._set_accepting(False)
        self._wake_held(float("inf"))  # every held request is answered now
        deadline = time.monotonic() + self.limits.graceful
        for conn in list(self.conns.values()):
            if conn.out:
                conn.closing = True
            elif not conn.lingering:
                self._close(conn)
        while self.conns and time.monotonic() < deadline:
            tick()
            for key, mask in self.selector.select(PARKED_POLL if self.parked else 0.2):
                key.data(key.fileobj, mask)
            self._unpark()
        for conn in list(self.conns.values()):
            self._close(conn)
        self._report_refused()
        self.selector.close()

    def _wakeup(self, fileobj: Any, mask: int) -> None:
        try:
            while os.read(fileobj, 512):
                pass
        except BlockingIOError:
            pass

    def _set_accepting(self, on: bool) -> None:
        if on == self.accepting:
            return
        self.accepting = on
        for s in self.listeners:
            if on:
                self.selector.register(s, _READ, self._accept)
            else:
                self.selector.unregister(s)

    # --- accepting ---------------------------------------------------------------------

    def _accept(self, listener: Any, mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
            if len(self.conns) >= self.limits.connections and not self.idle:
                return
            try:
                sock, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO):
                    continue
                if exc.errno in (errno.EMFILE, errno.ENFILE):
                    LOG.error("event worker %s: out of file descriptors", os.getpid())
                    return
                raise
            self._admit(sock, peer[:2] if isinstance(peer, tuple) else ("", 0))

    def _admit(self, sock: socket.socket, peer: tuple[str, int]) -> None:
        addr = peer[0]
        if self.per_address.get(addr, 0) >= self.limits.per_address and not self._evict(addr):
            self._refuse(sock, addr)
            return
        if len(self.conns) >= self.limits.connections and not self._evict(None):
            # Every idle candidate turned out to have a request waiting.
            self.refused_full += 1
            self.on_refused("connections_full")
            self._send_503(sock)
            return
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SNDBUF)
        conn = _Conn(sock, peer, sock.getsockname()[:2])
        # The first request gets the keep-alive time to begin, not the long timeout.
        conn.deadline = time.monotonic() + self.limits.keepalive
        fd = sock.fileno()
        self.conns[fd] = conn
        self.idle[fd] = conn
        self.per_address[addr] = self.per_address.get(addr, 0) + 1
        self.selector.register(sock, _READ, self._ready)

    def _evict(self, addr: str | None) -> bool:
        """Close the oldest idle connection (of ``addr``, if given); False if none.

        "Idle" in :attr:`idle` means the loop has read nothing pending — but a
        request may have arrived since. Closing such a connection would drop a
        request the client already sent, unanswered; so each candidate is peeked
        first, and one with input waiting is read and served instead (it is not a
        candidate again in this call, even if its reply leaves it idle).
        """
        for conn in list(self.idle.values()):
            if addr is not None and conn.addr != addr:
                continue
            if conn.sock.fileno() < 0 or conn.sock.fileno() not in self.idle:
                continue  # closed or no longer idle while an earlier candidate was served
            if _input_waiting(conn.sock):
                self._read(conn)
                if conn.sock.fileno() < 0:  # it had half-closed or reset: room made
                    return True
                continue
            self._close(conn)
            return True
        return False

    def _refuse(self, sock: socket.socket, addr: str) -> None:
        """Over the per-address limit with nothing idle to close: a 503, best effort."""
        self.refused[addr] = self.refused.get(addr, 0) + 1
        self.on_refused("rate_limit")
        self._send_503(sock)

    def _send_503(self, sock: socket.socket) -> None:
        reply = render_response(
            "503 Service Unavailable",
            [("Content-Type", "text/plain"), ("Retry-After", "1")],
            b"too many connections from this address\n",
            False,
            "HTTP/1.1",
            self.date.value(),
        )
        with contextlib.suppress(OSError):
            sock.setblocking(False)
            sock.send(reply)
        with contextlib.suppress(OSError):
            sock.close()

    def _sweep(self, now: float) -> None:
        for conn in list(self.conns.values()):
            if conn.deadline < now:
                if conn.out:
                    # A reply nobody reads: reset, so the kernel drops its queue now
                    # instead of keeping it for a client that never opens its window.
                    with contextlib.suppress(OSError):
                        conn.sock.setsockopt(
                            socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                        )
                self._close(conn)
        self._report_refused()

    def _report_refused(self) -> None:
        for addr, count in self.refused.items():
            self.guest_errors.error(
                addr,
                f"{count} connections",
                outcome=f"refused: it holds {self.limits.per_address}, the most one address may",
            )
        self.refused.clear()
        if self.refused_full:
            LOG.warning(
                "event worker %s refused %s connections: at %s connections, none idle",
                os.getpid(),
                self.refused_full,
                self.limits.connections,
            )
            self.refused_full = 0

    # --- connections -------------------------------------------------------------------

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd < 0 or self.conns.pop(fd, None) is None:
            return
        self.idle.pop(fd, None)
        self.parked.pop(fd, None)
        if self.held.pop(fd, None) is not None:
            self._unhold(conn)
        left = self.per_address[conn.addr] - 1
        if left:
            self.per_address[conn.addr] = left
        else:
            del self.per_address[conn.addr]
            self.queued.pop(conn.addr, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _ready(self, sock: socket.socket, mask: int) -> None:
        conn = self.conns.get(sock.fileno())
        if conn is None:
            return
        try:
            self._step(conn)
        except Exception as exc:
            # The boundary for one connection: whatever its bytes caused, it alone
            # is closed; the worker and every other connection go on.
            self.guest_errors.error(conn.addr, "connection", exc)
            self._close(conn)

    def _step(self, conn: _Conn) -> None:
        if conn.lingering:
            self._drain(conn)
        elif conn.out:
            self._send(conn)
            if not conn.out:
                self._serve(conn)
        else:
            self._read(conn)

    def _read(self, conn: _Conn) -> None:
        # Never more than the largest request: the buffer stays bounded. (A buffer
        # waiting for more always holds less; the parser refuses larger.)
        room = BUF_LIMIT - len(conn.buf)
        if room <= 0:  # pragma: no cover - defensive
            self._fail(conn, BadRequest(431, f"{len(conn.buf)} bytes of request"))
            self._settle(conn)
            return
        try:
            data = conn.sock.recv(min(RECV_SIZE, room))
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if data:
            conn.buf += data
        else:
            # Half-close: answer what is buffered, then close.
            conn.eof = True
        self._serve(conn)

    def _serve(self, conn: _Conn) -> None:
        """Answer the complete requests in the buffer in order (pipelining), while
        each reply goes out at once; then wait for the socket in the right state."""
        while conn.buf and not conn.out and not conn.closing:
            try:
                parsed = conn.parser.parse(conn.buf)
            except BadRequest as exc:
                self._fail(conn, exc)
                break
            if parsed is None:
                break
            if parsed == CONTINUE:
                if not conn.continued:
                    conn.continued = True
                    conn.out = CONTINUE_RESPONSE
                    self._send(conn)
                    continue
                break
            req, used = parsed
            del conn.buf[:used]
            conn.started = conn.continued = False
            keep_alive = req.keep_alive and self.running
            conn.out = self._respond(conn, req, keep_alive)
            if conn.hold is not None:
                self._park_held(conn)
                return
            if not keep_alive:
                conn.closing = True
            self._send(conn)
        self._settle(conn)

    def _settle(self, conn: _Conn) -> None:
        """Register for what the connection waits for next and set its deadline."""
        fd = conn.sock.fileno()
        if fd < 0:
            return
        if conn.out:
            self.idle.pop(fd, None)
            if conn.events != _WRITE:
                conn.deadline = time.monotonic() + self.limits.timeout
                self._want(conn, _WRITE)
            return
        if conn.closing:
            self._finish(conn)
            return
        if conn.eof:
            self._close(conn)
            return
        self._want(conn, _READ)
        if conn.buf:
            if not conn.started:  # a request began: it has request_time to complete
                conn.started = True
                conn.deadline = time.monotonic() + self.limits.request_time
                self.idle.pop(fd, None)
        else:
            conn.deadline = time.monotonic() + self.limits.keepalive
            self.idle.pop(fd, None)
            self.idle[fd] = conn

    def _want(self, conn: _Conn, events: int) -> None:
        if conn.parked:  # registered again when its address has room
            return
        if conn.events != events:
            conn.events = events
            self.selector.modify(conn.sock, events, self._ready)

    def _send(self, conn: _Conn) -> None:
        left = len(conn.out) - conn.sent
        room = self._room(conn.addr, left)
        if room <= 0:
            self._park(conn)
            return
        try:
            if conn.sent or room < left:
                sent = conn.sock.send(memoryview(conn.out)[conn.sent : conn.sent + room])
            else:
                sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        self.queued[conn.addr] = self.queued.get(conn.addr, 0) + sent
        conn.sent += sent
        if conn.sent >= len(conn.out):
            conn.out = b""
            conn.sent = 0
        elif sent and conn.events == _WRITE:
            # The client reads, slowly: it keeps its connection.
            conn.deadline = time.monotonic() + self.limits.timeout

    # --- the send-queue budget of each address ---------------------------------------

    def _room(self, addr: str, want: int) -> int:
        """Bytes ``addr`` may still hand to the kernel. The running count only
        grows; when ``want`` bytes would exceed the budget, the kernel is asked
        what its queues really hold (an ioctl per connection of the address).
        One send takes no more than a socket buffer, so a large reply does not
        ask each time."""
        queued = self.queued.get(addr, 0)
        if queued + min(want, 4 * SNDBUF) > self.limits.unsent:
            queued = self._queued(addr)
        return self.limits.unsent - queued

    def _queued(self, addr: str) -> int:
        total = 0
        for conn in self.conns.values():
            if conn.addr == addr:
                total += _send_queue(conn.sock)
        self.queued[addr] = total
        return total

    def _park(self, conn: _Conn) -> None:
        if conn.parked:
            return
        conn.parked = True
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.events = 0
        self.parked[conn.sock.fileno()] = conn

    def _unpark(self) -> None:
        """Let parked connections send while their address has room: first those
        whose own queue is emptiest (their client reads), then the oldest."""
        rooms: dict[str, int] = {}
        waiting = sorted(self.parked.items(), key=lambda item: _send_queue(item[1].sock))
        for fd, conn in waiting:
            if fd not in self.parked:
                continue
            if conn.addr not in rooms:
                rooms[conn.addr] = self.limits.unsent - self._queued(conn.addr)
            if rooms[conn.addr] <= 0:
                continue
            del self.parked[fd]
            conn.parked = False
            conn.events = _WRITE
            self.selector.register(conn.sock, _WRITE, self._ready)
            self._ready(conn.sock, _WRITE)
            rooms[conn.addr] = self.limits.unsent - self.queued.get(conn.addr, 0)

    def _finish(self, conn: _Conn) -> None:
        """The last reply is out: close, or linger if the client may still be sending
        (closing with unread input would reset the connection and could destroy the
        reply before the client read it)."""
        if not conn.linger and (conn.eof or not self._more_input(conn)):
            self._close(conn)
            return
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        conn.lingering = True
        conn.deadline = time.monotonic() + self.limits.linger
        self.idle.pop(conn.sock.fileno(), None)
        self._want(conn, _READ)

    def _more_input(self, conn: _Conn) -> bool:
        if conn.buf:
            return True
        try:
            return bool(conn.sock.recv(1, socket.MSG_PEEK))
        except OSError:
            return False

    def _drain(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        conn.lingered += len(data)
        if not data or conn.lingered > LINGER_BYTES:
            self._close(conn)

    def _respond(
        self,
        conn: _Conn,
        req: HttpRequest,
        keep_alive: bool,
        environ: dict[str, Any] | None = None,
    ) -> bytes:
        if environ is None:
            environ = build_environ(req, conn.peer, conn.server, sys.stderr)
            # as gunicorn's own workers: the application may set socket options for its
            # reply (the IMDSv2 token's IP TTL, vr.metadata.tokens)
            environ["gunicorn.socket"] = conn.sock

        def park(deadline: float, probe: Callable[[], object], limit: int) -> bool:
            if not self.running or self.held_per_address.get(conn.addr, 0) >= limit:
                return False
            conn.hold = _Hold(req, keep_alive, environ, deadline, probe, probe())
            environ[HELD] = True
            return True

        environ[PARK] = park
        environ[HELD] = False
        captured: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            captured[:] = [status, headers]
            return None

        try:
            result = self.app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            if conn.hold is not None:
                return b""
            status, headers = captured
        except Exception as exc:
            self.guest_errors.error(conn.addr, f"request {req.method} {req.target[:80]!r}", exc)
            status, headers, body = (
                "500 Internal Server Error",
                [("Content-Type", "text/plain")],
                b"internal error\n",
            )
            keep_alive = False
            conn.closing = True
        if req.method == "HEAD":
            body = b""
        return render_response(status, headers, body, keep_alive, req.version, self.date.value())

    # --- held requests (long-poll) ---------------------------------------------------

    def _park_held(self, conn: _Conn) -> None:
        """Take a connection whose request the application holds out of the loop."""
        assert conn.hold is not None
        fd = conn.sock.fileno()
        self.idle.pop(fd, None)
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(conn.sock)
        conn.events = 0
        # the sweep leaves it alone until well after the application's own deadline
        conn.deadline = conn.hold.deadline + self.limits.timeout
        self.held[fd] = conn
        self.held_per_address[conn.addr] = self.held_per_address.get(conn.addr, 0) + 1

    def _unhold(self, conn: _Conn) -> None:
        left = self.held_per_address.get(conn.addr, 1) - 1
        if left > 0:
            self.held_per_address[conn.addr] = left
        else:
            self.held_per_address.pop(conn.addr, None)

    def _wake_held(self, now: float) -> None:
        """Call the application again for each held request whose probe moved or
        whose deadline passed (``now`` infinite: all of them, at stop)."""
        seen: dict[int, object] = {}
        for fd, conn in list(self.held.items()):
            hold = conn.hold
            if hold is None or fd not in self.held:
                continue
            key = id(hold.probe)
            if key not in seen:
                seen[key] = hold.probe()
            if seen[key] == hold.token and now < hold.deadline:
                continue
            del self.held[fd]
            self._unhold(conn)
            conn.hold = None
            if now == float("inf"):
                hold.environ[PARK] = None
                hold.environ["vr.wait_deadline"] = 0.0
            conn.events = _READ
            self.selector.register(conn.sock, _READ, self._ready)
            try:
                conn.out = self._respond(conn, hold.req, hold.keep_alive, hold.environ)
                if conn.hold is not None:  # still unchanged: held again
                    self._park_held(conn)
                    continue
                if not hold.keep_alive:
                    conn.closing = True
                self._send(conn)
                self._serve(conn)
            except Exception as exc:
                self.guest_errors.error(conn.addr, "held request", exc)
                self._close(conn)

    def _fail(self, conn: _Conn, exc: BadRequest) -> None:
        LOG.debug("bad request from %s: %s", conn.peer[0], exc)
        status = f"{exc.status} {REASONS[exc.status]}"
        body = f"{REASONS[exc.status].lower()}\n".encode()
        conn.out = render_response(
            status, [("Content-Type", "text/plain")], body, False, "HTTP/1.1", self.date.value()
        )
        conn.closing = True
        conn.linger = True
        conn.buf.clear()
        conn.parser.reset()
        self._send(conn)


def _send_queue(sock: socket.socket) -> int:
    """Bytes in the kernel's send queue of ``sock`` (sent or not, not yet acknowledged)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def _input_waiting(sock: socket.socket) -> bool:
    """Whether the kernel holds bytes (or the client's EOF) the loop has not read."""
    try:
        sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True  # a reset: reading it closes the connection properly
    return True


class EventWorker(Worker):  # type: ignore[misc]
    """gunicorn worker: one thread, one :class:`EventLoop`, keep-alive HTTP/1.x."""

    def run(self) -> None:
        from vr.ops.metrics import refusal_counter

        loop = EventLoop(
            self.sockets,
            self.wsgi,
            WorkerLimits.from_cfg(self.cfg),
            self.PIPE[0],
            on_refused=refusal_counter(),
        )
        self.notify()
        loop.run(lambda: bool(self.alive), self._tick)

    def _tick(self) -> bool:
        self.notify()
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            return False
        return True
