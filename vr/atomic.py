"""The one way vr writes files: temp file in the same directory, fsync, chmod, rename.

:class:`Transaction` stages many writes and directory swaps and makes them visible
together: everything that needs disk space happens in :meth:`Transaction.stage_*`;
:meth:`Transaction.commit` only renames (which needs no space) and fsyncs the
directories. A failure before commit leaves no trace under any real name.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from pathlib import Path

from vr.errors import DiskFullError, StoreError

TMP_PREFIX = ".tmp-"


def _tmp_name(final: Path) -> Path:
    return final.with_name(f"{TMP_PREFIX}{final.name}.{secrets.token_hex(4)}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _space_error(exc: OSError, what: Path) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"no space left on device while writing {what}")
    return StoreError(f"cannot write {what}: {exc.strerror or exc}")


def write_file(path: Path, data: bytes, mode: int = 0o644, *, sync: bool = True) -> None:
    """Write ``data`` to a new file at ``path`` (which must not be visible yet)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        os.fchmod(fd, mode)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    tmp = _tmp_name(path)
    try:
        write_file(tmp, data, mode)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise _space_error(exc, path) from exc
    fsync_dir(path.parent)


def remove_tree(path: Path) -> None:
    """Remove a file, symlink or directory tree; missing is fine."""
    if path.is_symlink() or path.is_file():
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


class Transaction:
    """Stage writes; make them visible together with :meth:`commit`."""

    def __init__(self) -> None:
        self._renames: list[tuple[Path, Path]] = []
        self._temps: list[Path] = []
        self._dirs: set[Path] = set()

    def stage_file(
        self, path: Path, data: bytes, mode: int = 0o644, mtime_ns: int | None = None
    ) -> None:
        """Write ``data`` under a temp name next to ``path``; renamed on commit.

        ``mtime_ns`` sets the file's modification time (for change stamps).
        """
        tmp = _tmp_name(path)
        self._temps.append(tmp)
        try:
            write_file(tmp, data, mode)
            if mtime_ns is not None:
                os.utime(tmp, ns=(mtime_ns, mtime_ns))
        except OSError as exc:
            raise _space_error(exc, path) from exc
        self._renames.append((tmp, path))
        self._dirs.add(path.parent)

    def stage_tree(self, path: Path, files: dict[str, dict[str, bytes]]) -> None:
        """Create directory ``path`` holding ``{subdir: {name: bytes}}``; renamed on commit.

        File names must already be validated; the tree is fsynced before commit.
        """
        tmp = _tmp_name(path)
        self._temps.append(tmp)
        try:
            tmp.mkdir(mode=0o755)
            for sub, entries in files.items():
                d = tmp / sub
                d.mkdir(mode=0o755)
                for name, data in entries.items():
                    write_file(d / name, data, 0o644)
                fsync_dir(d)
            fsync_dir(tmp)
        except OSError as exc:
            raise _space_error(exc, path) from exc
        self._renames.append((tmp, path))
        self._dirs.add(path.parent)

    def stage_symlink(self, link: Path, target: str) -> None:
        """Point ``link`` at ``target`` (relative); swapped atomically on commit."""
        tmp = _tmp_name(link)
        self._temps.append(tmp)
        try:
            os.symlink(target, tmp)
        except OSError as exc:
            raise _space_error(exc, link) from exc
        self._renames.append((tmp, link))
        self._dirs.add(link.parent)

    def commit(self) -> None:
        """Make every staged change visible (renames only), then fsync the folders."""
        for tmp, final in self._renames:
            os.replace(tmp, final)
        self._renames.clear()
        self._temps.clear()
        for d in sorted(self._dirs):
            fsync_dir(d)

    def abort(self) -> None:
        """Remove everything staged; real names were never touched."""
        for tmp in self._temps:
            remove_tree(tmp)
        self._temps.clear()
        self._renames.clear()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()
