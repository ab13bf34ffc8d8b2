"""Data is fsynced before it becomes visible, and what became visible is durable.

A kill -9 keeps the page cache, so the crash tests cannot see a missing fsync; a power
cut would. This test traces the file-system calls of real applies (``os`` patched in
this process) and checks the order a power cut needs:

* a rename may only expose a file or a tree whose every write was followed by an
  fsync of that file, and whose folders were fsynced after their last new entry;
* a group commit's ``syncfs`` counts as an fsync of everything written before it;
* when the apply returns, every folder that gained an entry by a rename, a new file
  or a new folder has been fsynced since (temporary trees deleted meanwhile aside).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.store import vm_metadata
from tests.helpers.vmdata import vm_triples
from vr import atomic
from vr.paths import Paths
from vr.payloads import parse_payload
from vr.store import Store

VM = "10.1.1.23"


class Trace:
    """Which files and folders hold changes not yet fsynced, and each violation."""

    def __init__(self) -> None:
        self.fds: dict[int, str] = {}
        self.dirty: set[str] = set()
        self.new_entries: set[str] = set()
        self.violations: list[str] = []
        self.renames = 0
        self.syncfs_calls = 0

    def path(self, p: Any, dir_fd: int | None = None) -> str:
        p = os.fsdecode(p)
        if dir_fd is not None and not os.path.isabs(p):
            return os.path.normpath(os.path.join(self.fds[dir_fd], p))
        return os.path.abspath(p)

    def entry_added(self, path: str) -> None:
        self.new_entries.add(os.path.dirname(path))

    def check_exposed(self, src: str, dst: str) -> None:
        unsynced = sorted(
            d for d in self.dirty | self.new_entries if d == src or d.startswith(src + "/")
        )
        if unsynced:
            self.violations.append(f"rename {src} -> {dst} exposes unsynced {unsynced}")

    def move(self, src: str, dst: str) -> None:
        """A renamed tree keeps its state under its new name."""

        def renamed(p: str) -> str:
            return dst + p[len(src) :] if p == src or p.startswith(src + "/") else p

        self.dirty = {renamed(p) for p in self.dirty}
        self.new_entries = {renamed(p) for p in self.new_entries}
        self.fds = {fd: renamed(p) for fd, p in self.fds.items()}


def traced(monkeypatch: pytest.MonkeyPatch) -> Trace:
    t = Trace()
    names = ("open", "write", "pwrite", "fsync", "close", "mkdir", "symlink", "replace", "rename")
    real = {n: getattr(os, n) for n in names}

    def open_(path: Any, flags: int, mode: int = 0o777, *, dir_fd: int | None = None) -> int:
        full = t.path(path, dir_fd)
        existed = os.path.lexists(full)
        fd: int = real["open"](path, flags, mode, dir_fd=dir_fd)
        t.fds[fd] = full
        if flags & os.O_CREAT and not existed:
            t.entry_added(full)
        return fd

    def write(fd: int, data: Any) -> int:
        n: int = real["write"](fd, data)
        if fd in t.fds:
            t.dirty.add(t.fds[fd])
        return n

    def pwrite(fd: int, data: Any, offset: int) -> int:
        n: int = real["pwrite"](fd, data, offset)
        if fd in t.fds:
            t.dirty.add(t.fds[fd])
        return n

    def fsync(fd: Any) -> None:
        real["fsync"](fd)
        p = t.fds.get(fd if isinstance(fd, int) else fd.fileno())
        if p is not None:
            t.dirty.discard(p)
            t.new_entries.discard(p)

    def close(fd: int) -> None:
        t.fds.pop(fd, None)
        real["close"](fd)

    def mkdir(path: Any, mode: int = 0o777, *, dir_fd: int | None = None) -> None:
        real["mkdir"](path, mode, dir_fd=dir_fd)
        t.entry_added(t.path(path, dir_fd))

    def symlink(src: Any, dst: Any, *a: Any, **kw: Any) -> None:
        real["symlink"](src, dst, *a, **kw)
        t.entry_added(t.path(dst))

    def renaming(name: str) -> Callable[..., None]:
        def rename(src: Any, dst: Any, **kw: Any) -> None:
            s, d = t.path(src), t.path(dst)
            t.check_exposed(s, d)
            real[name](src, dst, **kw)
            t.move(s, d)
            t.entry_added(d)
            t.renames += 1

        return rename

    real_syncfs = atomic.syncfs

    def syncfs(path: Path) -> None:
        # The barrier of a group commit: everything written so far is on disk
        # (the whole test runs on one file system).
        real_syncfs(path)
        t.dirty.clear()
        t.new_entries.clear()
        t.syncfs_calls += 1

    monkeypatch.setattr(atomic, "syncfs", syncfs)
    for name, fn in (("open", open_), ("write", write), ("pwrite", pwrite), ("fsync", fsync),
                     ("close", close),
                     ("mkdir", mkdir), ("symlink", symlink),
                     ("replace", renaming("replace")), ("rename", renaming("rename"))):  # fmt: skip
        monkeypatch.setattr(os, name, fn)
    return t


def _pushes(gen: int) -> list[tuple[str, dict[str, Any]]]:
    return [
        ("vm_metadata.json.1", vm_metadata(VM, *vm_triples(VM, userdata=b"#!/bin/sh\n" * gen))),
        ("vm_password.json.1", {"ip_address": VM, "password": f"pw-{gen}", "type": "vmpassword"}),
        ("guest_network.json.1", {"device": "eth0", "router_guest_ip": "10.1.1.1",
                                  "cidr": "10.1.1.0/24", "add": True, "type": "guestnetwork"}),
        ("vm_dhcp_entry.json.1", {"mac_address": "02:00:0a:01:01:17", "ipv4_address": VM,
                                  "host_name": f"web-{gen}", "type": "dhcpentry"}),
    ]  # fmt: skip


@pytest.mark.parametrize("first", [True, False], ids=["into-empty-store", "over-existing-vm"])
def test_every_apply_fsyncs_data_before_exposing_it_and_its_folders_after(
    paths: Paths, monkeypatch: pytest.MonkeyPatch, first: bool
) -> None:
    import json

    store = Store(paths)
    if not first:
        store.apply([parse_payload(n, json.dumps(p).encode()) for n, p in _pushes(1)])
    payloads = [parse_payload(n, json.dumps(p).encode()) for n, p in _pushes(2)]

    with monkeypatch.context() as mp:  # only the trace's patches end here
        trace = traced(mp)
        store.apply(payloads)

    assert trace.renames >= 3, "the apply made nothing visible by rename"
    assert trace.violations == []
    left = sorted(p for p in trace.dirty | trace.new_entries if os.path.lexists(p))
    assert left == [], f"changed but never fsynced when the apply returned: {left}"
    assert (Path(paths.root) / f"var/www/html/latest/metadata/{VM}/local-hostname").exists()


def test_the_trace_catches_a_rename_of_unsynced_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The checker itself: a plain write + rename without fsync is reported."""
    with monkeypatch.context() as mp:
        trace = traced(mp)
        fd = os.open(tmp_path / "tmp", os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, b"data")
        os.close(fd)
        os.replace(tmp_path / "tmp", tmp_path / "final")
    assert len(trace.violations) == 1 and "exposes unsynced" in trace.violations[0]
    assert str(tmp_path) in trace.new_entries


