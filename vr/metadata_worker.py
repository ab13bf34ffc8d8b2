"""A single-threaded event-loop gunicorn worker for the metadata service.

Why: a guest's boot is a dozen tiny GETs, and hundreds of guests boot at once. With
gunicorn's threaded worker most of the time per request goes to handing the socket
between the poller thread and a pool thread and to its general-purpose HTTP parser,
not to the application. This worker keeps every connection in one ``selectors``
loop, parses the small subset of HTTP/1.x the service needs and calls the same WSGI
application (``vr.metadata_app``) directly. Everything else stays gunicorn's: the
arbiter, worker supervision, heartbeat, signals and graceful stop.

Scope and limits (each enforced, each answered with a clear status and a close):

* HTTP/1.0 and HTTP/1.1, keep-alive, pipelining; request head at most
  :data:`MAX_HEAD` bytes (431); a request body only with ``Content-Length`` up to
  :data:`MAX_BODY` (larger: 413; ``Transfer-Encoding``: 501) — the service has no
  use for bodies, it answers such requests 405 anyway.
* Idle keep-alive connections are closed after ``keepalive`` seconds; a request
  head that stays incomplete is dropped after ``timeout`` seconds (slow clients
  cannot pin connections). At most ``worker_connections`` connections per worker.
* The application must return its whole body in memory (ours does): responses
  are written as one buffer, with non-blocking partial sends handled.

Use it with ``worker_class="vr.metadata_worker.EventWorker"``.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import selectors
import socket
import sys
import time
from collections.abc import Callable, Iterable
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote_to_bytes

from gunicorn.workers.base import Worker

MAX_HEAD = 8192
MAX_BODY = 65536
RECV_SIZE = 65536
ACCEPT_BATCH = 64
SERVER = "vr-metadata"

_REASONS = {
    400: "Bad Request",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}
_TOKEN = frozenset(b"!#$%&'*+-.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz")


class BadRequest(Exception):
    """The request cannot be served; ``status`` says why. The connection closes."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "target", "version")

    def __init__(
        self,
        method: str,
        target: str,
        version: str,
        headers: list[tuple[str, str]],
        body: bytes,
        keep_alive: bool,
    ) -> None:
        self.method = method
        self.target = target
        self.version = version
        self.headers = headers
        self.body = body
        self.keep_alive = keep_alive


def parse_request(buf: bytes | bytearray) -> tuple[Request, int] | None:
    """Parse one request from the front of ``buf``.

    Returns the request and the bytes it used, None if more bytes are needed, or
    raises :class:`BadRequest`. Pure; unit-tested.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if len(buf) > MAX_HEAD:
            raise BadRequest(431, "request head too large")
        return None
    if end > MAX_HEAD:
        raise BadRequest(431, "request head too large")
    try:
        head = bytes(buf[:end]).decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest(400, "undecodable head") from None
    lines = head.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest(400, f"request line {lines[0][:80]!r}")
    method, target, version = parts
    if not method or not all(ord(c) in _TOKEN for c in method):
        raise BadRequest(400, f"method {method[:20]!r}")
    if version not in ("HTTP/1.1", "HTTP/1.0"):
        if version.startswith("HTTP/"):
            raise BadRequest(505, f"version {version[:20]!r}")
        raise BadRequest(400, f"version {version[:20]!r}")
    if not target or any(c <= " " or c == "\x7f" for c in target):
        raise BadRequest(400, "request target")
    headers: list[tuple[str, str]] = []
    length = 0
    conn_tokens = ""
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or not all(ord(c) in _TOKEN for c in name):
            raise BadRequest(400, f"header line {line[:40]!r}")
        value = value.strip(" \t")
        if any(c < " " and c != "\t" for c in value):
            raise BadRequest(400, f"header {name!r} value")
        lname = name.lower()
        if lname == "content-length":
            if not value.isdigit() or (length and int(value) != length):
                raise BadRequest(400, f"Content-Length {value[:20]!r}")
            length = int(value)
        elif lname == "transfer-encoding":
            raise BadRequest(501, "Transfer-Encoding is not supported")
        elif lname == "connection":
            conn_tokens += "," + value.lower()
        headers.append((name, value))
    if length > MAX_BODY:
        raise BadRequest(413, f"body of {length} bytes")
    if len(buf) < end + 4 + length:
        return None
    body = bytes(buf[end + 4 : end + 4 + length])
    tokens = {t.strip() for t in conn_tokens.split(",")}
    keep_alive = "close" not in tokens if version == "HTTP/1.1" else "keep-alive" in tokens
    return Request(method, target, version, headers, body, keep_alive), end + 4 + length


def split_target(target: str) -> tuple[str, str]:
    """Request target -> (PATH_INFO, QUERY_STRING) as WSGI wants them (latin-1 str)."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")
    path = path.split("#", 1)[0]
    return unquote_to_bytes(path).decode("latin-1"), query


