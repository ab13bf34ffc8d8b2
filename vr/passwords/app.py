"""The password server's WSGI application: CloudStack's ``DomU_Request`` protocol on 8080.

``GET`` (guests; the caller is its TCP source address, path and query ignored):

- ``DomU_Request: send_my_password`` -> the caller's password, or ``saved_password``
  when none is stored (the password is not cleared);
- ``DomU_Request: saved_password`` -> the guest's ack: clears the password if the one
  stored is the one it was served, answers ``saved_password``;
- anything else -> ``bad_request``.

A request of any method that carries ``X-Forwarded-For`` or ``Forwarded`` is refused
with 403 and counted (``vr status``), as the metadata server does: a guest's proxy
or an SSRF must not fetch a password for whoever it forwards.

Every GET answer is status 200, ``Content-Type: text/plain`` and the exact body with no
newline, as CloudStack's clients (cloud-init, ``cloud-set-guest-password``,
cloudbase-init) expect. ``POST`` with ``DomU_Request: save_password`` and form fields
``ip``, ``password``, ``token`` stores a password, only from the VR's own addresses;
unlike CloudStack it answers a real status (200, 400, 403). Other methods: 405.

Passwords live in the store (:attr:`vr.paths.Paths.passwords`), so a push applied by
update_config while this server is down is served when it comes back. Each worker
keeps the parsed file and re-reads it when a ``stat`` shows a new version, so a push
or an ack in one worker is seen by the next request in every other worker. The hot
path (a password already served, or none stored) writes nothing and takes no lock.

Audit lines of fetches, acks and saves name the VM and the outcome (logged with
:data:`vr.logs.AUDIT`, so they also go to ``audit.log``); never the password or the
token. Every request that changes something (the first serve of a generation, a
clearing ack, a save) has its line; those that change nothing (a password served
again, nothing stored, an ack that keeps it) at most one per VM per minute, with a
count of those held back, so a guest asking in a loop cannot flood ``audit.log``.
An unexpected error is logged in one line per guest per minute, no traceback.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import logging
import os
import secrets
import socket
from collections.abc import Callable, Iterable
from ipaddress import IPv4Address
from typing import Any

from vr import atomic
from vr.errors import PayloadError, StoreError, shorten
from vr.http.identity import Identify, Source, by_address, vm_of
from vr.http.wsgi import StartResponse
from vr.logs import AUDIT, GuestErrors, Throttle
from vr.metadata.counters import RefusalCounters
from vr.passwords.cache import PasswordCache
from vr.passwords.forms import FormError, parse_form
from vr.paths import Paths
from vr.payloads import parse_vm_password
from vr.store import Store

LOG = logging.getLogger(__name__)

SEND = "send_my_password"
SAVED = "saved_password"
SAVE = "save_password"
BAD = "bad_request"

FORWARD_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED")
FORWARDED_REFUSED = b"forwarded requests are refused"
MAX_BODY = 16 * 1024
"""A save carries three short fields; anything bigger is refused unread."""
TOKEN_BYTES = 16
"""A file younger than this when read may be replaced within the same mtime tick."""

IsOwnAddress = Callable[[IPv4Address], bool]
# --- the token ---------------------------------------------------------------------


def _valid_token(text: str) -> bool:
    return len(text) == 2 * TOKEN_BYTES and all(c in "0123456789abcdef" for c in text)


def read_token(paths: Paths) -> str | None:
    """The save token, or None if the file is missing or not a token. Never log it."""
    try:
        text = paths.password_token.read_text().strip()
    except (FileNotFoundError, UnicodeDecodeError):
        return None
    return text if _valid_token(text) else None


def ensure_token(paths: Paths) -> str:
    """Return the save token, creating ``Paths.password_token`` (mode 0600) if needed.

    Safe when several processes start at once: a new token is linked into place only
    if no other process created one first, so all of them end up with the same token.
    """
    paths.ensure()
    target = paths.password_token
    existing = read_token(paths)
    if existing is not None:
        if target.stat().st_mode & 0o077:
            os.chmod(target, 0o600)
            LOG.warning("%s was readable by others; mode set to 0600", target)
        return existing
    tmp = target.with_name(f"{atomic.TMP_PREFIX}{target.name}.{secrets.token_hex(4)}")
    atomic.write_file(tmp, secrets.token_hex(TOKEN_BYTES).encode(), 0o600)
    try:
        if target.exists():
            # present but not a token (empty, truncated): replace it
            os.replace(tmp, target)
            LOG.warning("%s did not hold a token; a new one was written", target)
        else:
            # another process may have won the race: then use its token
            with contextlib.suppress(FileExistsError):
                os.link(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    atomic.fsync_dir(target.parent)
    token = read_token(paths)
    if token is None:
        raise StoreError(f"{target}: could not create the password server token")
    return token


# --- who may save ------------------------------------------------------------------


def _nonlocal_bind_enabled() -> bool:
    try:
        with open("/proc/sys/net/ipv4/ip_nonlocal_bind") as f:
            return f.read().strip() != "0"
    except OSError:
        return True  # cannot tell: trust loopback only


def is_own_address(addr: IPv4Address) -> bool:
    """Whether ``addr`` is configured on this machine (in this network namespace).

    The kernel only lets a socket bind an address of its own local table, and drops
    packets that arrive from outside with a local source address, so a TCP peer with
    such an address is the VR itself. When ``ip_nonlocal_bind`` is on the test proves
    nothing and only loopback counts.
    """
    if addr.is_loopback:
        return True
    if addr.is_multicast or addr.is_unspecified or _nonlocal_bind_enabled():
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind((str(addr), 0))
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                LOG.warning("cannot tell whether %s is local: %s", addr, exc)
            return False
    return True


# --- the application ---------------------------------------------------------------


class SaveRefused(Exception):
    """Ends a save with ``status``; ``reason`` is safe to send and to log."""

    def __init__(self, status: str, reason: str, guest: bool = False) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.guest = guest  # asked by a guest, not the VR: not an audit line


class PasswordApp:
    """WSGI callable; build one per worker (after fork)."""

    def __init__(
        self,
        paths: Paths,
        store: Store | None = None,
        is_own: IsOwnAddress = is_own_address,
        counters: RefusalCounters | None = None,
        identify: Identify | None = None,
    ) -> None:
        self.paths = paths
        self.store = store or Store(paths)
        self.is_own = is_own
        self.identify = identify or by_address(paths)
        self.cache = PasswordCache(paths.passwords)
        self.counters = counters or RefusalCounters(paths, service="passwords")
        self.errors = GuestErrors(LOG)
        self.repeats = Throttle()

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        caller = environ.get("REMOTE_ADDR", "")
        try:
            method = environ.get("REQUEST_METHOD", "")
            if any(key in environ for key in FORWARD_HEADERS):
                return self.refuse_forwarded(start_response, method, caller)
            if method == "GET":
                return _reply(start_response, "200 OK", self.get(environ, caller))
            if method == "POST":
                return self.post(environ, start_response, caller)
            return _reply(start_response, "405 Method Not Allowed", b"", [("Allow", "GET, POST")])
        except Exception as exc:
            # the boundary: one line per guest per minute (no traceback), a generic answer
            self.errors.error(caller, "password request", exc)
            return _reply(start_response, "503 Service Unavailable", b"internal_error")

    def refuse_forwarded(
        self, start_response: StartResponse, method: str, caller: str
    ) -> list[bytes]:
        self.counters.count_forwarded()
        self.errors.error(
            caller,
            f"password {shorten(method, 20)}",
            outcome="refused: it carries a forwarding header",
        )
        return _reply(start_response, "403 Forbidden", FORWARDED_REFUSED)

    # --- GET -------------------------------------------------------------------

    def get(self, environ: dict[str, Any], caller: str) -> bytes:
        request = environ.get("HTTP_DOMU_REQUEST")
        vm = self.identify(caller)
        if request == SEND:
            return self.fetch(vm, caller)
        if request == SAVED:
            return self.ack(vm, caller)
        self.errors.error(
            caller,
            f"password request DomU_Request={shorten(request, 40)}",
            outcome=f"answered {BAD}",
        )
        return BAD.encode()

    def fetch(self, vm: IPv4Address | None, caller: str) -> bytes:
        entry = self.cache.get(vm) if vm is not None else None
        if entry is None:
            self._repeat(caller, "password fetch by VM %s: none stored, answered %s", SAVED)
            return SAVED.encode()
        assert vm is not None
        body = entry.password.encode()  # first: a reply that cannot be made changes nothing
        if entry.served:
            self._repeat(str(vm), "password fetch by VM %s: served generation %d", entry.gen)
            return body
        # recorded before the guest can ack, so its ack can clear this password
        self.store.mark_password_served(vm, entry.gen)
        LOG.info("password fetch by VM %s: served generation %d", vm, entry.gen, extra=AUDIT)
        return body

    def _repeat(self, vm: str, msg: str, *args: object) -> None:
        """An audit line for a request that changed nothing, which a guest can send
        in a loop: at most one per VM per minute, so audit.log cannot be flooded."""
        held = self.repeats.allow(vm)
        if held is not None:
            LOG.info(msg + "%s", vm, *args, self.repeats.held(held), extra=AUDIT)

    def ack(self, vm: IPv4Address | None, caller: str) -> bytes:
        # no entry now: anything stored later is a newer push the ack must not clear
        if vm is None or self.cache.get(vm) is None:
            self._repeat(caller, "password ack by VM %s: none stored")
        elif self.store.ack_password(vm):
            LOG.info("password ack by VM %s: cleared", vm, extra=AUDIT)
        else:
            self._repeat(str(vm), "password ack by VM %s: kept (stored password not served yet)")
        return SAVED.encode()

    # --- POST ------------------------------------------------------------------

    def post(
        self, environ: dict[str, Any], start_response: StartResponse, caller: str
    ) -> list[bytes]:
        try:
            vm = self.save(environ, caller)
        except SaveRefused as exc:
            if exc.guest:
                self.errors.error(caller, "password save", outcome="refused: not from the VR")
            else:
                LOG.warning("password save from %s: refused (%s)", caller, exc.reason, extra=AUDIT)
            return _reply(start_response, exc.status, exc.reason.encode())
        LOG.info("password save from %s for VM %s: stored", caller, vm, extra=AUDIT)
        return _reply(start_response, "200 OK", b"")

    def save(self, environ: dict[str, Any], caller: str) -> IPv4Address:
        source = vm_of(Source(caller))
        if source is None or not self.is_own(source):
            raise SaveRefused(
                "403 Forbidden", "forbidden: saves are accepted from the VR only", guest=True
            )
        if environ.get("HTTP_DOMU_REQUEST") != SAVE:
            raise SaveRefused("400 Bad Request", f"bad_request: expected DomU_Request: {SAVE}")
        fields = self._form(environ)
        missing = [k for k in ("ip", "password", "token") if k not in fields]
        if missing:
            raise SaveRefused("400 Bad Request", f"bad_request: missing form fields {missing}")
        token = read_token(self.paths)
        if token is None or not hmac.compare_digest(
            fields["token"].encode("utf-8", "replace"), token.encode()
        ):
            raise SaveRefused("403 Forbidden", "forbidden: wrong token")
        try:
            push = parse_vm_password({"ip_address": fields["ip"], "password": fields["password"]})
        except PayloadError as exc:  # the message never carries the password
            raise SaveRefused("400 Bad Request", f"bad_request: {exc}") from None
        # the passwords lock alone: a batch holding the store lock must not stall the worker
        self.store.save_password(push.ip, push.password)
        return push.ip

    def _form(self, environ: dict[str, Any]) -> dict[str, str]:
        try:
            length = int(environ.get("CONTENT_LENGTH") or -1)
        except ValueError:
            raise SaveRefused(
                "400 Bad Request", "bad_request: Content-Length not a number"
            ) from None
        if length > MAX_BODY:
            raise SaveRefused("400 Bad Request", f"bad_request: body over {MAX_BODY} bytes")
        body = environ["wsgi.input"].read(length if length >= 0 else MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise SaveRefused("400 Bad Request", f"bad_request: body over {MAX_BODY} bytes")
        try:
            return parse_form(environ.get("CONTENT_TYPE", ""), body)
        except FormError as exc:
            raise SaveRefused("400 Bad Request", f"bad_request: {exc}") from None


def _reply(
    start_response: StartResponse,
    status: str,
    body: bytes,
    extra: list[tuple[str, str]] | None = None,
) -> list[bytes]:
    headers = [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))]
    start_response(status, headers + (extra or []))
    return [body]


STORE_LOCK_TIMEOUT = 10.0
"""A fetch, ack or save waits this long for the passwords lock, then answers 503 (the
guest retries); below gunicorn's worker timeout, so the worker is never killed."""


def make_app(paths: Paths) -> PasswordApp:
    """The application for one worker."""
    return PasswordApp(paths, Store(paths, lock_timeout=STORE_LOCK_TIMEOUT))
