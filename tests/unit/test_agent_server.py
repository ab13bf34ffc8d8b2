"""The agent's SSH transport and server decisions, in-process over a socket pair."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import paramiko
import pytest
from paramiko.auth_handler import AuthHandler
from paramiko.channel import Channel
from paramiko.common import (
    OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED,
    OPEN_FAILED_RESOURCE_SHORTAGE,
    cMSG_CHANNEL_REQUEST,
    cMSG_USERAUTH_REQUEST,
)

from tests.helpers.agent import KexRecorder
from tests.helpers.agent_loop import FakeApplier, applied
from vr import config
from vr.agent.keys import AuthorizedKeys, LegacyRSAKey
from vr.agent.limits import AgentLimits, AuthThrottle
from vr.agent.server import (
    LEGACY_ALGORITHMS,
    AgentContext,
    AgentTransport,
    KexGroup14SHA1,
    serve_connection,
)
from vr.errors import ConfigError
from vr.paths import Paths

RSA_HOST_KEY = LegacyRSAKey(key=paramiko.RSAKey.generate(2048).key)  # type: ignore[attr-defined]


class TrileadLike(KexRecorder):
    """A client offering only what CloudStack's Trilead SSH2 offers (no SHA-2 at all)."""

    _preferred_kex = ("diffie-hellman-group-exchange-sha1", "diffie-hellman-group14-sha1")
    _kex_info = {**paramiko.Transport._kex_info, "diffie-hellman-group14-sha1": KexGroup14SHA1}  # type: ignore[attr-defined]
    _preferred_keys = ("ssh-rsa",)
    _key_info = {**paramiko.Transport._key_info, "ssh-rsa": LegacyRSAKey}  # type: ignore[attr-defined]
    _preferred_macs = ("hmac-sha1", "hmac-sha1-96")


class NoAuth(paramiko.ServerInterface):
    pass


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair()
    try:
        yield a, b
    finally:
        a.close()
        b.close()


def handshake(
    pair: tuple[socket.socket, socket.socket],
    client_cls: type[KexRecorder],
    disabled: dict[str, list[str]] | None = None,
) -> tuple[KexRecorder, AgentTransport, BaseException | None]:
    server = AgentTransport(pair[0], disabled_algorithms=disabled)
    server.add_server_key(RSA_HOST_KEY)
    started = threading.Event()
    server.start_server(event=started, server=NoAuth())
    client = client_cls(pair[1])
    problem: BaseException | None = None
    try:
        client.start_client(timeout=20)
    except paramiko.SSHException as exc:
        problem = exc
    started.wait(20)
    return client, server, problem


def test_the_legacy_algorithms_come_after_every_modern_one() -> None:
    assert AgentTransport._preferred_kex[-1] == "diffie-hellman-group14-sha1"  # type: ignore[attr-defined]
    assert AgentTransport._preferred_keys[-1] == "ssh-rsa"  # type: ignore[attr-defined]
    assert AgentTransport._preferred_pubkeys[-1] == "ssh-rsa"  # type: ignore[attr-defined]
    assert "ssh-rsa" not in paramiko.Transport._preferred_keys  # type: ignore[attr-defined]


