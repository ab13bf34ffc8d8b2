"""The sync engine against a hand-written fake table (no root, no iptc)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from tests.helpers.fake_tables import FakeTables
from vr.config import Config
from vr.errors import FirewallError
from vr.firewall import model
from vr.firewall.model import INPUT_CHAIN, NAT_CHAIN, MatchSpec, RuleSet, RuleSpec
from vr.firewall.sync import RuleCounter, SyncReport, counters, sync
from vr.payloads import DhcpEntry, GuestNetwork

GUEST = GuestNetwork("eth0", IPv4Address("10.1.1.1"), IPv4Network("10.1.1.0/24"), True)


def desired(cfg: Config, nets: list[GuestNetwork], entries: list[DhcpEntry]) -> RuleSet:
    """Bindings as one rule each: these tests are about chains; the sets the other
    design references are created by vr.firewall.state (tests/unit/test_firewall_push.py)."""
    return model.desired(cfg, nets, entries, binding_sets=False)


VM = DhcpEntry("02:00:00:00:00:0a", IPv4Address("10.1.1.10"), "vm1")
OTHER_VM = DhcpEntry("02:00:00:00:00:0b", IPv4Address("10.1.1.11"), "vm2")
FOREIGN = RuleSpec(
    target="ACCEPT",
    protocol="udp",
    matches=(MatchSpec("udp", (("dport", ("53",)),)),),
)


def jumps(fake: FakeTables, table: str, chain: str) -> list[str]:
    return [r.spec.target for r in fake.live[table][chain] if r.spec == RuleSpec(r.spec.target)]


def specs(fake: FakeTables, table: str, chain: str) -> list[RuleSpec]:
    return [r.spec for r in fake.live[table][chain]]


def test_first_apply_creates_our_chains_and_hooks_each_once() -> None:
    fake = FakeTables()
    rs = desired(Config(), [GUEST], [VM])
    sync(fake, rs)
    assert jumps(fake, "nat", "PREROUTING") == [NAT_CHAIN]
    assert jumps(fake, "filter", "INPUT") == [INPUT_CHAIN]
    assert specs(fake, "filter", INPUT_CHAIN) == [r.spec() for r in rs.chain(INPUT_CHAIN).rules]
    assert specs(fake, "nat", NAT_CHAIN) == [r.spec() for r in rs.chain(NAT_CHAIN).rules]


def test_rules_outside_our_chains_are_untouched() -> None:
    fake = FakeTables()
    fake.add_live("filter", "INPUT", FOREIGN, (7, 700))
    fake.add_live("filter", "FORWARD", FOREIGN)
    sync(fake, desired(Config(), [GUEST], []))
    sync(fake, desired(Config(), [], []))
    assert next(r for r in fake.live["filter"]["INPUT"] if r.spec == FOREIGN).counters == (7, 700)
    assert specs(fake, "filter", "INPUT") == [RuleSpec(INPUT_CHAIN), FOREIGN]
    assert specs(fake, "filter", "FORWARD") == [FOREIGN]


def test_applying_twice_commits_nothing_the_second_time() -> None:
    fake = FakeTables()
    rs = desired(Config(), [GUEST], [VM])
    first = sync(fake, rs)
    before = fake.snapshot()
    commits = list(fake.commits)
    second = sync(fake, rs)
    assert first.any_change
    assert not second.any_change
    assert fake.commits == commits
    assert fake.live == before


def test_rewriting_a_chain_keeps_the_counters_of_rules_that_stay() -> None:
    fake = FakeTables()
    sync(fake, desired(Config(), [GUEST], [VM]))
    fake.count("filter", INPUT_CHAIN, "binding 10.1.1.10", 3)
    sync(fake, desired(Config(), [GUEST], [VM, OTHER_VM]))
    by_comment = {r.spec.comment: r.counters for r in fake.live["filter"][INPUT_CHAIN]}
    assert by_comment["vr: binding 10.1.1.10 02:00:00:00:00:0a"] == (3, 180)
    assert by_comment["vr: binding 10.1.1.11 02:00:00:00:00:0b"] == (0, 0)


def test_removing_the_network_removes_its_redirect_only() -> None:
    fake = FakeTables()
    g2 = GuestNetwork("eth3", IPv4Address("10.2.0.1"), IPv4Network("10.2.0.0/16"), True)
    sync(fake, desired(Config(), [GUEST, g2], []))
    sync(fake, desired(Config(), [g2], []))
    assert {r.spec.in_interface for r in fake.live["nat"][NAT_CHAIN]} == {"eth3"}
    assert jumps(fake, "nat", "PREROUTING") == [NAT_CHAIN]


def test_a_rule_that_cannot_be_built_names_it_and_leaves_every_table_as_it_was() -> None:
    fake = FakeTables()
    sync(fake, desired(Config(), [], []))
    before = fake.snapshot()
    fake.refuse_rule = lambda spec: spec.in_interface == "eth0" and spec.target == "ACCEPT"
    with pytest.raises(FirewallError) as exc:
        sync(fake, desired(Config(), [GUEST], [VM]))
    msg = str(exc.value)
    assert f"chain {INPUT_CHAIN}" in msg
    assert "-s 10.1.1.0/24 -i eth0" in msg
    assert "tables left as they were" in msg
    assert fake.live == before
    assert not fake.staged


def test_a_refused_commit_rolls_back_the_tables_already_committed() -> None:
    fake = FakeTables()
    fake.add_live("nat", "PREROUTING", FOREIGN)
    old = desired(Config(), [], [])
    sync(fake, old)
    fake.count("filter", INPUT_CHAIN, "guarded ports", 5)
    before = fake.snapshot()
    fake.refuse_commit = {"filter"}
    with pytest.raises(FirewallError, match="table filter: commit"):
        sync(fake, desired(Config(), [GUEST], [VM]))
    assert fake.live == before


def test_a_refused_first_commit_touches_nothing() -> None:
    fake = FakeTables()
    before = fake.snapshot()
    fake.refuse_commit = {"nat"}
    with pytest.raises(FirewallError, match="table nat"):
        sync(fake, desired(Config(), [GUEST], []))
    assert fake.live == before


def test_duplicate_hooks_are_reduced_to_one() -> None:
    fake = FakeTables()
    rs = desired(Config(), [GUEST], [])
    sync(fake, rs)
    fake.live["filter"]["INPUT"].append(fake.live["filter"]["INPUT"][0])
    sync(fake, rs)
    assert jumps(fake, "filter", "INPUT") == [INPUT_CHAIN]


def test_a_stale_chain_of_ours_is_unhooked_and_removed() -> None:
    fake = FakeTables()
    fake.live["filter"]["VR-OLD"] = []
    fake.add_live("filter", "VR-OLD", FOREIGN)
    fake.add_live("filter", "INPUT", RuleSpec("VR-OLD"))
    sync(fake, desired(Config(), [], []))
    assert "VR-OLD" not in fake.live["filter"]
    assert jumps(fake, "filter", "INPUT") == [INPUT_CHAIN]


def test_a_chain_without_our_prefix_is_refused() -> None:
    from vr.firewall.model import Chain

    fake = FakeTables()
    with pytest.raises(FirewallError, match="expected a VR-"):
        sync(fake, RuleSet((Chain("filter", "INPUT", ()),)))
    assert not fake.commits


def test_counters_are_read_per_rule_of_our_chains() -> None:
    fake = FakeTables()
    sync(fake, desired(Config(), [GUEST], [VM]))
    fake.count("filter", INPUT_CHAIN, "binding 10.1.1.10", 2)
    rows = counters(fake, ["nat", "filter"])
    binding = [r for r in rows if "binding" in r.comment]
    assert [(r.chain, r.packets) for r in binding] == [(INPUT_CHAIN, 2)]
    assert {r.chain for r in rows} == {NAT_CHAIN, INPUT_CHAIN}


# --- IPv6 tables applied by another process (python-iptables#112) ---------------------

GUEST6 = replace(GUEST, router_guest_ip6=IPv6Address("fd00:1::1"), cidr6=IPv6Network("fd00:1::/64"))


@dataclass
class FakeChild:
    """:class:`vr.firewall.sync.Elsewhere` over a second fake: the other process."""

    parent: FakeTables
    tables: FakeTables = field(default_factory=FakeTables)
    fail: bool = False
    calls: list[tuple[list[str], bool]] = field(default_factory=list)

    def sync(self, ruleset: RuleSet) -> SyncReport:
        self.calls.append((ruleset.tables(), self.parent.lock_held))
        if self.fail:
            raise FirewallError("IPv6 tables (vr firewall sync6): refused")
        return sync(self.tables, ruleset)

    def counters(self, table_names: Sequence[str]) -> list[RuleCounter]:
        return counters(self.tables, table_names)


def split_fake() -> tuple[FakeTables, FakeChild]:
    fake = FakeTables()
    child = FakeChild(fake)
    fake.ipv6 = child
    return fake, child


def test_ipv6_tables_are_applied_by_the_child_under_the_parents_lock() -> None:
    fake, child = split_fake()
    report = sync(fake, desired(Config(metadata_port=8000), [GUEST6], [VM]))
    assert child.calls == [(["nat6", "filter6"], True)]
    assert specs(fake, "nat6", "PREROUTING") == [] and "VR-PREROUTING" not in fake.live["nat6"]
    dnat6 = [r.spec.render() for r in child.tables.live["nat6"][NAT_CHAIN]]
    assert len(dnat6) == 4 and all("-j DNAT --to-destination [fd00:1::1]:" in r for r in dnat6)
    assert jumps(child.tables, "nat6", "PREROUTING") == [NAT_CHAIN]
    assert set(report.changed) == {"nat", "filter", "nat6", "filter6"}
    again = sync(fake, desired(Config(metadata_port=8000), [GUEST6], [VM]))
    assert not again.any_change


def test_an_ipv4_rule_that_cannot_be_built_never_reaches_the_child() -> None:
    fake, child = split_fake()
    before = fake.snapshot()
    fake.refuse_rule = lambda spec: spec.target == "DNAT"
    with pytest.raises(FirewallError, match="table nat chain VR-PREROUTING rule 1"):
        sync(fake, desired(Config(), [GUEST6], [VM]))
    assert child.calls == [] and fake.live == before


def test_a_refusing_child_leaves_the_ipv4_tables_as_they_were() -> None:
    fake, child = split_fake()
    sync(fake, desired(Config(), [], []))
    before = fake.snapshot()
    child.fail = True
    with pytest.raises(FirewallError, match="sync6"):
        sync(fake, desired(Config(), [GUEST6], [VM]))
    assert fake.live == before


def test_ipv6_counters_come_from_the_child() -> None:
    fake, child = split_fake()
    sync(fake, desired(Config(), [GUEST6], [VM]))
    child.tables.count("nat6", NAT_CHAIN, "metadata [fd00:ec2::254]:80", 3)
    rows = counters(fake, ["nat", "nat6"])
    assert [(r.table, r.packets) for r in rows if "metadata [fd00:ec2::254]" in r.comment] == [
        ("nat6", 3)
    ]
    assert {r.table for r in rows} == {"nat", "nat6"}


def test_a_refused_ipv4_commit_after_the_child_applied_says_which_tables_changed() -> None:
    fake, child = split_fake()
    before = fake.snapshot()
    fake.refuse_commit = {"filter"}
    with pytest.raises(FirewallError, match=r"IPv4 only: nat6, filter6 already applied"):
        sync(fake, desired(Config(), [GUEST6], [VM]))
    assert fake.live == before
    assert NAT_CHAIN in child.tables.live["nat6"]
