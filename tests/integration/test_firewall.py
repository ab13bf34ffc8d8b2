"""The firewall with real packets across network namespaces.

Topology (all namespaces created here, removed even when a test fails)::

    guest g1 (10.1.1.10, MAC ..:0a) --+
                                      +-- switch (bridge) -- eth0 10.1.1.1  VR
    guest g2 (MAC ..:0b, no address) -+                      eth1 10.200.0.1 -- control 10.200.0.2
                                                             eth2 10.100.0.1 -- outsider 10.100.0.2

The VR runs an echo server on 80, 8080, 3922 and 9000 that answers with the source
address it saw, and the rules come from ``vr firewall apply`` / ``vr update-config``
run inside the VR namespace. A blocked port is one whose SYN is dropped (curl's
connect timeout), always next to a port that answers on the same path.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.line_peer import WAIT, Lines
from tests.helpers.netns import Lab, Namespace, lab
from vr import store
from vr.paths import Paths

pytestmark = pytest.mark.root

G1_MAC = "02:00:00:00:00:0a"
G2_MAC = "02:00:00:00:00:0b"
VR_GUEST = "10.1.1.1"
VM_IP = "10.1.1.10"
META = "169.254.169.254"
BINDING = "binding eth0 10.1.1.0/24 from another MAC"
"""The comment of the rule that checks eth0's bindings (one set lookup per packet)."""


