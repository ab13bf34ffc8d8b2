"""The SFTP subsystem, confined to the cache folder and to uploads.

Used by OpenSSH ``scp`` (its default SFTP mode), ``sftp`` and paramiko clients.
The session's only directory is ``/var/cache/cloud`` (also its home, so relative
names land there). Files can be created and written; reading, removing, renaming,
links and directories are refused. An upload is staged under a temp name and
renamed when the client closes it; if the session ends first, it is dropped.
"""

from __future__ import annotations

import contextlib
import logging
import os
import posixpath
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paramiko
from paramiko.sftp import CMD_CLOSE, SFTP_FAILURE, SFTP_OK, SFTP_PERMISSION_DENIED

from vr import atomic
from vr.agent.scp import UPLOAD_MODE
from vr.cloudstack import CACHE_DIR, OutsideCache, cache_name
from vr.errors import VRError

LOG = logging.getLogger(__name__)

_SFTP_OP_UNSUPPORTED = 8


@dataclass
class SftpContext:
    """What one SFTP session needs from its connection."""

    cache: Path
    max_bytes: int
    peer: str
    touch: Callable[[], None]


class UploadHandle(paramiko.SFTPHandle):
    def __init__(self, ctx: SftpContext, name: str, staged: atomic.StagedFile) -> None:
        super().__init__()
        self.ctx = ctx
        self.name = name
        self.staged = staged
        self.problem: str | None = None
        self.session_ended = False

    def write(self, offset: int, data: Any) -> int:
        self.ctx.touch()
        if self.problem is not None:
            return SFTP_FAILURE
        if offset + len(data) > self.ctx.max_bytes:
            self.problem = f"larger than {self.ctx.max_bytes} bytes"
            LOG.warning(
                "sftp upload of %s from %s refused: %s", self.name, self.ctx.peer, self.problem
            )
            self.staged.abort()
            return SFTP_FAILURE
        try:
            self.staged.write(data, offset)
        except VRError as exc:
            self.problem = str(exc)
            LOG.error("sftp upload of %s from %s failed: %s", self.name, self.ctx.peer, exc)
            self.staged.abort()
            return SFTP_FAILURE
        return SFTP_OK

    def read(self, offset: int, length: int) -> int:
        return SFTP_PERMISSION_DENIED

    def stat(self) -> paramiko.SFTPAttributes | int:
        attr = paramiko.SFTPAttributes()
        attr.st_size = self.staged.size
        attr.st_mode = 0o100000 | UPLOAD_MODE
        return attr

    def chattr(self, attr: paramiko.SFTPAttributes) -> int:
        # times and modes from `scp -p` / `sftp -p` are not kept; accepting keeps clients happy
        return SFTP_OK

    def finish(self) -> int:
        """Close: commit a complete upload, drop a failed or interrupted one."""
        if self.staged.finished:
            return SFTP_FAILURE if self.problem else SFTP_OK
        if self.session_ended or self.problem is not None:
            self.staged.abort()
            LOG.warning(
                "sftp upload of %s from %s dropped before completion", self.name, self.ctx.peer
            )
            return SFTP_FAILURE
        try:
            self.staged.commit()
        except VRError as exc:
            self.problem = str(exc)
            LOG.error("sftp upload of %s from %s failed: %s", self.name, self.ctx.peer, exc)
            return SFTP_FAILURE
        LOG.info(
            "received %s (%d bytes) by sftp from %s", self.name, self.staged.size, self.ctx.peer
        )
        return SFTP_OK

    def close(self) -> None:
        # paramiko calls this for handles still open when the session ends
        self.finish()


class CacheSFTPServer(paramiko.SFTPServer):
    """paramiko's SFTP server, but a failed commit on CLOSE is reported to the client."""

    def finish_subsystem(self) -> None:
        # like sshd when sftp-server exits: report status 0 before the channel closes
        chan = self.sock
        if isinstance(chan, paramiko.Channel):
            with contextlib.suppress(OSError, EOFError, paramiko.SSHException):
                chan.send_exit_status(0)
        super().finish_subsystem()

    def _process(self, t: int, request_number: int, msg: paramiko.Message) -> None:
        if t == CMD_CLOSE:
            handle = msg.get_binary()
            entry = self.file_table.get(handle)
            if isinstance(entry, UploadHandle):
                del self.file_table[handle]
                code = entry.finish()
                self._send_status(  # type: ignore[attr-defined]
                    request_number, code, entry.problem or None
                )
                return
            msg.rewind()
            msg.get_int()  # request id, as the base class expects the message after it
        super()._process(t, request_number, msg)  # type: ignore[misc]


