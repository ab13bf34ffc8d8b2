"""A single-threaded event-loop gunicorn worker for the metadata and password services.

Why: a guest's boot is a dozen tiny GETs, and hundreds of guests boot at once. With
gunicorn's threaded worker most of the time per request goes to handing the socket
between the poller thread and a pool thread and to its general-purpose HTTP parser,
not to the application. This worker keeps every connection in one ``selectors``
loop, parses the small subset of HTTP/1.x the services need (:mod:`vr.http1`) and
calls the WSGI application directly. Everything else stays gunicorn's: the arbiter,
worker supervision, heartbeat, signals and graceful stop.

:class:`EventLoop` is the loop itself and knows nothing of gunicorn (tests run it
in-process against a loopback listener); :class:`EventWorker` is the gunicorn
worker that runs it. Use it with ``worker_class="vr.metadata_worker.EventWorker"``.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import selectors
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from gunicorn.workers.base import Worker

from vr.http1 import (
    REASONS,
    BadRequest,
    Date,
    Request,
    WSGIApp,
    build_environ,
    parse_request,
    render_response,
)

LOG = logging.getLogger(__name__)

RECV_SIZE = 65536
ACCEPT_BATCH = 64


@dataclass(frozen=True)
class Limits:
    """How long and how many, per worker."""

    keepalive: float  # an idle keep-alive connection is closed after this long
    timeout: float  # a slow request or response is dropped after this long
    connections: int  # open connections at most
    graceful: float  # on stop, pending responses get this long to finish

    @classmethod
    def from_cfg(cls, cfg: Any) -> Limits:
        """From gunicorn's settings (``keepalive``, ``timeout``, ``worker_connections``...)."""
        return cls(
            keepalive=float(cfg.keepalive),
            timeout=float(cfg.timeout),
            connections=int(cfg.worker_connections),
            graceful=float(cfg.graceful_timeout),
        )


class _Conn:
    __slots__ = ("buf", "closing", "deadline", "out", "peer", "server", "sock")

    def __init__(self, sock: socket.socket, peer: tuple[str, int], server: tuple[str, int]) -> None:
        self.sock = sock
        self.peer = peer
        self.server = server
        self.buf = bytearray()
        self.out = b""
        self.deadline = 0.0
        self.closing = False


