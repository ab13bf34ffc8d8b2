"""Readers never see a mix of two versions of a VM, and concurrent writers never lose
an update. Real processes: the writers run in their own interpreters."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

from tests.helpers.store import vm_metadata
from vr.paths import Paths
from vr.store import read_vm

VM = IPv4Address("10.1.1.23")
PUSHES = 120

# Two complete versions: each deletes the other's own key, so a mix is visible.
VERSIONS = {
    "A": {"x": "a" * 20000, "common": "A" * 30000, "user-data": b"A" * 50000},
    "B": {"y": "b" * 20000, "common": "B" * 30000, "user-data": b"B" * 50000},
}


def _payload(tag: str) -> dict[str, object]:
    v = VERSIONS[tag]
    own, gone = ("x", "y") if tag == "A" else ("y", "x")
    return vm_metadata(
        str(VM),
        ["metadata", own, v[own]],
        ["metadata", gone, ""],
        ["metadata", "common", v["common"]],
        ["userdata", "user-data", base64.b64encode(v["user-data"]).decode()],  # type: ignore[arg-type]
    )


def _expected_meta(tag: str) -> dict[str, bytes]:
    own = "x" if tag == "A" else "y"
    v = VERSIONS[tag]
    return {own: v[own].encode(), "common": v["common"].encode()}  # type: ignore[union-attr]


WRITER = """
import json, sys
from pathlib import Path
from vr.paths import Paths
from vr.payloads import parse_payload
from vr.store import Store
root, count = Path(sys.argv[1]), int(sys.argv[2])
versions = [json.dumps(json.loads(a)).encode() for a in sys.argv[3:5]]
store = Store(Paths(root))
for i in range(count):
    store.apply([parse_payload("vm_metadata.json.w", versions[i % 2])])
"""


def _which(snapshot: tuple[dict[str, bytes], dict[str, bytes]]) -> str:
    meta, user = snapshot
    for tag in VERSIONS:
        if meta == _expected_meta(tag) and user == {"user-data": VERSIONS[tag]["user-data"]}:
            return tag
    return "MIX"


def _read_outside(paths: Paths) -> dict[str, bytes] | None:
    """A file server: resolve ``metadata/<ip>`` once, read the index, then each key."""
    try:
        fd = os.open(paths.metadata_dir(VM), os.O_RDONLY | os.O_DIRECTORY)
    except FileNotFoundError:
        return None
    try:
        out = {}
        index = _read_at(fd, "meta-data")
        for key in index.decode().split("\n")[:-1]:
            out[key] = _read_at(fd, key)
        return out
    except FileNotFoundError:
        return None  # the generation was discarded while being read: the reader retries
    finally:
        os.close(fd)


def _read_at(dir_fd: int, name: str) -> bytes:
    fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def test_readers_see_the_complete_old_or_new_vm_while_pushes_alternate(paths: Paths) -> None:
    from vr.payloads import parse_payload
    from vr.store import Store

    Store(paths).apply([parse_payload("vm_metadata.json", json.dumps(_payload("A")).encode())])
    writer = subprocess.Popen(
        [
            sys.executable,
            "-c",
            WRITER,
            str(paths.root),
            str(PUSHES),
            json.dumps(_payload("B")),
            json.dumps(_payload("A")),
        ]
    )
    seen: dict[str, int] = {"A": 0, "B": 0, "MIX": 0}
    outside: dict[str, int] = {"A": 0, "B": 0, "MIX": 0, "retry": 0}
    files: dict[str, int] = {"A": 0, "B": 0, "torn": 0}
    stop = threading.Event()
    errors: list[BaseException] = []

    def guarded(body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except BaseException as exc:  # reported by the test, not lost in the thread
                errors.append(exc)
                stop.set()

        return run

    def whole_vm() -> None:
        while not stop.is_set():
            rec = read_vm(paths, VM)
            assert rec is not None
            seen[_which((rec.metadata, rec.userdata))] += 1

    def through_links() -> None:
        while not stop.is_set():
            meta = _read_outside(paths)
            if meta is None:
                outside["retry"] += 1
                continue
            tags = [t for t in VERSIONS if meta == _expected_meta(t)]
            outside[tags[0] if tags else "MIX"] += 1

    def single_files() -> None:
        path = paths.metadata_dir(VM) / "common"
        user = paths.userdata_dir(VM) / "user-data"
        while not stop.is_set():
            for f, n in ((path, 30000), (user, 50000)):
                data = f.read_bytes()
                kinds = set(data)
                ok = len(data) == n and len(kinds) == 1
                files[chr(kinds.pop()).upper() if ok else "torn"] += 1

    threads = [threading.Thread(target=guarded(t)) for t in (whole_vm, through_links, single_files)]
    for t in threads:
        t.start()
    try:
        assert writer.wait(timeout=120) == 0
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
        if writer.poll() is None:
            writer.kill()
    assert errors == []
    assert seen["MIX"] == 0 and outside["MIX"] == 0 and files["torn"] == 0, (seen, outside, files)
    # the readers really raced the writer: both versions were observed
    assert seen["A"] > 0 and seen["B"] > 0, seen
    assert outside["A"] > 0 and outside["B"] > 0, outside


PUSHER = """
import io, json, sys
from pathlib import Path
from vr.applier import Applier
from vr.paths import Paths
root, me, count = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
paths = Paths(root)
applier = Applier(paths)
def push(name, ip, triples):
    (paths.cache / name).write_text(json.dumps(
        {"vm_ip_address": ip, "vm_metadata": triples, "type": "vmdata"}))
    err = io.StringIO()
    if applier.update_config([name], io.StringIO(), err) != 0:
        sys.exit(err.getvalue())
