"""Operating the router, end to end in namespaces: Prometheus metrics and health on
the control network (and nowhere else), vr.json and authorized_keys edits taking
effect without restarting vr up, and read-only diagnostics from real OpenSSH ``ssh``.

One sandbox for the module (vr up with its firewall, a management host, guests).
Passwords are never printed: a check that output holds none says only "password
in output".
"""

from __future__ import annotations

import json
import secrets
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.wait import wait_for
from vr.demo.sandbox import (
    METADATA_IP,
    OUTSIDER_IP,
    VR_CONTROL_IP,
    VR_GUEST_IP,
    VR_PUBLIC_IP,
    Sandbox,
    metadata_payload,
    sandbox,
)

pytestmark = [pytest.mark.root, pytest.mark.usefixtures("allow_subp")]

PORT = 9180


@pytest.fixture(scope="module")
def sb() -> Iterator[Sandbox]:
    with sandbox() as box:
        box.start_vr()
        res = box.push(box.write_payloads(box.initial_payloads()))
        assert res.code == 0, res.stderr
        for g in box.guests:  # the guests boot: addresses from the VR's dnsmasq
            assert box.dhcp(g.role).code == 0
        yield box


def no_password(sb: Sandbox, text: str) -> None:
    for g in sb.guests:
        if g.password in text:
            raise AssertionError("password in output")


def scrape(sb: Sandbox, role: str = "mg", port: int = PORT) -> dict[tuple[str, str], float]:
    """Every sample from the metrics endpoint: ``{(name, sorted labels json): value}``."""
    res = sb.run(
        role, ["curl", "-sS", "--max-time", "30", f"http://{VR_CONTROL_IP}:{port}/metrics"]
    )
    out = {}
    for fam in text_string_to_metric_families(res.stdout):
        for s in fam.samples:
            out[(s.name, json.dumps(s.labels, sort_keys=True))] = s.value
    return out


def value(samples: dict[tuple[str, str], float], name: str, **labels: str) -> float:
    return samples.get((name, json.dumps(labels, sort_keys=True)), 0.0)


def curl_code(sb: Sandbox, role: str, url: str, *extra: str, max_time: int = 30) -> str:
    """The HTTP status ``role`` gets (``000``: no answer within ``max_time`` seconds).
    Only a check that expects no answer shortens ``max_time``: a dropped packet never
    answers, while an answer may be slow on a loaded machine."""
    res = sb.run(
        role,
        ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", str(max_time),
         *extra, url],
        ok_codes=range(256),
    )  # fmt: skip
    return res.stdout


def status(sb: Sandbox) -> dict:
    return json.loads((sb.vr_root / "run/vr/status.json").read_text())


def pids(sb: Sandbox) -> dict[str, int]:
    return {n: s["pid"] for n, s in status(sb)["services"].items()}


