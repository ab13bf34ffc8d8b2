"""kill -9 at every point of an apply leaves a consistent store, and re-applying the
same push then succeeds.

A forked child counts the file-system calls that change something (open, write,
fsync, rename, symlink, mkdir, unlink, ...) and SIGKILLs itself just before call N,
for every N: no hook in the product code, every step covered. A second test kills
real ``update_config.py`` processes from outside after random short delays.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from tests.helpers.store import (
    apply_cfg,
    cfg_text,
    drop,
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


def test_update_config_processes_killed_from_outside_leave_a_consistent_store(
    tmp_path: Path,
) -> None:
    ips = [f"10.1.2.{i}" for i in range(1, 21)]
    base = Paths(tmp_path / "base")
    base.ensure()
    files = {
        f"vm_metadata.json.o{n}": vm_metadata(ip, ["metadata", "v", "old"], ["metadata", "w", "o"])
        for n, ip in enumerate(ips)
    }
    (base.cache / "VR-old.cfg").write_text(cfg_text(files))
    assert apply_cfg(base, "VR-old.cfg").code == 0
    files = {
        f"vm_metadata.json.n{n}": vm_metadata(ip, ["metadata", "v", "new"], ["metadata", "w", ""])
        for n, ip in enumerate(ips)
    }
    (base.cache / "VR-new.cfg").write_text(cfg_text(files))
    old_vm = ({"v": b"old", "w": b"o"}, {})
    new_vm = ({"v": b"new"}, {})

    rng = random.Random(1234)  # reproducible delays
    for _ in range(12):
        paths = clone(base.root, tmp_path / "work")
        proc = subprocess.Popen(
            [sys.executable, "-m", "vr", "apply-cfg", "VR-new.cfg"],
            env={**os.environ, "VR_ROOT": str(paths.root)},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            proc.wait(timeout=rng.uniform(0.05, 0.6))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        assert all(vm_state(paths, ip) in (old_vm, new_vm) for ip in ips)
        with Store(paths).locked():
            pass
        states = [vm_state(paths, ip) for ip in ips]
        assert states in ([old_vm] * len(ips), [new_vm] * len(ips))
        assert apply_cfg(paths, "VR-new.cfg").code == 0
        assert [vm_state(paths, ip) for ip in ips] == [new_vm] * len(ips)
        assert no_leftovers(paths) == []
