"""Reading the bridge's ports from OVSDB JSON, and the port table file."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from vr.hypervisor import ports
from vr.hypervisor.ports import Interface, OvsdbError, PortInfo, PortTable

HEADINGS = ["name", "ofport", "external_ids", "mac_in_use", "type"]


def vsctl_json(*rows: list[object]) -> str:
    return json.dumps({"headings": HEADINGS, "data": list(rows)})


def ids(**kv: str) -> list[object]:
    return ["map", [[k.replace("_", "-"), v] for k, v in kv.items()]]


def test_interfaces_are_read_from_ovs_vsctl_json() -> None:
    text = vsctl_json(
        ["br0", 65534, ["map", []], "a6:e2:9b:67:f2:4f", "internal"],
        ["vnet0", 5, ids(attached_mac="52:54:00:00:00:05", vm_id="u1"), "fe:54:00:00:00:05", ""],
        ["vnet1", ["set", []], ["map", []], ["set", []], ""],
    )
    got = ports.parse_interfaces(text)
    assert got[1] == Interface(
        "vnet0", 5, {"attached-mac": "52:54:00:00:00:05", "vm-id": "u1"}, "fe:54:00:00:00:05", ""
    )
    assert got[2].ofport is None
    assert got[2].mac_in_use == ""


def test_a_table_that_is_not_ovs_vsctl_json_is_an_error_naming_it() -> None:
    with pytest.raises(OvsdbError, match="expected ovs-vsctl JSON"):
        ports.parse_interfaces('{"headings": ["name"]}')


def test_vm_ports_are_those_with_an_attached_mac_and_a_number(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    ifaces = [
        Interface("uplink", 1, {}, "", ""),
        Interface("vr-meta", 2, {"attached-mac": "52:54:00:00:00:02"}, "", "internal"),
        Interface("vnet5", 5, {"attached-mac": "52:54:00:00:00:AB", "iface-id": "n",
                               "vm-id": "v"}, "", ""),
        Interface("vnet6", None, {"attached-mac": "52:54:00:00:00:06"}, "", ""),
        Interface("vnet7", -1, {"attached-mac": "52:54:00:00:00:07"}, "", ""),
        Interface("vnet8", 8, {"attached-mac": "not-a-mac"}, "", ""),
        Interface("vnet9", 0xFF01, {"attached-mac": "52:54:00:00:00:09"}, "", ""),
    ]  # fmt: skip
    got = ports.vm_ports(ifaces, skip="vr-meta")
    assert got == [PortInfo(5, "52:54:00:00:00:ab", "vnet5", "n", "v")]
    assert "vnet8" in caplog.text
    assert "'not-a-mac'" in caplog.text
    assert "vnet9" in caplog.text


def test_the_table_file_is_rewritten_only_when_it_changes_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "run" / "ports.json"
    table = PortTable(path)
    assert table.get(5) is None
    p5 = PortInfo(5, "52:54:00:00:00:05", "vnet5")
    assert ports.write(path, [p5])
    assert not ports.write(path, [p5])
    assert table.get(5) == p5
    assert ports.write(path, [])
    assert table.get(5) is None
