"""``vr hypervisor`` on a real Open vSwitch: a private ovsdb-server and ovs-vswitchd
(userspace datapath) in a hypervisor namespace, VM namespaces plugged into the bridge,
data pushed over SSH to each tenant network's agent, and guests asking with curl.

One hypervisor serves the whole module (two tenant networks ``a`` and ``b`` whose VMs
use the same addresses); every test plugs its own VMs.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers import netns
from tests.helpers.agent import keygen
from tests.helpers.fingerprint import fp
from tests.helpers.ovs import OvsLab, Vm, ovs_lab, vr_argv
from tests.helpers.vmdata import vm_payload, vm_triples
from tests.helpers.wait import wait_for
from vr.paths import Paths

pytestmark = pytest.mark.root

META = "http://169.254.169.254"
PASSWD = "http://169.254.169.254:8080/"
SSH_PORTS = {"a": 3922, "b": 3923}


@dataclass
class Hypervisor:
    ovs: OvsLab
    hv_root: Paths
    networks: dict[str, Paths]
    key: Path
    known_hosts: Path
    proc: subprocess.Popen[bytes]
    log: Path
    work: Path

    def push(self, network: str, payloads: list[tuple[str, dict[str, object]]]) -> None:
        """Push through the network's SSH agent as the management server does."""
        d = self.work / "push" / uuid.uuid4().hex[:8]
        d.mkdir(parents=True)
        files = []
        for name, obj in payloads:
            (d / name).write_text(json.dumps(obj))
            files.append(str(d / name))
        argv = vr_argv(
            "push", "--host", "127.0.0.1", "--port", str(SSH_PORTS[network]),
            "--key", str(self.key), "--known-hosts", str(self.known_hosts), "--accept-new",
            "--batch", *files,
        )  # fmt: skip
        res = self.ovs.hv.run(*argv, check=False, timeout=120)
        assert res.returncode == 0, f"push to {network} failed: {res.stdout}{res.stderr}"

    def add_vm(self, network: str, vm: Vm, instance: str, password: str | None) -> None:
        payloads: list[tuple[str, dict[str, object]]] = [
            ("vm_dhcp_entry.json", dhcp(vm.mac, vm.ip)),
            ("vm_metadata.json", metadata(vm.ip, instance)),
        ]
        if password is not None:
            payloads.append(
                (
                    "vm_password.json",
                    {"ip_address": vm.ip, "password": password, "type": "vmpassword"},
                )
            )
        self.push(network, payloads)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def dhcp(mac: str, ip: str) -> dict[str, object]:
    return {
        "mac_address": mac,
        "ipv4_address": ip,
        "host_name": "vm-" + ip.replace(".", "-"),
        "default_entry": True,
        "remove": False,
        "type": "dhcpentry",
    }


def metadata(ip: str, instance: str) -> dict[str, object]:
    triples = [
        t if t[1] != "instance-id" else ["metadata", "instance-id", instance]
        for t in vm_triples(ip)
    ]
    return vm_payload(ip, triples)


def served_instance(vm: Vm) -> str:
    return vm.curl(f"{META}/latest/meta-data/instance-id").stdout


def password_fp(vm: Vm, request: str = "send_my_password") -> str:
    """What the password server answers the VM, as a fingerprint (never the password)."""
    return fp(vm.curl(PASSWD, "-H", f"DomU_Request: {request}").stdout)


@pytest.fixture(scope="module")
def hv(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hypervisor]:
    work = tmp_path_factory.mktemp("hypervisor")
    with ovs_lab() as ovs:
        hv_root = Paths(work / "hv")
        hv_root.ensure()
        key = keygen(work / "mgmt_key", "ed25519")
        networks = {}
        for name, port in SSH_PORTS.items():
            p = Paths(work / f"net-{name}")
            p.ensure()
            p.config.write_text(json.dumps({"ssh_listen": "127.0.0.1", "ssh_port": port}))
            p.authorized_keys.parent.mkdir(parents=True, exist_ok=True)
            p.authorized_keys.write_text((work / "mgmt_key.pub").read_text())
            networks[name] = p
        log = work / "hypervisor.log"
        argv = vr_argv(
            "hypervisor", "--root", str(hv_root.root), "--bridge", ovs.bridge,
            "--ovs-rundir", str(ovs.rundir), "--workers", "1",
            *(x for n, p in networks.items() for x in ("--network", f"{n}={p.root}")),
        )  # fmt: skip
        with open(log, "ab") as out:
            proc = ovs.lab.spawn(ovs.hv, argv, stdout=out, stderr=subprocess.STDOUT)
        h = Hypervisor(ovs, hv_root, networks, key, work / "known_hosts", proc, log, work)
        for host, port in [("169.254.169.254", 80), ("169.254.169.254", 8080)] + [
            ("127.0.0.1", p) for p in SSH_PORTS.values()
        ]:
            wait = f"from tests.helpers.procs import wait_port; wait_port({host!r}, {port}, 60)"
            res = ovs.hv.run("python3", "-c", wait, check=False, timeout=90)
            assert res.returncode == 0, f"{host}:{port} never answered:\n{h.log_text()[-3000:]}"
        try:
            yield h
        finally:
            netns.stop(proc, timeout=15)
            # it removes its flows when it stops
            assert ovs.our_flows() == [], "vr hypervisor left flows behind"