@dataclass
class VR:
    lab: Lab
    vr: Namespace
    g1: Namespace
    g2: Namespace
    outsider: Namespace
    control: Namespace
    paths: Paths

    def vr_cmd(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.vr.run(
            sys.executable, "-m", "vr", *args, "--root", str(self.paths.root), check=False
        )

    def firewall(self, action: str) -> subprocess.CompletedProcess[str]:
        res = self.vr_cmd("firewall", action)
        assert res.returncode == 0, res.stderr
        return res

    def push(self, name: str, obj: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        (self.paths.cache / name).write_text(json.dumps(obj))
        return self.vr_cmd("update-config", name)

    def push_ok(self, name: str, obj: dict[str, Any]) -> None:
        res = self.push(name, obj)
        assert res.returncode == 0, res.stdout + res.stderr

    def our_rules(self) -> list[str]:
        """Our chains and hooks as iptables-legacy-save prints them, with counters."""
        dump = self.vr.run("iptables-legacy-save", "-c").stdout
        return [line for line in dump.splitlines() if "VR-" in line]

    def our_rule_specs(self) -> list[str]:
        """:meth:`our_rules` without their counters, which stray packets may move."""
        return [line.split("] ", 1)[-1] for line in self.our_rules()]

    def counter(self, comment_part: str) -> int:
        res = self.vr_cmd("firewall", "counters", "--json")
        assert res.returncode == 0, res.stderr
        rows = [json.loads(line) for line in res.stdout.splitlines()]
        hits = [r["packets"] for r in rows if comment_part in r["comment"]]
        assert len(hits) == 1, rows
        return int(hits[0])


def get(ns: Namespace, host: str, port: int) -> str | None:
    """The echo server's answer, or None when the connection is not accepted."""
    res = ns.run(
        "curl", "-sS", "--connect-timeout", "1", "--max-time", "5",
        f"http://{host}:{port}/", check=False,
    )  # fmt: skip
    if res.returncode == 0:
        return res.stdout.strip()
    # 28: timed out connecting (SYN dropped); 7: refused/unreachable.
    assert res.returncode in (7, 28), res.stderr
    return None


def network_push(add: bool = True, **kw: Any) -> dict[str, Any]:
    return {
        "type": "guestnetwork",
        "device": "eth0",
        "router_guest_ip": VR_GUEST,
        "cidr": "10.1.1.0/24",
        "add": add,
        **kw,
    }


def dhcp_push(ip: str, mac: str, remove: bool = False) -> dict[str, Any]:
    return {"type": "dhcpentry", "ipv4_address": ip, "mac_address": mac, "remove": remove}


def build(lb: Lab, root: Path, config: dict[str, Any]) -> VR:
    vr, sw = lb.host("vr"), lb.host("sw")
    g1, g2 = lb.host("g1"), lb.host("g2")
    outsider, control = lb.host("out"), lb.host("ctl")
    sw.run("ip", "link", "add", "br0", "type", "bridge")
    sw.run("ip", "link", "set", "br0", "up")
    for ns, port, addr, mac in (
        (vr, "p0", f"{VR_GUEST}/24", None),
        (g1, "p1", f"{VM_IP}/24", G1_MAC),
        (g2, "p2", None, G2_MAC),
    ):
        dev = "eth0"
        lb.link(ns, dev, addr, sw, port, None, a_mac=mac)
        sw.run("ip", "link", "set", port, "master", "br0")
    g1.run("ip", "route", "add", "default", "via", VR_GUEST)
    lb.link(vr, "eth1", "10.200.0.1/24", control, "eth0", "10.200.0.2/24")
    lb.link(vr, "eth2", "10.100.0.1/24", outsider, "eth0", "10.100.0.2/24")
    outsider.run("ip", "route", "add", "default", "via", "10.100.0.1")
    control.run("ip", "route", "add", "default", "via", "10.200.0.1")

    paths = Paths(root)
    paths.ensure()
    paths.config.write_text(json.dumps(config))
    server = lb.spawn(
        vr,
        [sys.executable, "-m", "tests.helpers.echo_server", "80", "8080", "3922", "9000"],
        stdout=subprocess.PIPE,
    )
    assert server.stdout is not None
    assert server.stdout.readline().strip() == b"ready"
    return VR(lb, vr, g1, g2, outsider, control, paths)


@pytest.fixture
def make_vr(tmp_path: Path) -> Iterator[Any]:
    with lab() as lb:

        def make(config: dict[str, Any] | None = None) -> VR:
            cfg = {"control_device": "eth1", "public_devices": ["eth2"], **(config or {})}
            return build(lb, tmp_path / "vrroot", cfg)

        yield make


@pytest.fixture
def vr(make_vr: Any) -> VR:
    """A VR whose firewall is set up (as at boot) and whose guest network was pushed."""
    v: VR = make_vr()
    # Someone else's rules, set before ours: they must survive everything we do.
    v.vr.run("iptables-legacy", "-A", "INPUT", "-p", "tcp", "--dport", "9001", "-j", "DROP")
    v.vr.run(
        "iptables-legacy", "-t", "nat", "-A", "PREROUTING", "-i", "eth2", "-p", "tcp",
        "--dport", "9080", "-j", "DNAT", "--to-destination", "10.100.0.1:9000",
    )  # fmt: skip
    v.firewall("apply")
    v.push_ok("guest_network.json.1", network_push())
    return v


def test_a_guest_reaches_link_local_metadata_and_password_with_its_real_address(vr: VR) -> None:
    assert get(vr.g1, META, 80) == f"{VM_IP} {VR_GUEST}:80"
    assert get(vr.g1, META, 8080) == f"{VM_IP} {VR_GUEST}:8080"
    assert get(vr.g1, VR_GUEST, 80) == f"{VM_IP} {VR_GUEST}:80"
    # On the legacy backend, inside the VR namespace.
    nat = vr.vr.run("iptables-legacy", "-t", "nat", "-S", "VR-PREROUTING").stdout
    assert f"--to-destination {VR_GUEST}:8080" in nat


def test_outsiders_cannot_reach_the_services_and_ssh_only_from_control(vr: VR) -> None:
    # The public path works for other ports, so the refusals below are the firewall's.
    assert get(vr.outsider, "10.100.0.1", 9000) == "10.100.0.2 10.100.0.1:9000"
    for port in (80, 8080, 3922):
        assert get(vr.outsider, "10.100.0.1", port) is None, port
    # The outsider's packets for 169.254.169.254 reach the VR (default route via its
    # eth2) but never meet the redirect, which is bound to the guest device.
    redirect = "eth0 metadata 169.254.169.254:80"
    before = vr.counter(redirect)
    assert get(vr.outsider, META, 80) is None
    assert vr.counter(redirect) == before
    assert get(vr.g1, META, 80) == f"{VM_IP} {VR_GUEST}:80"
    assert vr.counter(redirect) > before
    assert get(vr.control, "10.200.0.1", 3922) == "10.200.0.2 10.200.0.1:3922"
    assert get(vr.control, "10.200.0.1", 80) is None
    assert get(vr.g1, VR_GUEST, 3922) is None
    assert get(vr.vr, "127.0.0.1", 3922) == "127.0.0.1 127.0.0.1:3922"


def test_a_guest_spoofing_a_bound_address_is_dropped_and_counted(vr: VR) -> None:
    rules_before = vr.our_rule_specs()
    vr.push_ok("vm_dhcp_entry.json.1", dhcp_push(VM_IP, G1_MAC))
    # The binding is one set entry: the push changed no rule.
    assert vr.our_rule_specs() == rules_before
    assert f"add VR-MAC-eth0 {VM_IP},{G1_MAC.upper()}" in vr.vr.run("ipset", "save").stdout
    assert get(vr.g1, META, 80) == f"{VM_IP} {VR_GUEST}:80"
    before = vr.counter(BINDING)
    # g2 takes g1's address with its own MAC.
    vr.g1.run("ip", "addr", "del", f"{VM_IP}/24", "dev", "eth0")
    vr.g2.run("ip", "addr", "add", f"{VM_IP}/24", "dev", "eth0")
    vr.g2.run("ip", "route", "add", "default", "via", VR_GUEST)
    vr.vr.run("ip", "neigh", "flush", "dev", "eth0")
    assert get(vr.g2, META, 80) is None
    assert get(vr.g2, VR_GUEST, 8080) is None
    assert vr.counter(BINDING) > before
    # Without the binding the same packets are allowed (CloudStack's behaviour).
    vr.push_ok("vm_dhcp_entry.json.2", dhcp_push(VM_IP, G1_MAC, remove=True))
    vr.vr.run("ip", "neigh", "flush", "dev", "eth0")
    assert get(vr.g2, META, 80) == f"{VM_IP} {VR_GUEST}:80"


def test_a_spoofer_cannot_ride_the_bound_guests_established_connection(make_vr: Any) -> None:
    # The service listens on its own port so that a server which never times out holds
    # the connection; 169.254.169.254:80 is redirected there as for the real one.
    v: VR = make_vr({"metadata_port": 8000})
    v.firewall("apply")
    v.push_ok("guest_network.json.1", network_push())
    v.push_ok("vm_dhcp_entry.json.1", dhcp_push(VM_IP, G1_MAC))
    peer = [sys.executable, "-m", "tests.helpers.line_peer"]
    server = Lines(v.lab.spawn(v.vr, [*peer, "server", "8000"], stdout=subprocess.PIPE))
    server.wait_for("ready")
    client = Lines(
        v.lab.spawn(
            v.g1, [*peer, "client", META, "80"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
    )
    client.wait_for("connected")
    client.send("from the bound mac")
    server.wait_for(f"{VM_IP} from the bound mac")
    before = v.counter(BINDING)

    # Same connection (conntrack ESTABLISHED), same address, another MAC.
    v.g1.run("ip", "link", "set", "dev", "eth0", "address", G2_MAC)
    client.send("from another mac")
    spoofed = f"{VM_IP} from another mac"
    deadline = time.monotonic() + WAIT
    dropped = 0
    while spoofed not in server.poll(0.2) and time.monotonic() < deadline:
        dropped = v.counter(BINDING) - before
        if dropped:
            break
    assert spoofed not in server.poll(0), "a segment from another MAC was delivered"
    assert dropped > 0

    # The connection only stalled: back on the bound MAC, the retransmission arrives.
    v.g1.run("ip", "link", "set", "dev", "eth0", "address", G1_MAC)
    server.wait_for(spoofed)


def test_unbound_addresses_are_refused_when_binding_is_required(make_vr: Any) -> None:
    v: VR = make_vr({"require_mac_binding": True})
    v.firewall("apply")
    v.push_ok("guest_network.json.1", network_push())
    assert get(v.g1, META, 80) is None
    v.push_ok("vm_dhcp_entry.json.1", dhcp_push(VM_IP, G1_MAC))
    assert get(v.g1, META, 80) == f"{VM_IP} {VR_GUEST}:80"


def test_removing_the_guest_network_removes_its_redirect(vr: VR) -> None:
    assert get(vr.g1, META, 80) is not None
    vr.push_ok("guest_network.json.2", network_push(add=False))
    assert get(vr.g1, META, 80) is None
    assert get(vr.g1, VR_GUEST, 80) is None
    assert not [line for line in vr.our_rules() if "DNAT" in line]


def test_reapplying_changes_nothing_and_foreign_rules_survive(vr: VR) -> None:
    vr.push_ok("vm_dhcp_entry.json.1", dhcp_push(VM_IP, G1_MAC))
    assert get(vr.g1, META, 80) is not None  # some counters are non-zero now
    before = vr.our_rules()
    res = vr.firewall("apply")
    assert "no change" in res.stdout
    vr.firewall("restore")
    after = vr.our_rules()
    assert vr.our_rule_specs() == [line.split("] ", 1)[-1] for line in before]
    # Counters are kept, not reset (a stray packet may only have added to them).
    packets = [[int(line[1:].split(":", 1)[0]) for line in rs if line.startswith("[")]
               for rs in (before, after)]  # fmt: skip
    assert any(packets[0]) and all(a >= b for b, a in zip(*packets, strict=True))
    dump = vr.vr.run("iptables-legacy-save").stdout
    assert "-A INPUT -p tcp -m tcp --dport 9001 -j DROP" in dump
    assert "--dport 9080 -j DNAT --to-destination 10.100.0.1:9000" in dump
    assert dump.count("-j VR-INPUT") == 1 and dump.count("-j VR-PREROUTING") == 1
    # ... and still act: 9001 dropped, 9080 forwarded to 9000, 9000 reachable.
    assert get(vr.outsider, "10.100.0.1", 9001) is None
    assert get(vr.outsider, "10.100.0.1", 9080) == "10.100.0.2 10.100.0.1:9000"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"cidr": "10.1.1.0/33"}, "cidr='10.1.1.0/33': expected an IPv4 network"),
        ({"device": "eth9"}, "device='eth9': expected an interface that exists"),
        ({"router_guest_ip": "10.9.9.9"}, "router_guest_ip='10.9.9.9': expected an address"),
        ({"device": "eth1"}, "device='eth1': expected a guest interface"),
    ],
)
def test_a_malformed_network_push_is_rejected_and_changes_no_rule(
    vr: VR, change: dict[str, Any], message: str
) -> None:
    rules_before = vr.our_rule_specs()
    networks_before = store.read_networks(vr.paths)
    res = vr.push("guest_network.json.9", network_push(**change))
    assert res.returncode == 1
    assert message in res.stderr
    assert vr.our_rule_specs() == rules_before
    assert store.read_networks(vr.paths) == networks_before
    assert get(vr.g1, META, 80) == f"{VM_IP} {VR_GUEST}:80"


