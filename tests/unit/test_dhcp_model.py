"""dnsmasq's files rendered from config, networks and entries (pure)."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network

import pytest

from vr.config import Config
from vr.dhcp import model
from vr.dhcp.state import Lease6, leases6, released, released6
from vr.errors import PayloadError
from vr.payloads import DhcpEntry, GuestNetwork, parse_dhcp_entry, parse_guest_network

WHERE = model.Locations("/h", "/o", "/n", "/l")
NET = GuestNetwork("eth0", IPv4Address("10.1.1.1"), IPv4Network("10.1.1.0/24"), True)
VM = DhcpEntry("02:00:00:00:00:17", IPv4Address("10.1.1.23"), "web-1")


def test_one_dhcp_host_per_entry_with_infinite_lease_and_removed_entries_left_out() -> None:
    gone = DhcpEntry("02:00:00:00:00:18", IPv4Address("10.1.1.24"), "db-1", remove=True)
    files = model.render(Config(), [NET], [VM, gone], "r-1-VM", WHERE)
    assert files.hosts == b"02:00:00:00:00:17,10.1.1.23,web-1,infinite\n"
    assert b"10.1.1.1 r-1-VM data-server\n" in files.names
    assert b"10.1.1.23 web-1\n" in files.names


def test_unknown_guests_are_ignored_and_control_and_public_devices_excluded() -> None:
    conf = model.render(Config(), [NET], [VM], "r", WHERE).conf.decode()
    assert "dhcp-ignore=tag:!known" in conf.splitlines()
    assert {"except-interface=eth1", "except-interface=eth2", "interface=eth0"} <= set(
        conf.splitlines()
    )
    on_control = GuestNetwork("eth1", IPv4Address("10.2.2.1"), IPv4Network("10.2.2.0/24"), True)
    lines = model.render(Config(), [on_control], [], "r", WHERE).conf.decode().splitlines()
    assert "interface=eth1" not in lines


def test_a_host_change_touches_only_the_reloadable_files() -> None:
    a = model.render(Config(), [NET], [VM], "r", WHERE)
    b = model.render(
        Config(),
        [NET],
        [VM, VM.__class__("02:00:00:00:00:19", IPv4Address("10.1.1.25"), "x")],
        "r",
        WHERE,
    )
    assert a.conf == b.conf and a.hosts != b.hosts


def test_non_default_nics_get_empty_router_options_and_ipv6_by_duid() -> None:
    nd = DhcpEntry(
        "02:00:00:00:00:20", IPv4Address("10.1.1.30"), "n", default_entry=False,
        ipv6_address=IPv6Address("fd00:1::30"), ipv6_duid="00:03:00:01:02:00:00:00:00:20",
    )  # fmt: skip
    net6 = GuestNetwork(
        "eth0", IPv4Address("10.1.1.1"), IPv4Network("10.1.1.0/24"), True,
        router_guest_ip6=IPv6Address("fd00:1::1"), cidr6=IPv6Network("fd00:1::/64"),
    )  # fmt: skip
    files = model.render(Config(), [net6], [nd], "r", WHERE)
    assert files.hosts.decode().splitlines() == [
        "02:00:00:00:00:20,set:vr-nodefault,10.1.1.30,n,infinite",
        "id:00:03:00:01:02:00:00:00:00:20,[fd00:1::30],n,infinite",
    ]
    assert "tag:vr-nodefault,option:router" in files.opts.decode().splitlines()
    assert "enable-ra" in files.conf.decode().splitlines()


def test_released_hosts_are_those_that_left_the_hosts_file() -> None:
    old = (
        b"02:00:00:00:00:17,10.1.1.23,web-1,infinite\n02:00:00:00:00:18,set:x,10.1.1.24,infinite\n"
    )
    new = b"02:00:00:00:00:17,10.1.1.23,web-1,infinite\n"
    assert released(old, new) == {("02:00:00:00:00:18", IPv4Address("10.1.1.24"))}


BASE = {"mac_address": "02:00:00:00:00:17", "ipv4_address": "10.1.1.23", "host_name": "w"}


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"ipv6_address": "fe80::1"}, "ipv6_address"),
        ({"ipv6_address": "10.1.1.1"}, "ipv6_address"),
        ({"ipv6_address": "fd00:ec2::254"}, "ipv6_address"),
        ({"ipv6_address": "fd00:1::5", "ipv6_duid": "zz"}, "ipv6_duid"),
        ({"ipv6_duid": "00:01:00:01:aa:bb"}, "ipv6_duid"),
        ({"lease_time": 30}, "lease_time"),
        ({"lease_time": True}, "lease_time"),
    ],
)
def test_bad_ipv6_or_lease_fields_of_a_dhcp_entry_are_refused_by_name(
    extra: dict[str, object], field: str
) -> None:
    with pytest.raises(PayloadError) as err:
        parse_dhcp_entry({**BASE, **extra})
    assert err.value.field == field


@pytest.mark.parametrize(
    ("extra", "field"),
    [
        ({"router_guest_ip6": "fd00:1::1"}, "router_guest_ip6_cidr"),
        (
            {"router_guest_ip6": "fd00:2::1", "router_guest_ip6_cidr": "fd00:1::/64"},
            "router_guest_ip6",
        ),
        ({"router_guest_ip6": "fe80::1", "router_guest_ip6_cidr": "fe80::/64"}, "router_guest_ip6"),
        (
            {"router_guest_ip6": "fd00:1::1", "router_guest_ip6_cidr": "fd00:1::1/64"},
            "router_guest_ip6_cidr",
        ),
        ({"domain_name": "bad domain"}, "domain_name"),
        ({"dns": "10.1.1.1,not-an-ip"}, "dns"),
    ],
)
def test_bad_ipv6_fields_of_a_guest_network_are_refused_by_name(
    extra: dict[str, object], field: str
) -> None:
    net = {"device": "eth0", "router_guest_ip": "10.1.1.1", "cidr": "10.1.1.0/24"}
    with pytest.raises(PayloadError) as err:
        parse_guest_network({**net, **extra})
    assert err.value.field == field


def test_released_ipv6_addresses_are_those_that_left_the_hosts_file() -> None:
    old = (
        b"02:00:00:00:00:17,10.1.1.23,[fd00:1::17],vm-a,infinite\n"
        b"02:00:00:00:00:18,10.1.1.24,[fd00:1::18],vm-b,infinite\n"
        b"id:00:03:00:01:02:00:00:00:00:20,[fd00:1::20],infinite\n"
    )
    new = b"02:00:00:00:00:17,10.1.1.23,[fd00:1::17],vm-a,infinite\n"
    assert released6(old, new) == {IPv6Address("fd00:1::18"), IPv6Address("fd00:1::20")}


def test_dhcpv6_leases_are_read_with_the_server_duid_iaid_and_client_duid() -> None:
    text = (
        "4294967295 02:00:00:00:00:17 10.1.1.23 vm-a 01:02:00:00:00:00:17\n"
        "duid 00:01:00:01:2e:cc:6b:11:4e:45:46:94:15:e8\n"
        "4294967295 4227 fd00:1::17 vm-a 00:01:00:01:2e:cc:6b:14:02:00:00:00:00:17\n"
        "4294967295 99 not-an-address * 00:01\n"
    )
    server, leases = leases6(text)
    assert server == "00:01:00:01:2e:cc:6b:11:4e:45:46:94:15:e8"
    assert leases == [
        Lease6(IPv6Address("fd00:1::17"), "4227", "00:01:00:01:2e:cc:6b:14:02:00:00:00:00:17")
    ]


def test_a_leases_file_without_dhcpv6_has_no_server_duid() -> None:
    assert leases6("4294967295 02:00:00:00:00:17 10.1.1.23 vm-a *\n") == (None, [])


def test_a_removed_guest_network_is_no_longer_served() -> None:
    other = GuestNetwork("eth3", IPv4Address("10.3.3.1"), IPv4Network("10.3.3.0/24"), True)
    removal = GuestNetwork("eth0", IPv4Address("10.1.1.1"), IPv4Network("10.1.1.0/24"), False)
    served = model.render(Config(guest_networks=(NET,)), [other], [VM], "r", WHERE)
    assert "interface=eth0" in served.conf.decode().splitlines()
    # a pushed removal takes the network away, also one configured in vr.json
    files = model.render(Config(guest_networks=(NET,)), [other, removal], [VM], "r", WHERE)
    conf = files.conf.decode().splitlines()
    assert "interface=eth3" in conf
    assert not [line for line in conf if "eth0" in line or "10.1.1." in line]
    assert b"10.1.1.1" not in files.opts and b"10.1.1.1" not in files.names
