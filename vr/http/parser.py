"""The subset of HTTP/1.x that vr's event worker speaks: parsing (llhttp) and framing.

No sockets here: a :class:`RequestParser` takes the bytes a connection has received,
:func:`render_response` returns the bytes to send. The worker
(:mod:`vr.http.worker`) owns the I/O. Requests are parsed by llhttp (through
``httptools``, as uvicorn does), in its strict mode: bare LF line ends, differing or
repeated ``Content-Length`` values, obsolete line folding, unknown methods and
invalid bytes are refused, never guessed at. On top of it a few limits, each
answered with a status: a request head of at most :data:`MAX_HEAD` bytes (431), a
body only with ``Content-Length`` up to :data:`MAX_BODY` (413; ``Transfer-Encoding``
501) — the services have no use for bodies beyond that.
"""

from __future__ import annotations

import io
import time
from email.utils import formatdate
from typing import Any, Final, Literal
from urllib.parse import unquote_to_bytes

import httptools

MAX_HEAD = 8192
MAX_BODY = 65536
SERVER = "vr-metadata"

REASONS = {
    400: "Bad HttpRequest",
    413: "Content Too Large",
    417: "Expectation Failed",
    431: "HttpRequest Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    505: "HTTP Version Not Supported",
}


class BadRequest(Exception):
    """The request cannot be served; ``status`` says why. The connection closes."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status


class HttpRequest:
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

Parsed = tuple[HttpRequest, int] | Literal["100-continue"] | None


class RequestParser:
    """The requests of one connection, parsed one at a time by llhttp.

    :meth:`parse` is called with the connection's buffer, which starts with the
    current request, each time bytes were added; only the new bytes are fed to
    llhttp, so a client trickling its head costs no re-parsing. llhttp is fed the
    head exactly (up to its blank line), then exactly ``Content-Length`` body bytes:
    it never sees the next pipelined request, so the bytes one request used are
    known without asking llhttp for offsets. After a request (or :meth:`reset`) the
    parser starts afresh on a buffer that begins with the next request.
    """

    __slots__ = (
        "_complete",
        "_error",
        "_expect",
        "_fed",
        "_head",
        "_headers",
        "_headers_done",
        "_keep_alive",
        "_length",
        "_llhttp",
        "_upgraded",
        "_url",
    )

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Forget the current request: the next buffer starts a new one."""
        self._llhttp = httptools.HttpRequestParser(self)
        self._fed = 0  # bytes of the current request fed to llhttp
        self._head = 0  # the head's length with its blank line, once complete
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._headers_done = False
        self._complete = False
        self._upgraded = False
        self._length = 0
        self._expect = False
        self._keep_alive = False
        self._error: BadRequest | None = None

    # --- llhttp's callbacks (a BadRequest raised here ends the parse) ----------------

    def _refuse(self, status: int, detail: str) -> BadRequest:
        self._error = BadRequest(status, detail)
        return self._error

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        lname = name.lower()
        if lname == b"transfer-encoding":
            raise self._refuse(501, "Transfer-Encoding is not supported")
        if lname == b"expect" and self._llhttp.get_http_version() == "1.1":
            # HTTP/1.0 ignores Expect (RFC 9110)
            if self._expect or value.strip(b" \t").lower() != b"100-continue":
                raise self._refuse(417, f"Expect {value[:40]!r}")
            self._expect = True
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        version = self._llhttp.get_http_version()
        if version not in ("1.0", "1.1"):
            if version == "0.9":
                raise self._refuse(400, "HTTP/0.9 request line")
            raise self._refuse(505, f"version HTTP/{version}")
        for name, value in self._headers:
            if name.lower() == b"content-length":  # llhttp checked: one value, digits only
                self._length = _content_length(value)
        if self._length > MAX_BODY:
            raise self._refuse(413, f"body of more than {MAX_BODY} bytes")
        self._keep_alive = self._llhttp.should_keep_alive()
        self._headers_done = True

    def on_message_complete(self) -> None:
        self._complete = True

    # --- parsing -----------------------------------------------------------------------

    def _feed(self, buf: bytes | bytearray, stop: int) -> None:
        data = bytes(buf[self._fed : stop])
        self._fed = stop
        try:
            self._llhttp.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade (or CONNECT) request: vr never upgrades; it is answered as
            # a plain request, its body (if any) taken by Content-Length below.
            self._upgraded = True
        except httptools.HttpParserError as exc:
            if self._error is not None:
                raise self._error from None
            detail = str(exc)
            raise BadRequest(505 if "HTTP version" in detail else 400, detail) from None

    def parse(self, buf: bytes | bytearray) -> Parsed:
        """Parse the request at the front of ``buf``.

        Returns the request and the bytes it used, None if more bytes are needed,
        :data:`CONTINUE` if more bytes are needed and the client waits for
        ``100 Continue`` before it sends its body (``Expect: 100-continue``), or
        raises :class:`BadRequest` (and nothing else, whatever the bytes).
        """
        if not self._head:
            end = buf.find(b"\r\n\r\n", max(0, self._fed - 3))
            if (end < 0 and len(buf) > MAX_HEAD) or end > MAX_HEAD:
                raise BadRequest(431, "request head too large")
            stop = end + 4 if end >= 0 else len(buf)
            if stop > self._fed:
                self._feed(buf, stop)
            if not self._headers_done:
                if end >= 0:  # pragma: no cover - llhttp ends a valid head at its blank line
                    raise BadRequest(400, "request head not understood")
                return None
            self._head = stop
            method = self._llhttp.get_method()
            line = method + b" " + self._url + b" "  # llhttp lets runs of spaces pass
            if bytes(buf[: len(line)]) != line:
                raise BadRequest(400, "request line: expected single spaces")
        total = self._head + self._length
        if len(buf) < total:
            return CONTINUE if self._expect and len(buf) == self._head else None
        if self._fed < total and not self._upgraded:
            self._feed(buf, total)
        if not (self._complete or self._upgraded):  # pragma: no cover - llhttp agrees
            raise BadRequest(400, "request body not understood")
        req = HttpRequest(
            self._llhttp.get_method().decode("ascii"),
            self._url.decode("latin-1"),
            "HTTP/" + self._llhttp.get_http_version(),
            [(n.decode("latin-1"), v.decode("latin-1").strip(" \t")) for n, v in self._headers],
            bytes(buf[self._head : total]),
            self._keep_alive,
        )
        self.reset()
        return req, total


