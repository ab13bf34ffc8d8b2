"""The systemd units in image/systemd agree with what `vr up` promises: a clean stop within
5 s of SIGTERM of children it supervises itself. (That they load at all is checked by
`systemd-analyze verify` in the built image: tests/integration/test_image.py.)"""

from __future__ import annotations

import configparser
import re
from pathlib import Path

IMAGE = Path(__file__).resolve().parents[2] / "image"


def unit(name: str) -> configparser.ConfigParser:
    # strict=False: systemd allows a key to repeat (After=, Wants=); later lines add to it.
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((IMAGE / "systemd" / name).read_text())
    return cp


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(ms|s|min)?", value)
    assert m, f"not a simple systemd time span: {value!r}"
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "min": 60, None: 1}[m.group(2)]


def test_vr_service_lets_vr_up_stop_its_children_before_anything_is_killed() -> None:
    svc = unit("vr.service")["Service"]
    # mixed: SIGTERM reaches only `vr up`, which stops its children within 5 s itself.
    assert svc["KillMode"] == "mixed"
    assert seconds(svc["TimeoutStopSec"]) > 5


def test_vr_service_restarts_on_failure_without_a_tight_loop_or_giving_up() -> None:
    u = unit("vr.service")
    assert u["Service"]["Restart"] == "on-failure"
    assert seconds(u["Service"]["RestartSec"]) >= 1
    assert u["Unit"]["StartLimitIntervalSec"] == "0"


def test_the_firewall_is_restored_before_the_network_and_before_vr_up() -> None:
    fw = unit("vr-firewall.service")
    assert "network-pre.target" in fw["Unit"]["Before"].split()
    assert "network-pre.target" in fw["Unit"]["Wants"].split()
    assert fw["Service"]["Type"] == "oneshot"
    assert fw["Service"]["ExecStart"] == "/usr/local/bin/vr firewall restore"
    assert "vr-firewall.service" in unit("vr.service")["Unit"]["After"].split()


def test_vr_boot_runs_once_before_vr_up_and_bounds_its_own_wait() -> None:
    boot = unit("vr-boot.service")
    assert boot["Service"]["Type"] == "oneshot"
    assert boot["Service"]["ExecStart"] == "/usr/local/bin/vr boot"
    # vr boot waits for CloudStack's arguments itself: systemd must not cut it short.
    assert boot["Service"]["TimeoutStartSec"] == "infinity"
    assert "vr.service" in boot["Unit"]["Before"].split()
    assert "vr-firewall.service" in boot["Unit"]["After"].split()
    assert "vr-boot.service" in unit("vr.service")["Unit"]["After"].split()
    # Never Requires: without arguments vr up still starts (an operator can look at it).
    assert "Requires" not in unit("vr.service")["Unit"]


def test_the_key_path_unit_watches_the_file_vr_boot_reads() -> None:
    from vr.paths import Paths

    watched = unit("vr-boot-key.path")["Path"]["PathChanged"]
    assert watched == "/" + str(Paths(Path("/")).boot_authorized_keys.relative_to("/"))
    assert unit("vr-boot-key.path")["Path"]["Unit"] == "vr-boot-key.service"
    assert (
        unit("vr-boot-key.service")["Service"]["ExecStart"] == "/usr/local/bin/vr boot --key-only"
    )
