"""The metadata HTTP service: a Flask application with a pure-WSGI fast path.

The calling VM is the TCP peer (``REMOTE_ADDR``) mapped by ``vr.http.identity.vm_of``;
no header is ever consulted for identity. Every URL is answered by
``vr.metadata.views.resolve`` from the worker's :class:`vr.metadata.vmcache.VmCache`.

Two doors to the same answers:

* the fast path (a plain WSGI callable in front of Flask) serves every ``GET`` and
  ``HEAD`` that carries no forwarding header: what every guest sends at boot,
  hundreds at once. It skips Flask's request/response objects, which cost more
  than the lookup itself;
* Flask handles everything else: requests with ``X-Forwarded-For``/``Forwarded``
  (403, counted: an SSRF guard as GCE and Azure have), the IMDSv2 token ``PUT``
  (:mod:`vr.metadata.tokens`), other methods (405 with ``Allow``), and errors.

A GET that carries an IMDSv2 token header is answered only if the token is valid
(else 401); one without is answered as ever unless the :class:`TokenPolicy` requires
tokens for the caller (401 too). The token reply leaves with the policy's hop
limit. With ``fast_path=False`` Flask serves everything, which the tests use to
prove both doors answer byte for byte the same.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from flask import Flask, Response, request
from werkzeug.exceptions import HTTPException

from vr import store
from vr.http.wsgi import StartResponse, WSGIApp
from vr.logs import GuestErrors
from vr.metadata import changes
from vr.metadata.counters import RefusalCounters
from vr.metadata.identity import Signer, identity_reply
from vr.metadata.ratelimit import RateLimiter, retry_after
from vr.metadata.tokens import (
    TOKEN_ENVIRON,
    TTL_ENVIRON,
    UNAUTHORIZED,
    TokenPolicy,
    Tokens,
    is_token_path,
    new_key,
    set_hop_limit,
)
from vr.metadata.views import NOT_FOUND, Reply, resolve
from vr.metadata.vmcache import Lans, VmCache, VmLookup
from vr.paths import Paths

LOG = logging.getLogger(__name__)

ALLOWED_METHODS = ("GET", "HEAD")
ALLOW = ", ".join(ALLOWED_METHODS)
FORWARD_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_FORWARDED")
FORBIDDEN = Reply(403, b"forwarded requests are refused\n")
NOT_ALLOWED = Reply(405, b"method not allowed\n")
NOT_ALLOWED_TOKEN = Reply(405, b"method not allowed\n", headers=(("Allow", "PUT"),))
INTERNAL = Reply(500, b"internal error\n")
RATE_CHECKED = "vr.rate_checked"


_STATUS = {s.value: f"{s.value} {s.phrase}" for s in HTTPStatus}


def _headers(reply: Reply) -> list[tuple[str, str]]:
    h = [("Content-Type", reply.content_type), ("Content-Length", str(len(reply.body)))]
    if reply.location is not None:
        h.append(("Location", reply.location))
    if reply.headers:
        h += reply.headers
    elif reply.status == 405:
        h.append(("Allow", ALLOW))
    return h


def _answer(
    tokens: Tokens,
    policy: TokenPolicy,
    cache: VmLookup,
    environ: dict[str, Any],
    signer: Signer | None = None,
    lans: Lans | None = None,
) -> Reply:
    """A GET or HEAD: a token it carries must be valid (and it must carry one where
    the policy requires it); then the URL decides."""
    caller = environ.get("REMOTE_ADDR", "")
    token = environ.get(TOKEN_ENVIRON)
    if token is None:
        if policy.requires(caller):
            return UNAUTHORIZED
    elif not tokens.valid(caller, token):
        return UNAUTHORIZED
    path = environ.get("PATH_INFO", "")
    view = cache.view_for_address(caller)
    if "/dynamic" in path:
        reply = identity_reply(signer, caller, view, path)
        if reply is not None:
            return reply
    if lans is not None and path[:10].lower() == "/metadata/":
        return resolve(view, path, lans.lan_for(caller))
    return resolve(view, path)


def _limited(
    limiter: RateLimiter | None, counts: RefusalCounters, environ: dict[str, Any]
) -> Reply | None:
    """429 when the calling VM is over its rate (IPv4 callers; each request once)."""
    if limiter is None or RATE_CHECKED in environ:
        return None
    environ[RATE_CHECKED] = True
    try:
        address = int.from_bytes(socket.inet_aton(environ.get("REMOTE_ADDR", "")), "big")
    except OSError:
        return None
    wait = limiter.take(address)
    if not wait:
        return None
    counts.count_rate()
    return Reply(429, b"too many requests\n", headers=(("Retry-After", retry_after(wait)),))


@dataclass(frozen=True)
class _Guest:
    """What answers a guest's GET, shared by both doors."""

    tokens: Tokens
    policy: TokenPolicy
    cache: VmLookup
    signer: Signer | None
    lans: Lans | None
    probe: Callable[[], object]
    waiters: int

    def answer(self, environ: dict[str, Any]) -> Reply:
        return _answer(self.tokens, self.policy, self.cache, environ, self.signer, self.lans)

    def get(self, environ: dict[str, Any]) -> tuple[Reply, list[tuple[str, str]]] | None:
        """The reply and its headers (with ETag), or None: parked until a change."""
        reply = self.answer(environ)
        query = environ.get("QUERY_STRING")
        if query and reply.status == 200:
            try:
                wait = changes.wait_request(query)
            except changes.BadWait as exc:
                return _with_etag(Reply(400, f"{exc}\n".encode()))
            if wait is not None:
                tag = changes.etag(reply.body)
                held = changes.hold(
                    environ, tag, wait, self.probe, self.waiters, lambda: self.answer(environ)
                )
                if held is None:
                    return None
                if not changes.no_wait(held):
                    reply = held
        return _with_etag(reply)


