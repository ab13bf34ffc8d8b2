"""The pure rule computation: config + guest networks + DHCP entries -> rules."""

from __future__ import annotations

import json
from dataclasses import replace
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from vr.config import Config
from vr.errors import FirewallError
from vr.firewall.ipsets import BOUND_SET
from vr.firewall.model import (
    FILTER,
    FILTER6,
    INPUT_CHAIN,
    NAT,
    NAT6,
    NAT_CHAIN,
    PREFIX,
    Rule,
    RuleSet,
    desired,
)
from vr.payloads import DhcpEntry, GuestNetwork

GUEST = GuestNetwork("eth0", IPv4Address("10.1.1.1"), IPv4Network("10.1.1.0/24"), True)
GUEST2 = GuestNetwork("eth3", IPv4Address("10.2.0.1"), IPv4Network("10.2.0.0/16"), True)
VM = DhcpEntry("02:00:00:00:00:0a", IPv4Address("10.1.1.10"), "vm1")
WIDE = GuestNetwork("eth4", IPv4Address("10.0.0.1"), IPv4Network("10.0.0.0/8"), True)
"""Wider than a bitmap:ip,mac set holds: its bindings keep one rule each."""
VM_WIDE = DhcpEntry("02:00:00:00:00:0c", IPv4Address("10.200.0.7"), "vm3")


def rules(rs: RuleSet, chain: str) -> list[Rule]:
    return list(rs.chain(chain).rules)


def rules6(rs: RuleSet) -> list[Rule]:
    return [r for c in rs.chains if c.table == FILTER6 for r in c.rules]


def test_each_guest_network_redirects_link_local_80_and_8080_on_its_device_only() -> None:
    rs = desired(Config(), [GUEST, GUEST2], [])
    dnat = rules(rs, NAT_CHAIN)
    assert {(r.in_interface, r.dports, r.to_destination) for r in dnat} == {
        ("eth0", (80,), "10.1.1.1:80"),
        ("eth0", (8080,), "10.1.1.1:8080"),
        ("eth3", (80,), "10.2.0.1:80"),
        ("eth3", (8080,), "10.2.0.1:8080"),
    }
    assert all(r.destination == IPv4Network("169.254.169.254/32") for r in dnat)
    assert all(r.target == "DNAT" and r.protocol == "tcp" for r in dnat)


def test_redirect_goes_to_the_configured_service_ports() -> None:
    rs = desired(Config(metadata_port=8000, password_port=8001), [GUEST], [])
    assert [r.to_destination for r in rules(rs, NAT_CHAIN)] == ["10.1.1.1:8000", "10.1.1.1:8001"]
    guest_accept = [r for r in rules(rs, INPUT_CHAIN) if r.in_interface == "eth0"]
    assert guest_accept[0].dports == (8000, 8001)


def test_nothing_is_redirected_or_accepted_on_control_or_public_interfaces() -> None:
    cfg = Config(control_device="eth1", public_devices=("eth2",))
    rs = desired(cfg, [GUEST], [])
    assert all(r.in_interface == "eth0" for r in rules(rs, NAT_CHAIN))
    accepts = [r for r in rules(rs, INPUT_CHAIN) if r.target == "ACCEPT"]
    eth1 = [r for r in accepts if r.in_interface == "eth1"]
    assert [r.dports for r in eth1] == [(3922,), (9180,)]
    assert not [r for r in accepts if r.in_interface == "eth2"]


def test_guests_are_accepted_from_their_cidr_on_their_device() -> None:
    rs = desired(Config(), [GUEST], [])
    (accept,) = [r for r in rules(rs, INPUT_CHAIN) if r.in_interface == "eth0"]
    assert accept.target == "ACCEPT"
    assert accept.source == IPv4Network("10.1.1.0/24")
    assert accept.dports == (80, 8080)
    assert "NEW" in accept.ctstate


def test_guarded_ports_are_dropped_last_and_other_ports_fall_through() -> None:
    rs = desired(Config(), [GUEST], [])
    last = rules(rs, INPUT_CHAIN)[-1]
    assert last.target == "DROP"
    assert last.in_interface is None and last.source is None
    assert last.dports == (80, 3922, 8080, 9180)