def test_restore_reinstalls_the_saved_rules_after_a_reboot(vr: VR) -> None:
    vr.push_ok("vm_dhcp_entry.json.1", dhcp_push(VM_IP, G1_MAC))
    before = vr.our_rule_specs()
    # A reboot empties the tables (ours and everyone's).
    vr.vr.run("iptables-legacy", "-F")
    vr.vr.run("iptables-legacy", "-X")
    vr.vr.run("iptables-legacy", "-t", "nat", "-F")
    vr.vr.run("iptables-legacy", "-t", "nat", "-X")
    vr.vr.run("ipset", "destroy")  # ... and the sets
    assert get(vr.outsider, "10.100.0.1", 3922) is not None
    vr.firewall("restore")
    assert vr.our_rule_specs() == before
    assert get(vr.outsider, "10.100.0.1", 3922) is None
    assert get(vr.g1, META, 80) == f"{VM_IP} {VR_GUEST}:80"


def test_restore_after_a_reboot_refills_the_bindings_so_a_spoofer_is_still_dropped(vr: VR) -> None:
    vr.push_ok("vm_dhcp_entry.json.1", dhcp_push(VM_IP, G1_MAC))
    vr.vr.run("iptables-legacy", "-F")
    vr.vr.run("iptables-legacy", "-X")
    vr.vr.run("ipset", "destroy")
    vr.firewall("restore")
    vr.g1.run("ip", "addr", "del", f"{VM_IP}/24", "dev", "eth0")
    vr.g2.run("ip", "addr", "add", f"{VM_IP}/24", "dev", "eth0")
    vr.vr.run("ip", "neigh", "flush", "dev", "eth0")
    assert get(vr.g2, VR_GUEST, 80) is None
    assert vr.counter(BINDING) > 0
    # the bound MAC is let through again
    vr.g2.run("ip", "addr", "del", f"{VM_IP}/24", "dev", "eth0")
    vr.g1.run("ip", "addr", "add", f"{VM_IP}/24", "dev", "eth0")
    vr.vr.run("ip", "neigh", "flush", "dev", "eth0")
    assert get(vr.g1, VR_GUEST, 80) == f"{VM_IP} {VR_GUEST}:80"
