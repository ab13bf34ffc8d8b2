"""The one way vr writes files: temp file in the same directory, fsync, chmod, rename.

:class:`Transaction` stages many writes and directory swaps and makes them visible
together: everything that needs disk space happens in :meth:`Transaction.stage_*`;
:meth:`Transaction.commit` only renames (which needs no space) and fsyncs the
directories. A failure before commit leaves no trace under any real name.

A batch of many VMs stages thousands of files: a *group commit*
(``Transaction(group=True)``) writes them without an fsync each and makes them
durable with one :func:`syncfs` barrier before the first rename, which is the order
a power cut needs (data on disk before any name points at it) at one flush per batch.

A process killed in the middle of a commit's renames would leave some of them done.
With a ``journal`` path the list of renames is written (atomically, fsynced) before
the first one; :func:`roll_forward` run by the next writer finishes them, so a
transaction is all-or-nothing even across ``kill -9``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import functools
import json
import logging
import os
import secrets
import shutil
from pathlib import Path

from vr.errors import DiskFullError, StoreError

LOG = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
"""Every temporary name starts with this; pushed names can never start with '.'."""


def _tmp_name(final: Path) -> Path:
    return final.with_name(f"{TMP_PREFIX}{final.name}.{secrets.token_hex(4)}")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def syncfs(path: Path) -> None:
    """Flush every written page and inode of the file system holding ``path``
    (``syncfs(2)``: one barrier for a group commit instead of one fsync per file)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        if _libc().syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise StoreError(f"cannot flush the file system of {path}: {os.strerror(err)}")
    finally:
        os.close(fd)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def space_error(exc: OSError, what: Path) -> StoreError:
    """The error for a failed write of ``what``: disk full, or what the OS said."""
    return _space_error(exc, what)


def _space_error(exc: OSError, what: Path) -> StoreError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskFullError(f"disk full: no space left on device while writing {what}")
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


def discard_tree(path: Path) -> None:
    """Remove ``path`` so that no reader sees it half-deleted.

    It is first renamed to a temporary name (one atomic step), then deleted: a
    reader that finds ``path`` by name after reading from it knows it read it whole.
    """
    tmp = _tmp_name(path)
    try:
        os.rename(path, tmp)
    except FileNotFoundError:
        return
    remove_tree(tmp)


class Transaction:
    """Stage writes; make them visible together with :meth:`commit`.

    ``journal``: where to record the renames of a multi-step commit (see the module
    docstring); the caller must run :func:`roll_forward` on it before its next
    transaction, under the same lock.
    """

    def __init__(self, journal: Path | None = None, *, group: bool = False) -> None:
        """``group``: stage without fsyncs; :meth:`commit` flushes once (see the module
        docstring). For many files; one file's fsync is cheaper than a file system flush."""
        self._journal = journal
        self._sync = not group
        self._decided = False
        self._renames: list[tuple[Path, Path]] = []
        self._temps: list[Path] = []
        self._dirs: set[Path] = set()
        # group commit only: staged content -> a file already holding it, so a batch
        # hard-links repeated files (immutable once staged) instead of making an inode
        # each; ext4 spends far more on a new inode than on a new name.
        self._shared: dict[tuple[str, bytes], Path] | None = {} if group else None

    def stage_file(
        self, path: Path, data: bytes, mode: int = 0o644, mtime_ns: int | None = None
    ) -> None:
        """Write ``data`` under a temp name next to ``path``; renamed on commit.

        ``mtime_ns`` sets the file's modification time (for change stamps).
        """
        tmp = _tmp_name(path)
        self._temps.append(tmp)
        try:
            write_file(tmp, data, mode, sync=self._sync)
            if mtime_ns is not None:
                os.utime(tmp, ns=(mtime_ns, mtime_ns))
        except OSError as exc:
            raise _space_error(exc, path) from exc
        self._renames.append((tmp, path))
        self._dirs.add(path.parent)

    def stage_tree(
        self,
        path: Path,
        files: dict[str, dict[str, bytes]],
        links: dict[str, str] | None = None,
    ) -> None:
        """Create directory ``path`` holding ``{subdir: {name: bytes}}`` and the symlinks
        ``links`` (``{name: target}``) at its top; renamed on commit.

        File names must already be validated; the tree is fsynced before commit.
        """
        tmp = _tmp_name(path)
        self._temps.append(tmp)
        try:
            tmp.mkdir()
            # served files: readable by the web server whatever the umask
            os.chmod(tmp, 0o755)  # noqa: S103
            for sub, entries in files.items():
                d = tmp / sub
                d.mkdir()
                os.chmod(d, 0o755)  # noqa: S103
                for name, data in entries.items():
                    self._write_shared(d / name, data)
                if self._sync:
                    fsync_dir(d)
            for name, target in (links or {}).items():
                self._symlink_shared(target, tmp / name)
            if self._sync:
                fsync_dir(tmp)
        except OSError as exc:
            raise _space_error(exc, path) from exc
        self._renames.append((tmp, path))
        self._dirs.add(path.parent)

    def _write_shared(self, path: Path, data: bytes) -> None:
        """A served file (0644): a hard link to an identical one staged before, if any."""
        if self._shared is not None and self._link(("f", data), path):
            return
        write_file(path, data, 0o644, sync=self._sync)
        if self._shared is not None:
            self._shared[("f", data)] = path

    def _symlink_shared(self, target: str, path: Path) -> None:
        if self._shared is not None and self._link(("l", target.encode()), path):
            return
        os.symlink(target, path)
        if self._shared is not None:
            self._shared[("l", target.encode())] = path

    def _link(self, key: tuple[str, bytes], path: Path) -> bool:
        assert self._shared is not None
        src = self._shared.get(key)
        if src is None:
            return False
        try:
            os.link(src, path, follow_symlinks=False)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise
            # too many links (EMLINK) or the source is gone: a new inode instead
            del self._shared[key]
            return False
        return True

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
        """Make every staged change visible (renames only), then fsync the folders.

        Once the journal is written the change is decided: if a rename fails or the
        process is interrupted half-way, the remaining renames are finished from the
        journal (now, or by the next writer's :func:`roll_forward`), never undone.
        """
        if not self._sync and self._renames:
            syncfs(self._renames[0][0].parent)
        journal = self._journal if len(self._renames) > 1 else None
        if journal is not None:
            pairs = [[str(tmp), str(final)] for tmp, final in self._renames]
            atomic_write(journal, json.dumps(pairs).encode(), 0o600)
            self._decided = True
        try:
            for tmp, final in self._renames:
                os.replace(tmp, final)
        except BaseException as exc:
            if journal is not None:
                with contextlib.suppress(Exception):
                    roll_forward(journal)
            if isinstance(exc, OSError):
                raise StoreError(f"cannot make the change visible: {exc}") from exc
            raise
        self._renames.clear()
        self._temps.clear()
        for d in sorted(self._dirs):
            fsync_dir(d)
        if journal is not None:
            journal.unlink()
            fsync_dir(journal.parent)

    def abort(self) -> None:
        """Remove everything staged; real names were never touched.

        After the journal was written nothing is removed: the journal decides.
        """
        if self._decided:
            return
        for tmp in self._temps:
            remove_tree(tmp)
        self._temps.clear()
        self._renames.clear()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None:
            self.abort()