def test_cloudstack_ports_stay_guarded_when_the_services_use_other_ports() -> None:
    rs = desired(Config(metadata_port=8000, password_port=8001, ssh_port=2222), [GUEST], [])
    last = rules(rs, INPUT_CHAIN)[-1]
    assert last.target == "DROP"
    assert last.dports == (80, 2222, 3922, 8000, 8001, 8080, 9180)


def test_a_pushed_removal_takes_away_the_configured_network_on_that_device() -> None:
    removal = GuestNetwork("eth0", GUEST.router_guest_ip, GUEST.cidr, False)
    rs = desired(Config(guest_networks=(GUEST, GUEST2)), [removal], [])
    assert {r.in_interface for r in rules(rs, NAT_CHAIN)} == {"eth3"}


def test_ssh_and_services_are_accepted_on_loopback_first() -> None:
    first = rules(desired(Config(), [], []), INPUT_CHAIN)[0]
    assert (first.target, first.in_interface, first.dports) == (
        "ACCEPT",
        "lo",
        (80, 3922, 8080, 9180),
    )


def test_a_dhcp_entry_drops_its_address_from_other_macs_before_any_accept() -> None:
    # one rule per binding: outside set-capable networks, and the design before sets
    rs = desired(Config(), [GUEST], [VM], binding_sets=False)
    chain = rules(rs, INPUT_CHAIN)
    binding = [r for r in chain if r.mac_source is not None]
    assert len(binding) == 1
    b = binding[0]
    assert (b.target, b.source, b.mac_source, b.mac_negate) == (
        "DROP",
        IPv4Network("10.1.1.10/32"),
        "02:00:00:00:00:0a",
        True,
    )
    assert b.dports == (80, 8080)
    first_guest_accept = next(
        i for i, r in enumerate(chain) if r.target == "ACCEPT" and r.in_interface == "eth0"
    )
    assert chain.index(b) < first_guest_accept


@pytest.mark.parametrize("require_binding", [False, True])
def test_the_binding_drop_checks_every_packet_not_only_new_connections(
    require_binding: bool,
) -> None:
    # A spoofer must not ride an established connection: no conntrack state in the drop.
    rs = desired(Config(require_mac_binding=require_binding), [WIDE], [VM_WIDE])
    (b,) = [r for r in rules(rs, INPUT_CHAIN) if r.mac_source is not None]
    assert b.target == "DROP"
    assert b.ctstate == ()
    assert [m.name for m in b.spec().matches] == ["multiport", "mac", "comment"]
    assert "conntrack" not in b.spec().render()


def test_removing_a_dhcp_entry_removes_exactly_its_rule() -> None:
    other = DhcpEntry("02:00:00:00:00:0b", IPv4Address("10.1.1.11"), "vm2")
    both = rules(desired(Config(), [GUEST], [VM, other]), INPUT_CHAIN)
    one = rules(desired(Config(), [GUEST], [other]), INPUT_CHAIN)
    assert [r for r in both if "10.1.1.10" not in r.comment] == one


def test_removing_a_guest_network_removes_exactly_its_rules() -> None:
    both = desired(Config(), [GUEST, GUEST2], [])
    one = desired(Config(), [GUEST2], [])
    for chain in (NAT_CHAIN, INPUT_CHAIN):
        assert [
            r for r in rules(both, chain) if r.in_interface != "eth0" and "eth0" not in r.comment
        ] == rules(one, chain)


def test_unbound_addresses_are_refused_when_binding_is_required() -> None:
    rs = desired(Config(require_mac_binding=True), [GUEST], [VM])
    eth0 = [r for r in rules(rs, INPUT_CHAIN) if r.in_interface == "eth0"]
    assert [(r.target, r.source, r.match_sets) for r in eth0] == [
        ("ACCEPT", IPv4Network("10.1.1.0/24"), ((BOUND_SET, "src", False),)),
        ("DROP", IPv4Network("10.1.1.0/24"), ()),
    ]


def test_unbound_addresses_outside_set_networks_are_refused_rule_by_rule() -> None:
    rs = desired(Config(require_mac_binding=True), [WIDE], [VM_WIDE])
    eth4 = [r for r in rules(rs, INPUT_CHAIN) if r.in_interface == "eth4"]
    assert [(r.target, r.source) for r in eth4] == [
        ("ACCEPT", IPv4Network("10.200.0.7/32")),
        ("DROP", IPv4Network("10.0.0.0/8")),
    ]


