"""The one way files are written: staged under temporary names, visible only on commit."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vr import atomic


def test_atomic_write_replaces_the_file_with_the_mode_asked(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"old")
    atomic.atomic_write(f, b"new", 0o600)
    assert f.read_bytes() == b"new"
    assert f.stat().st_mode & 0o777 == 0o600
    assert os.listdir(tmp_path) == ["f"]


def test_nothing_is_visible_before_commit_and_everything_after(tmp_path: Path) -> None:
    with atomic.Transaction(tmp_path / "journal") as tx:
        tx.stage_file(tmp_path / "a", b"A")
        tx.stage_tree(tmp_path / "t", {"sub": {"k": b"v"}})
        tx.stage_symlink(tmp_path / "l", "t/sub")
        assert sorted(n for n in os.listdir(tmp_path) if not n.startswith(".tmp-")) == []
        tx.commit()
    assert (tmp_path / "a").read_bytes() == b"A"
    assert (tmp_path / "l" / "k").read_bytes() == b"v"
    assert sorted(os.listdir(tmp_path)) == ["a", "l", "t"]  # journal gone, no temps


def test_a_failure_before_commit_leaves_no_trace(tmp_path: Path) -> None:
    (tmp_path / "a").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.Transaction(tmp_path / "journal") as tx:
        tx.stage_file(tmp_path / "a", b"new")
        tx.stage_tree(tmp_path / "t", {"sub": {"k": b"v"}})
        raise RuntimeError("boom")
    assert os.listdir(tmp_path) == ["a"]
    assert (tmp_path / "a").read_bytes() == b"old"


def test_roll_forward_finishes_the_renames_a_killed_commit_left(tmp_path: Path) -> None:
    journal = tmp_path / "journal"
    done, pending = tmp_path / ".tmp-a.1", tmp_path / ".tmp-b.2"
    pending.write_bytes(b"B")
    (tmp_path / "a").write_bytes(b"A")  # its rename already happened
    journal.write_text(
        json.dumps([[str(done), str(tmp_path / "a")], [str(pending), str(tmp_path / "b")]])
    )
    assert atomic.roll_forward(journal) == 1
    assert sorted(os.listdir(tmp_path)) == ["a", "b"]
    assert (tmp_path / "b").read_bytes() == b"B"
    assert atomic.roll_forward(journal) == 0


def test_discarded_tree_is_removed_whole_and_a_missing_one_is_fine(tmp_path: Path) -> None:
    d = tmp_path / "gen"
    (d / "sub").mkdir(parents=True)
    (d / "sub" / "f").write_bytes(b"x")
    atomic.discard_tree(d)
    atomic.discard_tree(d)  # already gone: fine
    assert os.listdir(tmp_path) == []
