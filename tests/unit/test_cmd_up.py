"""``vr status``: what an operator reads about a running (or stopped) ``vr up``."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network

import pytest

from tests.helpers.procs import free_port
from vr.cli import main
from vr.ops.status import collect_status, format_status
from vr.paths import Paths
from vr.payloads import GuestNetwork, VmMetadata
from vr.store import Store
from vr.supervisor import single_instance

PUSH_TIME = 1_700_000_000.0


@pytest.fixture
def listening() -> Iterator[int]:
    """A loopback port that answers, as a running service's does."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        yield s.getsockname()[1]


def write_up_status(paths: Paths, up_port: int, down_port: int) -> None:
    """What a running vr up leaves in run/vr/status.json: one service answering, one
    crashed twice and not answering."""
    paths.run.mkdir(parents=True, exist_ok=True)
    services = {
        "metadata": {"pid": 4242, "up": True, "host": "127.0.0.1", "port": up_port, "restarts": 0},
        "passwords": {
            "pid": 4343,
            "up": True,  # stale: vr status asks the port again
            "host": "127.0.0.1",
            "port": down_port,
            "restarts": 2,
        },
    }
    status = {"pid": os.getpid(), "ready": True, "stopped": False, "services": services}
    (paths.run / "status.json").write_text(json.dumps(status))


def configure_eth0(paths: Paths) -> None:
    paths.config.parent.mkdir(parents=True, exist_ok=True)
    net = {"device": "eth0", "router_guest_ip": "10.1.1.1", "cidr": "10.1.1.0/24"}
    paths.config.write_text(json.dumps({"guest_networks": [net]}))


def push_networks(paths: Paths, *devices_and_cidrs: tuple[str, str, str]) -> None:
    Store(paths).apply(
        [
            GuestNetwork(dev, IPv4Address(ip), IPv4Network(cidr), True)
            for dev, ip, cidr in devices_and_cidrs
        ]
    )


def record_push(paths: Paths, ok: bool, summary: str) -> None:
    entry = {"file": "vm_metadata.json", "ok": ok, "summary": summary, "time": PUSH_TIME}
    paths.last_push.write_text(json.dumps(entry))


def test_status_prints_services_vms_networks_and_the_last_push(
    paths: Paths, listening: int, capsys: pytest.CaptureFixture[str]
) -> None:
    closed = free_port()
    write_up_status(paths, listening, closed)
    vms = [VmMetadata(IPv4Address(ip), ()) for ip in ("10.1.1.10", "10.1.1.11")]
    Store(paths).apply(vms)
    push_networks(paths, ("eth0", "10.1.1.1", "10.1.1.0/24"))
    record_push(paths, True, "VM 10.1.1.10: changed instance-id deleted -")
    with single_instance(paths):  # as the running vr up holds it
        # degraded: one service does not answer
        assert main(["status", "--root", str(paths.root)]) == 1
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(PUSH_TIME))
    assert capsys.readouterr().out.splitlines() == [
        f"vr up: ready (pid {os.getpid()})",
        f"  metadata   up    port {listening:<5} pid 4242     restarts 0",
        f"  passwords  down  port {closed:<5} pid 4343     restarts 2",
        "VMs: 2  guest networks: 1",
        "metadata requests refused for X-Forwarded-For/Forwarded: 0",
        "password requests refused for X-Forwarded-For/Forwarded: 0",
        f"last push: {when} vm_metadata.json ok: VM 10.1.1.10: changed instance-id deleted -",
        "health: degraded: passwords down since ?",
    ]


def test_status_of_a_stopped_vr_up_with_a_failed_push(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    paths.run.mkdir(parents=True, exist_ok=True)
    stopped = {
        "pid": 1,
        "ready": False,
        "stopped": True,
        "services": {"agent": {"pid": None, "up": False, "port": 3922, "restarts": 1}},
    }
    (paths.run / "status.json").write_text(json.dumps(stopped))
    record_push(paths, False, "vm_metadata.json: vm_ip_address='x': expected an IPv4 address")
    assert main(["status", "--root", str(paths.root)]) == 2  # down
    out = capsys.readouterr().out.splitlines()
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(PUSH_TIME))
    assert out[0] == "vr up: stopped"
    assert out[1] == "  agent      down  port 3922  pid -        restarts 1"
    assert out[2] == "VMs: 0  guest networks: 0"
    assert out[-2] == (
        f"last push: {when} vm_metadata.json FAILED: "
        "vm_metadata.json: vm_ip_address='x': expected an IPv4 address"
    )
    assert out[-1] == "health: down: vr up is not running"


