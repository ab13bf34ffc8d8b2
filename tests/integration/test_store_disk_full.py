"""A push that does not fit on a full disk fails clearly and leaves every file intact.

The store lives on a small tmpfs that this test mounts (and always unmounts)."""

from __future__ import annotations

import base64
import contextlib
import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers.store import (
    apply_cfg,
    cfg_text,
    drop,
    snapshot,
    temp_names,
    update_config,
    vm_metadata,
)
from vr.paths import Paths

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.root


@contextlib.contextmanager
def small_tmpfs(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        check=True,
        timeout=30,
    )
    try:
        yield where
    finally:
        if subprocess.run(["umount", str(where)], check=False, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(where)], check=False, timeout=30)


def fill(path: Path) -> None:
    """Write ``path`` until the file system refuses even one more byte."""
    with open(path, "wb", buffering=0) as f:
        for chunk in (1 << 16, 1 << 12, 1):
            while True:
                try:
                    f.write(b"\0" * chunk)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
                    break


def test_push_on_a_full_disk_fails_clearly_and_changes_nothing(tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "mnt", "4m") as mnt:
        paths = Paths(mnt)
        paths.ensure()
        for i in (5, 6):
            payload = vm_metadata(
                f"10.1.1.{i}", ["metadata", "vm-id", f"vm{i}"], ["userdata", "user-data", "b2xk"]
            )
            drop(paths, f"vm_metadata.json.base{i}", payload)
            assert update_config(paths, f"vm_metadata.json.base{i}").code == 0
        big = base64.b64encode(os.urandom(300_000)).decode()
        update = vm_metadata(
            "10.1.1.5", ["metadata", "vm-id", "new"], ["userdata", "user-data", big]
        )
        drop(paths, "vm_metadata.json.big", update)
        before = snapshot(mnt)
        fill(mnt / "filler")

        run = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "update_config.py"), "vm_metadata.json.big"],
            env={**os.environ, "VR_ROOT": str(mnt)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

        assert run.returncode == 1
        [line] = run.stderr.splitlines()
        assert line.startswith("vm_metadata.json.big: not applied: disk full: no space left")
        after = snapshot(mnt)
        after.pop("filler")
        assert after == before
        assert temp_names(paths.html) == []
        assert (paths.cache / "vm_metadata.json.big").exists()  # kept for the retry

        (mnt / "filler").unlink()
        retry = update_config(paths, "vm_metadata.json.big")
        assert retry.code == 0, retry.err
        assert (paths.metadata_root / "10.1.1.5" / "vm-id").read_bytes() == b"new"
        assert len((paths.userdata_root / "10.1.1.5" / "user-data").read_bytes()) == 300_000


def test_a_group_committed_batch_on_a_full_disk_fails_clearly_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """40 VMs (more than FEW_VMS): staged without fsyncs for one syncfs; the disk
    fills while staging, so nothing is renamed and every temporary goes."""
    ips = [f"10.1.3.{i}" for i in range(1, 41)]
    with small_tmpfs(tmp_path / "mnt", "4m") as mnt:
        paths = Paths(mnt)
        paths.ensure()
        old = {f"vm_metadata.json.o{n}": vm_metadata(ip, ["metadata", "v", "old"])
               for n, ip in enumerate(ips)}  # fmt: skip
        (paths.cache / "VR-old.cfg").write_text(cfg_text(old))
        assert apply_cfg(paths, "VR-old.cfg").code == 0

        # a different user-data each: identical files of a batch share one inode
        def big() -> str:
            return base64.b64encode(os.urandom(20_000)).decode()

        new = {f"vm_metadata.json.n{n}": vm_metadata(ip, ["metadata", "v", "new"],
                                                     ["userdata", "user-data", big()])
               for n, ip in enumerate(ips)}  # fmt: skip
        (paths.cache / "VR-new.cfg").write_text(cfg_text(new))
        before = snapshot(mnt)
        # room for the first VMs of the batch, not for all of them
        fill(mnt / "filler")
        with open(mnt / "filler", "r+b") as f:
            f.truncate(os.path.getsize(mnt / "filler") - 200_000)

        run = apply_cfg(paths, "VR-new.cfg")
        assert run.code == 1
        assert "not applied: disk full: no space left" in run.err
        after = snapshot(mnt)
        after.pop("filler")
        assert after == before
        assert temp_names(paths.html) == []

        (mnt / "filler").unlink()
        assert apply_cfg(paths, "VR-new.cfg").code == 0
        assert [(paths.metadata_root / ip / "v").read_bytes() for ip in ips] == [b"new"] * 40
