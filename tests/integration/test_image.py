"""image/build end to end: a Debian bookworm root filesystem with the appliance installed,
and image/check run against it (chroot, systemd-analyze verify, `vr up` from the image in
network namespaces serving a pushed VM to a guest).

Slow: a cold build runs debootstrap; later runs unpack the cached base system from
/var/cache/vr-image. The root filesystem lives under /var/tmp (not /tmp, which may be a
noexec tmpfs) and is removed afterwards, but only once nothing is mounted under it.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 1200  # a cold build takes a few minutes; never let CI hang on a mirror


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, from the kernel's table (octal escapes decoded)."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return found


def remove_rootfs(path: Path) -> None:
    """Unmount what a failed build may have left (deepest first), then delete the tree."""
    for point in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    left = mounts_under(path)
    # Deleting through a bind-mounted /dev would empty the host's /dev: refuse loudly.
    assert not left, f"still mounted under {path}, not deleting: {left}"
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


@pytest.fixture
def workdir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vr-image-test.", dir="/var/tmp"))
    try:
        yield d
    finally:
        remove_rootfs(d)


def run_build(rootfs: Path) -> tuple[int, str]:
    """Run image/build in its own process group; on timeout stop the whole group so its
    EXIT traps still unmount, and report what it printed."""
    proc = subprocess.Popen(
        ["bash", str(REPO / "image" / "build"), str(rootfs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"image/build did not finish within {BUILD_TIMEOUT}s:\n{out[-6000:]}")
    return proc.returncode, out


@pytest.mark.root
@pytest.mark.slow
def test_built_image_runs_the_appliance_and_passes_its_check(workdir: Path) -> None:
    rootfs = workdir / "rootfs"
    code, out = run_build(rootfs)
    assert mounts_under(workdir) == [], f"image/build left mounts behind:\n{out[-3000:]}"
    assert code == 0, f"image/build failed (exit {code}):\n{out[-8000:]}"
    assert "check: all steps passed" in out, out[-8000:]
    # The image is the one just built from this checkout, not a stale tree.
    assert (rootfs / "etc/vr-image-build").read_text().startswith("built=")
    assert os.readlink(rootfs / "usr/local/bin/vr") == "/opt/vr/venv/bin/vr"
