"""vr up's supervisor with stand-in services: real child processes on loopback ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.procs import free_port, wait_port
from tests.helpers.wait import wait_for
from vr.config import Config
from vr.paths import Paths
from vr.supervisor import BACKOFF_MAX, STABLE_AFTER, Service, Supervisor

SERVICE = textwrap.dedent(
    """
    import socket, sys, time
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", int(sys.argv[1]))); s.listen(8)
    open(sys.argv[2], "a").write("started\\n")
    while True:
        c, _ = s.accept(); c.close()
    """
)

RUNNER = textwrap.dedent(
    """
    import sys
    from pathlib import Path
    from vr import logs
    from vr.config import Config
    from vr.paths import Paths
    from vr.supervisor import Service, Supervisor
    root, script, p1, p2, marks = sys.argv[1:6]
    paths = Paths(Path(root)); paths.ensure(); logs.setup(paths)
    svcs = [Service(f"svc{i}", [sys.executable, script, port, f"{marks}{i}"], int(port))
            for i, port in enumerate((p1, p2))]
    sys.exit(Supervisor(paths, Config(), None, svcs).run())
    """
)


def _status(paths: Paths) -> dict:
    try:
        return json.loads((paths.run / "status.json").read_text())
    except (OSError, ValueError):
        return {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a zombie is not alive for our purpose
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.fixture
def running(tmp_path: Path, allow_subp: None) -> Iterator[tuple[subprocess.Popen[bytes], Paths]]:
    script = tmp_path / "svc.py"
    script.write_text(SERVICE)
    paths = Paths(tmp_path / "root")
    ports = [str(free_port()), str(free_port())]
    proc = subprocess.Popen(
        [sys.executable, "-c", RUNNER, str(paths.root), str(script), *ports, str(tmp_path / "m")],
        stderr=subprocess.DEVNULL,
    )
    try:
        for p in ports:
            wait_port("127.0.0.1", int(p))
        wait_for(lambda: _status(paths).get("ready") is True, "the supervisor ready")
        yield proc, paths
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_supervisor_reports_ready_with_service_pids(running) -> None:
    _proc, paths = running
    services = _status(paths)["services"]
    assert {s["up"] for s in services.values()} == {True}
    assert all(_alive(s["pid"]) for s in services.values())


def test_crashed_service_is_restarted_and_counted(running) -> None:
    _proc, paths = running
    victim = _status(paths)["services"]["svc0"]["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_for(
        lambda: (
            _status(paths).get("ready")
            and _status(paths)["services"]["svc0"]["restarts"] == 1
            and _status(paths)["services"]["svc0"]["pid"] not in (None, victim)
        ),
        "svc0 restarted once with a new pid",
    )
    assert "exited with -9" in paths.log_file.read_text()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_or_sigint_stops_every_service_within_five_seconds(running, signum) -> None:
    proc, paths = running
    pids = [s["pid"] for s in _status(paths)["services"].values()]
    proc.send_signal(signum)
    assert proc.wait(5) == 0
    assert not any(_alive(p) for p in pids)
    assert _status(paths)["stopped"] is True


def test_killed_supervisor_leaves_no_orphans(running) -> None:
    proc, paths = running
    pids = [s["pid"] for s in _status(paths)["services"].values()]
    proc.kill()
    proc.wait()
    wait_for(lambda: not any(_alive(p) for p in pids), "the services gone", timeout=5)


def test_second_vr_up_on_same_root_refuses(running, allow_subp: None) -> None:
    proc, paths = running
    second = subprocess.run(
        [sys.executable, "-m", "vr", "up", "--root", str(paths.root), "--no-firewall"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert second.returncode == 1
    assert f"another vr up (pid {proc.pid}) is running" in second.stderr
    assert proc.poll() is None


# --- restart backoff, driven by hand ---------------------------------------------------


class FakeProc:
    """A service process that exits when the test says so."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


class HandDriven:
    """A supervisor with one fake service and a clock the test moves."""

    def __init__(self, paths: Paths) -> None:
        self.procs: list[FakeProc] = []
        self.killed: list[tuple[int, int]] = []
        self.now = 0.0
        # a port nothing listens on: readiness is never reached, which step() allows
        svc = Service("svc", ["svc"], free_port())
        self.sup = Supervisor(
            paths,
            Config(),
            None,
            [svc],
            spawn=self._spawn,
            kill_group=lambda pgid, sig: self.killed.append((pgid, sig)),
        )
        self.sup.step(self.now)

    def _spawn(self, argv: list[str]) -> FakeProc:
        proc = FakeProc(100_000 + len(self.procs))
        self.procs.append(proc)
        return proc

    def crash_after(self, uptime: float) -> float:
        """Let the running process live ``uptime`` seconds, then exit; return the
        delay until the supervisor started the next one (clock moved in 0.25 s ticks)."""
        started = len(self.procs)
        self.now += uptime
        self.sup.step(self.now)  # still running
        self.procs[-1].returncode = 1
        exited = self.now
        self.sup.step(self.now)
        for _ in range(1000):
            if len(self.procs) > started:
                return self.now - exited
            self.now += 0.25
            self.sup.step(self.now)
        raise AssertionError("the service was never restarted")