def test_two_vms_with_the_same_ip_get_their_own_instance_id_and_password(hv: Hypervisor) -> None:
    a = hv.ovs.plug("52:54:00:0a:00:05", "10.9.0.5/24", "vm-a")
    b = hv.ovs.plug("52:54:00:0b:00:05", "10.9.0.5/24", "vm-b")
    pw_a, pw_b = "a-Secret-" + uuid.uuid4().hex[:8], "b-Secret-" + uuid.uuid4().hex[:8]
    hv.add_vm("a", a, "instance-a", pw_a)
    hv.add_vm("b", b, "instance-b", pw_b)

    wait_for(lambda: served_instance(a) == "instance-a", "VM a served")
    assert served_instance(b) == "instance-b"
    # the same through the DigitalOcean and EC2 views
    assert a.curl(f"{META}/metadata/v1/id").stdout == "instance-a"
    assert b.curl(f"{META}/2009-04-04/meta-data/instance-id").stdout == "instance-b"
    assert password_fp(a) == fp(pw_a)
    assert password_fp(b) == fp(pw_b)
    # a's ack clears a's password only
    assert a.curl(PASSWD, "-H", "DomU_Request: saved_password").stdout == "saved_password"
    assert a.curl(PASSWD, "-H", "DomU_Request: send_my_password").stdout == "saved_password"
    assert password_fp(b) == fp(pw_b)


def test_a_vm_spoofing_anothers_mac_and_ip_gets_only_its_own_data(hv: Hypervisor) -> None:
    victim = hv.ovs.plug("52:54:00:0a:00:15", "10.9.0.15/24", "victim")
    spoofer = hv.ovs.plug("52:54:00:0a:00:16", "10.9.0.16/24", "spoofer")
    pw_victim, pw_spoofer = "v-" + uuid.uuid4().hex, "s-" + uuid.uuid4().hex
    hv.add_vm("a", victim, "instance-victim", pw_victim)
    hv.add_vm("a", spoofer, "instance-spoofer", pw_spoofer)
    wait_for(lambda: served_instance(victim) == "instance-victim", "victim served")

    ns = spoofer.ns
    ns.run("ip", "link", "set", "eth0", "down")
    ns.run("ip", "link", "set", "eth0", "address", victim.mac)
    ns.run("ip", "addr", "flush", "dev", "eth0")
    ns.run("ip", "addr", "add", "10.9.0.15/24", "dev", "eth0")
    ns.run("ip", "link", "set", "eth0", "up")
    ns.run("ip", "route", "replace", "169.254.169.254/32", "dev", "eth0")

    assert served_instance(spoofer) == "instance-spoofer"
    assert password_fp(spoofer) == fp(pw_spoofer)
    # the victim's password is still there for the victim
    assert password_fp(victim) == fp(pw_victim)


def test_an_unplugged_ports_flows_are_removed_and_it_is_no_longer_served(hv: Hypervisor) -> None:
    keep = hv.ovs.plug("52:54:00:0b:00:21", "10.9.0.21/24", "keep")
    gone = hv.ovs.plug("52:54:00:0b:00:22", "10.9.0.22/24", "gone")
    hv.add_vm("b", keep, "instance-keep", None)
    hv.add_vm("b", gone, "instance-gone", None)
    wait_for(lambda: served_instance(gone) == "instance-gone", "VM served")
    assert hv.ovs.flows_of(gone.ofport)

    start = time.monotonic()
    hv.ovs.unplug(gone)
    wait_for(lambda: hv.ovs.flows_of(gone.ofport) == [], "the unplugged port's flows to go")
    took = time.monotonic() - start
    print(f"flows of an unplugged port removed after {took * 1000:.0f} ms")
    ports = json.loads((hv.hv_root.run / "hypervisor" / "ports.json").read_text())
    assert str(gone.ofport) not in ports
    assert hv.ovs.flows_of(keep.ofport)
    assert served_instance(keep) == "instance-keep"


def test_flows_are_restored_after_ovs_vswitchd_restarts(hv: Hypervisor) -> None:
    vm = hv.ovs.plug("52:54:00:0a:00:31", "10.9.0.31/24", "restart")
    hv.add_vm("a", vm, "instance-restart", None)
    wait_for(lambda: served_instance(vm) == "instance-restart", "VM served")
    before = hv.ovs.our_flows()

    hv.ovs.stop_daemon("ovs-vswitchd")
    hv.ovs.start_vswitchd()

    # the new ovs-vswitchd starts with an empty flow table and a new metadata port
    # (another MAC): the controller puts every flow back, re-addresses the port
    wait_for(lambda: len(hv.ovs.our_flows(check=False)) == len(before), "the flows to be restored")
    assert hv.ovs.flows_of(vm.ofport)
    wait_for(lambda: served_instance(vm) == "instance-restart", "VM served again")


def test_a_hundred_plugged_ports_are_all_served(hv: Hypervisor) -> None:
    vms = [
        hv.ovs.plug(f"52:54:00:0c:01:{i:02x}", f"10.20.{i}.10/24", f"many-{i}") for i in range(100)
    ]
    payloads: list[tuple[str, dict[str, object]]] = []
    for i, vm in enumerate(vms):
        payloads.append((f"vm_dhcp_entry-{i}.json", dhcp(vm.mac, vm.ip)))
        payloads.append((f"vm_metadata-{i}.json", metadata(vm.ip, f"many-{i}")))
    hv.push("b", payloads)
    wait_for(lambda: served_instance(vms[-1]) == "many-99", "the last port served", timeout=60)
    served = {served_instance(vm) for vm in vms}
    assert served == {f"many-{i}" for i in range(100)}