def test_bindings_in_a_network_of_at_most_a_slash_16_change_no_rule() -> None:
    other = DhcpEntry("02:00:00:00:00:0b", IPv4Address("10.2.3.4"), "vm2")
    for cfg in (Config(), Config(require_mac_binding=True)):
        none = desired(cfg, [GUEST, GUEST2], [])
        assert desired(cfg, [GUEST, GUEST2], [VM, other]) == none


def test_the_set_binding_drop_precedes_every_accept_and_checks_every_packet() -> None:
    chain = rules(desired(Config(), [GUEST], [VM]), INPUT_CHAIN)
    (b,) = [r for r in chain if r.match_sets]
    assert (b.target, b.source, b.in_interface, b.ctstate) == (
        "DROP",
        IPv4Network("10.1.1.0/24"),
        None,
        (),
    )
    assert b.match_sets == ((BOUND_SET, "src", False), ("VR-MAC-eth0", "src,src", True))
    assert [m.name for m in b.spec().matches] == ["multiport", "set", "set", "comment"]
    first_guest_accept = next(
        i for i, r in enumerate(chain) if r.target == "ACCEPT" and r.in_interface == "eth0"
    )
    assert chain.index(b) < first_guest_accept


def test_ipv6_binding_rules_exist_only_with_an_ipv6_guest_network() -> None:
    v6 = GuestNetwork(
        "eth0",
        IPv4Address("10.1.1.1"),
        IPv4Network("10.1.1.0/24"),
        True,
        router_guest_ip6=IPv6Address("fd00:1::1"),
        cidr6=IPv6Network("fd00:1::/64"),
    )
    without = [r for r in rules6(desired(Config(), [GUEST], [VM])) if r.mac_source]
    with_v6 = [r for r in rules6(desired(Config(), [v6], [VM])) if r.mac_source]
    assert without == []
    assert [(r.source, r.mac_source) for r in with_v6] == [
        (IPv6Network("fe80::ff:fe00:a/128"), "02:00:00:00:00:0a")
    ]


def test_a_pushed_network_replaces_the_configured_one_on_the_same_device() -> None:
    configured = GuestNetwork("eth0", IPv4Address("10.9.9.1"), IPv4Network("10.9.9.0/24"), True)
    rs = desired(Config(guest_networks=(configured,)), [GUEST], [])
    assert {r.to_destination for r in rules(rs, NAT_CHAIN)} == {"10.1.1.1:80", "10.1.1.1:8080"}


def test_configured_networks_are_active_without_any_push() -> None:
    rs = desired(Config(guest_networks=(GUEST,)), [], [])
    assert len(rules(rs, NAT_CHAIN)) == 2


def test_all_chains_carry_the_prefix_and_hook_into_builtin_chains() -> None:
    rs = desired(Config(), [GUEST], [VM])
    assert [(c.table, c.name, c.hooks) for c in rs.chains] == [
        (NAT, NAT_CHAIN, ("PREROUTING",)),
        (FILTER, INPUT_CHAIN, ("INPUT",)),
        (NAT6, NAT_CHAIN, ("PREROUTING",)),
        (FILTER6, INPUT_CHAIN, ("INPUT",)),
    ]
    assert all(c.name.startswith(PREFIX) for c in rs.chains)


def test_same_inputs_give_the_same_rules_whatever_the_order() -> None:
    other = DhcpEntry("02:00:00:00:00:0b", IPv4Address("10.1.1.11"), "vm2")
    assert desired(Config(), [GUEST, GUEST2], [VM, other]) == desired(
        Config(), [GUEST2, GUEST], [other, VM]
    )


def test_saved_state_round_trips_through_json() -> None:
    rs = desired(Config(require_mac_binding=True), [GUEST, GUEST2], [VM])
    assert RuleSet.from_json(rs.to_json()) == rs


def test_saved_state_with_a_foreign_chain_is_refused() -> None:
    chain = {"table": "filter", "name": "INPUT", "hooks": [], "rules": []}
    doc = json.dumps({"version": 1, "chains": [chain]}).encode()
    with pytest.raises(FirewallError, match="INPUT"):
        RuleSet.from_json(doc)


