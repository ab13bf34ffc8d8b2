"""One SSH connection to the push agent: authentication, channels, requests.

Runs in its own thread (see :mod:`vr.agent.daemon`). paramiko calls the
``check_*`` methods from its transport thread; a request's work starts only after
paramiko has answered it (see :func:`_handle_request_then_start`), so the exit
status never overtakes the request's reply on the wire.
"""

from __future__ import annotations

import contextlib
import io
import logging
import socket
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from hashlib import sha1
from typing import Any

import paramiko
from paramiko.auth_handler import AuthHandler
from paramiko.channel import Channel
from paramiko.common import (
    AUTH_FAILED,
    AUTH_SUCCESSFUL,
    MSG_CHANNEL_REQUEST,
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_FAILED_RESOURCE_SHORTAGE,
    OPEN_SUCCEEDED,
)
from paramiko.kex_group14 import KexGroup14SHA256
from paramiko.packet import Packetizer

from vr.agent.keys import AuthorizedKeys, LegacyRSAKey
from vr.agent.limits import AgentLimits, AuthThrottle
from vr.agent.requests import (
    SHELL,
    ApplyCfg,
    Diagnostic,
    ExecRefused,
    ExecRequest,
    PairSync,
    ScpTarget,
    UpdateConfig,
    parse_exec,
)
from vr.agent.scp import ProtocolBroken, ScpSink
from vr.agent.sftp import CacheSFTP, CacheSFTPServer, SftpContext
from vr.applier import Pusher
from vr.errors import shorten
from vr.ops.metrics import Metrics
from vr.paths import Paths

LOG = logging.getLogger(__name__)

USER = "root"
MAX_AUTH_FAILURES = 6
VERSION = "SSH-2.0-vr_agent"


@dataclass
class AgentContext:
    """Shared by every connection of one agent process."""

    paths: Paths
    limits: AgentLimits
    host_keys: list[paramiko.PKey]
    authorized: AuthorizedKeys
    throttle: AuthThrottle
    make_applier: Callable[[Paths], Pusher]
    legacy_algorithms: bool = True
    """Offer the SHA-1 algorithms CloudStack's management server needs (last)."""
    stopping: threading.Event = field(default_factory=threading.Event)
    metrics: Metrics | None = None
    """Counts diagnostics (pushes are counted by a metered ``make_applier``)."""


class Activity:
    """When a connection started, last moved, and whether a command is running."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self.started = self.last = clock()
        self.busy = 0
        self._lock = threading.Lock()

    def touch(self) -> None:
        self.last = self._clock()

    def begin(self) -> None:
        with self._lock:
            self.busy += 1
            self.last = self._clock()

    def end(self) -> None:
        with self._lock:
            self.busy -= 1
            self.last = self._clock()


class ChannelText(io.TextIOBase):
    """A text stream onto a channel's stdout or stderr; a vanished client is not an error."""

    def __init__(self, send: Callable[[bytes], None]) -> None:
        super().__init__()
        self._send = send

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
            self._send(s.encode("utf-8", "replace"))
        return len(s)


def _handle_request_then_start(chan: Channel, m: paramiko.Message) -> None:
    Channel._handle_request(chan, m)  # type: ignore[attr-defined]
    server = chan.transport.server_object  # type: ignore[union-attr]
    if isinstance(server, AgentServer):
        server.start_pending(chan)


class KexGroup14SHA1(KexGroup14SHA256):
    """``diffie-hellman-group14-sha1`` (RFC 4253 8.2): the 2048-bit group with SHA-1.

    paramiko 5 removed it; it is the best key exchange CloudStack's Java SSH library
    (Trilead) offers besides group-exchange-sha1 and the 1024-bit group1-sha1.
    """

    name = "diffie-hellman-group14-sha1"
    hash_algo = sha1


LEGACY_KEX = KexGroup14SHA1.name
LEGACY_RSA = "ssh-rsa"
LEGACY_ALGORITHMS: dict[str, list[str]] = {
    "kex": [LEGACY_KEX],
    "keys": [LEGACY_RSA],
    "pubkeys": [LEGACY_RSA],
}
"""What ``ssh_legacy_algorithms: false`` disables (paramiko's ``disabled_algorithms``)."""