def build_environ(
    req: Request, peer: tuple[str, int], server: tuple[str, int], errors: Any
) -> dict[str, Any]:
    path, query = split_target(req.target)
    environ: dict[str, Any] = {
        "REQUEST_METHOD": req.method,
        "SCRIPT_NAME": "",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "RAW_URI": req.target,
        "SERVER_PROTOCOL": req.version,
        "SERVER_NAME": server[0],
        "SERVER_PORT": str(server[1]),
        "REMOTE_ADDR": peer[0],
        "REMOTE_PORT": str(peer[1]),
        "wsgi.version": (1, 0),
        "wsgi.url_scheme": "http",
        "wsgi.input": io.BytesIO(req.body),
        "wsgi.errors": errors,
        "wsgi.multithread": False,
        "wsgi.multiprocess": True,
        "wsgi.run_once": False,
    }
    for name, value in req.headers:
        key = name.upper().replace("-", "_")
        if key == "CONTENT_LENGTH" or key == "CONTENT_TYPE":
            environ[key] = value
            continue
        # Underscore and dash spellings meet in one key, so "X_Forwarded_For"
        # cannot slip past a check for X-Forwarded-For.
        key = "HTTP_" + key
        environ[key] = environ[key] + "," + value if key in environ else value
    return environ


class _Date:
    """The ``Date`` header, formatted once per second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = ""

    def value(self) -> str:
        now = int(time.time())
        if now != self._second:
            self._second = now
            self._value = formatdate(now, usegmt=True)
        return self._value


def render_response(
    status: str,
    headers: list[tuple[str, str]],
    body: bytes,
    keep_alive: bool,
    version: str,
    date: str,
) -> bytes:
    lines = [f"HTTP/1.1 {status}", f"Date: {date}", f"Server: {SERVER}"]
    has_length = False
    for name, value in headers:
        if name.lower() == "content-length":
            has_length = True
        lines.append(f"{name}: {value}")
    if not has_length:
        lines.append(f"Content-Length: {len(body)}")
    if not keep_alive:
        lines.append("Connection: close")
    elif version == "HTTP/1.0":
        lines.append("Connection: keep-alive")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


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


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class EventWorker(Worker):  # type: ignore[misc]
    """gunicorn worker: one thread, one ``selectors`` loop, keep-alive HTTP/1.x."""

    def init_process(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.conns: dict[int, _Conn] = {}
        self.date = _Date()
        self.accepting = False
        super().init_process()

    # --- loop --------------------------------------------------------------------------

    def run(self) -> None:
        for s in self.sockets:
            s.setblocking(False)
        self.selector.register(self.PIPE[0], selectors.EVENT_READ, self._wakeup)
        self._set_accepting(True)
        last_sweep = last_notify = time.monotonic()
        self.notify()
        while self.alive:
            self._set_accepting(len(self.conns) < self.cfg.worker_connections)
            for key, mask in self.selector.select(1.0):
                key.data(key.fileobj, mask)
            now = time.monotonic()
            if now - last_notify >= 0.5:
                # The heartbeat costs a syscall: not once per loop turn under load.
                last_notify = now
                self.notify()
            if now - last_sweep >= 1.0:
                last_sweep = now
                self._sweep(now)
                if self.ppid != os.getppid():
                    self.log.info("Parent changed, shutting down: %s", self)
                    break
        self._stop()

    def _stop(self) -> None:
        """Graceful stop: no new connections; finish pending writes, close idle ones."""
        self._set_accepting(False)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        for conn in list(self.conns.values()):
            if not conn.out:
                self._close(conn)
            else:
                conn.closing = True
        while self.conns and time.monotonic() < deadline:
            self.notify()
            for key, mask in self.selector.select(0.2):
                key.data(key.fileobj, mask)
        for conn in list(self.conns.values()):
            self._close(conn)
        self.selector.close()

    def _wakeup(self, fileobj: Any, mask: int) -> None:
        try:
            while os.read(self.PIPE[0], 512):
                pass
        except BlockingIOError:
            pass

    def _set_accepting(self, on: bool) -> None:
        if on == self.accepting:
            return
        self.accepting = on
        for s in self.sockets:
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
                    self.log.error("metadata worker %s: out of file descriptors", self.pid)
                    return
                raise
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            server = sock.getsockname()
            conn = _Conn(sock, peer[:2] if isinstance(peer, tuple) else ("", 0), server[:2])
            conn.deadline = time.monotonic() + self.cfg.timeout
            self.conns[sock.fileno()] = conn
            self.selector.register(sock, selectors.EVENT_READ, self._readable)
            if len(self.conns) >= self.cfg.worker_connections:
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
                conn.deadline = min(conn.deadline, time.monotonic() + self.cfg.timeout)
                return
            req, used = parsed
            del conn.buf[:used]
            keep_alive = req.keep_alive and self.alive
            data = self._respond(conn, req, keep_alive)
            if not keep_alive:
                conn.closing = True
            conn.out = data
            self._flush(conn)
        if not conn.buf and not conn.out and not conn.closing:
            conn.deadline = time.monotonic() + self.cfg.keepalive

    def _respond(self, conn: _Conn, req: Request, keep_alive: bool) -> bytes:
        environ = build_environ(req, conn.peer, conn.server, sys.stderr)
        captured: list[Any] = []

        def start_response(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Any:
            captured[:] = [status, headers]
            return None

        try:
            result = self.wsgi(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            status, headers = captured
        except Exception:
            self.log.exception(
                "metadata request %s %r from %s failed", req.method, req.target, conn.peer[0]
            )
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
        self.log.debug("bad request from %s: %s", conn.peer[0], exc)
        status = f"{exc.status} {_REASONS[exc.status]}"
        body = f"{_REASONS[exc.status].lower()}\n".encode()
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
            conn.deadline = time.monotonic() + self.cfg.timeout
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
