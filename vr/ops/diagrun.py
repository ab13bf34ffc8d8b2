"""Running an allowed diagnostic (see :mod:`vr.ops.diagnostics`): the I/O edge.

``vr status`` / ``vr show`` and ``tail`` run in-process; the rest through
:mod:`vr.subp` with a fixed argv (never a shell), paths mapped under the root.
``vr firewall ...`` runs as its own ``python -m vr`` process so python-iptables
(one process-wide object) is never shared with a push applying rules in the agent.
Nothing here prints a password: the store's views never hold one, and cloud.log
never receives one.
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from vr import subp
from vr.errors import VRError
from vr.ops.diagnostics import DEFAULT_LINES, Diagnostic
from vr.paths import Paths

LOG = logging.getLogger(__name__)

COMMAND_TIMEOUT = 30.0
FOLLOW_POLL = 0.2
BLOCK = 64 * 1024


class Out(Protocol):
    def write(self, s: str, /) -> int: ...


def argv_for(diag: Diagnostic, paths: Paths) -> list[str] | None:
    """The fixed argv of a diagnostic run as a process (None: runs in-process)."""
    vr = [sys.executable, "-m", "vr"]
    root = ["--root", str(paths.root)]
    as_json = ["--json"] if diag.json else []
    if diag.kind == "firewall_show":
        return [*vr, "firewall", "show", *root, *as_json]
    if diag.kind == "firewall_counters":
        return [*vr, "firewall", "counters", *root, *as_json]
    if diag.kind == "iptables_nat":
        # python-iptables programs the legacy tables: show those, whatever iptables is
        return ["iptables-legacy", "-t", "nat", "-L", "PREROUTING", "-n", "-v"]
    if diag.kind == "ls_metadata":
        return ["ls", "-al", f"{paths.metadata_root}/"]
    if diag.kind == "ss":
        return ["ss", "-tulpn"]
    if diag.kind == "netstat":
        return ["netstat", "-tulpn"] if shutil.which("netstat") else ["ss", "-tulpn"]
    return None


def run(diag: Diagnostic, paths: Paths, out: Out, err: Out, stopped: Callable[[], bool]) -> int:
    """Run ``diag``, writing to ``out``/``err``; its exit status. ``stopped()``
    ends ``tail -f`` (the client left, the agent stops)."""
    argv = argv_for(diag, paths)
    if argv is not None:
        if diag.kind == "netstat" and argv[0] == "ss":
            err.write("netstat is not installed; the same from ss -tulpn:\n")
        try:
            res = subp.run(argv, timeout=COMMAND_TIMEOUT, ok_codes=range(256))
        except VRError as exc:
            err.write(f"{diag.kind}: {exc}\n")
            return 1
        out.write(res.stdout)
        err.write(res.stderr)
        return res.code
    if diag.kind == "vr_status":
        from vr.ops.health import EXIT
        from vr.ops.status import collect_status, format_status

        st = collect_status(paths)
        out.write(
            json.dumps(st, indent=1, sort_keys=True) + "\n" if diag.json else format_status(st)
        )
        return EXIT[st["health"]["state"]]
    if diag.kind == "vr_show":
        from vr import show

        report = show.collect(paths, list(diag.ips) or None)
        if diag.json:
            out.write(json.dumps(report, indent=2) + "\n")
        else:
            out.write("".join(line + "\n" for line in show.render(report)))
        return 0
    if diag.kind == "tail":
        return tail(paths.log_file, diag.lines, out, err)
    assert diag.kind == "tail_follow"
    return follow(paths.log_file, out, err, stopped)


def last_lines(path: Path, n: int) -> tuple[bytes, int]:
    """The last ``n`` lines of ``path`` and the size read up to (read from the end)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        data = b""
        pos = size
        while pos > 0 and data.count(b"\n") <= n:
            step = min(BLOCK, pos)
            pos -= step
            f.seek(pos)
            data = f.read(step) + data
    lines = data.splitlines(keepends=True)[-n:] if n else []
    return b"".join(lines), size


def tail(path: Path, n: int, out: Out, err: Out) -> int:
    try:
        text, _ = last_lines(path, n)
    except FileNotFoundError:
        err.write(f"tail: {path.name}: no log yet\n")
        return 1
    except OSError as exc:
        err.write(f"tail: cannot read the log: {exc.strerror}\n")
        return 1
    out.write(text.decode("utf-8", "replace"))
    return 0


def follow(path: Path, out: Out, err: Out, stopped: Callable[[], bool]) -> int:
    """``tail -f``: the last lines, then what is appended, across rotations (the log
    is renamed at 5 MiB and a new file started), until ``stopped()``."""
    try:
        text, pos = last_lines(path, DEFAULT_LINES)
        ident = _ident(path)
    except FileNotFoundError:
        text, pos, ident = b"", 0, None
    out.write(text.decode("utf-8", "replace"))
    decoder = codecs.getincrementaldecoder("utf-8")("replace")  # a chunk may split a character
    while not stopped():
        time.sleep(FOLLOW_POLL)
        try:
            now = _ident(path)
            size = path.stat().st_size
        except FileNotFoundError:
            continue
        if now != ident or size < pos:  # rotated or truncated: the new file from its start
            ident, pos = now, 0
        if size > pos:
            with open(path, "rb") as f:
                f.seek(pos)
                chunk = f.read(min(size - pos, 1024 * 1024))
            pos += len(chunk)
            out.write(decoder.decode(chunk))
    return 0


def _ident(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino
