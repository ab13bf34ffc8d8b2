"""Pushes of guest networks and DHCP entries drive the firewall (fake tables, no root)."""

from __future__ import annotations

import io
import json
from typing import Any

import pytest

from tests.helpers.fake_tables import FakeTables
from vr import store
from vr.applier import Applier
from vr.errors import FirewallError
from vr.firewall import state as fw
from vr.firewall.ipsets import BOUND_SET
from vr.firewall.model import INPUT_CHAIN, NAT_CHAIN
from vr.paths import Paths

DEVICES = {"lo", "eth0", "eth1", "eth2", "eth3"}


class Push:
    def __init__(self, paths: Paths, fake: FakeTables) -> None:
        self.paths = paths
        self.fake = fake
        hooks = fw.FirewallHooks(paths, lambda: fake, lambda d: d in DEVICES)
        self.applier = Applier(paths, hooks=hooks)

    def __call__(self, name: str, obj: dict[str, Any]) -> tuple[int, str]:
        (self.paths.cache / name).write_text(json.dumps(obj))
        out, err = io.StringIO(), io.StringIO()
        code = self.applier.update_config([name], out, err)
        return code, out.getvalue() + err.getvalue()


def network(device: str = "eth0", **kw: Any) -> dict[str, Any]:
    return {
        "type": "guestnetwork",
        "device": device,
        "router_guest_ip": "10.1.1.1",
        "cidr": "10.1.1.0/24",
        "add": True,
        **kw,
    }


@pytest.fixture
def fake() -> FakeTables:
    return FakeTables()


@pytest.fixture
def push(paths: Paths, fake: FakeTables) -> Push:
    fw.apply(paths, fake)  # the firewall is set up (what boot does)
    return Push(paths, fake)


def redirect_devices(fake: FakeTables) -> set[str | None]:
    return {r.spec.in_interface for r in fake.live["nat"][NAT_CHAIN]}


def test_a_guest_network_push_installs_its_redirect_and_saves_the_state(
    push: Push, fake: FakeTables, paths: Paths
) -> None:
    code, text = push("guest_network.json.1", network())
    assert code == 0, text
    assert redirect_devices(fake) == {"eth0"}
    saved = fw.load_saved(paths)
    assert saved is not None
    assert {r.in_interface for r in saved.chain(NAT_CHAIN).rules} == {"eth0"}
    assert not paths.firewall_pending.exists()


def test_removing_the_network_by_push_removes_its_redirect(push: Push, fake: FakeTables) -> None:
    push("guest_network.json.1", network())
    code, text = push("guest_network.json.2", network(add=False))
    assert code == 0, text
    assert redirect_devices(fake) == set()


def test_a_network_from_the_config_file_is_removed_by_push_until_pushed_again(
    paths: Paths, fake: FakeTables
) -> None:
    configured = {"router_guest_ip": "10.3.0.1", "cidr": "10.3.0.0/24"}
    paths.config.write_text(json.dumps({"guest_networks": [{"device": "eth3", **configured}]}))
    fw.apply(paths, fake)
    push = Push(paths, fake)
    assert redirect_devices(fake) == {"eth3"}

    code, text = push("guest_network.json.1", network("eth3", add=False, **configured))
    assert code == 0, text
    assert redirect_devices(fake) == set()
    assert store.read_networks(paths) == []
    fw.restore(paths, fake)  # boot: the removal outlives a restart
    assert redirect_devices(fake) == set()
    fw.apply(paths, fake)
    assert redirect_devices(fake) == set()

    code, text = push("guest_network.json.2", network("eth3", **configured))
    assert code == 0, text
    assert redirect_devices(fake) == {"eth3"}


def test_a_dhcp_entry_push_adds_its_binding_rule(push: Push, fake: FakeTables) -> None:
    code, text = push(
        "vm_dhcp_entry.json.1",
        {"type": "dhcpentry", "ipv4_address": "10.1.1.10", "mac_address": "02:00:00:00:00:0A"},
    )
    assert code == 0, text
    comments = [r.spec.comment for r in fake.live["filter"][INPUT_CHAIN]]
    assert "vr: binding 10.1.1.10 02:00:00:00:00:0a" in comments


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (network(device="eth9"), "device='eth9': expected an interface that exists"),
        (network(device="eth1"), "device='eth1': expected a guest interface, not the control"),
        (network(device="eth2"), "device='eth2': expected a guest interface"),
        (network(cidr="10.1.1.0/33"), "cidr='10.1.1.0/33': expected an IPv4 network"),
        (network(cidr="10.1.1.1/24"), "cidr='10.1.1.1/24'"),
        (network(router_guest_ip="10.9.9.9"), "router_guest_ip='10.9.9.9': expected an address"),
    ],
)
def test_a_malformed_network_push_is_rejected_and_changes_no_rule_and_no_state(
    push: Push, fake: FakeTables, paths: Paths, payload: dict[str, Any], expected: str
) -> None:
    push("guest_network.json.0", network(device="eth3"))
    rules_before = fake.snapshot()
    state_before = paths.firewall_state.read_bytes()
    networks_before = store.read_networks(paths)
    commits = len(fake.commits)
    code, text = push("guest_network.json.1", payload)
    assert code == 1
    assert "rejected" in text and expected in text
    assert fake.live == rules_before
    assert len(fake.commits) == commits
    assert paths.firewall_state.read_bytes() == state_before
    assert store.read_networks(paths) == networks_before
    assert (paths.failed / "guest_network.json.1").exists()


def test_a_metadata_push_does_not_touch_the_tables(push: Push, fake: FakeTables) -> None:
    commits = len(fake.commits)
    code, text = push(
        "vm_metadata.json.1",
        {"vm_ip_address": "10.1.1.10", "vm_metadata": [["metadata", "vm-id", "i-1"]]},
    )
    assert code == 0, text
    assert len(fake.commits) == commits


def test_before_the_firewall_is_set_up_pushes_only_update_the_store(
    paths: Paths, fake: FakeTables
) -> None:
    unmanaged = Push(paths, fake)
    code, text = unmanaged("guest_network.json.1", network(device="eth7"))
    assert code == 0, text
    assert fake.commits == []
    assert [n.device for n in store.read_networks(paths)] == ["eth7"]
    fw.apply(paths, fake)
    assert redirect_devices(fake) == {"eth7"}


def test_a_failed_firewall_apply_fails_the_push_and_the_next_push_retries(
    push: Push, fake: FakeTables, paths: Paths
) -> None:
    fake.refuse_commit = {"nat"}
    code, text = push("guest_network.json.1", network())
    assert code == 1
    assert "stored, but follow-up failed (retry is safe)" in text
    assert "table nat" in text
    assert paths.firewall_pending.exists()
    assert redirect_devices(fake) == set()
    fake.refuse_commit = set()
    code, text = push(
        "vm_metadata.json.1",
        {"vm_ip_address": "10.1.1.10", "vm_metadata": [["metadata", "vm-id", "i-1"]]},
    )
    assert code == 0, text
    assert redirect_devices(fake) == {"eth0"}
    assert not paths.firewall_pending.exists()


def test_restore_reapplies_the_saved_rule_set(push: Push, paths: Paths) -> None:
    push("guest_network.json.1", network())
    fresh = FakeTables()  # a rebooted kernel: empty tables
    fw.restore(paths, fresh)
    assert redirect_devices(fresh) == {"eth0"}


def test_restore_recomputes_when_the_last_apply_did_not_finish(
    push: Push, paths: Paths, fake: FakeTables
) -> None:
    fake.refuse_commit = {"nat"}
    push("guest_network.json.1", network())
    fresh = FakeTables()
    fw.restore(paths, fresh)
    assert redirect_devices(fresh) == {"eth0"}


def test_a_corrupt_saved_state_is_reported_not_applied(paths: Paths) -> None:
    paths.firewall_state.write_text("{not json")
    fresh = FakeTables()
    with pytest.raises(FirewallError, match=r"firewall\.json"):
        fw.restore(paths, fresh)
    assert fresh.commits == []


def dhcp(ip: str, mac: str, **kw: Any) -> dict[str, Any]:
    return {"type": "dhcpentry", "ipv4_address": ip, "mac_address": mac, **kw}


MAC_SET = "VR-MAC-eth0"


