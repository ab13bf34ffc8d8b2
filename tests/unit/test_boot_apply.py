"""vr boot's edge (vr.boot.apply, vr.cmd.boot): waiting for the arguments CloudStack
writes, and what lands on disk, in a temporary root; commands go to a fake runner."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from vr import subp
from vr.boot import apply
from vr.cli import main
from vr.paths import Paths

KEY = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 cloud@mgmt"
ARGS = (
    "template=domP type=router name=r-7-VM eth0ip=10.1.1.1 eth0mask=255.255.255.0 "
    "eth1ip=169.254.3.4 eth1mask=255.255.0.0 eth2ip=192.0.2.10 eth2mask=255.255.255.0 "
    "gateway=192.0.2.1\n"
)


class FakeClock:
    """Time that moves only when slept; ``on_sleep`` lets a test act 'meanwhile'."""

    def __init__(self, on_sleep=None) -> None:  # type: ignore[no-untyped-def]
        self.now = 0.0
        self.on_sleep = on_sleep

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds
        if self.on_sleep:
            self.on_sleep(self.now)

    def clock(self) -> apply.Clock:
        return apply.Clock(self.monotonic, self.sleep)


def test_arguments_written_later_during_this_boot_are_waited_for(paths: Paths) -> None:
    since = 1000.0

    def deliver(now: float) -> None:
        if now >= 5 and not paths.boot_cmdline.exists():
            paths.boot_cmdline.write_text(ARGS)
            os.utime(paths.boot_cmdline, (since + 5, since + 5))

    clock = FakeClock(deliver)
    args, source = apply.read_arguments(paths, "ro quiet", since, 60, clock.clock())
    assert args["type"] == "router" and source == str(paths.boot_cmdline)
    assert 5 <= clock.now < 6


def test_arguments_of_an_earlier_boot_are_used_only_after_the_wait(paths: Paths) -> None:
    paths.boot_cmdline.write_text(ARGS.replace("r-7-VM", "r-old-VM"))
    os.utime(paths.boot_cmdline, (500, 500))
    clock = FakeClock()
    args, _ = apply.read_arguments(paths, "", 1000.0, 60, clock.clock())
    assert args["name"] == "r-old-VM"
    assert clock.now >= 60


def test_without_earlier_arguments_the_wait_outlasts_the_timeout(paths: Paths) -> None:
    since = 1000.0

    def deliver(now: float) -> None:
        if now >= 500 and not paths.boot_cmdline.exists():
            paths.boot_cmdline.write_text(ARGS)
            os.utime(paths.boot_cmdline, (since + 500, since + 500))

    clock = FakeClock(deliver)
    args, _ = apply.read_arguments(paths, "", since, 60, clock.clock())
    assert args["name"] == "r-7-VM"
    assert clock.now >= 500


def test_a_file_without_final_newline_is_taken_once_it_stopped_changing(paths: Paths) -> None:
    paths.boot_cmdline.write_text(ARGS.strip())
    os.utime(paths.boot_cmdline, (2000, 2000))
    clock = FakeClock()
    assert apply.wait_for_cmdline(paths.boot_cmdline, 1000.0, 60, clock.clock()) == ARGS.strip()
    assert 0 < clock.now < 2


def test_kernel_command_line_arguments_need_no_wait(paths: Paths) -> None:
    clock = FakeClock()
    args, source = apply.read_arguments(
        paths, "BOOT_IMAGE=/vmlinuz ro " + ARGS, 0, 60, clock.clock()
    )
    assert args["eth1ip"] == "169.254.3.4" and source == "the kernel command line"
    assert clock.now == 0


def test_carry_out_writes_vr_json_key_and_etc_then_runs_the_commands_in_order(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    ran: list[tuple[str, ...]] = []
    monkeypatch.setattr(subp, "run", lambda cmd, **kw: ran.append(tuple(cmd)))
    paths.boot_authorized_keys.write_text(KEY + "\n")
    plan = apply.plan_for(paths, dict(t.split("=", 1) for t in ARGS.split()))
    apply.carry_out(paths, plan)
    assert ran == list(plan.commands)
    assert json.loads(paths.config.read_text())["control_device"] == "eth1"
    assert paths.authorized_keys.read_text() == KEY + "\n"
    assert stat.S_IMODE(paths.authorized_keys.stat().st_mode) == 0o600
    assert stat.S_IMODE(paths.authorized_keys.parent.stat().st_mode) == 0o700
    assert paths.etc_file("hostname").read_text() == "r-7-VM\n"


def _vr_boot(paths: Paths, tmp_path: Path, *extra: str) -> int:
    kernel = tmp_path / "proc-cmdline"
    kernel.write_text("BOOT_IMAGE=/vmlinuz root=UUID=x ro console=ttyS0\n")
    return main(["boot", "--root", str(paths.root), "--kernel-cmdline", str(kernel), *extra])


def test_vr_boot_with_bad_arguments_changes_nothing_and_exits_2(
    paths: Paths, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    paths.config.write_text('{"metadata_workers": 3}\n')
    paths.boot_cmdline.write_text(ARGS.replace("eth1mask=255.255.0.0", "eth1mask=255.0.255.0"))
    assert _vr_boot(paths, tmp_path, "--no-network") == 2
    assert paths.config.read_text() == '{"metadata_workers": 3}\n'
    assert not paths.authorized_keys.exists()
    assert "eth1mask='255.0.255.0': expected a netmask" in capfd.readouterr().err


def test_vr_boot_no_network_writes_the_files(paths: Paths, tmp_path: Path) -> None:
    paths.boot_cmdline.write_text(ARGS)
    assert _vr_boot(paths, tmp_path, "--no-network") == 0
    assert json.loads(paths.config.read_text())["ssh_listen"] == "169.254.3.4"


def test_key_only_installs_a_key_dropped_after_boot(paths: Paths, tmp_path: Path) -> None:
    paths.boot_cmdline.write_text(ARGS)
    paths.boot_authorized_keys.write_text(KEY + "\n")
    assert _vr_boot(paths, tmp_path, "--key-only") == 0
    assert paths.authorized_keys.read_text() == KEY + "\n"