MAX_PACKET = 256 * 1024
"""Largest SSH packet read, as OpenSSH's PACKET_MAX_SIZE (RFC 4253 asks for 35000)."""


class BoundedPacketizer(Packetizer):
    """paramiko's packet reader, refusing a packet announced larger than :data:`MAX_PACKET`.

    paramiko reads whatever length the peer announces, before any login: a 2 GiB
    ``recv`` buffer, and the data appended chunk by chunk (copied each time).
    """

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        if n > MAX_PACKET + 64:  # + the MAC
            raise paramiko.SSHException(f"packet of {n} bytes is larger than {MAX_PACKET}")
        data: bytes = super().read_all(n, check_rekey)
        return data


class AgentAuthHandler(AuthHandler):
    """paramiko's server-side authentication, telling the server each final result."""

    def _send_auth_result(self, username: str, method: str, result: int) -> None:
        server = self.transport.server_object
        if isinstance(server, AgentServer):
            server.auth_result(username, method, result)
        super()._send_auth_result(username, method, result)  # type: ignore[misc]


class AgentTransport(paramiko.Transport):
    """paramiko's server transport, plus the SHA-1 algorithms CloudStack's Trilead needs.

    Added, each after every modern choice: key exchange ``diffie-hellman-group14-sha1``,
    ``ssh-rsa`` (SHA-1) host-key signatures with the RSA host key, and ``ssh-rsa``
    client signatures. As a server, paramiko takes the first algorithm of the
    *client's* list that it supports, so a client offering anything modern gets it;
    only a client offering nothing newer lands on SHA-1. ``disabled_algorithms=``
    :data:`LEGACY_ALGORITHMS` turns them off.
    """

    _preferred_kex = (*paramiko.Transport._preferred_kex, LEGACY_KEX)  # type: ignore[attr-defined]
    _kex_info = {**paramiko.Transport._kex_info, LEGACY_KEX: KexGroup14SHA1}  # type: ignore[attr-defined]
    _preferred_keys = (*paramiko.Transport._preferred_keys, LEGACY_RSA)  # type: ignore[attr-defined]
    _preferred_pubkeys = (*paramiko.Transport._preferred_pubkeys, LEGACY_RSA)  # type: ignore[attr-defined]
    _key_info = {**paramiko.Transport._key_info, LEGACY_RSA: LegacyRSAKey}  # type: ignore[attr-defined]

    def _parse_newkeys(self, m: paramiko.Message) -> None:
        # paramiko makes a plain AuthHandler here on the first key exchange unless one exists
        if self.server_mode and self.auth_handler is None:
            self.auth_handler = AgentAuthHandler(self)
        super()._parse_newkeys(m)  # type: ignore[misc]

    def __init__(self, sock: socket.socket, **kwargs: Any) -> None:
        super().__init__(sock, **kwargs)
        # paramiko builds its Packetizer in __init__; only the reading limit changes
        self.packetizer.__class__ = BoundedPacketizer

    _channel_handler_table = {
        **paramiko.Transport._channel_handler_table,  # type: ignore[attr-defined]
        MSG_CHANNEL_REQUEST: _handle_request_then_start,
    }


