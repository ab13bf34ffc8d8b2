"""Guest network services on dnsmasq, tested with real clients: ``dhclient``
(isc-dhcp-client), Debian's cloud-init CloudStack data source, ``dig``/``getent``
and curl over IPv6, against ``vr up`` in the sandbox's VR namespace."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.sandbox6 import ROUTER6, dhcp6, dual_stack_sandbox, guest_items, network6, v6_of
from tests.helpers.wait import wait_for
from vr.demo.sandbox import VR_GUEST_IP, Guest, Sandbox, dhcp_payload

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("allow_subp")]


def _status(sb: Sandbox) -> dict[str, object]:
    data: dict[str, object] = json.loads((sb.vr_root / "run/vr/status.json").read_text())
    return data


@pytest.fixture(scope="module")
def sb() -> Iterator[Sandbox]:
    with dual_stack_sandbox() as sb:
        items = [network6(domain_name="cloud.test")]
        for g in sb.guests:
            items += guest_items(g, v6_of(g))
        try:
            sb.push(sb.write_payloads(items))
        except Exception:
            print((sb.vr_root / "var/log/cloud.log").read_text()[-3000:])
            raise
        for g in sb.guests:
            got = sb.dhcp(g.role)
            assert got.code == 0, got.stderr + sb.vr_log.read_text()[-3000:]
        yield sb


def test_dhclient_gets_the_pushed_address_and_hostname(sb: Sandbox) -> None:
    for g in sb.guests:
        addrs = sb.run(g.role, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
        assert f"inet {g.ip}/24" in addrs
        lease = sb.lease(g.role)
        assert f'option host-name "{g.name}";' in lease
        assert f"option dhcp-server-identifier {VR_GUEST_IP};" in lease
        assert f"option routers {VR_GUEST_IP};" in lease
        assert "option dhcp-lease-time 4294967295;" in lease  # CloudStack's infinite


def test_data_server_resolves_through_the_routers_dns(sb: Sandbox) -> None:
    g = sb.guests[0]
    # resolv.conf as dhclient wrote it from the lease: the router is the resolver
    assert sb.run(g.role, ["getent", "ahostsv4", "data-server"]).stdout.split()[0] == VR_GUEST_IP
    dig = sb.run(g.role, ["dig", "+short", f"@{VR_GUEST_IP}", "data-server.cloud.test"])
    assert dig.stdout.split() == [VR_GUEST_IP]
    other = sb.guests[1]
    assert sb.run(g.role, ["dig", "+short", other.name]).stdout.split() == [other.ip]
    aaaa = sb.run(g.role, ["dig", "+short", "AAAA", f"@{VR_GUEST_IP}", "data-server"])
    assert aaaa.stdout.split() == [ROUTER6]


def test_cloud_init_finds_the_router_from_the_lease_alone(sb: Sandbox) -> None:
    g = sb.guests[1]
    # no data-server by DNS (no resolver) or hosts, no default gateway to fall back on
    etc = Path(f"/etc/netns/{sb.ns(g.role)}/resolv.conf")
    saved = etc.read_text()
    try:
        etc.write_text("nameserver 127.0.0.1\n")
        sb.run(g.role, ["ip", "route", "del", "default"], ok_codes=range(256))
        assert "default" not in sb.run(g.role, ["ip", "route"]).stdout
        seen = sb.cloud_init(g.role)
    finally:
        etc.write_text(saved)
        sb.run(g.role, ["ip", "route", "replace", "default", "via", VR_GUEST_IP])
    assert seen["ok"] is True
    assert seen["vr_address"] == VR_GUEST_IP
    assert seen["instance_id"] == g.instance_id
    assert seen["local_hostname"] == g.name


def test_an_ipv6_guest_gets_its_own_instance_id_at_fd00_ec2__254(sb: Sandbox) -> None:
    for g in sb.guests:
        dhcp6(sb, g)
        got = sb.run(
            g.role,
            ["curl", "-sS", "--max-time", "10", "http://[fd00:ec2::254]/latest/instance-id"],
            ok_codes=range(256),
        )
        assert got.stdout == g.instance_id, got.stderr


def test_a_guest_without_an_entry_gets_no_lease(sb: Sandbox) -> None:
    stranger = Guest("gx", "10.1.1.99", "02:00:0a:01:01:63", "stranger", "no-vm", "unused-pw")
    sb.add_guest(stranger)
    res = sb.dhcp(stranger.role, timeout=8)
    assert res.code != 0
    assert "bound to" not in res.stderr
    assert (
        "inet "
        not in sb.run(stranger.role, ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    )
    # pushed later, the same guest is served without a restart of dnsmasq
    pid = _status(sb)["services"]["dhcp"]["pid"]  # type: ignore[index]
    res = sb.push(sb.write_payloads([("vm_dhcp_entry.json", dhcp_payload(stranger))]))
    assert res.code == 0, res.stderr
    assert sb.dhcp(stranger.role).code == 0
    assert f"inet {stranger.ip}/24" in sb.run(stranger.role, ["ip", "-4", "-o", "addr"]).stdout
    assert _status(sb)["services"]["dhcp"]["pid"] == pid  # type: ignore[index]
    # and a removed entry is no longer served
    removed = {**dhcp_payload(stranger), "remove": True}
    assert sb.push(sb.write_payloads([("vm_dhcp_entry.json", removed)])).code == 0
    leases = sb.vr_root / "var/lib/misc/dnsmasq.leases"
    wait_for(lambda: stranger.mac not in leases.read_text(), "lease released")


def test_killed_dnsmasq_is_restarted_by_vr_up_with_its_leases(sb: Sandbox) -> None:
    leases = sb.vr_root / "var/lib/misc/dnsmasq.leases"
    g = sb.guests[0]
    assert g.mac in leases.read_text()
    service = _status(sb)["services"]["dhcp"]  # type: ignore[index]
    children = sb.run("vr", ["pgrep", "-P", str(service["pid"]), "dnsmasq"]).stdout.split()
    assert len(children) == 1
    os.kill(int(children[0]), signal.SIGKILL)
    wait_for(
        lambda: (
            _status(sb)["services"]["dhcp"]["restarts"] == service["restarts"] + 1  # type: ignore[index]
            and _status(sb)["services"]["dhcp"]["up"]
        ),  # type: ignore[index]
        "dhcp service restarted",
    )
    assert g.mac in leases.read_text()
    # the restarted dnsmasq answers the guest's renewal with the same lease
    sb.run(
        g.role,
        ["dhclient", "-4", "-x", "-pf", "/var/lib/dhcp/dhclient.eth0.pid"],
        ok_codes=range(256),
    )
    assert sb.dhcp(g.role).code == 0
    assert f"inet {g.ip}/24" in sb.run(g.role, ["ip", "-4", "-o", "addr"]).stdout
