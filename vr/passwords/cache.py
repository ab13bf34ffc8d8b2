"""The password file as each worker sees it: parsed once, re-read when it changes."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from vr.errors import StoreError

RACY_NS = 2_000_000_000
"""A file younger than this may be rewritten within its timestamp tick: read again."""


@dataclass(frozen=True)
class PasswordEntry:
    password: str = field(repr=False)
    gen: int
    served: bool


class PasswordCache:
    """The parsed password file, re-read whenever ``stat`` shows another version.

    The version is (inode, size, mtime, ctime) of the file read. Every store write
    renames a new file into place, so the inode changes; an inode can be reused only
    after its file is gone, and a file read while still "racy" (younger than
    :data:`RACY_NS`) is read again on the next lookup, so two versions written in
    the same timestamp tick are never confused.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._version: tuple[int, int, int, int] | None = None
        self._racy = True
        self._entries: dict[str, PasswordEntry] = {}

    def get(self, ip: IPv4Address) -> PasswordEntry | None:
        self._refresh()
        return self._entries.get(str(ip))

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._version, self._entries, self._racy = None, {}, True
            return
        if not self._racy and self._version == _version(st):
            return
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                data = f.read()
        except FileNotFoundError:
            self._version, self._entries, self._racy = None, {}, True
            return
        self._entries = _parse_passwords(data, self.path)
        self._version = _version(st)
        self._racy = time.time_ns() - st.st_mtime_ns < RACY_NS


def _version(st: os.stat_result) -> tuple[int, int, int, int]:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _parse_passwords(data: bytes, path: Path) -> dict[str, PasswordEntry]:
    try:
        raw = json.loads(data)
        return {
            ip: PasswordEntry(str(rec["password"]), int(rec["gen"]), bool(rec["served"]))
            for ip, rec in raw.items()
        }
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        # the message names the file and the problem, never a value from it
        raise StoreError(f"{path}: not a password store ({type(exc).__name__})") from None
