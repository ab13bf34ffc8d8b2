"""The README's demo: it runs end to end, and leaves nothing behind even when its
terminal goes away (SIGHUP) while it is kept running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.root


def test_demo_kept_running_then_hung_up_removes_every_namespace_and_process() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "vr", "demo", "--keep"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C to remove" in line:
                break
        out = "".join(lines)
        assert "kept running" in out, out[-2000:]
        namespaces = re.search(r"network namespaces: (.*)", out)
        root = re.search(r"VR root: (\S+)", out)
        assert namespaces and root
        names = namespaces.group(1).split(", ")
        # what a guest saw, as the README promises
        assert out.count("saved_password") >= 2
        assert '"ok": true' in out
        up_pid = int(re.search(r"vr up: ready \(pid (\d+)\)", out).group(1))
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(60) != 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert not [n for n in names if n in listed]
    assert not any((Path("/etc/netns") / n).exists() for n in names)
    assert not Path(root.group(1)).exists()
    assert not Path(f"/proc/{up_pid}").exists()