for n in range(count):
    push(f"vm_metadata.json.own-{me}-{n}", f"10.1.3.{me}",
         [["metadata", "count", str(n)], ["metadata", f"seen-{n}", "yes"]])
    push(f"vm_metadata.json.shared-{me}-{n}", "10.1.9.9",
         [["metadata", f"writer-{me}", str(n)], ["metadata", f"w{me}-{n}", "yes"]])
"""


def test_concurrent_pushes_from_several_processes_lose_no_update(paths: Paths) -> None:
    writers, count = 4, 8
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", PUSHER, str(paths.root), str(me), str(count)],
            stderr=subprocess.PIPE,
            text=True,
        )
        for me in range(writers)
    ]
    errors = [p.communicate(timeout=180)[1] for p in procs]
    assert [p.returncode for p in procs] == [0] * writers, errors
    for me in range(writers):
        rec = read_vm(paths, IPv4Address(f"10.1.3.{me}"))
        assert rec is not None
        expected = {"count": str(count - 1).encode()}
        expected |= {f"seen-{n}": b"yes" for n in range(count)}
        assert rec.metadata == expected
    shared = read_vm(paths, IPv4Address("10.1.9.9"))
    assert shared is not None
    expected = {f"writer-{me}": str(count - 1).encode() for me in range(writers)}
    expected |= {f"w{me}-{n}": b"yes" for me in range(writers) for n in range(count)}
    assert shared.metadata == expected
    index = (paths.metadata_root / "10.1.9.9" / "meta-data").read_text().split("\n")[:-1]
    assert sorted(index) == sorted(expected)
    assert len(list(paths.processed.iterdir())) == 2 * writers * count


def test_lock_is_exclusive_across_threads(paths: Paths) -> None:
    from vr.store import Store

    inside = []
    order: list[str] = []

    def hold(tag: str) -> None:
        with Store(paths).locked():
            inside.append(tag)
            order.append(f"in-{tag}")
            assert len(inside) == 1, inside
            time.sleep(0.05)
            inside.remove(tag)
            order.append(f"out-{tag}")

    threads = [threading.Thread(target=hold, args=(str(i),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(order) == 8
    assert all(order[i][:3] == "in-" and order[i + 1][:4] == "out-" for i in range(0, 8, 2))


def test_temp_names_never_collide_with_pushed_names() -> None:
    from vr import atomic
    from vr.cloudstack import NAME_PATTERN

    assert not NAME_PATTERN.fullmatch(atomic.TMP_PREFIX + "x")
    assert Path(atomic.TMP_PREFIX).name.startswith(".")
