"""A redundant router pair with real keepalived: failover, return, partition.

Two routers (``vr up`` each, keepalived included) and two guests on one bridge, a
management host pushing every payload to both (as CloudStack does). The tests run in
file order on one lab: the master is killed, comes back, then the routers are cut
apart and healed. Passwords are compared with :func:`same_secret` (never printed).
"""

from __future__ import annotations

import json
import secrets
import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.helpers.pair_lab import (
    GUESTS,
    METADATA_IP,
    NONE,
    VIP,
    PairLab,
    first_answers,
    gap_around,
    pair_lab,
    same_secret,
    stop_loop,
)
from tests.helpers.wait import wait_for
from vr.paths import Paths
from vr.store import read_passwords

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("allow_subp")]

G1, G2 = GUESTS["g1"], GUESTS["g2"]
SEEN: dict[str, Any] = {}
"""What one test leaves for the next (the lab is shared, the steps are one story)."""


def metadata(g: dict[str, str]) -> dict[str, Any]:
    return {
        "vm_ip_address": g["ip"],
        "vm_metadata": [["metadata", "instance-id", g["id"]], ["metadata", "vm-id", g["id"]]],
        "type": "vmdata",
    }


def password(g: dict[str, str], pw: str) -> dict[str, Any]:
    return {"ip_address": g["ip"], "password": pw, "type": "vmpassword"}


def pending(pl: PairLab, router: str, g: dict[str, str]) -> bool:
    """Whether ``router`` still holds a password for guest ``g`` (read, never shown)."""
    return g["ip"] in read_passwords(Paths(pl.routers[router].root))


def no_password(answer: str) -> None:
    """Fail without showing the answer when a password was served."""
    if answer != NONE:
        shown = answer if answer in ("", "bad_request") else f"a password of {len(answer)} chars"
        raise AssertionError(f"{shown} was served where none should be")


def exchanged_since(pl: PairLab, counts: dict[str, int], n: int = 2) -> bool:
    """Both routers finished ``n`` exchanges after ``counts`` and agree."""
    return all(sync_exchanges(pl, r) >= counts[r] + n for r in counts) and pl.in_sync("ra", "rb")


def other(name: str) -> str:
    return "rb" if name == "ra" else "ra"


def sync_exchanges(pl: PairLab, name: str) -> int:
    doc = json.loads((pl.routers[name].root / "run/vr/pair/sync.json").read_text())
    return int(doc["exchanges"])


@pytest.fixture(scope="module")
def pl() -> Iterator[PairLab]:
    with pair_lab() as lab:
        for name in lab.routers:
            lab.start(name)
        for name in lab.routers:
            res = lab.push(name, lab.network_payload(name))
            assert res.returncode == 0, res.stderr
        lab.push_both(metadata(G1), metadata(G2))
        wait_for(lab.master, "one router MASTER holding the virtual IP", 30)
        wait_for(lambda: lab.in_sync("ra", "rb"), "both routers in sync", 30)
        yield lab


def test_only_the_master_answers_on_the_virtual_ip_and_the_backup_on_its_own(pl: PairLab) -> None:
    master = pl.master()
    assert master is not None
    backup = other(master)
    assert not pl.holds_vip(backup)
    assert pl.curl("g1", f"http://{METADATA_IP}/latest/instance-id") == (200, G1["id"])
    # the guest reached the virtual IP at the master's MAC
    neigh = pl.guests["g1"].run("ip", "neigh", "show", VIP).stdout
    mac = pl.routers[master].ns.run("cat", "/sys/class/net/eth0/address").stdout.strip()
    assert f"lladdr {mac}" in neigh
    # the BACKUP serves its own guest address (metadata and passwords)
    assert pl.curl("g2", f"http://{pl.routers[backup].guest_ip}/latest/instance-id") == (
        200,
        G2["id"],
    )
    no_password(pl.ask_password("g2", pl.routers[backup].guest_ip))
    # vr status (in the router, where it probes its services) names each router's
    # role and the peer's state, and exits 0: every service is up
    for name, role in ((master, "MASTER"), (backup, "BACKUP")):
        router = pl.routers[name]
        out = router.ns.run(sys.executable, "-m", "vr", "status", "--root", str(router.root)).stdout
        assert f"eth0       {role}" in out
        assert "reachable, passwords in sync" in out