def test_render_shows_hooks_and_rules_like_iptables_save() -> None:
    text = desired(Config(), [GUEST], [VM]).render()
    assert "-A PREROUTING -j VR-PREROUTING" in text
    assert "-A INPUT -j VR-INPUT" in text
    assert (
        "-d 169.254.169.254/32 -i eth0 -p tcp -m tcp --dport 80 -m comment "
        '--comment "vr: eth0 metadata 169.254.169.254:80" -j DNAT --to-destination 10.1.1.1:80'
    ) in text
    assert ("-m set --match-set VR-BOUND4 src -m set ! --match-set VR-MAC-eth0 src,src") in text
    assert (
        "-m mac ! --mac-source 02:00:00:00:00:0a"
        in desired(Config(), [GUEST], [VM], binding_sets=False).render()
    )


def test_metrics_are_accepted_on_the_control_device_only_and_dropped_elsewhere() -> None:
    cfg = Config(control_device="eth1", public_devices=("eth2",), metrics_port=9300)
    chain = rules(desired(cfg, [GUEST], []), INPUT_CHAIN)
    offered = [r for r in chain if r.target == "ACCEPT" and 9300 in r.dports]
    assert [r.in_interface for r in offered] == ["lo", "eth1"]
    assert chain[-1].target == "DROP" and 9300 in chain[-1].dports
    guest = [r for r in chain if r.in_interface == "eth0"]
    assert all(9300 not in r.dports for r in guest)


# --- IPv6 metadata redirects (ip6tables nat) ------------------------------------------

GUEST6 = replace(GUEST, router_guest_ip6=IPv6Address("fd00:1::1"), cidr6=IPv6Network("fd00:1::/64"))


def nat6(rs: RuleSet) -> list[Rule]:
    [chain] = [c for c in rs.chains if c.table == NAT6]
    assert (chain.name, chain.hooks) == (NAT_CHAIN, ("PREROUTING",))
    return list(chain.rules)


def test_ipv6_guests_are_redirected_from_both_metadata_addresses_to_the_service_ports() -> None:
    rs = desired(Config(metadata_port=8000, password_port=8088), [GUEST6], [])
    got = {(r.in_interface, str(r.destination), r.dports, r.to_destination) for r in nat6(rs)}
    assert got == {
        ("eth0", "fd00:ec2::254/128", (80,), "[fd00:1::1]:8000"),
        ("eth0", "fd00:ec2::254/128", (8080,), "[fd00:1::1]:8088"),
        ("eth0", "fe80::a9fe:a9fe/128", (80,), "[fd00:1::1]:8000"),
        ("eth0", "fe80::a9fe:a9fe/128", (8080,), "[fd00:1::1]:8088"),
    }
    assert {r.target for r in nat6(rs)} == {"DNAT"}


def test_ipv4_only_networks_and_other_devices_get_no_ipv6_redirect() -> None:
    cfg = Config(control_device="eth1", public_devices=("eth2",))
    rs = desired(cfg, [GUEST6, GUEST2], [])
    assert {r.in_interface for r in nat6(rs)} == {"eth0"}
    assert nat6(desired(cfg, [GUEST, GUEST2], [])) == []


def test_the_ipv6_redirect_renders_as_ip6tables_save_would() -> None:
    spec = nat6(desired(Config(metadata_port=8000), [GUEST6], []))[0].spec().render()
    assert spec == (
        "-d fd00:ec2::254/128 -i eth0 -p tcp -m tcp --dport 80 -m comment --comment "
        '"vr: eth0 metadata [fd00:ec2::254]:80" -j DNAT --to-destination [fd00:1::1]:8000'
    )


def test_split_keeps_the_order_of_each_family() -> None:
    from vr.firewall.model import IPV6_TABLES

    four, six = desired(Config(), [GUEST6], [VM]).split(IPV6_TABLES)
    assert four.tables() == [NAT, FILTER]
    assert six.tables() == [NAT6, FILTER6]


def test_with_binding_required_a_bound_ipv6_guest_is_accepted_from_both_its_addresses() -> None:
    vm6 = replace(VM, ipv6_address=IPv6Address("fd00:1::10"))
    rs = desired(Config(require_mac_binding=True), [GUEST6], [vm6])
    [chain] = [c for c in rs.chains if c.table == FILTER6]
    accepted = [r.source for r in chain.rules if r.target == "ACCEPT" and r.in_interface == "eth0"]
    assert accepted == [
        IPv6Network("fd00:1::10/128"),
        IPv6Network("fe80::ff:fe00:a/128"),  # EUI-64 of 02:00:00:00:00:0a
    ]
