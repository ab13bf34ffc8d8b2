"""The subset of HTTP/1.x that vr's event worker speaks: pure parsing and framing.

No sockets here: :func:`parse_request` takes the bytes a connection has received,
:func:`render_response` returns the bytes to send. The worker
(:mod:`vr.http.worker`) owns the I/O. Limits are enforced while parsing, each
answered with a status: a request head of at most :data:`MAX_HEAD` bytes (431), a
body only with ``Content-Length`` up to :data:`MAX_BODY` (413; ``Transfer-Encoding``
501) — the services have no use for bodies beyond that.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable
from email.utils import formatdate
from typing import Any, Final, Literal
from urllib.parse import unquote_to_bytes

MAX_HEAD = 8192
MAX_BODY = 65536
SERVER = "vr-metadata"

REASONS = {
    400: "Bad Request",
    413: "Content Too Large",
    417: "Expectation Failed",
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


CONTINUE: Final = "100-continue"
CONTINUE_RESPONSE = b"HTTP/1.1 100 Continue\r\n\r\n"


def parse_request(
    buf: bytes | bytearray,
) -> tuple[Request, int] | Literal["100-continue"] | None:
    """Parse one request from the front of ``buf``.

    Returns the request and the bytes it used, None if more bytes are needed,
    :data:`CONTINUE` if more bytes are needed and the client waits for
    ``100 Continue`` before it sends its body (``Expect: 100-continue``), or raises
    :class:`BadRequest`. Pure; unit-tested.
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
    expect = ""
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
        elif lname == "expect" and version == "HTTP/1.1":  # HTTP/1.0 ignores it (RFC 9110)
            if expect or value.lower() != CONTINUE:
                raise BadRequest(417, f"Expect {value[:40]!r}")
            expect = CONTINUE
        headers.append((name, value))
    if length > MAX_BODY:
        raise BadRequest(413, f"body of {length} bytes")
    if len(buf) < end + 4 + length:
        return CONTINUE if expect and len(buf) == end + 4 else None
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
        "REMOTE_ADDR": plain_address(peer[0]),
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


class Date:
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


WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def plain_address(host: str) -> str:
    """An IPv4 caller on a dual-stack socket (``::ffff:10.1.1.23``) as plain IPv4, so
    logs and limits name it as it is; IPv6 scope ids (``fe80::1%eth0``) are dropped."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host.split("%", 1)[0]
