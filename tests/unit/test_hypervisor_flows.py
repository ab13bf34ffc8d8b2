"""The hypervisor's flows as data: what each port gets, cookies, the diff, the bundle."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from vr.http.identity import Source, port_of
from vr.hypervisor import flows
from vr.hypervisor.flows import Flow, FlowError, MetaPort, VmPort

META = MetaPort(2, "AA:BB:CC:00:00:02")
VM5 = VmPort(5, "52:54:00:00:00:05", "vnet5")
VM6 = VmPort(6, "52:54:00:00:00:06", "vnet6")


def test_nat_address_encodes_the_port_in_16_bits_and_back() -> None:
    assert flows.nat_address(2) == IPv4Address("100.127.0.2")
    assert flows.nat_address(0x1234) == IPv4Address("100.127.18.52")
    for port in (1, 255, 256, 0xFEFF):
        assert port_of(Source(str(flows.nat_address(port)))) == port


@pytest.mark.parametrize(
    "address", ["100.127.0.0", "100.127.255.0", "100.126.0.5", "10.0.0.5", "::1", "junk"]
)
def test_addresses_that_are_no_ports_nat_address_name_no_port(address: str) -> None:
    assert port_of(Source(address)) is None


def test_each_port_gets_arp_both_ways_nat_per_service_port_and_a_guard() -> None:
    got = flows.port_flows(VM5, MetaPort(2, "aa:bb:cc:00:00:02"), (80, 8080))
    texts = [f.text for f in got]
    assert any("in_port=5,arp,arp_op=1,arp_tpa=169.254.169.254" in t for t in texts)
    answer = [t for t in texts if "in_port=2,arp,arp_op=1,arp_tpa=100.127.0.5" in t]
    assert len(answer) == 1
    assert "mod_dl_src:52:54:00:00:00:05" in answer[0]
    nat = [t for t in texts if "ct(commit,zone=5,nat(src=100.127.0.5)" in t]
    assert [t.split("tp_dst=")[1].split(",")[0] for t in nat] == ["80", "8080"]
    assert all("output:2" in t and "mod_dl_dst:aa:bb:cc:00:00:02" in t for t in nat)
    assert any(t.endswith("in_port=5,ip,nw_dst=169.254.169.254,actions=drop") for t in texts)


def test_desired_is_stable_whatever_the_order_of_ports_and_shares_the_return_path() -> None:
    one = flows.desired([VM5, VM6], META)
    two = flows.desired([VM6, VM5, VM5], META)
    assert one == two
    back = [f for f in one if f.table == flows.DEFAULT_RETURN_TABLE]
    assert len(back) == 2  # one reply flow and a drop, for every port
    assert len(flows.desired([], META)) == 5


def test_a_port_numbered_like_the_metadata_port_is_refused_naming_it() -> None:
    with pytest.raises(FlowError, match=r"ofport=2 of 'x'"):
        flows.desired([VmPort(2, "52:54:00:00:00:02", "x")], META)


@pytest.mark.parametrize(
    ("port", "message"),
    [
        (VmPort(0, "52:54:00:00:00:01"), "ofport=0: expected 1 to 65279"),
        (VmPort(0xFF00, "52:54:00:00:00:01"), "ofport=65280"),
        (VmPort(7, "52:54:00:00:01"), "mac='52:54:00:00:01': expected six hex pairs"),
        (VmPort(7, "52:54:00:00:00:0g"), "mac="),
    ],
)
def test_a_port_flows_cannot_express_is_refused_with_its_value(port: VmPort, message: str) -> None:
    with pytest.raises(FlowError, match=message):
        flows.desired([port], META)


def test_settings_out_of_range_are_refused() -> None:
    with pytest.raises(FlowError, match="return_table=255"):
        flows.desired([], META, return_table=255)
    with pytest.raises(FlowError, match="service port=0"):
        flows.desired([], META, service_ports=(0,))


def test_a_cookie_carries_the_tag_and_names_the_exact_flow() -> None:
    a = Flow(0, 10, "in_port=5", "drop")
    b = Flow(0, 10, "in_port=5", "output:2")
    assert a.cookie >> flows.COOKIE_SHIFT == flows.COOKIE_TAG
    assert a.cookie == Flow(0, 10, "in_port=5", "drop").cookie
    assert a.cookie != b.cookie


def test_diff_adds_whats_missing_deletes_whats_stale_and_ignores_foreign_cookies() -> None:
    want = flows.desired([VM5], META)
    stale = flows.desired([VM6], META)
    have = [f.cookie for f in want[:3]] + [stale[0].cookie, 0x0, 0x1234]
    change = flows.diff(want, have)
    assert set(change.add) == set(want[3:])
    assert change.delete == (stale[0].cookie,)
    assert not flows.diff(want, [f.cookie for f in want])


def test_a_port_whose_mac_changed_is_replaced_delete_first_in_one_bundle() -> None:
    old = flows.desired([VM5], META)
    new = flows.desired([VmPort(5, "52:54:00:00:00:55")], META)
    change = flows.diff(new, [f.cookie for f in old])
    text = flows.bundle(change)
    lines = text.splitlines()
    assert lines[0].startswith("delete cookie=0x5652")
    assert lines[0].endswith("/-1")
    first_add = next(i for i, line in enumerate(lines) if line.startswith("add "))
    assert all(line.startswith("delete ") for line in lines[:first_add])
    assert all(line.startswith("add cookie=0x") and ",table=" in line for line in lines[first_add:])
    assert any("52:54:00:00:00:55" in line for line in lines[first_add:])


def test_parse_cookies_reads_ovs_ofctl_dump_flows() -> None:
    dump = (
        " cookie=0x5652000000000001, priority=10,in_port=5 actions=drop\n"
        " cookie=0x5652abcdef012345, table=210, priority=0 actions=drop\n"
        "NXST_FLOW reply (xid=0x4):\n"
    )
    assert flows.parse_cookies(dump) == [0x5652000000000001, 0x5652ABCDEF012345]
