"""Change notification: ETags and GCE's ``wait_for_change`` long-poll.

Every 200 reply to a metadata or user-data GET carries ``ETag`` (a hash of the
body: it changes exactly when the value does). ``?wait_for_change=true`` holds the
request until the value's ETag differs from ``last_etag`` (default: the ETag the
value has when the request arrives), or ``timeout_sec`` (1-:data:`MAX_TIMEOUT`,
default :data:`DEFAULT_TIMEOUT`) passed; then the current value is answered, as GCE
does. A guest agent thus picks up a user-data change or a new key without a reboot.

How a request is held depends on the worker:

* vr's event worker offers ``environ[PARK]``: ``park(deadline, probe, limit)``
  takes the connection out of its loop without blocking it. The worker polls
  ``probe()`` (the store's change stamp: one ``stat``) every
  :data:`vr.http.worker.HELD_POLL` seconds and, when it moved or the deadline
  passed, calls the application again with the same environ; the application
  answers or parks again. ``park`` refuses (returns False) when the VM already
  holds ``limit`` requests in that worker: the client then gets 429;
* gunicorn's own workers have no ``PARK``: the request thread polls the stamp itself.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs

from vr.metadata.views import Reply

PARK = "vr.park"
DEADLINE = "vr.wait_deadline"
LAST = "vr.wait_etag"
DEFAULT_TIMEOUT = 60
MAX_TIMEOUT = 3600
POLL = 0.05
Park = Callable[[float, Callable[[], object], int], bool]


_ETAGS: dict[bytes, str] = {}
_ETAG_BYTES = [0]
ETAG_MEMO_BYTES = 1 << 20
"""The bodies whose tags are remembered, in bytes at most: the same few bodies are
asked for again and again (each VM's keys), and bytes objects cache their hash."""


def etag(body: bytes) -> str:
    tag = _ETAGS.get(body)
    if tag is None:
        tag = '"' + hashlib.blake2b(body, digest_size=8).hexdigest() + '"'
        if _ETAG_BYTES[0] + len(body) > ETAG_MEMO_BYTES:
            _ETAGS.clear()
            _ETAG_BYTES[0] = 0
        if len(body) <= ETAG_MEMO_BYTES // 64:
            _ETAGS[body] = tag
            _ETAG_BYTES[0] += len(body)
    return tag


class BadWait(ValueError):
    pass


def wait_request(query: str) -> tuple[str | None, int] | None:
    """``(last_etag, timeout_sec)`` when ``query`` asks to wait for a change, else
    None. :class:`BadWait` names a value that is not what GCE accepts."""
    if "wait_for_change" not in query:
        return None
    params = parse_qs(query, keep_blank_values=True)
    if params.get("wait_for_change", [""])[-1].lower() != "true":
        return None
    last = params.get("last_etag", [None])[-1]
    text = params.get("timeout_sec", [str(DEFAULT_TIMEOUT)])[-1]
    if not text.isascii() or not text.isdigit() or not 1 <= int(text[:6]) <= MAX_TIMEOUT:
        raise BadWait(f"timeout_sec={text[:20]!r}: expected whole seconds 1-{MAX_TIMEOUT}")
    if last is not None and not last.startswith('"'):
        last = f'"{last}"'  # GCE clients send the ETag without quotes
    return last, int(text)


def hold(
    environ: dict[str, Any],
    tag: str,
    wait: tuple[str | None, int],
    probe: Callable[[], object],
    limit: int,
    answer: Callable[[], Reply],
) -> Reply | None:
    """Decide on a ``wait_for_change`` GET whose value now has ETag ``tag``: None
    means the request was parked (the worker calls again later); a Reply is the
    answer now (``answer()`` re-evaluates the value in a blocking worker)."""
    last, timeout = wait
    now = time.monotonic()
    deadline = environ.setdefault(DEADLINE, now + timeout)
    baseline = environ.setdefault(LAST, last if last is not None else tag)
    if tag != baseline or now >= deadline:
        return _NO_WAIT
    park: Park | None = environ.get(PARK)
    if park is not None:
        return None if park(deadline, probe, limit) else TOO_MANY
    # gunicorn's threaded worker: poll the stamp in this request's thread
    seen = probe()
    while time.monotonic() < deadline:
        time.sleep(POLL)
        stamp = probe()
        if stamp != seen:
            seen = stamp
            reply = answer()
            if reply.status != 200 or etag(reply.body) != baseline:
                return reply
    return _NO_WAIT


_NO_WAIT = Reply(0, b"")
"""Marker: answer the current value now."""
TOO_MANY = Reply(429, b"too many waiting requests\n", headers=(("Retry-After", "1"),))


def no_wait(reply: Reply) -> bool:
    return reply is _NO_WAIT