def test_status_left_by_a_killed_vr_up_is_reported_stopped_not_ready(
    paths: Paths, listening: int
) -> None:
    """SIGKILL leaves run/vr/status.json saying ready; nothing holds the lock any more."""
    write_up_status(paths, listening, free_port())
    with single_instance(paths):
        assert format_status(collect_status(paths)).startswith(f"vr up: ready (pid {os.getpid()})")
    st = collect_status(paths)
    assert st["supervisor"]["ready"] is False
    assert {svc["up"] for svc in st["supervisor"]["services"].values()} == {False}
    assert format_status(st).splitlines()[0] == (
        f"vr up: stopped (vr up pid {os.getpid()} ended without stopping its services)"
    )


def test_status_without_any_vr_up_or_push(paths: Paths) -> None:
    text = format_status(collect_status(paths))
    assert text.splitlines() == [
        "vr up: stopped",
        "VMs: 0  guest networks: 0",
        "metadata requests refused for X-Forwarded-For/Forwarded: 0",
        "password requests refused for X-Forwarded-For/Forwarded: 0",
        "last push: none",
        "health: down: vr up is not running",
    ]


def test_a_pushed_network_replacing_a_configured_one_is_counted_once(paths: Paths) -> None:
    configure_eth0(paths)
    push_networks(paths, ("eth0", "10.9.9.1", "10.9.9.0/24"), ("eth3", "10.2.2.1", "10.2.2.0/24"))
    assert collect_status(paths)["networks"] == 2  # eth0 (pushed over configured), eth3


def test_a_configured_network_alone_is_counted(paths: Paths) -> None:
    configure_eth0(paths)
    assert collect_status(paths)["networks"] == 1


def test_a_pushed_removal_of_the_configured_network_is_not_counted(paths: Paths) -> None:
    configure_eth0(paths)
    push_networks(paths, ("eth3", "10.2.2.1", "10.2.2.0/24"))
    Store(paths).apply(
        [GuestNetwork("eth0", IPv4Address("10.1.1.1"), IPv4Network("10.1.1.0/24"), False)]
    )
    assert collect_status(paths)["networks"] == 1  # eth3 only, as the firewall has it


def test_status_of_a_pair_router_shows_the_role_per_network_and_the_peer(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    from vr.pair import manager

    paths.config.parent.mkdir(parents=True, exist_ok=True)
    paths.config.write_text(json.dumps({"pair_peer": "169.254.10.12"}))
    Store(paths).apply(
        [
            GuestNetwork(
                "eth0",
                IPv4Address("10.1.1.2"),
                IPv4Network("10.1.1.0/24"),
                True,
                None,
                IPv4Address("10.1.1.1"),
            )
        ]
    )
    paths.run.mkdir(parents=True, exist_ok=True)
    services = {"keepalived": {"pid": 77, "up": True, "host": "127.0.0.1", "port": 0,
                               "restarts": 0}}  # fmt: skip
    up = {"pid": os.getpid(), "ready": True, "stopped": False, "services": services}
    (paths.run / "status.json").write_text(json.dumps(up))
    manager.record_vrrp_state(paths, "INSTANCE", "VR-eth0", "BACKUP", "100")
    sync = {"reachable": True, "in_sync": True, "time": time.time(), "last_ok": time.time()}
    manager.PairFiles(paths).sync_status.write_text(json.dumps(sync))
    with single_instance(paths):
        assert main(["status", "--root", str(paths.root)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "  keepalived up    port -     pid 77       restarts 0" in out
    assert "pair: peer 169.254.10.12 reachable, passwords in sync" in out
    assert "  eth0       BACKUP   VRRP id 51 virtual IP 10.1.1.1/24" in out
    # a sync status nobody refreshed for a minute is not believed
    sync["time"] = time.time() - 60
    manager.PairFiles(paths).sync_status.write_text(json.dumps(sync))
    with single_instance(paths):
        st = collect_status(paths)
    assert st["pair"]["peer_reachable"] is False and st["pair"]["in_sync"] is False
