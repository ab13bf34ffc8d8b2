"""CloudStack's boot arguments parsed into a router configuration (vr.boot.cmdline)."""

from __future__ import annotations

import base64
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from vr.boot.cmdline import (
    CONTROL,
    GUEST,
    PUBLIC,
    decode_key,
    from_args,
    is_cloudstack,
    parse,
    shown,
)
from vr.errors import BootError

KEY = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 cloud@mgmt1"

# As the management server builds them for a KVM isolated router (spec §1.4), one line
# with the newline of `echo` (patch.sh).
ROUTER = (
    "template=domP name=r-270-VM eth0ip=10.1.1.1 eth0mask=255.255.255.0 "
    "eth1ip=169.254.3.4 eth1mask=255.255.0.0 eth2ip=192.0.2.10 eth2mask=255.255.255.0 "
    "gateway=192.0.2.1 type=router domain=cs1cloud.internal dns1=8.8.8.8 dns2=1.1.1.1 "
    "cidrsize=24 dhcprange=10.1.1.1 privateMtu=1450 publicMtu=1500 "
    f"authorized_key={base64.b64encode(KEY.encode()).decode().rstrip('=')}\n"
)


def test_a_router_gets_guest_control_and_public_nics_in_cloudstacks_order() -> None:
    cfg = from_args(parse(ROUTER))
    assert cfg.type == "router"
    assert cfg.name == "r-270-VM"
    assert [(n.device, n.role, n.address, n.mtu) for n in cfg.nics] == [
        ("eth0", GUEST, IPv4Interface("10.1.1.1/24"), 1450),
        ("eth1", CONTROL, IPv4Interface("169.254.3.4/16"), None),
        ("eth2", PUBLIC, IPv4Interface("192.0.2.10/24"), 1500),
    ]
    assert cfg.gateway == IPv4Address("192.0.2.1")
    assert cfg.dns == (IPv4Address("8.8.8.8"), IPv4Address("1.1.1.1"))
    assert cfg.domain == "cs1cloud.internal"
    assert cfg.redundant is False


def test_base64_key_without_its_padding_is_decoded_whole() -> None:
    # CloudStack's own parser cuts values at a second '=': ours keeps or restores padding.
    assert from_args(parse(ROUTER)).authorized_key == KEY
    padded = base64.b64encode(KEY.encode()).decode()
    assert padded.endswith("=")
    assert decode_key(padded) == KEY


def test_order_does_not_matter_and_the_last_repeated_key_wins() -> None:
    args = parse("advert_int=1 type=router advert_int=3 x=1 ro quiet")
    assert args == {"advert_int": "3", "type": "router", "x": "1"}


def test_dhcp_server_and_vpc_router_roles() -> None:
    dhcp = from_args(
        parse("type=dhcpsrvr eth0ip=10.1.1.2 eth0mask=24 eth1ip=169.254.1.1 eth1mask=16")
    )
    assert [(n.device, n.role) for n in dhcp.nics] == [("eth0", GUEST), ("eth1", CONTROL)]
    vpc = from_args(parse("type=vpcrouter eth0ip=169.254.1.9 eth0mask=255.255.0.0 eth1ip=1.2.3.4"))
    assert [(n.device, n.role) for n in vpc.nics] == [("eth0", CONTROL)]
    assert vpc.control.address == IPv4Interface("169.254.1.9/16")


def test_redundant_router_flag_is_the_presence_of_the_key() -> None:
    assert from_args(parse(ROUTER + " redundant_router=1")).redundant is True


def test_management_route_needs_both_cidr_and_local_gateway() -> None:
    cfg = from_args(parse(ROUTER + " mgmtcidr=10.0.0.0/8 localgw=169.254.0.1"))
    assert cfg.mgmt_cidr == IPv4Network("10.0.0.0/8")
    assert cfg.local_gw == IPv4Address("169.254.0.1")
    assert from_args(parse(ROUTER + " mgmtcidr=10.0.0.0/8")).mgmt_cidr is None


def test_kernel_command_line_is_recognised_only_with_cloudstack_arguments() -> None:
    assert is_cloudstack(parse("BOOT_IMAGE=/vmlinuz root=UUID=x ro " + ROUTER))
    assert not is_cloudstack(parse("BOOT_IMAGE=/vmlinuz root=UUID=x ro console=ttyS0"))


def test_secrets_are_never_shown() -> None:
    args = parse("type=router vmpassword=hunter2secret router_password=123456")
    text = repr(shown(args))
    assert "hunter2secret" not in text and "123456" not in text
    assert shown(args)["type"] == "router"


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("type=consoleproxy eth1ip=1.1.1.1 eth1mask=16", "type", "router"),
        ("eth1ip=1.1.1.1 eth1mask=16", "type", "router"),
        ("type=router eth0ip=10.1.1.1 eth0mask=24", "eth1ip", "control address"),
        ("type=router eth1ip=169.254.300.1 eth1mask=16", "eth1ip", "IPv4 address"),
        ("type=router eth1ip=169.254.3.4", "eth1mask", "netmask"),
        ("type=router eth1ip=169.254.3.4 eth1mask=255.0.255.0", "eth1mask", "netmask"),
        ("type=router eth1ip=169.254.0.0 eth1mask=16", "eth1ip", "host address"),
        ("type=router eth1ip=224.0.0.1 eth1mask=16", "eth1ip", "unicast"),
        ("type=router eth1ip=169.254.3.4 eth1mask=16 publicMtu=9", "publicMtu", "MTU"),
        ("type=router eth1ip=169.254.3.4 eth1mask=16 privateMtu=x", "privateMtu", "MTU"),
        ("type=router eth1ip=169.254.3.4 eth1mask=16 name=a_b", "name", "host name"),
        ("type=router eth1ip=169.254.3.4 eth1mask=16 gateway=x", "gateway", "IPv4"),
        ("type=router eth1ip=169.254.3.4 eth1mask=16 dns1=1.2.3", "dns1", "IPv4"),
        (
            "type=router eth1ip=169.254.3.4 eth1mask=16 authorized_key=!!",
            "authorized_key",
            "base64",
        ),
        (
            "type=router eth1ip=169.254.3.4 eth1mask=16 authorized_key=aGVsbG8",
            "authorized_key",
            "OpenSSH",
        ),
    ],
)
def test_bad_arguments_name_the_key_the_value_and_what_was_expected(
    text: str, key: str, expected: str
) -> None:
    with pytest.raises(BootError) as err:
        from_args(parse(text))
    assert err.value.key == key
    assert f"boot argument {key}=" in str(err.value)
    assert expected in str(err.value)
