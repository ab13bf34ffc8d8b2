"""Helpers for store and push tests: drop files into the cache, run the entry points,
and look at the tree the way a guest-facing reader (or an auditor) would."""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from vr.applier import Applier
from vr.cloudstack import build_cfg
from vr.paths import Paths

Snapshot = dict[str, tuple[str, object]]


def cfg_text(files: dict[str, Any]) -> str:
    """A ``VR-<uuid>.cfg`` carrying each ``name -> JSON payload`` (the push client's builder)."""
    return build_cfg([(name, json.dumps(obj).encode()) for name, obj in files.items()])


# Files that legitimately change on a rejected push: the rejected file moves,
# logs grow, the last-push record and the lock file are bookkeeping.
NOT_STORE = ("var/cache/cloud", "var/log", "var/lib/vr/last_push.json", "var/lib/vr/store.lock")


def snapshot(root: Path, exclude: tuple[str, ...] = NOT_STORE) -> Snapshot:
    """Every directory, file (bytes and mode) and symlink (target) under ``root``."""
    out: Snapshot = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            if any(rel == e or rel.startswith(e + "/") for e in exclude):
                continue
            st = full.lstat()
            if stat.S_ISLNK(st.st_mode):
                out[rel] = ("link", os.readlink(full))
            elif stat.S_ISDIR(st.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st.st_mode))
            else:
                out[rel] = ("file", (full.read_bytes(), stat.S_IMODE(st.st_mode)))
    return out


def served_tree(paths: Paths) -> dict[str, bytes]:
    """What a file server rooted at ``latest/`` serves: visible names, links followed."""
    out: dict[str, bytes] = {}
    for folder in (paths.metadata_root, paths.userdata_root):
        for vm in sorted(os.listdir(folder)):
            if vm.startswith("."):
                continue
            for name in sorted(os.listdir(folder / vm)):
                out[f"{folder.name}/{vm}/{name}"] = (folder / vm / name).read_bytes()
    return out


def encode_tree(tree: dict[str, bytes]) -> dict[str, dict[str, str]]:
    """The golden-file form: text when UTF-8, else base64."""
    out = {}
    for k, v in tree.items():
        try:
            out[k] = {"text": v.decode("utf-8")}
        except UnicodeDecodeError:
            out[k] = {"base64": base64.b64encode(v).decode()}
    return out


def decode_tree(data: dict[str, dict[str, str]]) -> dict[str, bytes]:
    return {
        k: v["text"].encode("utf-8") if "text" in v else base64.b64decode(v["base64"])
        for k, v in data.items()
    }


def temp_names(root: Path) -> list[str]:
    """Temporary names (``.tmp-*``) anywhere under ``root``."""
    return [
        str(Path(d, n).relative_to(root))
        for d, dirs, files in os.walk(root)
        for n in dirs + files
        if n.startswith(".tmp-")
    ]


def drop(paths: Paths, name: str, payload: dict[str, Any] | bytes) -> Path:
    """Put a pushed file into ``<root>/var/cache/cloud`` as the management server does."""
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    f = paths.cache / name
    f.parent.mkdir(parents=True, exist_ok=True)
    f.write_bytes(data)
    return f


def vm_metadata(ip: str, *triples: list[object]) -> dict[str, Any]:
    return {"vm_ip_address": ip, "vm_metadata": list(triples), "type": "vmdata"}


@dataclass
class Run:
    code: int
    out: str
    err: str


def update_config(paths: Paths, *args: str) -> Run:
    """``update_config.py`` in-process with captured streams."""
    out, err = io.StringIO(), io.StringIO()
    code = Applier(paths).update_config(list(args), out, err)
    return Run(code, out.getvalue(), err.getvalue())


def apply_cfg(paths: Paths, *args: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    code = Applier(paths).apply_cfg(list(args), out, err)
    return Run(code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def kept_logging() -> Iterator[None]:
    """Put the root logger back as it was after code that calls ``logs.setup``."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    try:
        yield
    finally:
        for h in list(root.handlers):
            if h not in handlers:
                root.removeHandler(h)
                h.close()
        for h in handlers:
            if h not in root.handlers:
                root.addHandler(h)
        root.setLevel(level)


def ip(text: str) -> IPv4Address:
    return IPv4Address(text)
