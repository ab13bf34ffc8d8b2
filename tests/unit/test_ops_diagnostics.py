"""The diagnostics allowlist: exact commands only, no shell, paths under the root."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from vr.agent.requests import ExecRefused, parse_exec
from vr.ops.diagnostics import Diagnostic, NotAllowed, parse_diagnostic
from vr.ops.diagrun import argv_for
from vr.paths import Paths


@pytest.mark.parametrize(
    ("command", "want"),
    [
        ("vr status", Diagnostic("vr_status")),
        ("vr status --json", Diagnostic("vr_status", json=True)),
        ("vr show", Diagnostic("vr_show")),
        (
            "vr show --json 10.1.1.10 10.1.1.11",
            Diagnostic(
                "vr_show", json=True, ips=(IPv4Address("10.1.1.10"), IPv4Address("10.1.1.11"))
            ),
        ),
        ("vr firewall show", Diagnostic("firewall_show")),
        ("vr firewall counters --json", Diagnostic("firewall_counters", json=True)),
        ("iptables -t nat -L PREROUTING -n -v", Diagnostic("iptables_nat")),
        ("ls -al /var/www/html/latest/metadata/", Diagnostic("ls_metadata")),
        ("ls -al /var/www/html/latest/metadata", Diagnostic("ls_metadata")),
        ("netstat -tulpn", Diagnostic("netstat")),
        ("ss -tulpn", Diagnostic("ss")),
        ("tail -n 100 /var/log/cloud.log", Diagnostic("tail", lines=100)),
        ("tail /var/log/cloud.log", Diagnostic("tail")),
        ("tail -f /var/log/cloud.log", Diagnostic("tail_follow")),
        ("  vr   status  ", Diagnostic("vr_status")),  # OpenSSH joins words with spaces
    ],
)
def test_each_allowed_command_is_recognised(command: str, want: Diagnostic) -> None:
    assert parse_diagnostic(command) == want
    assert parse_exec(command.encode()) == want


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        ("vr status; id", "';'"),
        ("vr status | cat", "'|'"),
        ("vr status && id", "'&'"),
        ("vr status $(id)", "'$()'"),
        ("vr status `id`", "'`'"),
        ("tail -n 5 /var/log/cloud.log > /x", "'>'"),
        ("ls -al /var/www/html/latest/metadata/*", "'*'"),
        ("vr status\tx", "'\\t'"),
        ("vr status\nid", "'\\n'"),
        ("ls -al '/var/www/html/latest/metadata/'", '"\'"'),
        ("vr status extra", "not an allowed command"),
        ("vr status --json --json", "not an allowed command"),
        ("tail -n 5 /var/log/cloud.log /etc/shadow", "not an allowed command"),
        ("tail -n 5 /var/lib/vr/passwords.json", "not an allowed command"),
        ("tail -n 0 /var/log/cloud.log", "from 1 to 10000"),
        ("tail -n 10001 /var/log/cloud.log", "from 1 to 10000"),
        ("tail -n -5 /var/log/cloud.log", "from 1 to 10000"),
        ("ls -al /", "not an allowed command"),
        ("ls -al /var/www/html/latest/metadata/../../..", "not an allowed command"),
        ("iptables -t nat -F", "not an allowed command"),
        ("iptables -t nat -L PREROUTING -n -v -x", "not an allowed command"),
        ("netstat -tulpn -c", "not an allowed command"),
        ("vr show 10.1.1", "expected [--json] and IPv4 addresses"),
        ("vr show --json --json", "expected [--json] and IPv4 addresses"),
        ("vr push --host h f", "not an allowed command"),
        ("vr firewall apply", "not an allowed command"),
    ],
)
def test_variations_are_refused_with_the_reason(command: str, reason: str) -> None:
    got = parse_diagnostic(command)
    assert isinstance(got, NotAllowed)
    assert reason in got.reason
    refused = parse_exec(command.encode())
    assert isinstance(refused, ExecRefused) and refused.code == 127


@pytest.mark.parametrize("command", ["cat /var/log/cloud.log", "sh -c 'vr status'", "VR status"])
def test_other_programs_are_not_diagnostics(command: str) -> None:
    assert parse_diagnostic(command) is None
    assert isinstance(parse_exec(command.encode()), ExecRefused)


def test_pushes_are_not_taken_for_diagnostics() -> None:
    assert not isinstance(parse_exec(b"/opt/cloud/bin/update_config.py f.json"), Diagnostic)


def test_processes_run_with_fixed_argv_and_paths_under_the_root(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "r")
    assert argv_for(Diagnostic("iptables_nat"), paths) == [
        "iptables-legacy", "-t", "nat", "-L", "PREROUTING", "-n", "-v"
    ]  # fmt: skip
    assert argv_for(Diagnostic("ls_metadata"), paths) == [
        "ls", "-al", f"{tmp_path}/r/var/www/html/latest/metadata/"
    ]  # fmt: skip
    assert argv_for(Diagnostic("ss"), paths) == ["ss", "-tulpn"]
    fw = argv_for(Diagnostic("firewall_counters", json=True), paths)
    assert fw is not None and fw[-5:] == [
        "firewall",
        "counters",
        "--root",
        f"{tmp_path}/r",
        "--json",
    ]
    assert argv_for(Diagnostic("vr_status"), paths) is None  # in-process
    assert argv_for(Diagnostic("tail"), paths) is None