def ssh(sb: Sandbox, command: str, key: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``ssh -p 3922 root@<router> <command>`` from the management host."""
    argv = [
        "ip", "netns", "exec", sb.ns("mg"),
        "ssh", "-p", "3922", "-i", str(key or sb.key),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
        "-o", "StrictHostKeyChecking=accept-new",
        "-o", f"UserKnownHostsFile={sb.workdir / 'ssh_known_hosts'}",
        f"root@{VR_CONTROL_IP}", command,
    ]  # fmt: skip
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


# --- metrics and health ------------------------------------------------------------


def test_counters_seen_from_the_management_network_move_after_real_traffic(sb: Sandbox) -> None:
    g = sb.guests[0]
    before = scrape(sb)
    for _ in range(3):
        assert curl_code(sb, g.role, f"http://{METADATA_IP}/latest/instance-id") == "200"
    forwarded = ("-H", "X-Forwarded-For: 10.1.1.99")
    assert curl_code(sb, g.role, f"http://{METADATA_IP}/latest/instance-id", *forwarded) == "403"
    fetched = sb.wget_password(g.role)
    no_password(sb, "")  # the fetched value is compared, never shown
    assert fetched.code == 0
    assert sb.wget_password(g.role, "saved_password").stdout == "saved_password"
    res = sb.push(sb.write_payloads([("vm_metadata.json", metadata_payload(g, "zone-b"))]))
    assert res.code == 0, res.stderr

    def moved() -> bool:
        now = scrape(sb)
        ok = "200"
        return (
            value(now, "vr_http_requests_total", service="metadata", view="cloudstack", status=ok)
            >= value(
                before, "vr_http_requests_total", service="metadata", view="cloudstack", status=ok
            )
            + 3
            and value(now, "vr_refused_total", reason="forwarded")
            == value(before, "vr_refused_total", reason="forwarded") + 1
            and value(now, "vr_password_fetches_total", result="served")
            == value(before, "vr_password_fetches_total", result="served") + 1
            and value(now, "vr_password_acks_total") == value(before, "vr_password_acks_total") + 1
            and value(now, "vr_pushes_total", type="vm_metadata", result="applied")
            == value(before, "vr_pushes_total", type="vm_metadata", result="applied") + 1
            and value(now, "vr_push_apply_seconds_count", type="vm_metadata")
            == value(before, "vr_push_apply_seconds_count", type="vm_metadata") + 1
        )

    wait_for(moved, "request, refusal, password and push counters moved")
    now = scrape(sb)
    assert value(now, "vr_vms") == len(sb.guests)
    assert value(now, "vr_metadata_cache_vms") >= 1
    assert value(now, "vr_service_up", service="metadata") == 1
    assert value(now, "vr_health", state="ready") == 1
    assert value(now, "vr_service_restarts_total", service="agent", reason="crash") == 0


def test_health_is_json_on_the_same_port(sb: Sandbox) -> None:
    res = sb.run("mg", ["curl", "-sS", "--max-time", "30", f"http://{VR_CONTROL_IP}:{PORT}/health"])
    doc = json.loads(res.stdout)
    assert doc["state"] == "ready"
    assert set(doc["services"]) == {"agent", "metadata", "passwords", "ops", "dhcp"}
    assert doc["degraded"] == []


def test_a_guest_or_an_outsider_cannot_reach_the_metrics_port(sb: Sandbox) -> None:
    g = sb.guests[0]
    for host in (VR_GUEST_IP, VR_CONTROL_IP, METADATA_IP):
        assert curl_code(sb, g.role, f"http://{host}:{PORT}/metrics", max_time=3) == "000"
    assert curl_code(sb, "out", f"http://{VR_PUBLIC_IP}:{PORT}/metrics", max_time=3) == "000"
    # ... while the management host, on the control network, is answered
    assert curl_code(sb, "mg", f"http://{VR_CONTROL_IP}:{PORT}/metrics") == "200"
    assert OUTSIDER_IP  # the outsider's address is what the VR sees on eth2


def test_a_spoofed_guest_address_is_counted_as_a_refusal(sb: Sandbox) -> None:
    """A neighbour sending from a bound address with its own MAC: dropped by the
    binding rule, and the drop shows in vr_refused_total{reason="spoof"}."""
    a, b = sb.guests[0], sb.guests[1]
    before = value(scrape(sb), "vr_refused_total", reason="spoof")
    # b claims a's address: only on its own interface, for this one try
    sb.run(b.role, ["ip", "addr", "add", f"{a.ip}/32", "dev", "eth0"])
    try:
        url = f"http://{VR_GUEST_IP}/latest/instance-id"
        curl_code(sb, b.role, url, "--interface", a.ip, max_time=3)  # dropped: no answer
    finally:
        sb.run(b.role, ["ip", "addr", "del", f"{a.ip}/32", "dev", "eth0"])
        sb.run("vr", ["ip", "neigh", "flush", "dev", "eth0"], ok_codes=range(256))
    wait_for(lambda: value(scrape(sb), "vr_refused_total", reason="spoof") > before, "spoof drops")


# --- diagnostics over SSH ----------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "expect"),
    [
        ("vr status", "health: ready"),
        ("vr status --json", '"state": "ready"'),
        ("vr show", "{ip}"),
        ("vr firewall show", "VR-INPUT"),
        ("vr firewall counters", "pkts"),
        ("iptables -t nat -L PREROUTING -n -v", "VR-PREROUTING"),
        ("ls -al /var/www/html/latest/metadata/", "{ip}"),
        ("netstat -tulpn", ":3922"),
        ("ss -tulpn", ":3922"),
        ("tail -n 5 /var/log/cloud.log", "vr."),
    ],
)
def test_each_diagnostic_works_from_openssh(sb: Sandbox, command: str, expect: str) -> None:
    res = ssh(sb, command)
    assert res.returncode == 0, res.stderr
    assert expect.format(ip=sb.guests[0].ip) in res.stdout
    no_password(sb, res.stdout + res.stderr)
    if command.startswith("tail -n 5"):
        assert len(res.stdout.splitlines()) == 5


@pytest.mark.parametrize(
    "command",
    [
        "vr status; id",
        "vr status | cat",
        "vr status && id",
        "vr status $(id)",
        "vr status `id`",
        "vr status > /tmp/x",
        "'vr' status",
        "vr status --json extra",
        "tail -n 5 /var/log/cloud.log /etc/shadow",
        "tail -n 5 /var/lib/vr/passwords.json",
        "ls -al /",
        "ls -al /var/www/html/latest/metadata/*",
        "iptables -t nat -L PREROUTING -n -v -x",
        "iptables -t nat -F",
        "cat /var/log/cloud.log",
        "vr push --host 1.2.3.4 x",
        "sh -c 'vr status'",
    ],
)
def test_anything_outside_the_list_is_refused(sb: Sandbox, command: str) -> None:
    res = ssh(sb, command)
    assert res.returncode == 127, (res.returncode, res.stdout)
    assert res.stderr.startswith("vr-agent: ")
    assert res.stdout == ""


def test_tail_follows_the_log_until_the_client_leaves(sb: Sandbox) -> None:
    argv = [
        "ip", "netns", "exec", sb.ns("mg"), "ssh", "-p", "3922", "-i", str(sb.key),
        "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=accept-new",
        "-o", f"UserKnownHostsFile={sb.workdir / 'ssh_known_hosts'}",
        f"root@{VR_CONTROL_IP}", "tail -f /var/log/cloud.log",
    ]  # fmt: skip
    follower = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    seen: list[str] = []

    def read() -> None:
        assert follower.stdout is not None
        for line in follower.stdout:
            seen.append(line)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        g = sb.guests[1]
        path = f"/latest/follow-{secrets.token_hex(4)}"  # in no line before this test

        def refusal_followed() -> bool:
            # a line written after the follower started: the refusal of a forwarded request
            curl_code(sb, g.role, f"http://{METADATA_IP}{path}", "-H", "Forwarded: for=x")
            return any(path in line for line in list(seen))

        wait_for(refusal_followed, "the follower printed a line logged after it started")
    finally:
        follower.terminate()
        follower.wait(10)
        reader.join(10)
    # the agent's follower ends with the client, it is not left running
    wait_for(
        lambda: "diagnostic tail_follow ended with 0" in sb.paths.log_file.read_text(),
        "the follower ended",
    )


# --- live reconfiguration --------------------------------------------------------------


def test_an_invalid_edit_of_vr_json_changes_nothing(sb: Sandbox) -> None:
    before = pids(sb)
    original = sb.paths.config.read_text()
    try:
        doc = json.loads(original)
        sb.paths.config.write_text(json.dumps({**doc, "metadata_port": "eighty"}))
        wait_for(
            lambda: "metadata_port='eighty'" in sb.paths.log_file.read_text(),
            "the refusal was logged with its reason",
        )
    finally:
        sb.paths.config.write_text(original)
    assert "edit refused, the running configuration stays" in sb.paths.log_file.read_text()
    assert pids(sb) == before
    assert curl_code(sb, sb.guests[0].role, f"http://{METADATA_IP}/latest/instance-id") == "200"


def test_an_edit_of_vr_json_restarts_only_its_service_and_reapplies_the_firewall(
    sb: Sandbox,
) -> None:
    before = pids(sb)
    original = sb.paths.config.read_text()
    doc = json.loads(original)
    try:
        sb.paths.config.write_text(json.dumps({**doc, "metrics_port": 9181}))
        wait_for(
            lambda: curl_code(sb, "mg", f"http://{VR_CONTROL_IP}:9181/health") == "200",
            "the metrics server answers on its new port",
        )
        after = pids(sb)
        assert after["ops"] != before["ops"]
        assert {n: p for n, p in after.items() if n != "ops"} == {
            n: p for n, p in before.items() if n != "ops"
        }
        assert status(sb)["services"]["ops"]["reconfigured"] == 1
        # the firewall follows: the new port is the control network's only
        guest = sb.guests[0].role
        assert curl_code(sb, guest, f"http://{VR_GUEST_IP}:9181/metrics", max_time=3) == "000"
        assert curl_code(sb, "mg", f"http://{VR_CONTROL_IP}:{PORT}/metrics") == "000"
    finally:
        sb.paths.config.write_text(original)
    wait_for(
        lambda: curl_code(sb, "mg", f"http://{VR_CONTROL_IP}:{PORT}/health") == "200",
        "back on the first port",
    )
    assert value(scrape(sb), "vr_service_restarts_total", service="ops", reason="reconfigure") == 2


def test_a_key_removed_from_authorized_keys_is_refused_at_the_next_login(sb: Sandbox) -> None:
    second = sb.workdir / "mgmt" / "second"
    sb.run("mg", ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "second", "-f", str(second)])
    keys = sb.paths.authorized_keys
    original = keys.read_text()
    keys.write_text(original + second.with_suffix(".pub").read_text())
    assert ssh(sb, "vr status", second).returncode == 0
    keys.write_text(original)  # in place, as an editor or a management server would
    refused = ssh(sb, "vr status", second)
    assert refused.returncode == 255
    assert "Permission denied" in refused.stderr
    assert ssh(sb, "vr status").returncode == 0