def test_restart_delay_doubles_after_each_crash_and_stops_at_the_cap(paths: Paths) -> None:
    hd = HandDriven(paths)
    delays = [hd.crash_after(1.0) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, BACKOFF_MAX, BACKOFF_MAX, BACKOFF_MAX]
    assert hd.sup.services[0].restarts == 9
    # each crashed process's group got SIGKILL (workers that outlive it keep the port)
    assert hd.killed == [(p.pid, signal.SIGKILL) for p in hd.procs[:9]]


def test_restart_delay_starts_over_after_a_run_that_stayed_up(paths: Paths) -> None:
    hd = HandDriven(paths)
    grown = [hd.crash_after(1.0) for _ in range(5)]
    assert grown == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert hd.crash_after(STABLE_AFTER) == 0.5
    assert hd.crash_after(1.0) == 1.0  # and grows again from there


def test_a_service_is_not_restarted_before_its_delay(paths: Paths) -> None:
    hd = HandDriven(paths)
    hd.crash_after(1.0)
    hd.crash_after(1.0)  # the next delay is 2 s
    hd.procs[-1].returncode = 1
    hd.sup.step(hd.now)
    hd.sup.step(hd.now + 1.99)
    assert len(hd.procs) == 3
    hd.sup.step(hd.now + 2.0)
    assert len(hd.procs) == 4


# --- the firewall step -------------------------------------------------------------------


FIREWALL_RUNNER = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from vr import logs
    from vr.config import Config
    from vr.errors import VRError
    from vr.paths import Paths
    from vr.supervisor import Service, Supervisor
    root, script, port, mark, firewall = sys.argv[1:6]
    paths = Paths(Path(root)); paths.ensure(); logs.setup(paths)
    svcs = [Service("svc0", [sys.executable, script, port, mark], int(port))]
    try:
        sys.exit(Supervisor(paths, Config(), json.loads(firewall), svcs).run())
    except VRError as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)
    """
)

SLOW_FIREWALL = textwrap.dedent(
    """
    import os, sys, time
    open(sys.argv[1], "w").write(str(os.getpid()))
    time.sleep(120)  # far longer than the stop deadline
    """
)

FAILING_FIREWALL = textwrap.dedent(
    """
    import sys
    print("firewall not applied: no such table", file=sys.stderr)
    sys.exit(3)
    """
)


def _start_with_firewall(
    tmp_path: Path, firewall_script: str, *firewall_args: str
) -> tuple[subprocess.Popen[str], Paths, Path]:
    svc, fw = tmp_path / "svc.py", tmp_path / "firewall.py"
    svc.write_text(SERVICE)
    fw.write_text(firewall_script)
    paths = Paths(tmp_path / "root")
    mark = tmp_path / "service-started"
    firewall = json.dumps([sys.executable, str(fw), *firewall_args])
    proc = subprocess.Popen(
        [sys.executable, "-c", FIREWALL_RUNNER, str(paths.root), str(svc), str(free_port()),
         str(mark), firewall],
        stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    return proc, paths, mark


def test_sigterm_during_a_slow_firewall_step_stops_within_five_seconds(
    tmp_path: Path, allow_subp: None
) -> None:
    fw_pid_file = tmp_path / "firewall.pid"
    proc, paths, mark = _start_with_firewall(tmp_path, SLOW_FIREWALL, str(fw_pid_file))
    try:
        wait_for(
            lambda: fw_pid_file.exists() and fw_pid_file.read_text() != "",
            "the firewall's pid written",
        )
        firewall_pid = int(fw_pid_file.read_text())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0  # the deadline for a clean stop
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
    assert not _alive(firewall_pid)
    assert not mark.exists()  # no service was started after the interrupted step
    assert _status(paths)["stopped"] is True
    assert "during the firewall step, stopping" in paths.log_file.read_text()


def test_a_failing_firewall_step_ends_vr_up_with_its_error_and_starts_nothing(
    tmp_path: Path, allow_subp: None
) -> None:
    proc, paths, mark = _start_with_firewall(tmp_path, FAILING_FIREWALL)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1
    assert "exit code 3: firewall not applied: no such table" in err
    assert not mark.exists()
    assert _status(paths)["stopped"] is True


def test_a_pair_router_also_supervises_keepalived_and_the_sync_without_ports(
    paths: Paths,
) -> None:
    from vr.config import Config
    from vr.pair.manager import PairFiles
    from vr.supervisor import services_for

    single = [s.name for s in services_for(paths, Config())]
    pair = {s.name: s for s in services_for(paths, Config(pair_peer="169.254.10.12"))}
    assert list(pair) == [*single, "keepalived", "pair-sync"]
    keepalived = pair["keepalived"]
    assert keepalived.port == 0 and keepalived.answers()
    argv = keepalived.argv
    assert "--dont-fork" in argv and "--vrrp" in argv
    assert argv[argv.index("--use-file") + 1] == str(PairFiles(paths).conf)
    assert argv[argv.index("--pid") + 1].startswith(str(paths.root))
