"""The SFTP view: one folder, uploads only, nothing visible before the client closes."""

from __future__ import annotations

import os

import paramiko
from paramiko.sftp import SFTP_FAILURE, SFTP_OK, SFTP_PERMISSION_DENIED

from vr.agent.sftp import CacheSFTP, SftpContext, UploadHandle
from vr.paths import Paths

WRITE = os.O_WRONLY | os.O_CREAT | os.O_TRUNC


class FakeConnection:
    """What CacheSFTP asks of its SSH connection."""

    def __init__(self, paths: Paths, limit: int = 1000) -> None:
        self.ctx = SftpContext(paths.cache, limit, "192.0.2.9:4000", lambda: None)

    def sftp_context(self) -> SftpContext:
        return self.ctx


def files(paths: Paths) -> list[str]:
    """Files under their real names (temps excluded)."""
    return sorted(
        n
        for n in os.listdir(paths.cache)
        if (paths.cache / n).is_file() and not n.startswith(".tmp-")
    )


def temps(paths: Paths) -> list[str]:
    return [n for n in os.listdir(paths.cache) if n.startswith(".tmp-")]


def upload(sftp: CacheSFTP, path: str, data: bytes) -> UploadHandle:
    handle = sftp.open(path, WRITE, paramiko.SFTPAttributes())
    assert isinstance(handle, UploadHandle)
    assert handle.write(0, data[:3]) == SFTP_OK
    assert handle.write(3, data[3:]) == SFTP_OK
    return handle


def test_an_upload_appears_only_when_the_client_closes_it(paths: Paths) -> None:
    sftp = CacheSFTP(FakeConnection(paths))
    handle = upload(sftp, "/var/cache/cloud/vm_metadata.json.d4", b'{"a": 1}')
    assert files(paths) == []
    assert handle.finish() == SFTP_OK
    assert temps(paths) == []
    assert (paths.cache / "vm_metadata.json.d4").read_bytes() == b'{"a": 1}'


def test_relative_names_land_in_the_cache_folder(paths: Paths) -> None:
    sftp = CacheSFTP(FakeConnection(paths))
    assert sftp.canonicalize(".") == "/var/cache/cloud"
    upload(sftp, "f.json", b"{}...").finish()
    assert files(paths) == ["f.json"]


def test_a_session_that_ends_mid_upload_leaves_nothing(paths: Paths) -> None:
    sftp = CacheSFTP(FakeConnection(paths))
    handle = upload(sftp, "/var/cache/cloud/f.json", b"half of it")
    sftp.session_ended()
    handle.close()  # what paramiko does with handles left open
    assert files(paths) == [] and temps(paths) == []


def test_an_upload_over_the_limit_fails_and_leaves_nothing(paths: Paths) -> None:
    sftp = CacheSFTP(FakeConnection(paths, limit=10))
    handle = sftp.open("/var/cache/cloud/f.json", WRITE, paramiko.SFTPAttributes())
    assert isinstance(handle, UploadHandle)
    assert handle.write(0, b"x" * 8) == SFTP_OK
    assert handle.write(8, b"x" * 8) == SFTP_FAILURE
    assert handle.finish() == SFTP_FAILURE
    assert "larger than 10 bytes" in (handle.problem or "")
    assert files(paths) == [] and temps(paths) == []


def test_paths_outside_the_cache_are_denied(paths: Paths) -> None:
    sftp = CacheSFTP(FakeConnection(paths))
    for path in ("/etc/passwd", "/var/cache/cloud/../../../etc/x", "/var/cache/cloud/.x"):
        assert sftp.open(path, WRITE, paramiko.SFTPAttributes()) == SFTP_PERMISSION_DENIED
    assert sftp.list_folder("/etc") == SFTP_PERMISSION_DENIED
    assert sftp.stat("/etc/passwd") == SFTP_PERMISSION_DENIED


def test_only_writing_is_allowed(paths: Paths) -> None:
    (paths.cache / "f.json").write_bytes(b"secret-ish")
    sftp = CacheSFTP(FakeConnection(paths))
    assert sftp.open("f.json", os.O_RDONLY, paramiko.SFTPAttributes()) == SFTP_PERMISSION_DENIED
    assert sftp.remove("f.json") == SFTP_PERMISSION_DENIED
    assert sftp.rename("f.json", "g.json") == SFTP_PERMISSION_DENIED
    assert sftp.mkdir("d", paramiko.SFTPAttributes()) == SFTP_PERMISSION_DENIED
    assert sftp.symlink("/etc/passwd", "l") == SFTP_PERMISSION_DENIED
    assert files(paths) == ["f.json"]


def test_the_folder_lists_pushed_files_but_not_temps(paths: Paths) -> None:
    sftp = CacheSFTP(FakeConnection(paths))
    (paths.cache / "f.json").write_bytes(b"{}")
    upload(sftp, "g.json", b"{}...")  # still open: only a temp file
    listing = sftp.list_folder("/var/cache/cloud")
    assert isinstance(listing, list)
    assert [a.filename for a in listing] == ["f.json"]


def mode(path: os.PathLike[str] | str) -> int:
    return os.stat(path).st_mode & 0o777


def test_an_upload_is_readable_only_by_root_while_staged_and_after(paths: Paths) -> None:
    sftp = CacheSFTP(FakeConnection(paths))
    attr = paramiko.SFTPAttributes()
    attr.st_mode = 0o100644  # what the client asks for does not loosen it
    handle = sftp.open("vm_password.json.e5", WRITE, attr)
    assert isinstance(handle, UploadHandle)
    assert handle.write(0, b'{"password": "x"}') == SFTP_OK
    assert [mode(paths.cache / t) for t in temps(paths)] == [0o600]
    assert handle.finish() == SFTP_OK
    assert mode(paths.cache / "vm_password.json.e5") == 0o600