def roll_forward(journal: Path) -> int:
    """Finish the renames of a commit that was interrupted; returns how many were done.

    A temporary name that no longer exists was already renamed: renames are done in
    journal order and temporary names are never reused.
    """
    try:
        pairs = json.loads(journal.read_bytes())
    except FileNotFoundError:
        return 0
    except ValueError:
        LOG.warning("ignoring unreadable journal %s", journal)
        journal.unlink()
        return 0
    done = 0
    dirs: set[Path] = set()
    for tmp, final in pairs:
        if os.path.lexists(tmp):
            try:
                os.replace(tmp, final)
            except OSError as exc:
                LOG.error("cannot finish rename %s -> %s: %s", tmp, final, exc)
                continue
            done += 1
        dirs.add(Path(final).parent)
    for d in sorted(dirs):
        fsync_dir(d)
    journal.unlink()
    fsync_dir(journal.parent)
    LOG.warning("finished %d renames of an interrupted commit (journal %s)", done, journal)
    return done


class StagedFile:
    """A file received piece by piece (an upload) under a temp name next to ``path``.

    Nothing appears under the real name until :meth:`commit` (fsync, chmod, rename,
    fsync of the folder); :meth:`abort` removes the temp file. ``mode`` defaults to
    0600: an upload may carry a password. A process killed
    mid-upload leaves only a ``.tmp-`` file, which callers sweep at start-up.
    """

    def __init__(self, path: Path, mode: int = 0o600) -> None:
        self.path = path
        self.mode = mode
        self.tmp = _tmp_name(path)
        self.size = 0
        try:
            self._fd: int | None = os.open(
                self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            raise _space_error(exc, path) from exc

    def write(self, data: bytes, offset: int | None = None) -> None:
        """Write ``data`` at ``offset`` (default: after what was written so far)."""
        if self._fd is None:
            raise StoreError(f"upload of {self.path} already finished")
        pos = self.size if offset is None else offset
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self._fd, view, pos)
                view = view[n:]
                pos += n
        except OSError as exc:
            raise _space_error(exc, self.path) from exc
        self.size = max(self.size, pos)

    def commit(self) -> None:
        """Make the complete file visible under its real name."""
        if self._fd is None:
            raise StoreError(f"upload of {self.path} already finished")
        fd, self._fd = self._fd, None
        try:
            os.fchmod(fd, self.mode)
            os.fsync(fd)
            os.close(fd)
            os.replace(self.tmp, self.path)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            raise _space_error(exc, self.path) from exc
        fsync_dir(self.path.parent)

    def abort(self) -> None:
        """Drop what was received; the real name is untouched. Safe to call twice."""
        if self._fd is not None:
            fd, self._fd = self._fd, None
            with contextlib.suppress(OSError):
                os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)

    @property
    def finished(self) -> bool:
        return self._fd is None


def sweep_temps(folder: Path) -> list[Path]:
    """Remove ``.tmp-`` leftovers of interrupted writes directly in ``folder``."""
    removed: list[Path] = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for n in names:
        if n.startswith(TMP_PREFIX):
            remove_tree(folder / n)
            removed.append(folder / n)
    return removed
