"""Golden cases: pushed files in ``tests/golden/<case>/N-<name>`` are applied in order
through CloudStack's entry points; the tree a guest-facing server sees must equal
``expected.json`` byte for byte (and the private state, where the case lists it)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.store import apply_cfg, decode_tree, served_tree, update_config
from vr.paths import Paths
from vr.store import read_dhcp, read_networks, read_passwords

GOLDEN = Path(__file__).resolve().parent.parent / "golden"
CASES = sorted(d.name for d in GOLDEN.iterdir() if d.is_dir())


def _steps(case: Path) -> list[tuple[str, bytes]]:
    files = [f for f in case.iterdir() if f.name != "expected.json"]
    files.sort(key=lambda f: int(f.name.split("-", 1)[0]))
    return [(f.name.split("-", 1)[1], f.read_bytes()) for f in files]


def _state(paths: Paths) -> dict[str, Any]:
    return {
        "passwords": {ip: rec["password"] for ip, rec in read_passwords(paths).items()},
        "networks": [
            {
                "device": n.device,
                "address": str(n.interface),
                "gateway": str(n.router_guest_gateway) if n.router_guest_gateway else None,
                "mac_address": n.mac_address,
            }
            for n in read_networks(paths)
        ],
        "dhcp": [
            {"ip": str(d.ipv4_address), "mac_address": d.mac_address, "host_name": d.host_name}
            for d in read_dhcp(paths)
        ],
    }


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 4


@pytest.mark.parametrize("case", CASES)
def test_golden_pushes_produce_the_expected_tree(case: str, paths: Paths) -> None:
    expected = json.loads((GOLDEN / case / "expected.json").read_text())
    for name, data in _steps(GOLDEN / case):
        (paths.cache / name).write_bytes(data)
        run = apply_cfg(paths, name) if name.endswith(".cfg") else update_config(paths, name)
        assert run.code == 0, run.err
        assert not (paths.cache / name).exists()
    assert served_tree(paths) == decode_tree(expected["served"])
    if "state" in expected:
        assert _state(paths) == expected["state"]
