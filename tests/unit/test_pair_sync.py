"""The pair's exchange on real store files (two roots, no network), notify, config, agent."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from vr import config
from vr.agent.requests import ExecRefused, PairSync, parse_exec
from vr.errors import ConfigError, VRError
from vr.pair import ledger as lg
from vr.pair import manager
from vr.pair.sync import exchange, serve_request
from vr.paths import Paths
from vr.payloads import VmPassword
from vr.store import Store, read_passwords

VM = IPv4Address("10.1.1.21")


def router(tmp_path: Path, name: str) -> Paths:
    p = Paths(tmp_path / name)
    p.ensure()
    exchange(p, None)  # the sync ran once: the ledger exists
    return p


def sync(a: Paths, b: Paths) -> None:
    """One exchange started by ``a`` (what ``vr pair run`` does over SSH)."""
    local = exchange(a, None)
    answer = serve_request(b, lg.encode(local, with_passwords=True), "peer")
    exchange(a, lg.decode(answer, "peer", with_passwords=True))


def test_an_ack_on_one_router_removes_the_password_on_the_other(tmp_path: Path) -> None:
    a, b = router(tmp_path, "a"), router(tmp_path, "b")
    for p in (a, b):
        Store(p).apply([VmPassword(VM, "pw-1")])
    sa = Store(a)
    gen = read_passwords(a)[str(VM)]["gen"]
    sa.mark_password_served(VM, gen)
    assert sa.ack_password(VM)
    sync(a, b)
    assert str(VM) not in read_passwords(b)
    assert lg.fingerprint(exchange(a, None)) == lg.fingerprint(exchange(b, None))


def test_an_ack_made_while_the_sync_was_not_looking_still_reaches_the_peer(
    tmp_path: Path,
) -> None:
    """Pushed, fetched and acknowledged between two exchanges: the store records the ack."""
    a, b = router(tmp_path, "a"), router(tmp_path, "b")
    for p in (a, b):
        Store(p).apply([VmPassword(VM, "pw-2")])
    sa = Store(a)
    sa.mark_password_served(VM, read_passwords(a)[str(VM)]["gen"])
    sa.ack_password(VM)
    sync(b, a)  # b starts: its pending pw-2 must not come back on a
    assert str(VM) not in read_passwords(a)
    assert str(VM) not in read_passwords(b)


def test_a_password_pushed_while_the_peer_was_down_reaches_it(tmp_path: Path) -> None:
    a, b = router(tmp_path, "a"), router(tmp_path, "b")
    for p in (a, b):
        Store(p).apply([VmPassword(VM, "old")])
    Store(a).apply([VmPassword(VM, "new")])  # b was down
    sync(b, a)
    assert read_passwords(b)[str(VM)]["password"] == "new"
    assert read_passwords(b)[str(VM)]["served"] is False


def test_a_bad_peer_message_changes_nothing(tmp_path: Path) -> None:
    b = router(tmp_path, "b")
    Store(b).apply([VmPassword(VM, "keep")])
    before = read_passwords(b)
    with pytest.raises(lg.LedgerError, match="pair sync from x: not JSON"):
        serve_request(b, b"{nope", "x")
    assert read_passwords(b) == before


def test_agent_accepts_the_pair_sync_command_without_arguments() -> None:
    assert parse_exec(b"vr-pair-sync") == PairSync()
    refused = parse_exec(b"vr-pair-sync --all")
    assert isinstance(refused, ExecRefused) and "takes no arguments" in refused.reason


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"pair_peer": "peer.example"}, "pair_peer='peer.example': expected the peer router's"),
        ({"pair_priority": 255}, "pair_priority=255: expected a VRRP priority from 1 to 254"),
        ({"pair_advert_ms": 505}, "pair_advert_ms=505: expected a multiple of 10"),
        ({"pair_vrid": 0}, "pair_vrid=0: expected a VRRP id from 1 to 255"),
    ],
)
def test_bad_pair_settings_are_refused_naming_them(raw: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigError, match=expected.replace("(", r"\(")):
        config.from_dict(raw)


def test_notify_records_the_state_and_refuses_unknown_ones(paths: Paths) -> None:
    manager.record_vrrp_state(paths, "INSTANCE", "VR-eth0", "MASTER", "100")
    assert manager.vrrp_states(paths) == {"VR-eth0": "MASTER"}
    with pytest.raises(VRError, match="notify state 'PRIMARY': expected one of MASTER"):
        manager.record_vrrp_state(paths, "INSTANCE", "VR-eth0", "PRIMARY", "100")
    with pytest.raises(ValueError, match=r"instance '\.\./x'"):
        manager.record_vrrp_state(paths, "INSTANCE", "../x", "BACKUP", "100")
    assert manager.vrrp_states(paths) == {"VR-eth0": "MASTER"}
    lines = manager.PairFiles(paths).transitions.read_text().splitlines()
    assert [ln.split()[1:] for ln in lines] == [["VR-eth0", "MASTER"]]


def test_the_ledger_file_holds_no_password(tmp_path: Path) -> None:
    a = router(tmp_path, "a")
    Store(a).apply([VmPassword(VM, "never-on-disk-twice")])
    exchange(a, None)
    doc = json.loads(a.pair_state.read_text())
    assert "never-on-disk-twice" not in a.pair_state.read_text()
    assert doc["vms"][str(VM)]["acked"] is False