def _content_length(value: bytes) -> int:
    """llhttp checked the value is ASCII digits; leading zeros are allowed, so the
    digits may be thousands: no number longer than MAX_BODY's is ever built."""
    digits = value.strip(b" \t").lstrip(b"0")
    if len(digits) > len(str(MAX_BODY)):
        return MAX_BODY + 1
    return int(digits) if digits else 0


def parse_request(buf: bytes | bytearray) -> Parsed:
    """Parse one request from the front of ``buf`` (:meth:`RequestParser.parse`
    with a new parser). Pure; unit-tested."""
    return RequestParser().parse(buf)


def split_target(target: str) -> tuple[str, str]:
    """HttpRequest target -> (PATH_INFO, QUERY_STRING) as WSGI wants them (latin-1 str)."""
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        slash = rest.find("/")
        target = rest[slash:] if slash >= 0 else "/"
    path, _, query = target.partition("?")
    path = path.split("#", 1)[0]
    return unquote_to_bytes(path).decode("latin-1"), query


def build_environ(
    req: HttpRequest, peer: tuple[str, int], server: tuple[str, int], errors: Any
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


def plain_address(host: str) -> str:
    """An IPv4 caller on a dual-stack socket (``::ffff:10.1.1.23``) as plain IPv4, so
    logs and limits name it as it is; IPv6 scope ids (``fe80::1%eth0``) are dropped."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host.split("%", 1)[0]
