"""kill -9 at every point of an apply leaves a consistent store, and re-applying the
same push then succeeds.

A forked child counts the file-system calls that change something (open, write,
fsync, rename, symlink, mkdir, unlink, ...) and SIGKILLs itself just before call N,
for every N: no hook in the product code, every step covered. Real ``vr apply-cfg``
processes are also SIGKILLed from outside, each held at a chosen rename inside the
apply (:mod:`tests.helpers.held_rename`), and every reader-side start-up (the
services, ``vr show``) is shown to finish such a batch before it reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.store import (
    apply_cfg,
    cfg_text,
    drop,
    kept_logging,
    served_tree,
    temp_names,
    update_config,
    vm_metadata,
)
from vr.paths import Paths
from vr.store import Store, read_vm

REPO = Path(__file__).resolve().parents[2]
SYSCALLS = (
    "open", "write", "fchmod", "chmod", "fsync", "replace", "rename", "symlink",
    "mkdir", "unlink", "rmdir",
)  # fmt: skip
KILLED = -signal.SIGKILL


def _in_child_killed_at(step: int, action: Callable[[], object], report: int) -> None:
    """Runs in the forked child: patch ``os`` to die before the ``step``-th call."""
    count = 0

    def counting(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            if count == step:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        return call

    real_write = os.write
    for name in SYSCALLS:
        setattr(os, name, counting(getattr(os, name)))
    action()
    real_write(report, str(count).encode())


def run_killed_at(step: int, action: Callable[[], object]) -> tuple[int, int]:
    """(exit status, number of counted calls if it finished) of ``action`` in a child."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 0
        try:
            os.close(r)
            _in_child_killed_at(step, action, w)
        except BaseException:
            code = 3
        finally:
            os._exit(code)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), int(out or 0)


def vm_state(paths: Paths, ip: str) -> tuple[dict[str, bytes], dict[str, bytes]] | None:
    rec = read_vm(paths, IPv4Address(ip))
    return None if rec is None else (rec.metadata, rec.userdata)


def served_for(paths: Paths, ip: str) -> dict[str, bytes]:
    return {k: v for k, v in served_tree(paths).items() if f"/{ip}/" in k}


def clone(src: Path, dst: Path) -> Paths:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)
    return Paths(dst)


def no_leftovers(paths: Paths) -> list[str]:
    """Temporaries the next writer did not clean up. Those of files written outside
    the store lock (archives, the last-push record, the passwords file and its
    generation counter, which the password server writes under its own lock) are only
    removed once they are old, as another process may be writing them right now."""
    with Store(paths).locked():
        pass
    outside = (".tmp-last_push.json.", ".tmp-passwords.json.", ".tmp-passwords.gen.")
    state = [n for n in temp_names(paths.state) if not n.startswith(outside)]
    return temp_names(paths.html) + state