def _with_etag(reply: Reply) -> tuple[Reply, list[tuple[str, str]]]:
    headers = _headers(reply)
    if reply.status == 200:
        headers.append(("ETag", changes.etag(reply.body)))
    return reply, headers


class FastPath:
    """WSGI middleware answering plain GET/HEAD directly, the rest through Flask."""

    def __init__(
        self,
        guest: _Guest,
        counters: RefusalCounters,
        fallback: WSGIApp,
        errors: GuestErrors,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.guest = guest
        self.counters = counters
        self.fallback = fallback
        self.errors = errors
        self.limiter = limiter

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        method = environ["REQUEST_METHOD"]
        refused = _limited(self.limiter, self.counters, environ)
        if refused is not None:
            start_response(_STATUS[429], _headers(refused))
            return [] if method == "HEAD" else [refused.body]
        if (
            (method != "GET" and method != "HEAD")
            or "HTTP_X_FORWARDED_FOR" in environ
            or "HTTP_FORWARDED" in environ
        ):
            return self.fallback(environ, start_response)
        try:
            got = self.guest.get(environ)
        except Exception as exc:
            self.errors.error(
                environ.get("REMOTE_ADDR", ""), _what(environ.get("PATH_INFO", "")), exc
            )
            got = INTERNAL, _headers(INTERNAL)
        if got is None:  # parked: the worker calls again when the value may have changed
            start_response("200 OK", [])
            return []
        reply, headers = got
        start_response(_STATUS[reply.status], headers)
        return [] if method == "HEAD" else [reply.body]


def _what(path: str) -> str:
    return f"metadata request for {path[:80]!r}"


def _response(reply: Reply) -> Response:
    resp = Response(reply.body, status=_STATUS[reply.status])
    # Set after construction so Flask does not append "; charset=utf-8".
    for name, value in _headers(reply):
        resp.headers[name] = value
    return resp


def create_app(
    paths: Paths,
    *,
    cache: VmLookup | None = None,
    counters: RefusalCounters | None = None,
    fast_path: bool = True,
    warm: bool = False,
    token_key: bytes | None = None,
    policy: TokenPolicy | None = None,
    signer: Signer | None = None,
    limiter: RateLimiter | None = None,
    waiters_per_vm: int = 8,
) -> Flask:
    """Build the metadata application for one worker (call after fork).

    ``warm`` loads every stored VM before the first request; otherwise VMs are
    loaded on first use. ``fast_path=False`` routes every request through Flask.
    ``token_key`` signs IMDSv2 tokens: pass the same key (made before fork) to
    every worker of a service, or a token minted by one fails on another; None
    makes one for this application only. ``policy`` (default: hop limit 1, tokens
    optional) is how IMDSv2 is enforced. ``signer`` signs the instance identity
    document (:mod:`vr.metadata.identity`); without one those paths are 404.
    ``limiter`` (this worker's handle on the shared table) limits each VM's rate;
    ``waiters_per_vm`` bounds one VM's held ``wait_for_change`` requests per worker.
    """
    app = Flask(__name__)
    app.url_map.merge_slashes = False
    app.url_map.strict_slashes = False
    vms: VmLookup = cache if cache is not None else VmCache(paths)
    # the DigitalOcean tree's NIC details come from the router's own pushes
    lans = Lans(paths) if cache is None else None
    counts = counters if counters is not None else RefusalCounters(paths)
    tokens = Tokens(token_key if token_key is not None else new_key())
    imds = policy if policy is not None else TokenPolicy()
    # a guest's error is logged in one line per minute, never with a traceback
    errors = GuestErrors(LOG)
    if warm:
        LOG.info("metadata worker loaded %s VMs from %s", vms.warm(), paths.latest)
    guest = _Guest(
        tokens, imds, vms, signer, lans, lambda: store.stamp_token(paths), waiters_per_vm
    )
    app.extensions["vr.metadata.vmcache"] = vms
    app.extensions["vr.counters"] = counts

    @app.before_request
    def refuse_forwarded() -> Response | None:
        refused = _limited(limiter, counts, request.environ)
        if refused is not None:
            return _response(refused)
        for key in FORWARD_HEADERS:
            if key in request.environ:
                counts.count_forwarded()
                errors.error(
                    request.remote_addr or "",
                    f"{request.method[:20]} {request.path[:80]!r}",
                    outcome="refused: it carries a forwarding header",
                )
                return _response(FORBIDDEN)
        if request.method not in ALLOWED_METHODS and is_token_path(
            request.environ.get("PATH_INFO", "")
        ):
            if request.method != "PUT":
                return _response(NOT_ALLOWED_TOKEN)
            caller = request.environ.get("REMOTE_ADDR", "")
            reply = tokens.mint(caller, request.environ.get(TTL_ENVIRON))
            if reply.status == 200:
                set_hop_limit(request.environ, imds.hop_limit)
            return _response(reply)
        if request.method not in ALLOWED_METHODS:
            return _response(NOT_ALLOWED)
        return None

    def serve(path: str = "") -> Response:
        got = guest.get(request.environ)
        if got is None:  # parked (see FastPath)
            return Response(b"")
        reply, headers = got
        resp = Response(reply.body, status=_STATUS[reply.status])
        for name, value in headers:
            resp.headers[name] = value
        return resp

    every_method = ["GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"]
    app.add_url_rule("/", "root", serve, methods=every_method, provide_automatic_options=False)
    app.add_url_rule(
        "/<path:path>", "any", serve, methods=every_method, provide_automatic_options=False
    )

    @app.errorhandler(404)
    def not_found(exc: Exception) -> Response:
        return _response(NOT_FOUND)

    @app.errorhandler(405)
    def not_allowed(exc: Exception) -> Response:
        return _response(NOT_ALLOWED)

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        code = exc.code or 500
        return _response(Reply(code, f"{HTTPStatus(code).phrase.lower()}\n".encode()))

    @app.errorhandler(Exception)
    def failed(exc: Exception) -> Response:
        errors.error(request.remote_addr or "", _what(request.path), exc)
        return _response(INTERNAL)

    if fast_path:
        flask_wsgi: WSGIApp = app.wsgi_app
        fast = FastPath(guest, counts, flask_wsgi, errors, limiter)
        app.wsgi_app = fast  # type: ignore[method-assign]
    return app