def test_the_trace_sees_the_store_skip_a_file_fsync(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation check: the store's files written without their fsync are caught."""
    import json

    from vr import atomic

    real_write_file = atomic.write_file

    def unsynced(path: Path, data: bytes, mode: int = 0o644, *, sync: bool = True) -> None:
        real_write_file(path, data, mode, sync=False)

    payloads = [parse_payload(n, json.dumps(p).encode()) for n, p in _pushes(1)]
    with monkeypatch.context() as mp:
        trace = traced(mp)
        mp.setattr(atomic, "write_file", unsynced)
        Store(paths).apply(payloads)
    assert any("local-hostname" in v or "user-data" in v for v in trace.violations)


def _upload(folder: Path) -> Path:
    """What the agent does with an scp/SFTP upload: pieces, out of order, then commit."""
    from vr.atomic import StagedFile

    upload = StagedFile(folder / "vm_metadata.json.up")
    upload.write(b"B" * 5000, offset=5000)
    upload.write(b"A" * 5000, offset=0)
    upload.commit()
    return upload.path


def test_an_upload_is_fsynced_before_its_rename_and_its_folder_after(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with monkeypatch.context() as mp:
        trace = traced(mp)
        path = _upload(tmp_path)

    assert trace.renames == 1
    assert trace.violations == []
    left = sorted(p for p in trace.dirty | trace.new_entries if os.path.lexists(p))
    assert left == [], f"changed but never fsynced when the upload was committed: {left}"
    assert path.read_bytes() == b"A" * 5000 + b"B" * 5000


@pytest.mark.parametrize("skipped", ["file", "folder"])
def test_the_trace_sees_an_upload_skip_an_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, skipped: str
) -> None:
    """Mutation check: StagedFile.commit without its file's (or folder's) fsync is caught."""
    import stat

    with monkeypatch.context() as mp:
        trace = traced(mp)
        traced_fsync = os.fsync

        def fsync_skipping(fd: Any) -> None:
            is_dir = stat.S_ISDIR(os.fstat(fd).st_mode)
            if is_dir == (skipped == "folder"):
                return  # the mutant: this fsync never happens
            traced_fsync(fd)

        mp.setattr(os, "fsync", fsync_skipping)
        _upload(tmp_path)

    if skipped == "file":
        assert len(trace.violations) == 1 and "exposes unsynced" in trace.violations[0]
        assert ".tmp-vm_metadata.json.up" in trace.violations[0]
    else:
        assert trace.violations == []
        assert str(tmp_path) in trace.new_entries


BATCH = [f"10.1.2.{i}" for i in range(1, 41)]
"""More VMs than FEW_VMS: group-committed."""


def _batch(tag: str) -> list[Any]:
    import json

    return [
        parse_payload(
            "vm_metadata.json",
            json.dumps(vm_metadata(ip, *vm_triples(ip, userdata=tag.encode()))).encode(),
        )
        for ip in BATCH
    ]


@pytest.mark.parametrize("first", [True, False], ids=["into-empty-store", "over-existing-vms"])
def test_a_group_committed_batch_flushes_once_before_exposing_anything(
    paths: Paths, monkeypatch: pytest.MonkeyPatch, first: bool
) -> None:
    store = Store(paths)
    if not first:
        store.apply(_batch("old"))
    with monkeypatch.context() as mp:
        trace = traced(mp)
        fsyncs = {"n": 0}
        real_fsync = os.fsync

        def counting(fd: Any) -> None:
            fsyncs["n"] += 1
            real_fsync(fd)

        mp.setattr(os, "fsync", counting)
        store.apply(_batch("new"))
    assert trace.syncfs_calls == 1
    assert trace.renames >= 2 * len(BATCH)
    assert trace.violations == []
    assert fsyncs["n"] < len(BATCH), fsyncs  # folders and the journal, not every file
    left = sorted(p for p in trace.dirty | trace.new_entries if os.path.lexists(p))
    assert left == [], f"changed but never fsynced when the apply returned: {left}"


def test_the_trace_sees_a_group_commit_without_its_barrier(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Mutation check: a group commit whose syncfs does nothing is caught."""
    with monkeypatch.context() as mp:
        trace = traced(mp)
        mp.setattr(atomic, "syncfs", lambda path: None)
        Store(paths).apply(_batch("new"))
    assert any("exposes unsynced" in v for v in trace.violations)