def test_master_killed_guest_keeps_answers_and_passwords(pl: PairLab) -> None:
    master = pl.master()
    assert master is not None
    backup = other(master)
    p1, p2 = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    pl.push_both(password(G1, p1), password(G2, p2))
    wait_for(lambda: pl.in_sync("ra", "rb"), "passwords in sync", 10)
    # g1 fetches and acknowledges on the MASTER: the BACKUP forgets it
    same_secret(pl.ask_password("g1"), p1)
    assert pl.ask_password("g1", request="saved_password") == "saved_password"
    wait_for(lambda: not pending(pl, backup, G1), "the BACKUP learnt the ack", 5)

    loop = pl.loop("g1")
    recs: list[list[Any]] = []
    try:
        recs += first_answers(loop)
        killed = pl.kill(master)
        wait_for(lambda: pl.master() == backup, f"{backup} MASTER", 20)
        wait_for(
            lambda: pl.curl("g2", f"http://{METADATA_IP}/latest/vm-id") == (200, G2["id"]),
            "the new MASTER answers",
            20,
        )
    finally:
        recs += stop_loop(loop)
    wrong = [r for r in recs if r[1] is not None and (r[1], r[2]) != (200, G1["id"])]
    assert wrong == []
    good = [r for r in recs if r[1] == 200]
    assert any(r[0] > killed for r in good), "no answer after the failover"
    gap = gap_around(recs, killed, lambda r: r[1] == 200)
    print(f"failover gap {gap:.2f}s over {len(recs)} requests, 0 wrong")
    # the acknowledged password is never served again; the pending one is
    no_password(pl.ask_password("g1"))
    same_secret(pl.ask_password("g2"), p2)
    assert pl.ask_password("g2", request="saved_password") == "saved_password"
    SEEN.update(killed=master, survivor=backup)


def test_master_returns_without_flapping_and_catches_up(pl: PairLab) -> None:
    returning, master = SEEN["killed"], SEEN["survivor"]
    # pushed while the other router is down: reaches it later from its peer
    p3 = secrets.token_urlsafe(12)
    res = pl.push(master, password(G1, p3))
    assert res.returncode == 0, res.stderr
    before = pl.transitions(master)
    seen_before = len(pl.transitions(returning))
    pl.start(returning)
    wait_for(lambda: pl.vrrp(returning) == "BACKUP", f"{returning} BACKUP", 20)
    wait_for(lambda: pl.in_sync("ra", "rb"), "back in sync", 10)
    # Longer than keepalived's master-down interval (1.8 s): a preempting router
    # would have taken the virtual IP by now.
    start = sync_exchanges(pl, returning)
    wait_for(lambda: sync_exchanges(pl, returning) >= start + 3, "three more exchanges", 20)
    assert pl.master() == master
    assert pl.transitions(master) == before
    assert pl.transitions(returning)[seen_before:] == ["BACKUP"]
    assert not pl.holds_vip(returning)
    # the password pushed while it was down is there, on its own guest address
    same_secret(pl.ask_password("g1", pl.routers[returning].guest_ip), p3)
    assert pl.ask_password("g1", pl.routers[returning].guest_ip, "saved_password") == (
        "saved_password"
    )
    wait_for(lambda: not pending(pl, master, G1), "the MASTER learnt the ack", 5)
    no_password(pl.ask_password("g1"))


def cut(pl: PairLab, add: bool) -> None:
    """Drop everything between the two routers (VRRP on the guest bridge, SSH on the
    control bridge) with rules in each router's own namespace."""
    for name, r in pl.routers.items():
        peer = pl.routers[other(name)]
        for src in (peer.guest_ip, peer.control_ip):
            op = "-I" if add else "-D"
            r.ns.run("iptables-legacy", "-w", op, "INPUT", "-s", src, "-j", "DROP")


def test_partition_both_master_then_heal_loses_nothing(pl: PairLab) -> None:
    cut(pl, True)
    try:
        wait_for(
            lambda: all(pl.holds_vip(n) and pl.vrrp(n) == "MASTER" for n in pl.routers),
            "both routers MASTER while cut apart",
            20,
        )
        p4, p5 = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
        pl.push_both(password(G1, p4))
        # a push that reached one router only (the other was unreachable for it)
        assert pl.push("rb", password(G2, p5)).returncode == 0
        # g1 fetches and acknowledges on ra; rb cannot learn it yet and still holds it
        same_secret(pl.ask_password("g1", pl.routers["ra"].guest_ip), p4)
        assert pl.ask_password("g1", pl.routers["ra"].guest_ip, "saved_password") == (
            "saved_password"
        )
        assert pending(pl, "rb", G1)
        assert not pending(pl, "ra", G2)
    finally:
        cut(pl, False)
    healed = {r: sync_exchanges(pl, r) for r in pl.routers}
    wait_for(pl.master, "one MASTER after the heal", 20)
    wait_for(lambda: exchanged_since(pl, healed), "in sync after the heal", 30)
    # the ack made on ra is kept by rb; the push that only rb got reached ra
    for name in pl.routers:
        no_password(pl.ask_password("g1", pl.routers[name].guest_ip))
    same_secret(pl.ask_password("g2", pl.routers["ra"].guest_ip), p5)