class AgentServer(paramiko.ServerInterface):
    """Decides every request of one connection; see the module docstring of :mod:`vr.agent`."""

    def __init__(
        self,
        ctx: AgentContext,
        peer: str,
        activity: Activity,
        on_login: Callable[[], None] = lambda: None,
    ) -> None:
        self.ctx = ctx
        self.on_login = on_login
        self.peer = peer
        self.address = peer.rsplit(":", 1)[0]
        self.activity = activity
        self.transport: paramiko.Transport | None = None
        self.auth_failures = 0
        self.key_used: str | None = None
        self._offered: str | None = None
        self._pending: dict[int, ExecRequest] = {}
        self._commanded: weakref.WeakSet[Channel] = weakref.WeakSet()
        self._stop_seen: float | None = None
        self._lock = threading.Lock()

    # --- authentication ---------------------------------------------------------------

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_none(self, username: str) -> int:
        return AUTH_FAILED

    def check_auth_password(self, username: str, password: str) -> int:
        return self._failed(username, "password authentication is not accepted")

    def check_auth_interactive(self, username: str, submethods: str) -> Any:
        return self._failed(username, "keyboard-interactive authentication is not accepted")

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        """Is ``key`` one that may log in? Not yet a login: see :meth:`auth_result`.

        paramiko asks this before it verifies the signature, and also for the
        unsigned "would you accept this key?" query, which anyone who knows the
        public key can send.
        """
        what = f"{key.get_name()} key {key.fingerprint}"
        self._offered = None
        if username != USER:
            return self._failed(username, f"only user {USER} may log in ({what})")
        if not self.ctx.authorized.allows(key):
            return self._failed(username, f"{what} is not in {self.ctx.authorized.path}")
        self._offered = what
        return AUTH_SUCCESSFUL

    def auth_result(self, username: str, method: str, result: int) -> None:
        """paramiko's final answer to one login attempt, just before it is sent.

        Only here does a signature count: a verified one is the login (the throttle
        forgets the address), a bad one with an authorized key is a failure like any
        other. Called by :class:`AgentAuthHandler`.
        """
        offered, self._offered = self._offered, None
        if result == AUTH_SUCCESSFUL:
            self.key_used = offered
            self.ctx.throttle.success(self.address)
            self.on_login()
        elif method == "publickey" and offered is not None:
            self._failed(username, f"{offered}: signature did not verify")

    def _failed(self, username: str, reason: str) -> int:
        self.auth_failures += 1
        count, delay = self.ctx.throttle.failure(self.address)
        LOG.warning(
            "auth failed for %s from %s: %s (failure %d from this address; answering in %.1fs)",
            shorten(username, 40),
            self.peer,
            reason,
            count,
            delay,
        )
        # stalls only this connection's transport thread
        time.sleep(delay)
        return AUTH_FAILED

    # --- channels and requests --------------------------------------------------------

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session":
            LOG.warning("refused %s channel from %s: no forwarding", kind, self.peer)
            return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        if self.transport is not None:
            # the channel asked for is not among them yet
            open_now = len(self.transport._channels.values())  # type: ignore[attr-defined]
            if open_now >= self.ctx.limits.max_channels:
                LOG.warning("refused channel from %s: %d already open", self.peer, open_now)
                return OPEN_FAILED_RESOURCE_SHORTAGE
        self.activity.touch()
        return OPEN_SUCCEEDED

    def check_channel_pty_request(self, channel: Channel, *args: Any) -> bool:
        LOG.warning("refused pty request from %s", self.peer)
        return False

    def check_channel_shell_request(self, channel: Channel) -> bool:
        return self._queue(channel, SHELL)

    def check_channel_exec_request(self, channel: Channel, command: bytes) -> bool:
        return self._queue(channel, parse_exec(command))

    def check_channel_subsystem_request(self, channel: Channel, name: str) -> bool:
        if name != "sftp":
            LOG.warning("refused subsystem %s from %s", shorten(name, 40), self.peer)
            return False
        if not self._claim(channel, "subsystem sftp"):
            return False
        self.activity.touch()
        ok: bool = super().check_channel_subsystem_request(channel, name)
        return ok

    def check_channel_forward_agent_request(self, channel: Channel) -> bool:
        LOG.warning("refused agent forwarding from %s", self.peer)
        return False

    def check_channel_x11_request(self, channel: Channel, *args: Any) -> bool:
        LOG.warning("refused X11 forwarding from %s", self.peer)
        return False

    def check_channel_direct_tcpip_request(
        self, chanid: int, origin: tuple[str, int], destination: tuple[str, int]
    ) -> int:
        # paramiko asks this, not check_channel_request, for ssh -L / -W channels
        host, port = destination
        LOG.warning(
            "refused direct-tcpip channel (ssh -L/-W) to %s port %s from %s: no forwarding",
            shorten(str(host), 60),
            port,
            self.peer,
        )
        return OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_port_forward_request(self, address: str, port: int) -> int:
        LOG.warning("refused port forwarding %s:%s from %s", address, port, self.peer)
        return False

    def sftp_context(self) -> SftpContext:
        return SftpContext(
            self.ctx.paths.cache, self.ctx.limits.max_upload_bytes, self.peer, self.activity.touch
        )

    def _claim(self, channel: Channel, what: str) -> bool:
        """Mark ``channel`` as running its one command; False if it already has one.

        Like OpenSSH, a session channel takes one shell, exec or subsystem request:
        each further one would start another thread past ``max_channels``.
        """
        with self._lock:
            if channel in self._commanded:
                refused = True
            else:
                refused = False
                self._commanded.add(channel)
        if refused:
            LOG.warning(
                "refused %s on channel %d from %s: the channel already ran a command",
                what,
                channel.get_id(),
                self.peer,
            )
        return not refused

    def _queue(self, channel: Channel, request: ExecRequest) -> bool:
        if not self._claim(channel, "shell" if request is SHELL else "exec"):
            return False
        with self._lock:
            self._pending[channel.get_id()] = request
        self.activity.touch()
        return True

    def start_pending(self, channel: Channel) -> None:
        """Run the queued request of ``channel`` (its reply has been sent)."""
        with self._lock:
            request = self._pending.pop(channel.get_id(), None)
        if request is not None:
            self.activity.begin()
            threading.Thread(
                target=self._run, args=(channel, request), name=f"req-{self.peer}", daemon=True
            ).start()

    def _run(self, chan: Channel, request: ExecRequest) -> None:
        code = 1
        try:
            code = self._execute(chan, request)
        except Exception:
            LOG.exception("request %r from %s failed", request, self.peer)
            ChannelText(chan.sendall_stderr).write(
                "vr-agent: internal error, see /var/log/cloud.log\n"
            )
        finally:
            self.activity.end()
            _finish(chan, code)

    def _execute(self, chan: Channel, request: ExecRequest) -> int:
        out, err = ChannelText(chan.sendall), ChannelText(chan.sendall_stderr)
        if isinstance(request, UpdateConfig):
            LOG.info("%s: update_config.py %s", self.peer, " ".join(request.args))
            applier = self.ctx.make_applier(self.ctx.paths)
            code: int = applier.update_config(list(request.args), out, err)
            return code
        if isinstance(request, ApplyCfg):
            LOG.info("%s: vr_cfg.sh %s", self.peer, " ".join(request.args))
            applier = self.ctx.make_applier(self.ctx.paths)
            code = applier.apply_cfg(list(request.args), out, err)
            return code
        if isinstance(request, ScpTarget):
            return self._scp(chan, request)
        if isinstance(request, Diagnostic):
            return self._diagnose(chan, request, out, err)
        if isinstance(request, PairSync):
            return self._pair_sync(chan, err)
        assert isinstance(request, ExecRefused)
        LOG.warning("refused request from %s: %s", self.peer, request.reason)
        err.write(f"vr-agent: {request.reason}\n")
        return request.code

    def _diagnose(
        self, chan: Channel, request: Diagnostic, out: ChannelText, err: ChannelText
    ) -> int:
        from vr.ops import diagrun

        LOG.info("%s: diagnostic %s", self.peer, request.kind)
        if self.ctx.metrics is not None:
            self.ctx.metrics.diagnostics.labels(request.kind).inc()
        transport = self.transport

        def stopped() -> bool:
            gone = chan.closed or (transport is not None and not transport.is_active())
            return gone or self.ctx.stopping.is_set()

        code = diagrun.run(request, self.ctx.paths, out, err, stopped)
        LOG.info("%s: diagnostic %s ended with %d", self.peer, request.kind, code)
        return code

    def _pair_sync(self, chan: Channel, err: ChannelText) -> int:
        """Read the peer's ledger (stdin to EOF, bounded), merge it, answer ours."""
        from vr.pair.ledger import LedgerError
        from vr.pair.sync import serve_request

        chan.settimeout(self.ctx.limits.idle_timeout)
        limit = self.ctx.limits.max_upload_bytes
        parts: list[bytes] = []
        size = 0
        try:
            while chunk := chan.recv(65536):
                size += len(chunk)
                if size > limit:
                    err.write(f"vr-agent: pair sync larger than {limit} bytes refused\n")
                    return 1
                parts.append(chunk)
                self.activity.touch()
            answer = serve_request(self.ctx.paths, b"".join(parts), self.peer)
        except LedgerError as exc:
            LOG.warning("refused pair sync from %s: %s", self.peer, exc)
            err.write(f"vr-agent: {exc}\n")
            return 1
        except (TimeoutError, OSError, EOFError) as exc:
            LOG.warning(
                "pair sync from %s broke off: %s", self.peer, str(exc) or type(exc).__name__
            )
            return 1
        chan.sendall(answer)
        return 0

    def _scp(self, chan: Channel, request: ScpTarget) -> int:
        chan.settimeout(self.ctx.limits.idle_timeout)
        sink = ScpSink(
            chan,
            self.ctx.paths.cache,
            request.name,
            self.ctx.limits.max_upload_bytes,
            self.peer,
            self.activity.touch,
        )
        try:
            if request.error is not None:
                return sink.refuse_target(request.error).exit_code
            return sink.run().exit_code
        except (ProtocolBroken, TimeoutError, EOFError, OSError) as exc:
            LOG.warning("scp from %s broke off: %s", self.peer, str(exc) or type(exc).__name__)
            return 1

    # --- connection life ----------------------------------------------------------------

    def close_reason(self, now: float) -> str | None:
        """Why the connection should be closed now, if it should."""
        limits, act = self.ctx.limits, self.activity
        if self.auth_failures >= MAX_AUTH_FAILURES:
            return f"{self.auth_failures} failed authentication attempts"
        authed = self.transport is not None and self.transport.is_authenticated()
        if not authed and now - act.started > limits.auth_timeout:
            return f"not authenticated within {limits.auth_timeout:.0f}s"
        if now - act.started > limits.session_timeout:
            return f"session longer than {limits.session_timeout:.0f}s"
        if act.busy == 0 and now - act.last > limits.idle_timeout:
            return f"idle for {limits.idle_timeout:.0f}s"
        if self.ctx.stopping.is_set():
            if self._stop_seen is None:
                self._stop_seen = now
            if act.busy == 0 or now - self._stop_seen > limits.stop_grace:
                return "agent stopping"
        return None


