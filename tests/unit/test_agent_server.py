"""The agent's SSH transport and server decisions, in-process over a socket pair."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import paramiko
import pytest

from vr import config
from vr.agent.keys import LegacyRSAKey
from vr.agent.server import LEGACY_ALGORITHMS, AgentTransport, KexGroup14SHA1
from vr.errors import ConfigError
from vr.paths import Paths

RSA_HOST_KEY = LegacyRSAKey(key=paramiko.RSAKey.generate(2048).key)  # type: ignore[attr-defined]


class Recording(paramiko.Transport):
    """A client transport that remembers the key exchange it agreed on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kex_names: list[str] = []

    def _parse_kex_init(self, m: paramiko.Message) -> None:
        super()._parse_kex_init(m)  # type: ignore[misc]
        self.kex_names.append(self.kex_engine.name)  # type: ignore[attr-defined]


class TrileadLike(Recording):
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
    client_cls: type[Recording],
    disabled: dict[str, list[str]] | None = None,
) -> tuple[Recording, AgentTransport, BaseException | None]:
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
    client, server, problem = handshake(pair, Recording)
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
