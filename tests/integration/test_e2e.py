"""The whole appliance end to end: vr up in a VR namespace, pushes over SSH, guests
fetching with curl, wget and cloud-init's own CloudStack data source.

Passwords are generated per test and compared with :func:`same_password`, which
never puts a value in an assertion message (pytest prints both sides of a failed
``==``, and the arguments of calls inside an ``assert``).
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.wait import wait_for
from vr.demo.sandbox import (
    METADATA_IP,
    VR_GUEST_IP,
    Guest,
    Sandbox,
    dhcp_payload,
    metadata_payload,
    password_payload,
    sandbox,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("allow_subp")]

REPO = Path(__file__).resolve().parents[2]
NONE = "saved_password"
"""The password server's answer when no password is stored."""


def new_password() -> str:
    return secrets.token_urlsafe(12)


def same_password(got: object, want: str) -> None:
    """Fail with "password differs" and no value when ``got`` is not ``want``."""
    if got != want:
        raise AssertionError("password differs")


def no_password_for_cloud_init(seen: dict[str, object]) -> None:
    if seen["password"] is not None:
        raise AssertionError("cloud-init read a password where none was stored")


BEFORE_ANY_VM: dict[str, str] = {}


@pytest.fixture(scope="module")
def box() -> Iterator[Sandbox]:
    """One sandbox for the module (namespaces, keys, two guests, their pushes)."""
    with sandbox() as box:
        box.start_vr()
        # The guest network and DHCP entries arrive by push after start; the guests
        # take their leases, then, before any VM data is pushed, a guest asks (answers
        # recorded for the test below).
        network, *vms = box.initial_payloads()
        entries = [item for item in vms if item[0].startswith("vm_dhcp_entry")]
        assert box.push(box.write_payloads([network, *entries])).code == 0
        for g in box.guests:  # the guests boot: addresses from the VR's dnsmasq
            assert box.dhcp(g.role).code == 0
        for path in ("latest/instance-id", "latest/meta-data/"):
            res = box.run(
                "ga",
                ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10",
                 f"http://{METADATA_IP}/{path}"],
            )  # fmt: skip
            BEFORE_ANY_VM[path] = res.stdout
        res = box.push(box.write_payloads(vms))
        assert res.code == 0, res.stderr
        yield box


@pytest.fixture
def sb(box: Sandbox) -> Sandbox:
    """The module's sandbox with vr up running, whatever an earlier test did to it
    (stopped, killed): each test starts from a running appliance, and tests about
    passwords push their own."""
    if not any(p.poll() is None for p in box.procs):
        box.procs.clear()
        box.start_vr()
    return box


def test_before_any_vm_is_pushed_guests_get_404_not_errors(sb: Sandbox) -> None:
    assert BEFORE_ANY_VM == {"latest/instance-id": "404", "latest/meta-data/": "404"}


def _status(sb: Sandbox) -> dict:
    return json.loads((sb.vr_root / "run/vr/status.json").read_text())


def test_cloud_init_reads_everything_and_acknowledges_the_password(sb: Sandbox) -> None:
    g = sb.guests[0]
    password = new_password()
    res = sb.push(sb.write_payloads([("vm_password.json", password_payload(g, password))]))
    assert res.code == 0, res.stderr
    seen = sb.cloud_init(g.role)
    assert seen["ok"] is True
    assert seen["vr_address"] == VR_GUEST_IP
    assert seen["instance_id"] == g.instance_id
    assert seen["local_hostname"] == g.name
    assert seen["availability_zone"] == "zone-a"
    assert seen["public_keys"] == [g.ssh_key]
    assert base64.b64decode(str(seen["user_data_b64"])) == g.user_data
    same_password(seen["password"], password)
    # cloud-init acknowledged it: the next fetch gives no password
    same_password(sb.wget_password(g.role).stdout, NONE)
    no_password_for_cloud_init(sb.cloud_init(g.role))


def test_guest_reaches_metadata_at_169_254_169_254_and_at_the_vr_address(sb: Sandbox) -> None:
    g = sb.guests[1]
    for host in (METADATA_IP, VR_GUEST_IP):
        res = sb.curl(g.role, f"http://{host}/latest/instance-id")
        assert res.stdout == g.instance_id
    index = sb.curl(g.role, f"http://{METADATA_IP}/latest/meta-data/").stdout
    assert index.splitlines()[:2] == ["service-offering", "availability-zone"]
    assert index.endswith("\n")


