"""The SCP sink against a scripted peer: what lands in the cache folder, what is refused."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vr.agent.scp import ProtocolBroken, ScpSink
from vr.paths import Paths


class ScriptedPeer:
    """Hands the sink the source's bytes in small pieces and records the replies."""

    def __init__(self, data: bytes, piece: int = 7) -> None:
        self.data = data
        self.piece = piece
        self.sent = b""

    def recv(self, nbytes: int) -> bytes:
        chunk, self.data = (
            self.data[: min(nbytes, self.piece)],
            self.data[min(nbytes, self.piece) :],
        )
        return chunk

    def sendall(self, data: bytes) -> None:
        self.sent += data


def file_msg(name: str, body: bytes, mode: str = "0644") -> bytes:
    return f"C{mode} {len(body)} {name}\n".encode() + body + b"\0"


def sink(paths: Paths, peer: ScriptedPeer, name: str | None = None, limit: int = 1000) -> ScpSink:
    return ScpSink(peer, paths.cache, name, limit, peer="192.0.2.9:4000")


def visible(paths: Paths) -> list[str]:
    return sorted(n for n in os.listdir(paths.cache) if (paths.cache / n).is_file())


def test_files_are_received_under_their_own_names(paths: Paths) -> None:
    body = b'{"vm_ip_address": "10.1.1.5"}\n'
    peer = ScriptedPeer(b"T1700000000 0 1700000000 0\n" + file_msg("vm_metadata.json.a1", body))
    result = sink(paths, peer).run()
    assert result.received == ["vm_metadata.json.a1"] and result.exit_code == 0
    assert (paths.cache / "vm_metadata.json.a1").read_bytes() == body
    assert peer.sent == b"\0" * 4  # ready, times, go, done


class ClosingPeer(ScriptedPeer):
    """Trilead's SCPClient: sends ``E`` after the file and closes without reading the reply."""

    def sendall(self, data: bytes) -> None:
        if self.sent == b"\0" * 3:  # ready, go, done: the reply to E finds the channel gone
            raise OSError("Socket is closed")
        super().sendall(data)


def test_a_source_that_closes_right_after_e_still_delivers_its_file(paths: Paths) -> None:
    body = b'{"vm_ip_address": "10.1.1.6"}'
    peer = ClosingPeer(file_msg("vm_metadata.json.t1", body) + b"E\n")
    result = sink(paths, peer).run()
    assert result.received == ["vm_metadata.json.t1"] and result.exit_code == 0
    assert (paths.cache / "vm_metadata.json.t1").read_bytes() == body


def test_a_fixed_target_name_wins_over_the_sent_name(paths: Paths) -> None:
    peer = ScriptedPeer(file_msg("local-name.json", b"{}"))
    sink(paths, peer, name="vm_password.json.b2").run()
    assert visible(paths) == ["vm_password.json.b2"]


def test_an_oversized_file_is_refused_and_the_next_one_still_arrives(paths: Paths) -> None:
    big = f"C0644 {5000} big.json\n".encode()
    peer = ScriptedPeer(big + file_msg("small.json", b"{}"))
    result = sink(paths, peer, limit=1000).run()
    assert b"\x01scp: big.json: 5000 bytes is too large; at most 1000 bytes\n" in peer.sent
    assert result.refused and result.exit_code == 1
    assert visible(paths) == ["small.json"]


@pytest.mark.parametrize("name", ["../etc/passwd", ".hidden", "a/b", ".."])
def test_bad_names_are_refused_and_nothing_is_written(paths: Paths, name: str) -> None:
    peer = ScriptedPeer(f"C0644 2 {name}\n".encode())
    result = sink(paths, peer).run()
    assert peer.sent.startswith(b"\0\x01scp: file name=")
    assert result.exit_code == 1
    assert visible(paths) == []
    assert not any(paths.root.parent.rglob("passwd"))


def test_a_transfer_that_breaks_off_leaves_no_file_and_no_temp(paths: Paths) -> None:
    peer = ScriptedPeer(b"C0644 100 vm_metadata.json.c3\n" + b"x" * 40)
    with pytest.raises(ProtocolBroken):
        sink(paths, peer).run()
    assert sorted(os.listdir(paths.cache)) == ["failed", "processed"]


def test_a_source_error_after_the_data_drops_the_file(paths: Paths) -> None:
    peer = ScriptedPeer(b"C0644 3 f.json\nabc\x01scp: f.json: read error\n")
    result = sink(paths, peer).run()
    assert visible(paths) == [] and result.exit_code == 1


def test_directories_are_refused(paths: Paths) -> None:
    peer = ScriptedPeer(b"D0755 0 sub\n" + file_msg("f.json", b"{}") + b"E\n")
    result = sink(paths, peer).run()
    assert b"\x02scp: directories are not accepted" in peer.sent
    assert result.exit_code == 1 and visible(paths) == []


def test_a_refused_target_answers_the_handshake_with_the_reason(paths: Paths) -> None:
    peer = ScriptedPeer(file_msg("f.json", b"{}"))
    result = sink(paths, peer).refuse_target("'/etc': uploads go only to /var/cache/cloud/")
    assert peer.sent == b"\x01scp: '/etc': uploads go only to /var/cache/cloud/\n"
    assert result.exit_code == 1 and visible(paths) == []


def test_a_malformed_control_line_ends_the_session(paths: Paths, tmp_path: Path) -> None:
    peer = ScriptedPeer(b"C0644 notanumber f.json\n")
    with pytest.raises(ProtocolBroken):
        sink(paths, peer).run()
    assert visible(paths) == []


def test_a_received_file_is_readable_only_by_root_whatever_mode_was_sent(paths: Paths) -> None:
    class Watching(ScriptedPeer):
        """Notes the temp file's mode each time the sink reads more of the upload."""

        staged_modes: list[int]

        def recv(self, nbytes: int) -> bytes:
            self.staged_modes += [
                os.stat(paths.cache / n).st_mode & 0o777
                for n in os.listdir(paths.cache)
                if n.startswith(".tmp-")
            ]
            return super().recv(nbytes)

    peer = Watching(file_msg("vm_password.json.f6", b'{"password": "x"}' * 3, mode="0666"))
    peer.staged_modes = []
    sink(paths, peer).run()
    assert peer.staged_modes and set(peer.staged_modes) == {0o600}
    assert os.stat(paths.cache / "vm_password.json.f6").st_mode & 0o777 == 0o600
