"""The flow controller's reconciliation against a hand-written fake switch."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import pytest

from vr.errors import CommandError
from vr.hypervisor import flows
from vr.hypervisor.controller import Controller, ports_file
from vr.hypervisor.ports import Interface
from vr.paths import Paths


@dataclass
class FakeOvs:
    """A bridge: OVSDB rows and an OpenFlow table keyed by cookie; bundles all or nothing."""

    bridge: str = "br-vm"
    rows: list[Interface] = field(default_factory=list)
    table: dict[int, str] = field(default_factory=dict)
    bundles: list[str] = field(default_factory=list)
    down: bool = False
    counted: int = 0

    def _up(self) -> None:
        if self.down:
            raise CommandError(["ovs-ofctl"], 1, "", "br-vm is not a bridge or a socket")

    def ensure_meta_port(self, name: str) -> None:
        if not any(r.name == name for r in self.rows):
            self.rows.append(Interface(name, 2, {}, "aa:bb:cc:00:00:02", "internal"))

    def meta_port(self, name: str) -> flows.MetaPort | None:
        r = next(r for r in self.rows if r.name == name)
        return flows.MetaPort(r.ofport, r.mac_in_use) if r.ofport else None

    def interfaces(self) -> list[Interface]:
        return list(self.rows)

    def cookies(self) -> list[int]:
        self._up()
        return list(self.table)

    def flow_count(self) -> int:
        self._up()
        self.counted += 1
        return len(self.table)

    def apply(self, change: flows.Diff) -> None:
        self._up()
        self.bundles.append(flows.bundle(change))
        for c in change.delete:
            del self.table[c]
        for f in change.add:
            self.table[f.cookie] = f.text

    def plug(self, name: str, ofport: int, mac: str) -> None:
        self.rows.append(Interface(name, ofport, {"attached-mac": mac}, "", ""))

    def unplug(self, name: str) -> None:
        self.rows = [r for r in self.rows if r.name != name]


@pytest.fixture
def fake() -> FakeOvs:
    return FakeOvs()


@pytest.fixture
def ctl(fake: FakeOvs, paths: Paths) -> Controller:
    return Controller(fake, paths)  # type: ignore[arg-type]


def table_text(fake: FakeOvs) -> list[str]:
    return sorted(fake.table.values())


def test_a_plugged_port_gets_its_flows_in_one_bundle_and_in_the_port_table(
    ctl: Controller, fake: FakeOvs, paths: Paths
) -> None:
    fake.plug("vnet5", 5, "52:54:00:00:00:05")
    assert ctl.sync()
    assert len(fake.bundles) == 1
    meta = flows.MetaPort(2, "aa:bb:cc:00:00:02")
    want = flows.desired([flows.VmPort(5, "52:54:00:00:00:05", "vnet5")], meta)
    assert table_text(fake) == sorted(f.text for f in want)
    table: dict[str, Any] = json.loads(ports_file(paths).read_text())
    assert table["5"]["mac"] == "52:54:00:00:00:05"


def test_syncing_again_changes_nothing(ctl: Controller, fake: FakeOvs) -> None:
    fake.plug("vnet5", 5, "52:54:00:00:00:05")
    ctl.sync()
    assert not ctl.sync()
    assert len(fake.bundles) == 1


def test_an_unplugged_port_loses_its_flows_and_only_those(
    ctl: Controller, fake: FakeOvs, paths: Paths
) -> None:
    fake.plug("vnet5", 5, "52:54:00:00:00:05")
    fake.plug("vnet6", 6, "52:54:00:00:00:06")
    ctl.sync()
    fake.unplug("vnet5")
    assert ctl.sync()
    assert not any("in_port=5," in t or "100.127.0.5" in t for t in fake.table.values())
    assert any("in_port=6," in t for t in fake.table.values())
    assert fake.bundles[-1].startswith("delete ")
    assert "5" not in json.loads(ports_file(paths).read_text())


def test_flows_a_restarted_switch_lost_are_put_back(ctl: Controller, fake: FakeOvs) -> None:
    fake.plug("vnet5", 5, "52:54:00:00:00:05")
    ctl.sync()
    before = table_text(fake)
    fake.table.clear()
    assert ctl.sync()
    assert table_text(fake) == before


def test_foreign_flows_are_left_alone(ctl: Controller, fake: FakeOvs) -> None:
    fake.table[0x0] = "table=0,priority=0,actions=NORMAL"
    fake.table[0x1234] = "someone else's"
    fake.plug("vnet5", 5, "52:54:00:00:00:05")
    ctl.sync()
    assert fake.table[0x0] == "table=0,priority=0,actions=NORMAL"
    assert 0x1234 in fake.table


def test_a_switch_that_does_not_answer_is_logged_once_and_retried(
    ctl: Controller, fake: FakeOvs, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    fake.plug("vnet5", 5, "52:54:00:00:00:05")
    fake.down = True
    ctl._sync_logged()
    ctl._sync_logged()
    assert caplog.text.count("cannot reconcile") == 1
    assert "is not a bridge" in caplog.text
    fake.down = False
    ctl._sync_logged()
    assert "reconciled again" in caplog.text
    assert any("in_port=5," in t for t in fake.table.values())


def test_between_events_a_flow_count_stands_in_for_a_full_pass(
    ctl: Controller, fake: FakeOvs
) -> None:
    fake.plug("vnet5", 5, "52:54:00:00:00:05")
    ctl.sync()
    ctl._sync_logged(full=False)
    assert fake.counted == 1
    assert len(fake.bundles) == 1
    # a restarted switch has no flows: the count differs, the full pass restores them
    before = table_text(fake)
    fake.table.clear()
    ctl._sync_logged(full=False)
    assert table_text(fake) == before