def test_guest_b_never_sees_guest_a_data_or_password(sb: Sandbox) -> None:
    a, b = sb.guests[0], sb.guests[1]
    only_for_a, for_b = new_password(), new_password()
    for g, password in ((b, for_b), (a, only_for_a)):
        res = sb.push(sb.write_payloads([("vm_password.json", password_payload(g, password))]))
        assert res.code == 0, res.stderr
    assert sb.curl(b.role, f"http://{METADATA_IP}/latest/instance-id").stdout == b.instance_id
    assert sb.curl(b.role, f"http://{METADATA_IP}/latest/user-data").stdout.encode() == b.user_data
    got_b = sb.wget_password(b.role).stdout
    if got_b == only_for_a:
        raise AssertionError("guest B was served guest A's password")
    same_password(got_b, for_b)
    same_password(sb.wget_password(a.role).stdout, only_for_a)


def test_password_reset_pushed_later_is_delivered_once(sb: Sandbox) -> None:
    g = sb.guests[1]
    reset = new_password()
    res = sb.push(sb.write_payloads([("vm_password.json", password_payload(g, reset))]))
    assert res.code == 0, res.stderr
    same_password(sb.cloud_init(g.role)["password"], reset)
    no_password_for_cloud_init(sb.cloud_init(g.role))
    same_password(sb.wget_password(g.role).stdout, NONE)


def test_guest_fetches_and_acks_its_password_at_169_254_169_254_port_8080(sb: Sandbox) -> None:
    """The guest network was pushed after vr up started (see the fixture): the password
    server answers behind 169.254.169.254:8080 too, asked as cloud-set-guest-password
    asks, and the ack there clears the password."""
    g = sb.guests[0]
    password = new_password()
    res = sb.push(sb.write_payloads([("vm_password.json", password_payload(g, password))]))
    assert res.code == 0, res.stderr
    same_password(sb.wget_password(g.role, host=METADATA_IP).stdout, password)
    ack = sb.wget_password(g.role, "saved_password", host=METADATA_IP)
    assert ack.code == 0
    same_password(ack.stdout, NONE)
    same_password(sb.wget_password(g.role, host=METADATA_IP).stdout, NONE)
    same_password(sb.wget_password(g.role).stdout, NONE)  # and at the VR's own address


def test_new_vm_pushed_while_guests_fetch_is_served_at_once(sb: Sandbox) -> None:
    a = sb.guests[0]
    stop = threading.Event()
    answers: list[str] = []

    def hammer() -> None:
        while not stop.is_set() and len(answers) < 500:
            answers.append(sb.curl(a.role, f"http://{METADATA_IP}/latest/instance-id").stdout)

    t = threading.Thread(target=hammer)
    t.start()
    try:
        c = Guest(
            "gc", "10.1.1.50", "02:00:0a:01:01:32", "new-1", "c0ffee00-new-vm", new_password()
        )
        sb.add_guest(c)
        res = sb.push(
            sb.write_payloads(
                [("vm_dhcp_entry.json", dhcp_payload(c)), ("vm_metadata.json", metadata_payload(c))]
            )
        )
        assert res.code == 0, res.stderr
        assert sb.dhcp(c.role).code == 0
        assert sb.curl(c.role, f"http://{METADATA_IP}/latest/instance-id").stdout == c.instance_id
    finally:
        stop.set()
        t.join(60)
    assert answers and set(answers) == {a.instance_id}


@pytest.mark.parametrize("service", ["metadata", "passwords"])
def test_killed_server_is_restarted_and_no_password_is_lost(sb: Sandbox, service: str) -> None:
    g = sb.guests[0]
    kept = new_password()
    before = _status(sb)["services"][service]
    os.kill(before["pid"], signal.SIGKILL)
    # pushed while the killed server is down or restarting: it must not be lost
    res = sb.push(sb.write_payloads([("vm_password.json", password_payload(g, kept))]))
    assert res.code == 0, res.stderr
    wait_for(
        lambda: (
            _status(sb)["ready"]
            and _status(sb)["services"][service]["restarts"] == before["restarts"] + 1
        ),
        f"{service} restarted once and the router ready",
    )
    assert sb.curl(g.role, f"http://{METADATA_IP}/latest/instance-id").stdout == g.instance_id
    same_password(sb.wget_password(g.role).stdout, kept)


