"""IMDSv2-style session tokens: ``PUT /latest/api/token``, then GETs that carry one.

Why: cloud-init's EC2 data source (and AWS SDKs) on a platform they identify as
EC2 ask for a token first and, in cloud-init 22.4, give up on any 4xx to that
PUT — it never falls back to plain GETs there. So the service mints tokens as
EC2 does (peers.md §1, §10) while plain GETs (IMDSv1, what CloudStack's guests
use) stay allowed:

* ``PUT /latest/api/token`` with ``X-aws-ec2-metadata-token-ttl-seconds: 1..21600``
  -> 200, the token as ``text/plain``, the TTL echoed in the same header; a missing
  or out-of-range TTL -> 400. A PUT carrying a forwarding header is refused (403)
  before it gets here, like every forwarded request.
* A GET or HEAD carrying ``X-aws-ec2-metadata-token`` must carry a valid one: a
  token minted for the same source address that has not expired, else 401 (the
  client then asks for a new one). A GET without the header is answered as ever.

Tokens are stateless: ``base64url(expiry || HMAC-SHA256(key, caller || expiry)[:16])``
with a key shared by every worker of one service run (generated before fork, see
:func:`new_key`), so any worker checks a token another minted, and restarting the
service invalidates them all. Expiry is on the system-wide monotonic clock.

Hop limit (EC2's ``http-put-response-hop-limit``): the reply to a token PUT leaves
with IP TTL :attr:`TokenPolicy.hop_limit` (1 by default, 1-64 as AWS allows), so a
container one routed (or NAT) hop behind the guest never receives a token. The
application sets it on the connection's socket (``environ["gunicorn.socket"]``, which
vr's event worker and gunicorn's own workers provide) and does not restore it: a
TCP retransmission of the token must not escape with a larger TTL, and every later
reply on that connection goes to the same client, which the token reached.

Tokens required (EC2's ``HttpTokens=required``): router-wide, or for the VMs listed
in ``imds_tokens_required_vms``; a GET or HEAD without a token then gets 401, as on
EC2. Tokens are secrets: never log them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import socket
import struct
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from vr.metadata.views import TEXT, Reply

# Names, not secrets:
TOKEN_PATH = "/latest/api/token"  # noqa: S105
TTL_HEADER = "X-aws-ec2-metadata-token-ttl-seconds"
TOKEN_HEADER = "X-aws-ec2-metadata-token"  # noqa: S105
TTL_ENVIRON = "HTTP_X_AWS_EC2_METADATA_TOKEN_TTL_SECONDS"
TOKEN_ENVIRON = "HTTP_X_AWS_EC2_METADATA_TOKEN"  # noqa: S105
MIN_TTL = 1
MAX_TTL = 21600
HOP_LIMIT_RANGE = (1, 64)
"""EC2's bounds of ``http-put-response-hop-limit``."""
KEY_BYTES = 32
_MAC_BYTES = 16
_EXPIRY = struct.Struct(">Q")

BAD_TTL = Reply(400, f"{TTL_HEADER}: expected whole seconds {MIN_TTL}-{MAX_TTL}\n".encode())
UNAUTHORIZED = Reply(401, b"invalid or expired token\n")


@dataclass(frozen=True)
class TokenPolicy:
    """How IMDSv2 is enforced: ``hop_limit`` is the IP TTL of a token reply;
    ``required`` makes every GET need a token; ``required_vms`` (VM addresses as
    ``REMOTE_ADDR`` spells them) need one even when ``required`` is off."""

    hop_limit: int = 1
    required: bool = False
    required_vms: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def of(cls, hop_limit: int, required: bool, required_vms: Iterable[str]) -> TokenPolicy:
        low, high = HOP_LIMIT_RANGE
        if not low <= hop_limit <= high:
            raise ValueError(f"hop limit {hop_limit!r}: expected {low} to {high}")
        return cls(hop_limit, required, frozenset(required_vms))

    def requires(self, caller: str) -> bool:
        """Whether a GET from ``caller`` must carry a token."""
        return self.required or caller in self.required_vms


def set_hop_limit(environ: dict[str, Any], hops: int) -> bool:
    """Send the rest of this connection's replies with IP TTL (IPv6: hop limit)
    ``hops``; False when the server gave no socket (e.g. Flask's test client)."""
    sock = environ.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return False
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_UNICAST_HOPS, hops)
        # an IPv4 client of a dual-stack socket
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hops)
    else:
        sock.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, hops)
    return True


def new_key() -> bytes:
    """A fresh signing key for one service run; create it before workers fork."""
    return os.urandom(KEY_BYTES)


def is_token_path(path: str) -> bool:
    return path.lower() == TOKEN_PATH


class Tokens:
    """Mint and check tokens with ``key`` (:func:`new_key`); ``clock`` for tests."""

    def __init__(self, key: bytes, clock: Callable[[], float] = time.monotonic) -> None:
        if len(key) < 16:
            raise ValueError(f"token key of {len(key)} bytes: expected at least 16")
        self._key = key
        self._clock = clock

    def _mac(self, caller: str, expiry: bytes) -> bytes:
        msg = caller.encode("utf-8", "surrogateescape") + b"|" + expiry
        return hmac.new(self._key, msg, hashlib.sha256).digest()[:_MAC_BYTES]

    def mint(self, caller: str, ttl: str | None) -> Reply:
        """The reply to a token PUT from ``caller`` (REMOTE_ADDR) with TTL header ``ttl``."""
        text = ttl.strip() if ttl is not None else ""
        # ASCII digits only (isdigit also takes "²"), and few: int() refuses thousands
        if not text.isascii() or not text.isdigit() or len(text) > len(str(MAX_TTL)):
            return BAD_TTL
        seconds = int(text)
        if not MIN_TTL <= seconds <= MAX_TTL:
            return BAD_TTL
        expiry = _EXPIRY.pack(int(self._clock()) + seconds)
        token = base64.urlsafe_b64encode(expiry + self._mac(caller, expiry)).rstrip(b"=")
        return Reply(200, token, TEXT, headers=((TTL_HEADER, str(seconds)),))

    def valid(self, caller: str, token: str) -> bool:
        """Whether ``token`` was minted for ``caller`` by this key and is unexpired."""
        raw = token.strip().encode("ascii", "replace")
        try:
            blob = base64.urlsafe_b64decode(raw + b"=" * (-len(raw) % 4))
        except (binascii.Error, ValueError):
            return False
        if len(blob) != _EXPIRY.size + _MAC_BYTES:
            return False
        expiry, mac = blob[: _EXPIRY.size], blob[_EXPIRY.size :]
        if not hmac.compare_digest(mac, self._mac(caller, expiry)):
            return False
        return bool(self._clock() < _EXPIRY.unpack(expiry)[0])
