"""vr up's supervisor with stand-in services: real child processes on loopback ports."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.procs import free_port, wait_port
from vr.paths import Paths

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


def _wait(cond, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.05)
    raise AssertionError("condition not reached")


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
        _wait(lambda: _status(paths).get("ready") is True)
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
    _wait(
        lambda: (
            _status(paths).get("ready")
            and _status(paths)["services"]["svc0"]["restarts"] == 1
            and _status(paths)["services"]["svc0"]["pid"] not in (None, victim)
        )
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
    _wait(lambda: not any(_alive(p) for p in pids), timeout=5)


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
