"""Where the appliance keeps things, and who may read the push folders."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from vr.paths import Paths


@pytest.fixture
def open_umask() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_push_folders_are_created_private_whatever_the_umask(
    tmp_path: Path, open_umask: None
) -> None:
    paths = Paths(tmp_path / "root")
    paths.ensure()
    assert [mode(d) for d in (paths.cache, paths.processed, paths.failed)] == [0o700] * 3
    assert mode(paths.state) == 0o700


def test_push_folders_left_open_by_an_older_install_are_tightened(tmp_path: Path) -> None:
    paths = Paths(tmp_path / "root")
    for d in (paths.cache, paths.processed, paths.failed):
        d.mkdir(parents=True, exist_ok=True)
        os.chmod(d, 0o755)
    paths.ensure()
    assert [mode(d) for d in (paths.cache, paths.processed, paths.failed)] == [0o700] * 3
