"""What an edit of vr.json restarts (pure), the watcher's settling, and the
supervisor following an edit with stand-in services."""

from __future__ import annotations

import json
import signal
from dataclasses import fields
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from vr.config import Config
from vr.ops.reconfig import NO_RESTART_KEYS, SERVICE_KEYS, SETTLE, Watcher, plan
from vr.paths import Paths
from vr.payloads import GuestNetwork
from vr.supervisor import Supervisor, services_for

SERVICES = ["agent", "metadata", "passwords", "ops", "dhcp"]


def test_every_setting_is_known_to_belong_to_a_service_or_to_none() -> None:
    known = set(NO_RESTART_KEYS).union(*SERVICE_KEYS.values())
    assert {f.name for f in fields(Config)} == known


def test_services_of_the_plan_are_the_services_vr_up_runs(paths: Paths) -> None:
    assert [s.name for s in services_for(paths, Config())] == SERVICES
    pair = [s.name for s in services_for(paths, Config(pair_peer="192.0.2.2"))]
    assert set(SERVICE_KEYS) == set(SERVICES) | set(pair)


@pytest.mark.parametrize(
    ("change", "restart", "firewall"),
    [
        ({"metadata_workers": 4}, ("metadata",), False),
        ({"password_workers": 1}, ("passwords",), False),
        ({"metadata_port": 8000}, ("metadata",), True),
        ({"ssh_legacy_algorithms": False}, ("agent",), False),
        ({"ssh_port": 2222}, ("agent",), True),
        ({"metrics_port": 9300}, ("ops",), True),
        ({"require_mac_binding": True}, (), False),  # no network configured: same rules
        ({"control_device": "eth5"}, ("dhcp",), True),  # dnsmasq never serves it
        ({"dnsmasq": False}, ("dhcp",), False),
        ({"userdata_max_bytes": 4096}, (), False),
    ],
)
def test_an_edit_restarts_only_the_services_whose_settings_changed(
    change: dict[str, object], restart: tuple[str, ...], firewall: bool
) -> None:
    todo = plan(Config(), Config(**change), SERVICES)  # type: ignore[arg-type]
    assert todo.changed == tuple(change)
    assert todo.restart == restart
    assert todo.firewall is firewall


def test_a_configured_guest_network_changes_the_firewall_and_dnsmasq_only() -> None:
    net = GuestNetwork("eth0", IPv4Address("10.1.1.1"), IPv4Network("10.1.1.0/24"), True)
    todo = plan(Config(), Config(guest_networks=(net,)), SERVICES)
    assert (todo.restart, todo.firewall) == (("dhcp",), True)


def test_no_change_is_an_empty_plan() -> None:
    todo = plan(Config(), Config(), SERVICES)
    assert (todo.changed, todo.restart, todo.firewall) == ((), (), False)
    assert todo.describe() == "nothing to restart"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_the_watcher_reports_a_file_once_it_has_settled(tmp_path: Path) -> None:
    clock = Clock()
    cfg, other = tmp_path / "vr.json", tmp_path / "vr.json.tmp"
    w = Watcher([cfg], clock=clock)
    w.record(str(other))  # an editor's temporary file: not ours
    w.record(str(other), str(cfg))  # renamed over vr.json
    assert w.due() == []
    clock.now += SETTLE / 2
    w.record(str(cfg))  # still being written
    clock.now += SETTLE / 2
    assert w.due() == []
    clock.now += SETTLE
    assert w.due() == [cfg]
    assert w.due() == []  # once per burst


def test_the_watcher_sees_a_real_rename_over_the_file(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "vr.json"
    w = Watcher([cfg])
    w.start()
    try:
        tmp = cfg.with_name("vr.json.new")
        tmp.write_text("{}")
        tmp.rename(cfg)
        import time

        deadline = time.monotonic() + 20
        seen: list[Path] = []
        while time.monotonic() < deadline and not seen:
            seen = w.due()
            time.sleep(0.05)
        assert seen == [cfg]
    finally:
        w.stop()


# --- the supervisor following an edit, with stand-in processes ----------------------


class FakeProc:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        self.returncode = -15
        return self.returncode


def supervised(paths: Paths) -> tuple[Supervisor, list[tuple[int, int]]]:
    killed: list[tuple[int, int]] = []
    pids = iter(range(200_000, 300_000))
    sup = Supervisor(
        paths,
        Config(),
        None,
        services_for(paths, Config()),
        spawn=lambda argv: FakeProc(next(pids)),  # type: ignore[arg-type,return-value]
        kill_group=lambda pgid, sig: killed.append((pgid, sig)),
    )
    sup.step(0.0)
    return sup, killed


def test_an_edit_restarts_only_its_service_with_the_new_settings(paths: Paths) -> None:
    sup, killed = supervised(paths)
    before = {s.name: s.pid for s in sup.services}
    paths.config.write_text(json.dumps({"metadata_workers": 5}))
    assert sup.reconfigure() is True
    sup.step(1.0)
    after = {s.name: s.pid for s in sup.services}
    assert [n for n in SERVICES if after[n] != before[n]] == ["metadata"]
    metadata = next(s for s in sup.services if s.name == "metadata")
    assert metadata.argv[-2:] == ["--workers", "5"]
    assert (metadata.reconfigured, metadata.restarts) == (1, 0)
    assert (before["metadata"], signal.SIGTERM) in killed
    assert sup.cfg.metadata_workers == 5


def test_an_edit_that_changes_which_services_run_stops_and_starts_them(paths: Paths) -> None:
    sup, killed = supervised(paths)
    dhcp = next(s for s in sup.services if s.name == "dhcp")
    dhcp_pid = dhcp.pid
    paths.config.write_text(json.dumps({"dnsmasq": False}))
    assert sup.reconfigure() is True
    assert [s.name for s in sup.services] == [n for n in SERVICES if n != "dhcp"]
    assert (dhcp_pid, signal.SIGTERM) in killed
    paths.config.write_text(json.dumps({"dnsmasq": False, "pair_peer": "192.0.2.2"}))
    assert sup.reconfigure() is True
    sup.step(1.0)
    started = {s.name: s.pid for s in sup.services}
    assert {"keepalived", "pair-sync"} <= set(started)
    assert started["keepalived"] is not None and started["pair-sync"] is not None
    paths.config.write_text(json.dumps({}))
    assert sup.reconfigure() is True
    sup.step(2.0)
    assert [s.name for s in sup.services] == SERVICES
    assert next(s for s in sup.services if s.name == "dhcp").pid is not None


def test_an_invalid_edit_keeps_the_running_configuration(
    paths: Paths, caplog: pytest.LogCaptureFixture
) -> None:
    sup, killed = supervised(paths)
    before = {s.name: s.pid for s in sup.services}
    paths.config.write_text(json.dumps({"metadata_workers": 500}))
    assert sup.reconfigure() is False
    assert {s.name: s.pid for s in sup.services} == before
    assert killed == []
    assert sup.cfg == Config()
    assert "metadata_workers=500: expected a number of worker processes" in caplog.text
    assert "the running configuration stays" in caplog.text
