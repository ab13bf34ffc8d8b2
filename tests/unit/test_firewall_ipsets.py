"""The binding sets as data: which sets and members, the ipset lines, reading them back."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network

from vr.firewall.ipsets import (
    BITMAP,
    BOUND_SET,
    HASH_IP,
    IpSet,
    SetDef,
    desired,
    entry_ops,
    parse_save,
    plan,
)
from vr.payloads import DhcpEntry, GuestNetwork

NET = GuestNetwork("eth0", IPv4Address("10.1.0.1"), IPv4Network("10.1.0.0/16"), True)
WIDE = GuestNetwork("eth4", IPv4Address("10.64.0.1"), IPv4Network("10.64.0.0/10"), True)
VM = DhcpEntry("02:00:00:00:00:0a", IPv4Address("10.1.2.3"), "vm1")
OUTSIDE = DhcpEntry("02:00:00:00:00:0b", IPv4Address("10.64.0.9"), "vm2")

SAVE = """create VR-MAC-eth0 bitmap:ip,mac range 10.1.0.0-10.1.255.255
add VR-MAC-eth0 10.1.2.3,02:00:00:00:00:0A
create VR-BOUND4 hash:ip family inet hashsize 1024 maxelem 1048576 bucketsize 12 initval 0x1
add VR-BOUND4 10.1.2.3
create other hash:ip family inet hashsize 1024 maxelem 65536
add other 192.0.2.1
"""


def test_a_network_of_at_most_a_slash_16_gets_a_bitmap_set_and_the_bound_set() -> None:
    sets = desired([NET, WIDE], [VM, OUTSIDE])
    assert sets == (
        IpSet(SetDef("VR-MAC-eth0", BITMAP, NET.cidr), frozenset({"10.1.2.3,02:00:00:00:00:0A"})),
        IpSet(SetDef(BOUND_SET, HASH_IP), frozenset({"10.1.2.3"})),
    )


def test_without_a_set_capable_network_there_are_no_sets() -> None:
    assert desired([WIDE], [OUTSIDE]) == ()


def test_an_entry_outside_every_set_network_has_no_set_ops() -> None:
    assert entry_ops([NET, WIDE], OUTSIDE, add=True) == []


def test_removing_an_entry_deletes_by_address_alone() -> None:
    lines = [op.line() for op in entry_ops([NET], VM, add=False)]
    assert lines == ["del -exist VR-MAC-eth0 10.1.2.3", "del -exist VR-BOUND4 10.1.2.3"]


def test_reading_ipset_save_keeps_only_our_sets_with_their_members() -> None:
    assert parse_save(SAVE) == {
        "VR-MAC-eth0": IpSet(
            SetDef("VR-MAC-eth0", BITMAP, NET.cidr), frozenset({"10.1.2.3,02:00:00:00:00:0A"})
        ),
        BOUND_SET: IpSet(SetDef(BOUND_SET, HASH_IP), frozenset({"10.1.2.3"})),
    }


def test_the_live_sets_already_as_wanted_need_no_line() -> None:
    assert plan(parse_save(SAVE), desired([NET], [VM])).empty


def test_missing_sets_are_created_and_filled_before_the_rules() -> None:
    p = plan({}, desired([NET], [VM]))
    assert p.before == (
        "create VR-MAC-eth0 bitmap:ip,mac range 10.1.0.0/16",
        "add -exist VR-MAC-eth0 10.1.2.3,02:00:00:00:00:0A",
        f"create {BOUND_SET} hash:ip family inet maxelem 1048576",
        f"add -exist {BOUND_SET} 10.1.2.3",
    )
    assert p.after == ()


def test_a_member_that_changed_mac_is_deleted_then_added() -> None:
    moved = DhcpEntry("02:00:00:00:00:0c", VM.ipv4_address, "vm1")
    p = plan(parse_save(SAVE), desired([NET], [moved]))
    assert p.before == (
        "del -exist VR-MAC-eth0 10.1.2.3,02:00:00:00:00:0A",
        "add -exist VR-MAC-eth0 10.1.2.3,02:00:00:00:00:0C",
    )


def test_a_network_whose_range_changed_is_rebuilt_aside_and_swapped_in() -> None:
    narrower = GuestNetwork("eth0", IPv4Address("10.1.2.1"), IPv4Network("10.1.2.0/24"), True)
    p = plan(parse_save(SAVE), desired([narrower], [VM]))
    assert p.before == (
        "create VR-MAC-eth0-new bitmap:ip,mac range 10.1.2.0/24",
        "add -exist VR-MAC-eth0-new 10.1.2.3,02:00:00:00:00:0A",
        "swap VR-MAC-eth0-new VR-MAC-eth0",
        "destroy VR-MAC-eth0-new",
    )


def test_sets_no_longer_wanted_are_destroyed_after_the_rules() -> None:
    p = plan(parse_save(SAVE), ())
    assert p.before == ()
    assert p.after == (f"destroy {BOUND_SET}", "destroy VR-MAC-eth0")