def test_kill_at_every_step_of_a_push_leaves_old_or_new_and_reapply_works(tmp_path: Path) -> None:
    base = Paths(tmp_path / "base")
    base.ensure()
    old = vm_metadata(
        "10.1.1.5",
        ["metadata", "k1", "one"], ["metadata", "k2", "two"], ["metadata", "k3", "three"],
        ["userdata", "user-data", "b2xk"],
    )  # fmt: skip
    new = vm_metadata(
        "10.1.1.5",
        ["metadata", "k1", "ONE"], ["metadata", "k2", ""], ["metadata", "k4", "four"],
        ["userdata", "user-data", "bmV3"],
    )  # fmt: skip
    for name, payload in (
        ("vm_metadata.json.other", vm_metadata("10.1.1.6", ["metadata", "vm-id", "6"])),
        ("vm_metadata.json.old", old),
        ("vm_metadata.json.old2", old),  # a previous generation exists to be discarded
    ):
        drop(base, name, payload)
        assert update_config(base, name).code == 0
    drop(base, "vm_metadata.json.new", new)
    old_state, old_served = vm_state(base, "10.1.1.5"), served_for(base, "10.1.1.5")
    other = served_for(base, "10.1.1.6")

    done = clone(base.root, tmp_path / "done")
    code, total = run_killed_at(0, lambda: update_config(done, "vm_metadata.json.new"))
    assert code == 0 and total > 50, (code, total)
    new_state, new_served = vm_state(done, "10.1.1.5"), served_for(done, "10.1.1.5")
    assert new_state != old_state

    outcomes = {"old": 0, "new": 0}
    for step in range(1, total + 1):
        paths = clone(base.root, tmp_path / "work")
        code, _ = run_killed_at(step, lambda p=paths: update_config(p, "vm_metadata.json.new"))  # type: ignore[misc]
        assert code == KILLED, step
        state, served = vm_state(paths, "10.1.1.5"), served_for(paths, "10.1.1.5")
        if state == old_state:
            assert served == old_served, step
            outcomes["old"] += 1
        else:
            assert (state, served) == (new_state, new_served), step
            outcomes["new"] += 1
        assert served_for(paths, "10.1.1.6") == other, step

        run = update_config(paths, "vm_metadata.json.new")
        assert run.code == 0, (step, run.err)
        assert (vm_state(paths, "10.1.1.5"), served_for(paths, "10.1.1.5")) == (
            new_state,
            new_served,
        ), step
        assert no_leftovers(paths) == [], step
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes


def test_kill_during_a_batch_is_all_or_nothing_once_the_next_writer_runs(tmp_path: Path) -> None:
    ips = [f"10.1.1.{i}" for i in (11, 12, 13)]
    base = Paths(tmp_path / "base")
    base.ensure()
    for n, ip in enumerate(ips):
        drop(base, f"vm_metadata.json.o{n}", vm_metadata(ip, ["metadata", "v", "old"]))
        assert update_config(base, f"vm_metadata.json.o{n}").code == 0
    batch = {
        f"vm_metadata.json.n{n}": vm_metadata(
            ip, ["metadata", "v", "new"], ["userdata", "user-data", "bmV3"]
        )
        for n, ip in enumerate(ips)
    }
    batch["vm_password.json.p"] = {"ip_address": ips[0], "password": "Pw-new"}
    (base.cache / "VR-1.cfg").write_text(cfg_text(batch))
    old = {ip: vm_state(base, ip) for ip in ips}

    done = clone(base.root, tmp_path / "done")
    code, total = run_killed_at(0, lambda: apply_cfg(done, "VR-1.cfg"))
    assert code == 0, code
    new = {ip: vm_state(done, ip) for ip in ips}

    outcomes = {"old": 0, "new": 0}
    for step in range(1, total + 1, 2):
        paths = clone(base.root, tmp_path / "work")
        code, _ = run_killed_at(step, lambda p=paths: apply_cfg(p, "VR-1.cfg"))  # type: ignore[misc]
        assert code == KILLED, step
        for ip in ips:  # before any repair: each VM whole
            assert vm_state(paths, ip) in (old[ip], new[ip]), (step, ip)
        with Store(paths).locked():  # the next writer finishes or forgets the batch
            pass
        now = {ip: vm_state(paths, ip) for ip in ips}
        assert now in (old, new), step
        outcomes["old" if now == old else "new"] += 1
        assert apply_cfg(paths, "VR-1.cfg").code == 0, step
        assert {ip: vm_state(paths, ip) for ip in ips} == new, step
        assert no_leftovers(paths) == [], step
    assert outcomes["old"] > 0 and outcomes["new"] > 0, outcomes


