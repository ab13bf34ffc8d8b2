"""The whole appliance end to end: vr up in a VR namespace, pushes over SSH, guests
fetching with curl, wget and cloud-init's own CloudStack data source."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from vr.sandbox import (
    METADATA_IP,
    VR_GUEST_IP,
    Guest,
    Sandbox,
    metadata_payload,
    password_payload,
    sandbox,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("allow_subp")]


BEFORE_ANY_VM: dict[str, str] = {}


@pytest.fixture(scope="module")
def sb() -> Iterator[Sandbox]:
    with sandbox() as box:
        box.start_vr()
        # The guest network arrives by push after start; then, before any VM is pushed,
        # a guest asks (answers recorded for the test below).
        network, *vms = box.initial_payloads()
        assert box.push(box.write_payloads([network])).code == 0
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


def test_before_any_vm_is_pushed_guests_get_404_not_errors(sb: Sandbox) -> None:
    assert BEFORE_ANY_VM == {"latest/instance-id": "404", "latest/meta-data/": "404"}


def _status(sb: Sandbox) -> dict:
    return json.loads((sb.vr_root / "run/vr/status.json").read_text())


def _wait(cond, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_cloud_init_reads_everything_and_acknowledges_the_password(sb: Sandbox) -> None:
    g = sb.guests[0]
    seen = sb.cloud_init(g.role)
    assert seen["ok"] is True
    assert seen["vr_address"] == VR_GUEST_IP
    assert seen["instance_id"] == g.instance_id
    assert seen["local_hostname"] == g.name
    assert seen["availability_zone"] == "zone-a"
    assert seen["public_keys"] == [g.ssh_key]
    assert base64.b64decode(str(seen["user_data_b64"])) == g.user_data
    assert seen["password"] == g.password
    # cloud-init acknowledged it: the next fetch gives no password
    assert sb.wget_password(g.role).stdout == "saved_password"
    assert sb.cloud_init(g.role)["password"] is None


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
    sb.push(sb.write_payloads([("vm_password.json", password_payload(a, "only-for-a-42"))]))
    assert sb.curl(b.role, f"http://{METADATA_IP}/latest/instance-id").stdout == b.instance_id
    assert sb.curl(b.role, f"http://{METADATA_IP}/latest/user-data").stdout.encode() == b.user_data
    got_b = sb.wget_password(b.role).stdout
    assert got_b != "only-for-a-42"
    assert got_b == b.password
    assert sb.wget_password(a.role).stdout == "only-for-a-42"


def test_password_reset_pushed_later_is_delivered_once(sb: Sandbox) -> None:
    g = sb.guests[1]
    sb.push(sb.write_payloads([("vm_password.json", password_payload(g, "reset-pw-7"))]))
    seen = sb.cloud_init(g.role)
    assert seen["password"] == "reset-pw-7"
    assert sb.cloud_init(g.role)["password"] is None
    assert sb.wget_password(g.role).stdout == "saved_password"


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
        c = Guest("gc", "10.1.1.50", "02:00:0a:01:01:32", "new-1", "c0ffee00-new-vm", "pw-c-1")
        sb.add_guest(c)
        res = sb.push(sb.write_payloads([("vm_metadata.json", metadata_payload(c))]))
        assert res.code == 0, res.stderr
        assert sb.curl(c.role, f"http://{METADATA_IP}/latest/instance-id").stdout == c.instance_id
    finally:
        stop.set()
        t.join(60)
    assert answers and set(answers) == {a.instance_id}


@pytest.mark.parametrize("service", ["metadata", "passwords"])
def test_killed_server_is_restarted_and_no_password_is_lost(sb: Sandbox, service: str) -> None:
    g = sb.guests[0]
    before = _status(sb)["services"][service]
    os.kill(before["pid"], signal.SIGKILL)
    # pushed while the killed server is down or restarting: it must not be lost
    res = sb.push(sb.write_payloads([("vm_password.json", password_payload(g, f"kept-{service}"))]))
    assert res.code == 0, res.stderr
    _wait(
        lambda: (
            _status(sb)["ready"]
            and _status(sb)["services"][service]["restarts"] == before["restarts"] + 1
        )
    )
    assert sb.curl(g.role, f"http://{METADATA_IP}/latest/instance-id").stdout == g.instance_id
    assert sb.wget_password(g.role).stdout == f"kept-{service}"


def test_vr_status_counts_vms_networks_last_push_and_refused_requests(sb: Sandbox) -> None:
    g = sb.guests[1]
    refused = sb.run(
        g.role,
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H", "X-Forwarded-For: 10.1.1.23",
         f"http://{METADATA_IP}/latest/instance-id"],
    )  # fmt: skip
    assert refused.stdout == "403"

    def status() -> dict:
        out = sb.run("vr", sb.vr_cmd("status", "--root", str(sb.vr_root), "--json")).stdout
        return json.loads(out)

    _wait(lambda: status()["metadata_counters"]["forwarded_refused"] >= 1)
    st = status()
    assert st["vms"] >= 2
    assert st["networks"] == 1
    assert st["last_push"]["ok"] is True
    assert {s["up"] for s in st["supervisor"]["services"].values()} == {True}


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
