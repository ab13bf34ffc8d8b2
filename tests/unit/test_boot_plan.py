"""What vr boot decides to change (vr.boot.plan): commands, files, vr.json, the key."""

from __future__ import annotations

import base64

import pytest

from vr import config
from vr.boot.cmdline import from_args, parse
from vr.boot.plan import make_plan, merge_keys
from vr.errors import BootError

KEY = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 cloud@mgmt"
ROUTER = (
    "type=router name=r-7-VM eth0ip=10.1.1.1 eth0mask=255.255.255.0 eth1ip=169.254.3.4 "
    "eth1mask=255.255.0.0 eth2ip=192.0.2.10 eth2mask=255.255.255.0 gateway=192.0.2.1 "
    "dns1=192.0.2.53 domain=cs1cloud.internal publicMtu=1400"
)


def plan_of(text: str, existing: dict[str, object] | None = None, dropped: str | None = None):  # type: ignore[no-untyped-def]
    return make_plan(from_args(parse(text)), existing or {}, dropped)


def test_router_interfaces_get_their_addresses_and_the_default_route_leaves_by_public() -> None:
    p = plan_of(ROUTER)
    assert p.devices == ("eth0", "eth1", "eth2")
    assert ("ip", "-4", "addr", "add", "10.1.1.1/24", "brd", "+", "dev", "eth0") in p.commands
    assert ("ip", "-4", "addr", "add", "169.254.3.4/16", "brd", "+", "dev", "eth1") in p.commands
    assert ("ip", "link", "set", "dev", "eth2", "mtu", "1400") in p.commands
    assert p.commands[-2:] == (
        ("ip", "route", "replace", "default", "via", "192.0.2.1", "dev", "eth2"),
        ("hostname", "r-7-VM"),
    )
    # Every NIC: old addresses flushed before the new one is added, then brought up.
    for dev in p.devices:
        flush = p.commands.index(("ip", "-4", "addr", "flush", "dev", dev))
        up = p.commands.index(("ip", "link", "set", "dev", dev, "up"))
        assert flush < up
    assert p.warnings == ()


def test_vr_json_names_the_interfaces_and_keeps_the_operators_other_settings() -> None:
    p = plan_of(ROUTER, existing={"metadata_workers": 4, "control_device": "eth9"})
    assert p.vr_json == {
        "metadata_workers": 4,
        "control_device": "eth1",
        "public_devices": ["eth2"],
        "ssh_listen": "169.254.3.4",
        "guest_networks": [
            {"device": "eth0", "router_guest_ip": "10.1.1.1", "cidr": "10.1.1.0/24"}
        ],
    }
    cfg = config.from_dict(p.vr_json)  # what vr up will load
    assert cfg.control_device == "eth1" and cfg.ssh_listen == "169.254.3.4"


def test_vpc_router_listens_on_eth0_and_has_no_public_device_at_boot() -> None:
    p = plan_of("type=vpcrouter eth0ip=169.254.1.9 eth0mask=255.255.0.0 gateway=203.0.113.1")
    assert p.vr_json["control_device"] == "eth0"
    assert p.vr_json["public_devices"] == []
    assert p.vr_json["guest_networks"] == []
    assert not any(c[:3] == ("ip", "route", "replace") for c in p.commands)
    assert p.warnings and "gateway=203.0.113.1" in p.warnings[0]


def test_dhcp_server_default_route_uses_the_guest_nic() -> None:
    dhcp = "type=dhcpsrvr eth0ip=10.1.1.2 eth0mask=24 eth1ip=169.254.1.1 eth1mask=16"
    p = plan_of(dhcp + " gateway=10.1.1.254")
    assert ("ip", "route", "replace", "default", "via", "10.1.1.254", "dev", "eth0") in p.commands


def test_redundant_router_keeps_public_down_and_sets_no_default_route() -> None:
    p = plan_of(ROUTER + " redundant_router=1")
    assert ("ip", "link", "set", "dev", "eth2", "down") in p.commands
    assert not any(c[:4] == ("ip", "route", "replace", "default") for c in p.commands)


def test_management_cidr_is_routed_through_the_local_gateway_on_the_control_nic() -> None:
    p = plan_of(ROUTER + " mgmtcidr=10.0.0.0/8 localgw=169.254.0.1")
    assert (
        "ip",
        "route",
        "replace",
        "10.0.0.0/8",
        "via",
        "169.254.0.1",
        "dev",
        "eth1",
    ) in p.commands


def test_system_files_hostname_hosts_and_resolver() -> None:
    files = plan_of(ROUTER).etc_files
    assert files["hostname"] == b"r-7-VM\n"
    assert b"127.0.1.1\tr-7-VM\n" in files["hosts"]
    assert files["resolv.conf"] == b"search cs1cloud.internal\nnameserver 192.0.2.53\n"


def test_key_from_arguments_and_from_the_dropped_file_are_merged_without_repeats() -> None:
    other = "ssh-ed25519 AAAAC3Nza other@mgmt"
    b64 = base64.b64encode(KEY.encode()).decode()
    p = plan_of(ROUTER + f" authorized_key={b64}", dropped=f"# comment\n{KEY}\n\n{other}\n")
    assert p.authorized_keys == f"{KEY}\n{other}\n".encode()
    assert plan_of(ROUTER).authorized_keys is None
    assert merge_keys(None, "\n# only a comment\n") is None


def test_arguments_making_an_invalid_vr_json_are_refused_before_anything_changes() -> None:
    # the guest network would overlap 169.254/16, which vr.json refuses
    with pytest.raises(BootError) as err:
        plan_of(ROUTER.replace("eth0ip=10.1.1.1", "eth0ip=169.254.9.1"))
    assert "vr.json" in str(err.value)
    with pytest.raises(BootError):
        plan_of(ROUTER, existing={"ssh_port": "x"})
