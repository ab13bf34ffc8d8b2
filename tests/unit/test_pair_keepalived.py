"""keepalived's configuration: which VRRP instances, and their text."""

from __future__ import annotations

from ipaddress import IPv4Address, IPv4Interface, IPv4Network

import pytest

from vr.config import Config
from vr.pair.keepalived import KeepalivedConf, instances
from vr.payloads import GuestNetwork

NOTIFY = ["/usr/bin/python3", "-m", "vr", "pair", "notify", "--root", "/r"]


def net(dev: str, ip: str, cidr: str, gw: str | None, add: bool = True) -> GuestNetwork:
    return GuestNetwork(
        dev, IPv4Address(ip), IPv4Network(cidr), add, None, IPv4Address(gw) if gw else None
    )


def test_one_instance_per_network_with_a_gateway_numbered_by_device() -> None:
    cfg = Config(pair_peer="169.254.10.12", pair_priority=110, pair_vrid=60)
    got = instances(
        cfg,
        [
            net("eth3", "10.3.0.2", "10.3.0.0/24", "10.3.0.1"),
            net("eth0", "10.1.1.2", "10.1.1.0/24", "10.1.1.1"),
            net("eth4", "10.4.0.2", "10.4.0.0/24", None),  # no gateway: no VIP
            net("eth5", "10.5.0.1", "10.5.0.0/24", "10.5.0.1"),  # the router is the gateway
            net("eth6", "10.6.0.2", "10.6.0.0/24", "10.6.0.1", add=False),
        ],
    )
    assert [(i.interface, i.vrid, i.vip, i.priority) for i in got] == [
        ("eth0", 60, IPv4Interface("10.1.1.1/24"), 110),
        ("eth3", 61, IPv4Interface("10.3.0.1/24"), 110),
    ]


def test_vrid_past_255_is_refused_naming_the_network() -> None:
    cfg = Config(pair_peer="169.254.10.12", pair_vrid=255)
    nets = [net(f"eth{i}", f"10.{i}.0.2", f"10.{i}.0.0/24", f"10.{i}.0.1") for i in (1, 2)]
    with pytest.raises(ValueError, match="guest network eth2: VRRP id 256"):
        instances(cfg, nets)


def test_rendered_config_is_backup_nopreempt_vrrp3_with_the_vip_and_notify() -> None:
    cfg = Config(pair_peer="169.254.10.12", pair_advert_ms=500)
    inst = instances(cfg, [net("eth0", "10.1.1.2", "10.1.1.0/24", "10.1.1.1")])
    text = KeepalivedConf("r-1", NOTIFY, inst).render()
    assert "vrrp_version 3" in text
    block = text[text.index("vrrp_instance VR-eth0 {") :]
    for line in (
        "state BACKUP",
        "nopreempt",
        "interface eth0",
        "virtual_router_id 51",
        "priority 100",
        "advert_int 0.5",
        "10.1.1.1/24 dev eth0",
        'notify "/usr/bin/python3 -m vr pair notify --root /r"',
    ):
        assert f"    {line}\n" in block or f"        {line}\n" in block


def test_a_notify_path_keepalived_would_split_is_refused() -> None:
    with pytest.raises(ValueError, match="notify argument '/a b'"):
        KeepalivedConf("r-1", ["/a b"], ()).render()