class CacheSFTP(paramiko.SFTPServerInterface):
    """The filesystem view of an SFTP session: one folder, uploads only."""

    def __init__(self, server: Any, *args: Any, **kwargs: Any) -> None:
        super().__init__(server, *args, **kwargs)
        self.ctx: SftpContext = server.sftp_context()
        self.handles: list[UploadHandle] = []

    def session_started(self) -> None:
        LOG.debug("sftp session from %s", self.ctx.peer)

    def session_ended(self) -> None:
        for h in self.handles:
            h.session_ended = True

    def _target(self, path: str) -> str | None:
        self.ctx.touch()
        return cache_name(path)

    def canonicalize(self, path: str) -> str:
        full = posixpath.normpath(posixpath.join(CACHE_DIR, path or "."))
        return "/" + full.lstrip("/")

    def _stat(self, path: str) -> paramiko.SFTPAttributes | int:
        try:
            name = self._target(path)
        except OutsideCache:
            if self.canonicalize(path) in ("/", "/var", "/var/cache"):
                return self._dir_attr(posixpath.basename(path))
            return SFTP_PERMISSION_DENIED
        target = self.ctx.cache if name is None else self.ctx.cache / name
        try:
            st = os.stat(target)
        except OSError as exc:
            return paramiko.SFTPServer.convert_errno(exc.errno or 0)
        return paramiko.SFTPAttributes.from_stat(st, name or "cloud")

    def _dir_attr(self, name: str) -> paramiko.SFTPAttributes:
        return paramiko.SFTPAttributes.from_stat(os.stat(self.ctx.cache), name)

    def stat(self, path: str) -> paramiko.SFTPAttributes | int:
        return self._stat(path)

    def lstat(self, path: str) -> paramiko.SFTPAttributes | int:
        return self._stat(path)

    def list_folder(self, path: str) -> list[paramiko.SFTPAttributes] | int:
        try:
            if self._target(path) is not None:
                return SFTP_PERMISSION_DENIED
        except OutsideCache:
            return SFTP_PERMISSION_DENIED
        out = []
        for entry in os.scandir(self.ctx.cache):
            if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                continue
            out.append(paramiko.SFTPAttributes.from_stat(entry.stat(), entry.name))
        return out

    def open(
        self, path: str, flags: int, attr: paramiko.SFTPAttributes
    ) -> paramiko.SFTPHandle | int:
        try:
            name = self._target(path)
        except OutsideCache as exc:
            LOG.warning("sftp open from %s refused: %s", self.ctx.peer, exc)
            return SFTP_PERMISSION_DENIED
        if name is None or not flags & (os.O_WRONLY | os.O_RDWR):
            LOG.warning("sftp from %s: only uploads are allowed (%s)", self.ctx.peer, path)
            return SFTP_PERMISSION_DENIED
        if flags & os.O_APPEND:
            return _SFTP_OP_UNSUPPORTED
        try:
            staged = atomic.StagedFile(self.ctx.cache / name, UPLOAD_MODE)
        except VRError as exc:
            LOG.error("sftp upload of %s from %s failed: %s", name, self.ctx.peer, exc)
            return SFTP_FAILURE
        handle = UploadHandle(self.ctx, name, staged)
        self.handles.append(handle)
        return handle

    # nothing but uploads: no removing, renaming, links or folders
    def remove(self, path: str) -> int:
        return SFTP_PERMISSION_DENIED

    def rename(self, oldpath: str, newpath: str) -> int:
        return SFTP_PERMISSION_DENIED

    def posix_rename(self, oldpath: str, newpath: str) -> int:
        return SFTP_PERMISSION_DENIED

    def mkdir(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        return SFTP_PERMISSION_DENIED

    def rmdir(self, path: str) -> int:
        return SFTP_PERMISSION_DENIED

    def symlink(self, target_path: str, path: str) -> int:
        return SFTP_PERMISSION_DENIED

    def readlink(self, path: str) -> str | int:
        return SFTP_PERMISSION_DENIED

    def chattr(self, path: str, attr: paramiko.SFTPAttributes) -> int:
        try:
            name = self._target(path)
        except OutsideCache:
            return SFTP_PERMISSION_DENIED
        return SFTP_OK if name is not None else SFTP_PERMISSION_DENIED
