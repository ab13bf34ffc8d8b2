"""Host keys are made once and reused; authorized keys follow the file."""

from __future__ import annotations

import base64
import os
import stat
import struct
from pathlib import Path

import paramiko
import pytest

from vr.agent.keys import RACY_NS, AuthorizedKeys, load_host_keys, parse_authorized_keys
from vr.paths import Paths


def blob(kind: str, payload: bytes = b"\x01\x02") -> bytes:
    return struct.pack(">I", len(kind)) + kind.encode() + payload


def line(kind: str, payload: bytes = b"\x01\x02", comment: str = "mgmt") -> str:
    return f"{kind} {base64.b64encode(blob(kind, payload)).decode()} {comment}"


def test_plain_key_lines_are_accepted() -> None:
    text = "\n".join(
        ["# management server", line("ssh-ed25519"), line("ssh-rsa"), "", line("ssh-rsa")]
    )
    parsed = parse_authorized_keys(text)
    assert parsed.blobs == {blob("ssh-ed25519"), blob("ssh-rsa")}
    assert parsed.problems == ()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('from="10.0.0.1" ' + line("ssh-rsa"), "key options"),
        ("ssh-rsa !!!notbase64", "not valid base64"),
        (f"ssh-rsa {base64.b64encode(blob('ssh-ed25519')).decode()}", "does not match"),
        ("ssh-rsa", "no key"),
    ],
)
def test_lines_that_would_be_misread_are_reported_and_not_used(text: str, problem: str) -> None:
    parsed = parse_authorized_keys(text)
    assert parsed.blobs == frozenset()
    assert len(parsed.problems) == 1 and problem in parsed.problems[0]
    assert parsed.problems[0].startswith("line 1:")


def test_authorized_keys_are_reread_when_the_file_changes(tmp_path: Path) -> None:
    first = paramiko.RSAKey.generate(1024)
    second = paramiko.RSAKey.generate(1024)
    path = tmp_path / "authorized_keys"
    keys = AuthorizedKeys(path)
    assert not keys.allows(first)  # missing file: nobody
    path.write_text(f"ssh-rsa {first.get_base64()} one\n")
    assert keys.allows(first) and not keys.allows(second)
    path.write_text(f"ssh-rsa {second.get_base64()} two\n# now rotated\n")
    assert keys.allows(second) and not keys.allows(first)
    path.unlink()
    assert not keys.allows(second)


def test_a_key_swapped_within_one_file_time_tick_is_still_noticed(tmp_path: Path) -> None:
    """Same size, same inode, same mtime (restored): only the racy re-read sees it."""
    first = paramiko.RSAKey.generate(1024)
    second = paramiko.RSAKey.generate(1024)
    path = tmp_path / "authorized_keys"
    path.write_text(f"ssh-rsa {first.get_base64()} k\n")
    st = os.stat(path)
    keys = AuthorizedKeys(path, clock_ns=lambda: st.st_mtime_ns + 1000)
    assert keys.allows(first)
    with open(path, "r+") as f:  # in place, same length
        f.write(f"ssh-rsa {second.get_base64()} k\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_size == st.st_size
    assert keys.allows(second) and not keys.allows(first)


def test_a_file_older_than_the_racy_window_is_not_read_at_every_login(tmp_path: Path) -> None:
    """The counterpart: past the window the stat signature alone decides (one stat
    per login), so the same in-place swap with the mtime restored goes unseen."""
    first, second = paramiko.RSAKey.generate(1024), paramiko.RSAKey.generate(1024)
    path = tmp_path / "authorized_keys"
    path.write_text(f"ssh-rsa {first.get_base64()} k\n")
    st = os.stat(path)
    keys = AuthorizedKeys(path, clock_ns=lambda: st.st_mtime_ns + 10 * RACY_NS)
    assert keys.allows(first)
    with open(path, "r+") as f:
        f.write(f"ssh-rsa {second.get_base64()} k\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert keys.allows(first)


def test_host_keys_are_created_private_and_reused(paths: Paths) -> None:
    first = load_host_keys(paths.host_keys)
    assert sorted(k.get_name() for k in first) == ["ssh-ed25519", "ssh-rsa"]
    for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key"):
        mode = stat.S_IMODE(os.stat(paths.host_keys / name).st_mode)
        assert mode == 0o600
        assert (paths.host_keys / f"{name}.pub").read_text().startswith("ssh-")
    again = load_host_keys(paths.host_keys)
    assert [k.asbytes() for k in again] == [k.asbytes() for k in first]


def test_a_host_key_with_loose_permissions_is_tightened(paths: Paths) -> None:
    load_host_keys(paths.host_keys)
    key = paths.host_keys / "ssh_host_ed25519_key"
    os.chmod(key, 0o644)
    load_host_keys(paths.host_keys)
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