class EventLoop:
    """Every connection of one worker in one ``selectors`` loop.

    ``listeners`` are non-blocking-capable listening sockets; ``app`` the WSGI
    application; ``wake_fd`` (optional) a pipe whose read end wakes the loop
    (gunicorn's signal pipe).
    """

    def __init__(
        self,
        listeners: list[Any],
        app: WSGIApp,
        limits: Limits,
        wake_fd: int | None = None,
    ) -> None:
        self.listeners = listeners
        self.app = app
        self.limits = limits
        self.wake_fd = wake_fd
        self.selector = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        self.date = Date()
        self.accepting = False
        self.running = True

    def run(self, alive: Callable[[], bool], tick: Callable[[], bool]) -> None:
        """Serve until ``alive()`` is false or ``tick()`` (called about twice a
        second: gunicorn's heartbeat) returns false, then stop gracefully."""
        for s in self.listeners:
            s.setblocking(False)
        if self.wake_fd is not None:
            self.selector.register(self.wake_fd, selectors.EVENT_READ, self._wakeup)
        last_sweep = last_tick = time.monotonic()
        while True:
            self.running = alive()
            if not self.running:
                break
            self._set_accepting(len(self.conns) < self.limits.connections)
            for key, mask in self.selector.select(1.0):
                key.data(key.fileobj, mask)
            now = time.monotonic()
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
        """Graceful stop: no new connections; finish pending writes, close idle ones."""
        self._set_accepting(False)
        deadline = time.monotonic() + self.limits.graceful
        for conn in list(self.conns.values()):
            if not conn.out:
                self._close(conn)
            else:
                conn.closing = True
        while self.conns and time.monotonic() < deadline:
            tick()
            for key, mask in self.selector.select(0.2):
                key.data(key.fileobj, mask)
        for conn in list(self.conns.values()):
            self._close(conn)
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
                self.selector.register(s, selectors.EVENT_READ, self._accept)
            else:
                self.selector.unregister(s)

    def _accept(self, listener: Any, mask: int) -> None:
        for _ in range(ACCEPT_BATCH):
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
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server = sock.getsockname()
            conn = _Conn(sock, peer[:2] if isinstance(peer, tuple) else ("", 0), server[:2])
            conn.deadline = time.monotonic() + self.limits.timeout
            self.conns[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, self._readable)
            if len(self.conns) >= self.limits.connections:
                return

    def _sweep(self, now: float) -> None:
        for conn in list(self.conns.values()):
            if conn.deadline < now:
                self._close(conn)

    # --- connections -------------------------------------------------------------------

    def _close(self, conn: _Conn) -> None:
        fd = conn.sock.fileno()
        if fd >= 0 and self.conns.pop(fd, None) is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn.sock)
        with contextlib.suppress(OSError):
            conn.sock.close()

    def _readable(self, sock: socket.socket, mask: int) -> None:
        conn = self.conns.get(sock.fileno())
        if conn is None:
            return
        if mask & selectors.EVENT_WRITE:
            self._flush(conn)
            if conn.out or conn.sock.fileno() < 0:
                return
        try:
            data = sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        conn.buf += data
        self._serve(conn)

    def _serve(self, conn: _Conn) -> None:
        """Answer every complete request in the buffer (pipelining), in order."""
        while conn.buf and not conn.out and not conn.closing:
            try:
                parsed = parse_request(conn.buf)
            except BadRequest as exc:
                self._fail(conn, exc)
                return
            if parsed is None:
                # An incomplete head must complete within ``timeout``.
                conn.deadline = min(conn.deadline, time.monotonic() + self.limits.timeout)
                return
            req, used = parsed
            del conn.buf[:used]
            keep_alive = req.keep_alive and self.running
            data = self._respond(conn, req, keep_alive)
            if not keep_alive:
                conn.closing = True
            conn.out = data
            self._flush(conn)
        if not conn.buf and not conn.out and not conn.closing:
            conn.deadline = time.monotonic() + self.limits.keepalive

    def _respond(self, conn: _Conn, req: Request, keep_alive: bool) -> bytes:
        environ = build_environ(req, conn.peer, conn.server, sys.stderr)
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
            status, headers = captured
        except Exception:
            LOG.exception("request %s %r from %s failed", req.method, req.target, conn.peer[0])
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

    def _fail(self, conn: _Conn, exc: BadRequest) -> None:
        LOG.debug("bad request from %s: %s", conn.peer[0], exc)
        status = f"{exc.status} {REASONS[exc.status]}"
        body = f"{REASONS[exc.status].lower()}\n".encode()
        conn.out = render_response(
            status, [("Content-Type", "text/plain")], body, False, "HTTP/1.1", self.date.value()
        )
        conn.closing = True
        conn.buf.clear()
        self._flush(conn)

    def _flush(self, conn: _Conn) -> None:
        try:
            sent = conn.sock.send(conn.out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._close(conn)
            return
        conn.out = conn.out[sent:]
        if conn.out:
            conn.deadline = time.monotonic() + self.limits.timeout
            self.selector.modify(
                conn.sock, selectors.EVENT_READ | selectors.EVENT_WRITE, self._readable
            )
            return
        if conn.closing:
            self._close(conn)
            return
        key = self.selector.get_key(conn.sock)
        if key.events & selectors.EVENT_WRITE:
            self.selector.modify(conn.sock, selectors.EVENT_READ, self._readable)
            if conn.buf:
                self._serve(conn)


class EventWorker(Worker):  # type: ignore[misc]
    """gunicorn worker: one thread, one :class:`EventLoop`, keep-alive HTTP/1.x."""

    def run(self) -> None:
        loop = EventLoop(self.sockets, self.wsgi, Limits.from_cfg(self.cfg), self.PIPE[0])
        self.notify()
        loop.run(lambda: bool(self.alive), self._tick)

    def _tick(self) -> bool:
        self.notify()
        if self.ppid != os.getppid():
            self.log.info("Parent changed, shutting down: %s", self)
            return False
        return True