@contextlib.contextmanager
def held_at_rename(
    paths: Paths, step: int, *args: str
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``python -m vr ARGS`` in a real process, stopped before its ``step``-th rename
    (see :mod:`tests.helpers.held_rename`): yields what it reported (``held`` or
    ``done <renames>``) and the process; it is SIGKILLed and reaped on the way out."""
    r, w = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.helpers.held_rename", str(step), str(w), *args],
        env={**os.environ, "VR_ROOT": str(paths.root)},
        pass_fds=(w,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    os.close(w)
    try:
        with os.fdopen(r, "rb") as f:
            # blocks until the child is held or has finished (EOF at its exit)
            report = f.readline().decode().strip()
        yield report, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()


def _batch_over(base: Path, ips: list[str]) -> tuple[Paths, tuple[Any, Any]]:
    """A store of ``ips`` (old) with ``VR-new.cfg`` waiting in the cache, and the
    (old, new) state of one VM."""
    paths = Paths(base)
    paths.ensure()
    files = {
        f"vm_metadata.json.o{n}": vm_metadata(ip, ["metadata", "v", "old"], ["metadata", "w", "o"])
        for n, ip in enumerate(ips)
    }
    (paths.cache / "VR-old.cfg").write_text(cfg_text(files))
    assert apply_cfg(paths, "VR-old.cfg").code == 0
    files = {
        f"vm_metadata.json.n{n}": vm_metadata(ip, ["metadata", "v", "new"], ["metadata", "w", ""])
        for n, ip in enumerate(ips)
    }
    (paths.cache / "VR-new.cfg").write_text(cfg_text(files))
    return paths, (({"v": b"old", "w": b"o"}, {}), ({"v": b"new"}, {}))


BATCH_IPS = [f"10.1.2.{i}" for i in range(1, 21)]
COMMIT_RENAMES = 1 + 2 * len(BATCH_IPS) + 1
"""VR-new.cfg's commit over existing VMs: the journal, each VM's generation and
pointer, the stamp."""


def test_update_config_processes_killed_from_outside_leave_a_consistent_store(
    tmp_path: Path,
) -> None:
    """Real ``vr apply-cfg`` processes SIGKILLed from outside at chosen points inside
    the apply: before its journal, after it, between the renames of its VMs, at its
    stamp and in the clean-up after the commit. Each kill is known to land there."""
    ips = BATCH_IPS
    base, (old_vm, new_vm) = _batch_over(tmp_path / "base", ips)

    done = clone(base.root, tmp_path / "done")
    with held_at_rename(done, 0, "apply-cfg", "VR-new.cfg") as (report, proc):
        assert proc.wait() == 0
    total = int(report.split()[1])
    assert total > COMMIT_RENAMES + 3, report  # old generations, archives, last push

    steps = sorted({1, 2, 3, 8, 13, 21, 22, 30, COMMIT_RENAMES - 1, COMMIT_RENAMES,
                    COMMIT_RENAMES + 1, total})  # fmt: skip
    outcomes = {"old": 0, "new": 0, "mixed before repair": 0}
    for step in steps:
        paths = clone(base.root, tmp_path / "work")
        with held_at_rename(paths, step, "apply-cfg", "VR-new.cfg") as (report, proc):
            assert report == "held", (step, report)  # inside the apply, not after it
            in_commit = paths.journal.exists()
            proc.send_signal(signal.SIGKILL)
            assert proc.wait() == KILLED, step
        assert in_commit == (2 <= step <= COMMIT_RENAMES), step
        states = [vm_state(paths, ip) for ip in ips]
        assert all(s in (old_vm, new_vm) for s in states), step  # each VM whole
        if old_vm in states and new_vm in states:
            outcomes["mixed before repair"] += 1
        with Store(paths).locked():
            pass
        states = [vm_state(paths, ip) for ip in ips]
        assert states in ([old_vm] * len(ips), [new_vm] * len(ips)), step
        outcomes["old" if states[0] == old_vm else "new"] += 1
        assert (states[0] == new_vm) == (step >= 2), step  # decided once the journal is written
        assert apply_cfg(paths, "VR-new.cfg").code == 0
        assert [vm_state(paths, ip) for ip in ips] == [new_vm] * len(ips)
        assert no_leftovers(paths) == []
    assert outcomes["old"] == 1 and outcomes["mixed before repair"] >= 4, outcomes


def _captured_at_start(paths: Paths, ips: list[str]) -> dict[str, Any]:
    return {"journal": paths.journal.exists(), "vms": [vm_state(paths, ip) for ip in ips]}


class _Started(Exception):
    """Stops a service entry point where it would start serving."""


def _start_service(
    command: list[str], paths: Paths, ips: list[str], monkeypatch: pytest.MonkeyPatch
) -> dict[str, Any]:
    """Run ``vr COMMAND`` in-process up to where it starts serving (gunicorn, the
    agent's listener, the supervisor) and return the store as it is at that moment."""
    from vr.agent import daemon
    from vr.cli import main
    from vr.http import runner as gunicorn_runner
    from vr.supervisor import Supervisor

    seen: dict[str, Any] = {}

    def serving(*args: Any, **kwargs: Any) -> Any:
        seen.update(_captured_at_start(paths, ips))
        raise _Started

    with monkeypatch.context() as mp, kept_logging():
        mp.setattr(gunicorn_runner, "run", serving)
        mp.setattr(daemon, "build_context", serving)
        mp.setattr(Supervisor, "run", serving)
        mp.setenv("VR_ROOT", str(paths.root))
        with pytest.raises(_Started):
            main(command)
    return seen


@pytest.fixture
def killed_mid_batch(tmp_path: Path) -> tuple[Paths, Any, Any]:
    """A store whose ``VR-new.cfg`` apply was SIGKILLed after 10 of its 20 VMs were
    switched: what every reader-side start-up must find whole. (Made anew for each
    test: the journal names absolute paths, so a copy would repair the original.)"""
    paths, (old_vm, new_vm) = _batch_over(tmp_path / "killed", BATCH_IPS)
    with held_at_rename(paths, 2 + 2 * 10, "apply-cfg", "VR-new.cfg") as (report, proc):
        assert report == "held"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == KILLED
    states = [vm_state(paths, ip) for ip in BATCH_IPS]
    assert states.count(new_vm) == 10 and states.count(old_vm) == 10  # the mix to repair
    assert paths.journal.exists()
    return paths, old_vm, new_vm


@pytest.mark.parametrize(
    "command",
    [
        ["serve-metadata", "--bind", "127.0.0.1:1"],
        ["serve-passwords", "--bind", "127.0.0.1:1"],
        ["agent", "--listen", "127.0.0.1", "--port", "1"],
        ["up", "--no-firewall"],
    ],
    ids=lambda c: c[0],
)
def test_every_service_finishes_a_killed_batch_before_it_serves(
    command: list[str],
    killed_mid_batch: tuple[Paths, Any, Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    paths, _, new_vm = killed_mid_batch

    seen = _start_service(command, paths, BATCH_IPS, monkeypatch)

    assert seen == {"journal": False, "vms": [new_vm] * len(BATCH_IPS)}


def test_vr_show_after_a_killed_batch_shows_one_state_across_vms(
    killed_mid_batch: tuple[Paths, Any, Any],
) -> None:
    paths, _, _ = killed_mid_batch

    run = subprocess.run(
        [sys.executable, "-m", "vr", "show", "--json"],
        env={**os.environ, "VR_ROOT": str(paths.root)},
        capture_output=True,
        check=True,
        cwd=REPO,
    )

    vms = json.loads(run.stdout)["vms"]
    shown = {ip: {k: v["text"] for k, v in vms[ip]["meta-data"].items()} for ip in BATCH_IPS}
    assert shown == {ip: {"v": "new"} for ip in BATCH_IPS}
    assert not paths.journal.exists()


def test_recover_is_a_no_op_without_an_interrupted_commit(paths: Paths) -> None:
    from vr.store import recover

    assert recover(paths) is False
    assert not paths.lock.exists()  # not even the lock was taken