def _finish(chan: Channel, code: int) -> None:
    """Report the exit status like OpenSSH: status, then EOF, then close."""
    with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
        chan.send_exit_status(code)
        chan.shutdown_write()
        chan.close()


def serve_connection(
    sock: socket.socket,
    peer: str,
    ctx: AgentContext,
    on_login: Callable[[], None] = lambda: None,
) -> None:
    """Speak SSH on ``sock`` until the client leaves or a limit closes the connection.

    ``on_login`` is called when the client has authenticated (before it is told so).
    """
    activity = Activity()
    transport = AgentTransport(
        sock, disabled_algorithms=None if ctx.legacy_algorithms else LEGACY_ALGORITHMS
    )
    transport.local_version = VERSION
    transport.banner_timeout = ctx.limits.auth_timeout
    transport.handshake_timeout = ctx.limits.auth_timeout
    for key in ctx.host_keys:
        transport.add_server_key(key)
    transport.set_subsystem_handler("sftp", CacheSFTPServer, CacheSFTP)
    server = AgentServer(ctx, peer, activity, on_login)
    server.transport = transport
    try:
        transport.start_server(server=server)
    except (paramiko.SSHException, EOFError, OSError) as exc:
        LOG.info("ssh handshake with %s failed: %s", peer, str(exc) or type(exc).__name__)
        transport.close()
        return
    logged_in = False
    # paramiko holds channels weakly and closes them when collected: keep them here
    channels: list[Channel] = []
    try:
        while transport.is_active():
            chan = transport.accept(timeout=0.2)  # requests arrive in the check_* callbacks
            channels = [c for c in channels if not c.closed]
            if chan is not None:
                channels.append(chan)
            if not logged_in and transport.is_authenticated():
                logged_in = True
                LOG.info("%s logged in from %s with %s", USER, peer, server.key_used)
            reason = server.close_reason(time.monotonic())
            if reason is not None:
                LOG.info("closing connection from %s: %s", peer, reason)
                break
    finally:
        transport.close()
