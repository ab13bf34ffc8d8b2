"""IPv6 guests reach metadata and passwords at [fd00:ec2::254] and [fe80::a9fe:a9fe]
through the ip6tables redirect, against ``vr up`` in the sandbox's VR namespace.

The services listen on NON-default ports (metadata 8000, passwords 8088), so only the
redirect of 80/8080 on the guest device can answer. Guests get their address by
DHCPv6 (``dhclient -6``) and their default route from dnsmasq's router advertisement;
clients are curl and wget, as a guest image has them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest

from tests.helpers.sandbox6 import (
    CIDR6,
    ROUTER6,
    dhcp6,
    dual_stack_sandbox,
    guest_items,
    network6,
    v6_of,
)
from tests.helpers.wait import wait_for
from vr.demo.sandbox import Guest, Sandbox, dhcp_payload

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("allow_subp")]

METADATA_PORT = 8000
PASSWORD_PORT = 8088
AWS = "[fd00:ec2::254]"
OPENSTACK = "[fe80::a9fe:a9fe%25eth0]"
# A VM with a DHCP entry and metadata but no running guest: a spoofer claims its address.
ABSENT = Guest("gz", "10.1.1.77", "02:00:0a:01:01:4d", "absent", "i-absent-77", "unused")
ABSENT6 = "fd00:1::77"
SPOOFER = Guest("gs", "10.1.1.88", "02:00:0a:01:01:58", "spoofer", "no-vm", "unused")


def booted(sb: Sandbox) -> list[Guest]:
    """The sandbox's own guests (DHCPv6 done), not the spoofer added later."""
    return [g for g in sb.guests if g != SPOOFER]


def fp(secret: str) -> str:
    """A fingerprint to compare passwords by, so none is ever printed."""
    return hashlib.sha256(secret.encode()).hexdigest()[:12]


def curl(sb: Sandbox, role: str, url: str, *extra: str) -> tuple[int, str]:
    """(curl's exit code, body): 0 answered; 7 refused/unreachable, 28 timed out."""
    res = sb.run(
        role,
        ["curl", "-sS", "-g", "--connect-timeout", "2", "--max-time", "10", *extra, url],
        ok_codes=range(256),
    )
    return res.code, res.stdout


def password(sb: Sandbox, role: str, host: str) -> tuple[int, str]:
    return curl(sb, role, f"http://{host}:8080/", "-H", "DomU_Request: send_my_password")


@pytest.fixture(scope="module")
def sb() -> Iterator[Sandbox]:
    with dual_stack_sandbox(metadata_port=METADATA_PORT, password_port=PASSWORD_PORT) as sb:
        items = [network6()]
        for g in [*booted(sb), ABSENT]:
            items += guest_items(g, v6_of(g) if g is not ABSENT else ABSENT6, password=True)
        res = sb.push(sb.write_payloads(items))
        assert res.code == 0, res.stderr + sb.vr_log.read_text()[-3000:]
        for g in booted(sb):
            dhcp6(sb, g)
        yield sb


def test_each_ipv6_guest_gets_its_own_instance_id_at_both_metadata_addresses(
    sb: Sandbox,
) -> None:
    for g in booted(sb):
        for host in (AWS, OPENSTACK):
            assert curl(sb, g.role, f"http://{host}/latest/instance-id") == (0, g.instance_id)
    # the service itself is on 8000 only: port 80 of the router's address has nothing
    code, _ = curl(sb, booted(sb)[0].role, f"http://[{ROUTER6}]/latest/instance-id")
    assert code in (7, 28)


def test_each_ipv6_guest_gets_its_own_password_on_8080_at_both_addresses(sb: Sandbox) -> None:
    for g in booted(sb):
        for host in (AWS, OPENSTACK):
            code, body = password(sb, g.role, host)
            assert code == 0
            assert fp(body) == fp(g.password), f"{g.role} at {host}: not its own password"
    # as CloudStack's cloud-set-guest-password asks, with wget
    g = booted(sb)[0]
    res = sb.wget_password(g.role, host=AWS)
    assert res.code == 0 and fp(res.stdout) == fp(g.password)


def test_the_public_side_gets_neither_address_nor_the_service_ports(sb: Sandbox) -> None:
    # the outsider routes the metadata prefix and the guest prefix to the router
    ll = sb.run("vr", ["ip", "-6", "-o", "addr", "show", "dev", "eth2", "scope", "link"])
    router_ll = ll.stdout.split()[3].split("/")[0]
    for prefix in ("fd00:ec2::/64", CIDR6):
        sb.run("out", ["ip", "-6", "route", "replace", prefix, "via", router_ll, "dev", "eth0"])
    for url in (
        f"http://{AWS}/latest/instance-id",
        f"http://{OPENSTACK}/latest/instance-id",
        f"http://[{ROUTER6}]:{METADATA_PORT}/latest/instance-id",
    ):
        code, body = curl(sb, "out", url)
        assert (code, body) in ((7, ""), (28, "")), url
    for host in (AWS, OPENSTACK, f"[{ROUTER6}]"):
        assert password(sb, "out", host)[0] in (7, 28), host
    code, _ = curl(sb, "out", f"http://[{ROUTER6}]:{PASSWORD_PORT}/")
    assert code in (7, 28)


def test_a_guest_with_another_vms_ipv6_address_and_its_own_mac_is_dropped(
    sb: Sandbox,
) -> None:
    sb.add_guest(SPOOFER)
    sb.run("gs", ["ip", "-6", "addr", "add", f"{ABSENT6}/64", "dev", "eth0", "nodad"])
    sb.run("gs", ["ip", "-6", "route", "replace", "default", "via", ROUTER6])
    url = f"http://{AWS}/latest/instance-id"
    assert curl(sb, "gs", url, "--interface", ABSENT6) == (28, "")
    # the same address with the MAC of its DHCP entry is answered: only the binding drops it
    sb.run("gs", ["ip", "link", "set", "eth0", "address", ABSENT.mac])
    sb.run("vr", ["ip", "-6", "neigh", "flush", "dev", "eth0"])
    assert curl(sb, "gs", url, "--interface", ABSENT6) == (0, ABSENT.instance_id)


def test_removing_a_dhcp_entry_releases_its_dhcpv6_lease(sb: Sandbox) -> None:
    g = booted(sb)[-1]
    leases = sb.vr_root / "var/lib/misc/dnsmasq.leases"
    assert f" {v6_of(g)} " in leases.read_text()
    entry = {**dhcp_payload(g), "ipv6_address": v6_of(g)}
    removed = {**entry, "remove": True}
    try:
        assert sb.push(sb.write_payloads([("vm_dhcp_entry.json", removed)])).code == 0
        # dnsmasq drops the lease only when dhcp_release6 sends it the RELEASE
        wait_for(lambda: f" {v6_of(g)} " not in leases.read_text(), "DHCPv6 lease released")
        log = (sb.vr_root / "var/log/cloud.log").read_text()
        assert f"released the DHCPv6 lease of {v6_of(g)} on eth0" in log
    finally:
        assert sb.push(sb.write_payloads([("vm_dhcp_entry.json", entry)])).code == 0