def test_a_dhcp_entry_push_changes_one_set_entry_and_no_rule(
    push: Push, fake: FakeTables, paths: Paths
) -> None:
    push("guest_network.json.1", network())
    rules_before = fake.snapshot()
    commits = len(fake.commits)
    runs = len(fake.fake_sets.runs)
    code, text = push("vm_dhcp_entry.json.1", dhcp("10.1.1.10", "02:00:00:00:00:0A"))
    assert code == 0, text
    assert fake.live == rules_before
    assert len(fake.commits) == commits
    assert fake.fake_sets.runs[runs:] == [
        [
            f"add -exist {MAC_SET} 10.1.1.10,02:00:00:00:00:0A",
            f"add -exist {BOUND_SET} 10.1.1.10",
        ]
    ]
    assert fake.fake_sets.members(MAC_SET) == {"10.1.1.10,02:00:00:00:00:0A"}
    assert not paths.firewall_pending.exists()


def test_a_mac_moved_to_another_address_leaves_no_stale_binding(
    push: Push, fake: FakeTables
) -> None:
    push("guest_network.json.1", network())
    push("vm_dhcp_entry.json.1", dhcp("10.1.1.10", "02:00:00:00:00:0a"))
    push("vm_dhcp_entry.json.2", dhcp("10.1.1.20", "02:00:00:00:00:0a"))
    assert fake.fake_sets.members(MAC_SET) == {"10.1.1.20,02:00:00:00:00:0A"}
    assert fake.fake_sets.members(BOUND_SET) == {"10.1.1.20"}
    push("vm_dhcp_entry.json.3", dhcp("10.1.1.20", "02:00:00:00:00:0a", remove=True))
    assert fake.fake_sets.members(MAC_SET) == set()
    assert fake.fake_sets.members(BOUND_SET) == set()


def test_restore_on_a_rebooted_kernel_refills_the_sets_from_the_store(
    push: Push, paths: Paths
) -> None:
    push("guest_network.json.1", network())
    push("vm_dhcp_entry.json.1", dhcp("10.1.1.10", "02:00:00:00:00:0a"))
    fresh = FakeTables()
    fw.restore(paths, fresh)
    assert fresh.fake_sets.members(MAC_SET) == {"10.1.1.10,02:00:00:00:00:0A"}
    assert fresh.fake_sets.members(BOUND_SET) == {"10.1.1.10"}


def test_a_refused_set_change_fails_the_push_and_the_next_push_recomputes(
    push: Push, fake: FakeTables, paths: Paths
) -> None:
    push("guest_network.json.1", network())
    del fake.fake_sets.sets[MAC_SET]  # someone destroyed it behind our back
    code, text = push("vm_dhcp_entry.json.1", dhcp("10.1.1.10", "02:00:00:00:00:0a"))
    assert code == 1
    assert "add to missing set VR-MAC-eth0" in text
    assert paths.firewall_pending.exists()
    code, text = push(
        "vm_metadata.json.1",
        {"vm_ip_address": "10.1.1.10", "vm_metadata": [["metadata", "vm-id", "i-1"]]},
    )
    assert code == 0, text
    assert fake.fake_sets.members(MAC_SET) == {"10.1.1.10,02:00:00:00:00:0A"}
    assert not paths.firewall_pending.exists()


def test_removing_the_network_destroys_its_set_after_its_rules_are_gone(
    push: Push, fake: FakeTables
) -> None:
    push("guest_network.json.1", network())
    push("vm_dhcp_entry.json.1", dhcp("10.1.1.10", "02:00:00:00:00:0a"))
    code, text = push("guest_network.json.2", network(add=False))
    assert code == 0, text
    assert fake.fake_sets.sets == {}


def test_with_an_ipv6_guest_network_a_dhcp_push_reapplies_the_ipv6_binding_rules(
    push: Push, fake: FakeTables
) -> None:
    push(
        "guest_network.json.1",
        network(router_guest_ip6="fd00:1::1", router_guest_ip6_cidr="fd00:1::/64"),
    )
    code, text = push(
        "vm_dhcp_entry.json.1",
        dhcp("10.1.1.10", "02:00:00:00:00:0a", ipv6_address="fd00:1::10"),
    )
    assert code == 0, text
    comments = [r.spec.comment for r in fake.live["filter6"][INPUT_CHAIN]]
    assert "vr: binding fd00:1::10 02:00:00:00:00:0a" in comments
    assert fake.fake_sets.members(MAC_SET) == {"10.1.1.10,02:00:00:00:00:0A"}
