"""Run vr's :class:`~vr.http.worker.EventLoop` in-process against a loopback listener.

The loop runs in a thread with real sockets, exactly as a gunicorn worker runs it
(minus the arbiter), so tests can use small limits and look at its buffers. Client
helpers speak raw HTTP/1.1 over sockets so pipelining, half-close and unread
responses are under the test's control. Every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import select
import selectors
import socket
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs

from vr.http.worker import EventLoop, WorkerLimits

HOST = "127.0.0.1"
WAIT = 10.0  # generous bound for anything the server should do "soon"


def limits(**kw: Any) -> WorkerLimits:
    """Roomy defaults; a test names the limit it is about."""
    base: dict[str, Any] = {
        "keepalive": 60.0,
        "request_time": 60.0,
        "timeout": 60.0,
        "connections": 100,
        "per_address": 100,
        "graceful": 1.0,
        "linger": 2.0,
    }
    base.update(kw)
    return WorkerLimits(**base)


def body_for(path: str, size: int) -> bytes:
    """The body :func:`sized_app` sends for ``path``: the path repeated, cut to size."""
    tag = path.encode() + b"|"
    return (tag * (size // len(tag) + 1))[:size]


def sized_app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
    """``GET /<anything>?size=N`` -> N bytes naming the path (default 16)."""
    query = parse_qs(environ["QUERY_STRING"])
    size = int(query.get("size", ["16"])[0])
    environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Type", "application/octet-stream")])
    return [body_for(environ["PATH_INFO"], size)]


@dataclass
class Served:
    loop: EventLoop
    port: int
    listener: socket.socket
    thread: threading.Thread

    def start(self) -> None:
        """Run the loop in its thread (``serving(..., start=False)`` only)."""
        self.thread.start()

    def accept(self) -> None:
        """Before :meth:`start`: wait for a pending connection and let the loop
        accept every pending one, and do nothing else — no byte of any connection
        is read unless accepting itself reads it. Lets a test fix the order of
        events exactly."""
        assert not self.thread.is_alive(), "the loop runs: it accepts by itself"
        ready, _, _ = select.select([self.listener], [], [], WAIT)
        assert ready, "no connection to accept"
        self.loop._accept(self.listener, selectors.EVENT_READ)

    def wait_input(self) -> None:
        """Before :meth:`start`: wait until the kernel holds unread input for every
        accepted connection (the loop has read none of it)."""
        assert not self.thread.is_alive(), "the loop runs: it reads by itself"
        socks = [c.sock for c in self.loop.conns.values()]
        pending = set(socks)
        while pending:
            ready, _, _ = select.select(list(pending), [], [], WAIT)
            assert ready, "the clients' bytes never arrived"
            pending.difference_update(ready)

    def connect(self, source: str = HOST, rcvbuf: int | None = None) -> socket.socket:
        s = socket.socket()
        if rcvbuf is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.bind((source, 0))
        s.settimeout(WAIT)
        s.connect((HOST, self.port))
        return s

    def conns_from(self, address: str) -> int:
        return sum(1 for c in list(self.loop.conns.values()) if c.peer[0] == address)


@contextlib.contextmanager
def serving(lim: WorkerLimits, app: Any = sized_app, start: bool = True) -> Iterator[Served]:
    """Serve on a loopback port; with ``start=False`` the loop waits for
    :meth:`Served.start` and the test may :meth:`Served.accept` by hand first."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen(128)
    listener.setblocking(False)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    stop = threading.Event()
    loop = EventLoop([listener], app, lim, wake_r)
    thread = threading.Thread(
        target=loop.run, args=(lambda: not stop.is_set(), lambda: True), daemon=True
    )
    if start:
        thread.start()
    try:
        yield Served(loop, listener.getsockname()[1], listener, thread)
    finally:
        stop.set()
        os.write(wake_w, b"x")
        if thread.is_alive():
            thread.join(timeout=WAIT + lim.graceful)
        else:  # never started: close what was accepted by hand
            for conn in list(loop.conns.values()):
                loop._close(conn)
        listener.close()
        os.close(wake_r)
        os.close(wake_w)
        assert not thread.is_alive(), "the event loop did not stop"


def request(path: str, *headers: str, version: str = "HTTP/1.1") -> bytes:
    lines = [f"GET {path} {version}", "Host: vr", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class Reader:
    """Reads HTTP/1.1 responses (Content-Length framed) from a client socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.eof = False

    def _more(self, size: int = 65536) -> None:
        data = self.sock.recv(size)
        if not data:
            self.eof = True
            raise EOFError(f"connection closed with {len(self.buf)} bytes unparsed")
        self.buf += data

    def response(self, chunk: int = 65536) -> tuple[int, dict[str, str], bytes]:
        while b"\r\n\r\n" not in self.buf:
            self._more(chunk)
        end = self.buf.index(b"\r\n\r\n")
        lines = bytes(self.buf[:end]).decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(self.buf) < end + 4 + length:
            self._more(chunk)
        body = bytes(self.buf[end + 4 : end + 4 + length])
        del self.buf[: end + 4 + length]
        return int(lines[0].split(" ")[1]), headers, body

    def closed(self) -> bool:
        """True once the server closed the connection (after any unread bytes)."""
        try:
            while True:
                self._more()
        except EOFError:
            return True
        except ConnectionResetError:
            return True


def closed_within_wait(sock: socket.socket) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within :data:`WAIT` seconds,
    discarding whatever it sends first."""
    try:
        while True:
            ready, _, _ = select.select([sock], [], [], WAIT)
            if not ready:
                return False
            if not sock.recv(65536):
                return True
    except ConnectionResetError:
        return True