def test_vr_status_counts_vms_networks_last_push_and_refused_requests(sb: Sandbox) -> None:
    g = sb.guests[1]
    res = sb.push(sb.write_payloads([("vm_metadata.json", metadata_payload(g))]))
    assert res.code == 0, res.stderr
    refused = sb.run(
        g.role,
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "X-Forwarded-For: 10.1.1.23",
         f"http://{METADATA_IP}/latest/instance-id"],
    )  # fmt: skip
    assert refused.stdout == "403"

    def status() -> dict:
        argv = sb.vr_cmd("status", "--root", str(sb.vr_root), "--json")
        out = sb.run("vr", argv, ok_codes=(0, 1, 2)).stdout  # the exit status is the health
        return json.loads(out)

    wait_for(
        lambda: status()["metadata_counters"]["forwarded_refused"] >= 1,
        "a forwarded request counted as refused",
    )
    st = status()
    assert st["vms"] >= 2
    assert st["networks"] == 1
    assert st["last_push"]["ok"] is True
    assert {s["up"] for s in st["supervisor"]["services"].values()} == {True}


def test_passwords_survive_a_restart_of_the_whole_appliance_and_are_served_once(
    sb: Sandbox,
) -> None:
    """One password pushed over SSH and never fetched, one written by CloudStack's
    update_config.py while vr up is stopped: after vr up starts again each is served
    once (here at 169.254.169.254, so the firewall came back too), then acknowledged."""
    a, b = sb.guests[0], sb.guests[1]
    pushed, written_while_down = new_password(), new_password()
    res = sb.push(sb.write_payloads([("vm_password.json", password_payload(a, pushed))]))
    assert res.code == 0, res.stderr
    assert sb.stop_vr() == 0
    payload = password_payload(b, written_while_down)
    (sb.paths.cache / "vm_password.json").write_text(json.dumps(payload))
    script = REPO / "scripts" / "update_config.py"
    env = f"VR_ROOT={sb.vr_root}"
    res = sb.run("vr", ["env", env, sys.executable, str(script), "vm_password.json"])
    assert res.code == 0, res.stderr
    sb.start_vr()
    for g, password in ((a, pushed), (b, written_while_down)):
        same_password(sb.wget_password(g.role, host=METADATA_IP).stdout, password)
        same_password(sb.wget_password(g.role, "saved_password", host=METADATA_IP).stdout, NONE)
        same_password(sb.wget_password(g.role, host=METADATA_IP).stdout, NONE)


def test_sigterm_stops_vr_up_within_five_seconds_with_nothing_left(sb: Sandbox) -> None:
    pids = [s["pid"] for s in _status(sb)["services"].values()]
    (up,) = sb.procs
    os.killpg(up.pid, signal.SIGTERM)
    assert up.wait(5) == 0  # the deadline for a clean stop
    sb.procs.clear()
    left = subprocess.run(
        ["ip", "netns", "pids", sb.ns("vr")], capture_output=True, text=True, check=True
    )
    assert left.stdout.split() == []
    for pid in pids:
        assert not os.path.exists(f"/proc/{pid}")


def _netns_pids(sb: Sandbox) -> list[str]:
    res = subprocess.run(
        ["ip", "netns", "pids", sb.ns("vr")], capture_output=True, text=True, check=True
    )
    return res.stdout.split()


def test_sigkill_of_vr_up_leaves_no_process_of_it(sb: Sandbox) -> None:
    """SIGKILL gives vr up no chance to stop anything: its services (agent, both
    gunicorn arbiters and their workers) must still go, by themselves."""
    (up,) = sb.procs
    services = [s["pid"] for s in _status(sb)["services"].values()]
    running = set(_netns_pids(sb))
    # vr up, the agent, two arbiters and at least one worker each
    assert {str(up.pid), *map(str, services)} <= running and len(running) >= 6
    os.kill(up.pid, signal.SIGKILL)
    up.wait(10)
    sb.procs.clear()
    # a bound for the arbiters' graceful stop (5 s), not a speed requirement
    wait_for(lambda: _netns_pids(sb) == [], "no process left in the namespaces", timeout=30)
