"""IMDSv2 tokens: minted per caller with a TTL, checked statelessly, without HTTP."""

from __future__ import annotations

import socket

import pytest

from vr.metadata.tokens import (
    MAX_TTL,
    TTL_HEADER,
    TokenPolicy,
    Tokens,
    is_token_path,
    new_key,
    set_hop_limit,
)


class Clock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def minted(tokens: Tokens, caller: str = "10.1.1.5", ttl: str = "60") -> str:
    reply = tokens.mint(caller, ttl)
    assert reply.status == 200
    return reply.body.decode()


def test_a_token_is_valid_for_its_caller_until_its_ttl_ends() -> None:
    clock = Clock()
    tokens = Tokens(new_key(), clock)
    reply = tokens.mint("10.1.1.5", "60")
    assert (reply.status, reply.content_type, reply.headers) == (
        200,
        "text/plain",
        ((TTL_HEADER, "60"),),
    )
    token = reply.body.decode()
    assert tokens.valid("10.1.1.5", token)
    clock.now += 59
    assert tokens.valid("10.1.1.5", token)
    clock.now += 1
    assert not tokens.valid("10.1.1.5", token)


def test_a_token_does_not_work_for_another_vm_or_another_service_run() -> None:
    key = new_key()
    token = minted(Tokens(key))
    assert not Tokens(key).valid("10.1.1.6", token)
    assert Tokens(key).valid("10.1.1.5", token)  # another worker, same key
    assert not Tokens(new_key()).valid("10.1.1.5", token)


@pytest.mark.parametrize("ttl", [None, "", "0", "-1", str(MAX_TTL + 1), "1.5", "abc"])
def test_a_missing_or_out_of_range_ttl_is_400(ttl: str | None) -> None:
    reply = Tokens(new_key()).mint("10.1.1.5", ttl)
    assert reply.status == 400
    assert TTL_HEADER.encode() in reply.body


@pytest.mark.parametrize("forged", ["", "x", "AAAA", "not base64 !!", "A" * 32, "é"])
def test_garbage_and_tampered_tokens_are_invalid(forged: str) -> None:
    tokens = Tokens(new_key())
    assert not tokens.valid("10.1.1.5", forged)
    token = minted(tokens)
    flipped = token[:-2] + ("A" if token[-2] != "A" else "B") + token[-1]
    assert not tokens.valid("10.1.1.5", flipped)


def test_only_the_latest_version_has_a_token_path() -> None:
    assert is_token_path("/latest/api/token") and is_token_path("/LATEST/api/Token")
    assert not is_token_path("/2009-04-04/api/token")
    assert not is_token_path("/latest/api/token/extra")


def test_a_short_key_is_refused() -> None:
    with pytest.raises(ValueError, match="expected at least 16"):
        Tokens(b"short")


@pytest.mark.parametrize("hops", [0, 65, -1])
def test_a_hop_limit_outside_ec2s_bounds_is_refused_naming_it(hops: int) -> None:
    with pytest.raises(ValueError, match=f"hop limit {hops}: expected 1 to 64"):
        TokenPolicy.of(hops, False, [])


def test_tokens_are_required_router_wide_or_for_listed_vms() -> None:
    assert not TokenPolicy().requires("10.1.1.5")
    listed = TokenPolicy.of(2, False, ["10.1.1.5"])
    assert listed.requires("10.1.1.5") and not listed.requires("10.1.1.6")
    assert TokenPolicy.of(1, True, []).requires("10.1.1.6")


def test_the_hop_limit_is_set_on_the_connection_socket() -> None:
    with socket.socket() as sock:
        assert set_hop_limit({"gunicorn.socket": sock}, 2)
        assert sock.getsockopt(socket.IPPROTO_IP, socket.IP_TTL) == 2
    assert not set_hop_limit({}, 2)
