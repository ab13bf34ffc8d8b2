"""The pair's password ledger: observation, merge rule, reconciliation, wire format."""

from __future__ import annotations

import itertools
import json
import random
from typing import Any

import pytest

from vr.pair import ledger as lg
from vr.pair.ledger import Entry

IP = "10.1.1.21"


def entry(pw: str, stamp: int, served: bool = False, acked: bool = False) -> Entry:
    return Entry(lg.digest(IP, pw), stamp, served, acked, None if acked else pw)


def rec(pw: str, stamp: int, served: bool = False, gen: int = 1) -> dict[str, Any]:
    return {"password": pw, "gen": gen, "served": served, "stamp": stamp}


def test_the_same_password_on_both_routers_is_one_entry_and_an_ack_wins() -> None:
    a = entry("p1", 100, served=True, acked=True)
    b = entry("p1", 103)
    merged = lg.merge_entry(a, b)
    assert merged.acked and merged.served and merged.password is None
    assert merged.stamp == 103


def test_a_later_push_supersedes_an_earlier_password_pending_or_acked() -> None:
    old_acked, new = entry("p1", 100, acked=True), entry("p2", 200)
    assert lg.merge_entry(old_acked, new) == new
    old, new_acked = entry("p1", 100), entry("p2", 200, acked=True)
    assert lg.merge_entry(old, new_acked) == new_acked


def test_merge_is_commutative_and_idempotent() -> None:
    rnd = random.Random(7)
    pool = [
        entry(pw, stamp, served, acked)
        for pw, stamp, served, acked in itertools.product(
            ("p1", "p2"), (100, 200), (False, True), (False, True)
        )
        if served or not acked  # only a served password can be acknowledged
    ]
    for _ in range(500):
        a, b = rnd.choice(pool), rnd.choice(pool)
        assert lg.merge_entry(a, b) == lg.merge_entry(b, a)
        assert lg.merge_entry(a, a) == a
        m = lg.merge_entry(a, b)
        assert lg.merge_entry(m, b) == m


def test_a_password_that_left_the_file_was_acknowledged() -> None:
    led = lg.observe({}, {IP: rec("p1", 100, served=True)})
    assert led[IP] == entry("p1", 100, served=True)
    after = lg.observe(led, {})
    assert after[IP].acked and after[IP].password is None


def test_a_new_password_in_the_file_is_a_new_entry_with_its_stamp() -> None:
    led = {IP: entry("p1", 100, acked=True)}
    after = lg.observe(led, {IP: rec("p2", 200)})
    assert after[IP] == entry("p2", 200)


def test_reconcile_removes_an_acked_password_and_adds_a_missing_one() -> None:
    gens = itertools.count(50)
    pw = {IP: rec("p1", 100, served=True), "10.1.1.22": rec("x", 100)}
    other = "10.1.1.23"
    led = {
        IP: entry("p1", 100, acked=True),
        "10.1.1.22": Entry(lg.digest("10.1.1.22", "x"), 100, True, False, "x"),
        other: Entry(lg.digest(other, "y"), 300, False, False, "y"),
    }
    assert lg.reconcile(pw, led, lambda: next(gens))
    assert IP not in pw
    assert pw["10.1.1.22"]["served"] is True  # served on the peer: its ack counts here
    assert pw[other] == {"password": "y", "gen": 50, "served": False, "stamp": 300}
    assert not lg.reconcile(pw, led, lambda: next(gens))  # applying twice changes nothing


def test_an_ack_on_one_router_clears_the_other_after_one_exchange() -> None:
    """The two routers' files after the push, a fetch and an ack on A, one exchange."""
    gens = itertools.count(10)
    a_file = {IP: rec("p1", 100, served=True)}
    b_file = {IP: rec("p1", 101)}
    a_led = lg.observe({IP: lg.observe({}, a_file)[IP]}, {})  # A saw it, then the ack
    b_led = lg.observe({}, b_file)
    merged_b = lg.merge(b_led, a_led)
    lg.reconcile(b_file, merged_b, lambda: next(gens))
    assert b_file == {}
    assert lg.fingerprint(lg.merge(a_led, merged_b)) == lg.fingerprint(merged_b)


def test_partition_then_heal_keeps_the_ack_and_the_one_sided_push() -> None:
    gens = itertools.count(10)
    g2 = "10.1.1.22"
    a_led = {IP: entry("p4", 100, served=True, acked=True)}  # fetched + acked on A
    b_file = {IP: rec("p4", 101), g2: rec("p5", 150)}  # B: p4 pending, p5 only here
    b_led = lg.observe({}, b_file)
    merged = lg.merge(b_led, a_led)
    lg.reconcile(b_file, merged, lambda: next(gens))
    assert set(b_file) == {g2}
    a_file: dict[str, dict[str, Any]] = {}
    lg.reconcile(a_file, lg.merge(lg.observe(a_led, a_file), merged), lambda: next(gens))
    assert set(a_file) == {g2} and a_file[g2]["password"] == "p5"


def test_encode_without_passwords_keeps_no_secret() -> None:
    data = lg.encode({IP: entry("secret-pw", 100)}, with_passwords=False)
    assert b"secret-pw" not in data
    assert lg.decode(data, "file", with_passwords=False)[IP].password is None
    wire = lg.encode({IP: entry("secret-pw", 100)}, with_passwords=True)
    assert lg.decode(wire, "peer", with_passwords=True)[IP] == entry("secret-pw", 100)


@pytest.mark.parametrize(
    ("doc", "expected"),
    [
        ({"version": 2, "vms": {}}, "expected a ledger of version 1"),
        ({"version": 1, "vms": {"../x": {}}}, "'../x': expected an IPv4 address"),
        ({"version": 1, "vms": {IP: {"digest": "zz"}}}, "'digest': expected 64 hex digits"),
        (
            {"version": 1, "vms": {IP: {"digest": "a" * 64, "stamp": -1}}},
            "'stamp'=-1: expected ms since 1970",
        ),
        (
            {
                "version": 1,
                "vms": {
                    IP: {"digest": "a" * 64, "stamp": 1, "served": False, "acked": False},
                },
            },
            "a pending entry needs the password its digest names",
        ),
    ],
)
def test_a_bad_peer_message_is_refused_naming_the_problem(doc: object, expected: str) -> None:
    with pytest.raises(lg.LedgerError, match=expected.replace("(", r"\(")) as exc:
        lg.decode(json.dumps(doc).encode(), "pair sync from 169.254.10.12", with_passwords=True)
    assert "pair sync from 169.254.10.12" in str(exc.value)