def test_a_sha1_only_client_negotiates_group14_sha1_and_an_ssh_rsa_host_signature(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server, problem = handshake(pair, TrileadLike)
    try:
        assert problem is None
        assert client.is_active()
        assert client.kex_names == ["diffie-hellman-group14-sha1"]
        assert client.host_key_type == "ssh-rsa"
        assert client.get_remote_server_key().asbytes() == RSA_HOST_KEY.asbytes()
    finally:
        client.close()
        server.close()


def test_with_the_legacy_algorithms_disabled_a_sha1_only_client_is_refused(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server, problem = handshake(pair, TrileadLike, LEGACY_ALGORITHMS)
    try:
        assert isinstance(problem, paramiko.SSHException)
        assert not client.is_active()
    finally:
        client.close()
        server.close()


def test_a_modern_client_gets_a_modern_exchange_even_with_legacy_on(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    client, server, problem = handshake(pair, KexRecorder)
    try:
        assert problem is None
        assert client.kex_names and "sha1" not in client.kex_names[0]
        assert client.host_key_type == "rsa-sha2-512"
        assert "sha1" not in client.local_mac  # type: ignore[attr-defined]
    finally:
        client.close()
        server.close()


def test_legacy_algorithms_are_a_config_setting_on_by_default(paths: Paths) -> None:
    assert config.load(paths).ssh_legacy_algorithms is True
    paths.config.write_text(json.dumps({"ssh_legacy_algorithms": False}))
    assert config.load(paths).ssh_legacy_algorithms is False
    paths.config.write_text(json.dumps({"ssh_legacy_algorithms": "no"}))
    with pytest.raises(ConfigError, match="ssh_legacy_algorithms='no': expected bool"):
        config.load(paths)


# --- authentication: only a verified signature is a login ------------------------------

PEER = "192.0.2.7:40000"
ADDRESS = "192.0.2.7"


@dataclass
class Served:
    """One connection handled by :func:`serve_connection` in a thread, and its client end."""

    ctx: AgentContext
    sock: socket.socket
    thread: threading.Thread

    def client(self) -> paramiko.Transport:
        t = paramiko.Transport(self.sock)
        t.start_client(timeout=20)
        return t


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def authorized_key() -> paramiko.PKey:
    return paramiko.RSAKey.generate(2048)


@pytest.fixture
def ctx(paths: Paths, authorized_key: paramiko.PKey) -> AgentContext:
    paths.authorized_keys.parent.mkdir(parents=True, exist_ok=True)
    paths.authorized_keys.write_text(f"ssh-rsa {authorized_key.get_base64()} mgmt\n")
    return AgentContext(
        paths=paths,
        limits=AgentLimits(),
        host_keys=[RSA_HOST_KEY],
        authorized=AuthorizedKeys(paths.authorized_keys),
        throttle=AuthThrottle(base=0.01, cap=0.01, clock=Clock()),
        make_applier=lambda p: FakeApplier(applied),
    )


@contextlib.contextmanager
def serve(ctx: AgentContext) -> Iterator[Served]:
    server_sock, client_sock = socket.socketpair()
    thread = threading.Thread(target=serve_connection, args=(server_sock, PEER, ctx), daemon=True)
    thread.start()
    try:
        yield Served(ctx, client_sock, thread)
    finally:
        client_sock.close()
        thread.join(20)
        server_sock.close()
    assert not thread.is_alive()


@pytest.fixture
def served(ctx: AgentContext) -> Iterator[Served]:
    with serve(ctx) as s:
        yield s


def logged_in(served: Served, key: paramiko.PKey) -> paramiko.Transport:
    t = served.client()
    t.auth_publickey("root", key)
    return t


class ForgedKey(paramiko.RSAKey):
    """The authorized public key with signatures made by some other private key."""

    def __init__(self, public: paramiko.PKey) -> None:
        super().__init__(key=public.key)  # type: ignore[attr-defined]
        self._forger = paramiko.RSAKey.generate(2048)

    def sign_ssh_data(self, data: bytes, algorithm: str | None = None) -> paramiko.Message:
        return self._forger.sign_ssh_data(data, algorithm)


class QueryOnly(AuthHandler):
    """A client that only asks "would you accept this key?" (no signature), like anyone
    who has the public key can."""

    def __init__(self, transport: paramiko.Transport) -> None:
        super().__init__(transport)
        self.key_ok = threading.Event()

    def _parse_service_accept(self, m: paramiko.Message) -> None:
        q = paramiko.Message()
        q.add_byte(cMSG_USERAUTH_REQUEST)
        q.add_string(self.username)
        q.add_string("ssh-connection")
        q.add_string("publickey")
        q.add_boolean(False)
        q.add_string("rsa-sha2-256")
        q.add_string(self.private_key.asbytes())
        self.transport._send_message(q)

    def _parse_userauth_info_request(self, m: paramiko.Message) -> None:
        self.key_ok.set()  # 60 is also USERAUTH_PK_OK: the server accepts the key


def test_the_unsigned_key_query_does_not_reset_the_failure_count(
    served: Served, authorized_key: paramiko.PKey
) -> None:
    for _ in range(3):
        served.ctx.throttle.failure(ADDRESS)
    t = served.client()
    try:
        handler = QueryOnly(t)
        t.auth_handler = handler
        handler.auth_publickey("root", authorized_key, threading.Event())
        assert handler.key_ok.wait(20)  # the server said it would accept the key ...
        assert served.ctx.throttle.failures(ADDRESS) == 3  # ... and that is not a login
        assert not t.is_authenticated()
    finally:
        t.close()


def test_a_bad_signature_with_an_authorized_key_is_counted_and_logged(
    served: Served, authorized_key: paramiko.PKey, caplog: pytest.LogCaptureFixture
) -> None:
    served.ctx.throttle.failure(ADDRESS)
    t = served.client()
    try:
        with pytest.raises(paramiko.AuthenticationException):
            t.auth_publickey("root", ForgedKey(authorized_key))
        assert served.ctx.throttle.failures(ADDRESS) == 2
        assert f"ssh-rsa key {authorized_key.fingerprint}: signature did not verify" in caplog.text
        assert "(failure 2 from this address" in caplog.text
        # a real login afterwards is what resets the count
        t.auth_publickey("root", authorized_key)
        assert t.is_authenticated()
        deadline = time.monotonic() + 20
        while served.ctx.throttle.failures(ADDRESS) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert served.ctx.throttle.failures(ADDRESS) == 0
    finally:
        t.close()


# --- channels and requests --------------------------------------------------------------


def test_exactly_max_channels_sessions_may_be_open_at_once(
    ctx: AgentContext, authorized_key: paramiko.PKey
) -> None:
    small = dataclasses.replace(ctx, limits=dataclasses.replace(ctx.limits, max_channels=2))
    with serve(small) as served:
        t = logged_in(served, authorized_key)
        try:
            first, second = t.open_session(timeout=20), t.open_session(timeout=20)
            with pytest.raises(paramiko.ChannelException) as info:
                t.open_session(timeout=20)
            assert info.value.code == OPEN_FAILED_RESOURCE_SHORTAGE
            first.close()
            deadline = time.monotonic() + 20
            while True:  # the server forgets the closed channel once both sides closed it
                try:
                    third = t.open_session(timeout=20)
                    break
                except paramiko.ChannelException:
                    assert time.monotonic() < deadline
                    time.sleep(0.05)
            assert not third.closed and not second.closed
        finally:
            t.close()


def test_a_connection_is_closed_after_the_session_timeout_even_when_active(
    ctx: AgentContext, authorized_key: paramiko.PKey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vr.agent.server")
    short = dataclasses.replace(
        ctx, limits=dataclasses.replace(ctx.limits, session_timeout=1.0, idle_timeout=60.0)
    )
    with serve(short) as served:
        t = logged_in(served, authorized_key)
        try:
            deadline = time.monotonic() + 20
            while t.is_active() and time.monotonic() < deadline:
                try:
                    t.send_ignore()  # traffic: never idle
                except EOFError:
                    # the agent closed the connection between is_active() and the send
                    break
                time.sleep(0.1)
            while t.is_active() and time.monotonic() < deadline:
                time.sleep(0.05)  # the client's transport thread notices the close
            assert not t.is_active()
        finally:
            t.close()
    assert f"closing connection from {PEER}: session longer than 1s" in caplog.text


def test_a_direct_tcpip_channel_as_for_ssh_L_is_refused(
    served: Served, authorized_key: paramiko.PKey, caplog: pytest.LogCaptureFixture
) -> None:
    t = logged_in(served, authorized_key)
    try:
        with pytest.raises(paramiko.ChannelException) as info:
            t.open_channel("direct-tcpip", ("127.0.0.1", 22), ("127.0.0.1", 40001), timeout=20)
        assert info.value.code == OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        assert "refused direct-tcpip channel (ssh -L/-W) to '127.0.0.1' port 22" in caplog.text
    finally:
        t.close()


def test_a_subsystem_other_than_sftp_is_refused(
    served: Served, authorized_key: paramiko.PKey, caplog: pytest.LogCaptureFixture
) -> None:
    t = logged_in(served, authorized_key)
    try:
        chan = t.open_session(timeout=20)
        with pytest.raises(paramiko.SSHException):  # paramiko closes the channel on failure
            chan.invoke_subsystem("netconf")
        assert f"refused subsystem 'netconf' from {PEER}" in caplog.text
    finally:
        t.close()


def test_agent_forwarding_is_refused_and_no_agent_channel_is_opened(
    served: Served, authorized_key: paramiko.PKey, caplog: pytest.LogCaptureFixture
) -> None:
    t = logged_in(served, authorized_key)
    try:
        chan = t.open_session(timeout=20)
        # paramiko hands an agent channel the server opens to this handler, not to accept()
        agent_channels: list[Channel] = []
        chan.request_forward_agent(agent_channels.append)
        chan.exec_command("/opt/cloud/bin/update_config.py f")
        assert chan.recv_exit_status() == 0  # the session itself goes on
        assert f"refused agent forwarding from {PEER}" in caplog.text
        assert agent_channels == []  # the server never opens an agent channel
    finally:
        t.close()


def raw_request(chan: Channel, kind: str, *strings: str) -> None:
    """A channel request as a client may send it: no reply asked, no client-side checks."""
    m = paramiko.Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(chan.remote_chanid)
    m.add_string(kind)
    m.add_boolean(False)
    for s in strings:
        m.add_string(s)
    chan.transport._send_user_message(m)  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "again",
    [("exec", "/opt/cloud/bin/update_config.py g"), ("shell",), ("subsystem", "sftp")],
)
def test_a_channel_runs_one_command_and_further_requests_start_no_thread(
    ctx: AgentContext,
    authorized_key: paramiko.PKey,
    caplog: pytest.LogCaptureFixture,
    again: tuple[str, ...],
) -> None:
    release = threading.Event()
    running = threading.Event()

    def held(args: list[str], out: TextIO, err: TextIO) -> int:
        running.set()
        release.wait(20)
        return 0

    applier = FakeApplier(held)
    blocking = dataclasses.replace(ctx, make_applier=lambda p: applier)
    with serve(blocking) as served:
        t = logged_in(served, authorized_key)
        try:
            chan = t.open_session(timeout=20)
            chan.exec_command("/opt/cloud/bin/update_config.py f")
            assert running.wait(20)
            threads = threading.active_count()
            for _ in range(50):
                raw_request(chan, *again)
            # answered after the 50 before it (one transport thread, in order): refused
            with pytest.raises(paramiko.SSHException):
                chan.exec_command("/opt/cloud/bin/update_config.py h")
            assert threading.active_count() == threads
            assert applier.calls == [("update_config", ["f"])]
            assert "the channel already ran a command" in caplog.text
        finally:
            release.set()
            t.close()


def test_a_packet_announced_larger_than_openssh_accepts_is_refused_before_it_is_read(
    ctx: AgentContext, caplog: pytest.LogCaptureFixture
) -> None:
    """Before any login: paramiko would otherwise read (and buffer, copying it at each
    chunk) all of a 2 GiB packet a stranger announces."""
    caplog.set_level(logging.INFO, logger="vr.agent.server")
    with serve(ctx) as served:
        served.sock.sendall(b"SSH-2.0-stranger\r\n")
        assert served.sock.recv(64).startswith(b"SSH-2.0-vr_agent")
        # length 0x7ffffff4 (a multiple of the block size 8 after the length field), then
        # the rest of the first block; nothing more: a patient peer would send the rest
        served.sock.sendall(bytes.fromhex("7ffffff4") + b"\x04\x14\x00\x00")
        served.sock.shutdown(socket.SHUT_WR)
        served.sock.settimeout(20)
        while served.sock.recv(4096):  # the agent's KEXINIT, until it closes
            pass
    assert f"ssh handshake with {PEER} failed: packet of 2147483632 bytes" in caplog.text
