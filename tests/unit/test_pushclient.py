"""The management side: naming and batch format (checked against our own parser), the
SSH connection against the agent's connection handling on loopback, the progress bar."""

from __future__ import annotations

import io
import json
import re
import stat
from pathlib import Path
from typing import Any, TextIO

import paramiko
import pytest

from tests.helpers.agent_loop import HOST, LoopAgent, loop_agent
from vr.agent import client as pushclient
from vr.agent.client import (
    Connection,
    Outcome,
    Progress,
    Target,
    payload_stem,
    push,
    remote_name,
)
from vr.cloudstack import build_cfg, parse_cfg
from vr.errors import PayloadError
from vr.paths import Paths
from vr.payloads import parse_payload

UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}"


def meta(ip: str) -> bytes:
    return json.dumps(
        {
            "vm_ip_address": ip,
            "vm_metadata": [["metadata", "local-hostname", "vm"]],
            "type": "vmdata",
        }
    ).encode()


@pytest.mark.parametrize(
    ("filename", "data", "stem"),
    [
        ("anything.json", meta("10.1.1.2"), "vm_metadata"),
        ("x", b'{"ip_address": "10.1.1.2", "password": "p", "type": "vmpassword"}', "vm_password"),
        ("vm_dhcp_entry.json", b'{"ipv4_address": "10.1.1.2"}', "vm_dhcp_entry"),
        ("guest_network.json.abc", b"not even json", "guest_network"),
    ],
)
def test_the_stem_comes_from_the_json_type_else_the_file_name(
    filename: str, data: bytes, stem: str
) -> None:
    assert payload_stem(filename, data) == stem


def test_a_payload_of_unknown_kind_is_refused_with_what_was_expected() -> None:
    with pytest.raises(PayloadError, match=r"vm_metadata\.json"):
        payload_stem("notes.txt", b'{"type": "firewall"}')


def test_remote_names_follow_cloudstack() -> None:
    name = remote_name("vm_metadata")
    assert re.fullmatch(rf"vm_metadata\.json\.{UUID}", name)
    assert remote_name("vm_metadata") != name


def test_a_batch_parses_back_to_the_same_files_in_order() -> None:
    items = [(remote_name("vm_metadata"), meta(f"10.1.1.{i}")) for i in range(2, 5)]
    text = build_cfg(items)
    assert text.startswith("#Apache CloudStack Virtual Router Config File\n<version>\n1.0\n")
    batch = parse_cfg(text)
    assert [i.name for i in batch.items] == [n for n, _ in items]
    for item, (_, data) in zip(batch.items, items, strict=True):
        assert json.loads(item.data) == json.loads(data)
        assert item.archive
        parse_payload(item.name, item.data)


def test_a_payload_that_would_break_the_batch_format_is_refused() -> None:
    with pytest.raises(PayloadError, match="</file>"):
        build_cfg([("f.json", b'{"a":\n</file>\n1}')])


def test_an_outcome_is_one_line() -> None:
    line = Outcome("a.json", "vm_metadata.json.1", False, "exit 1: rejected").line()
    assert line == "FAIL a.json -> vm_metadata.json.1: exit 1: rejected"


# --- against the agent's connection handling on loopback ---------------------------------


def meta_file(tmp_path: Path, n: int) -> Path:
    path = tmp_path / f"vm-{n}.json"
    path.write_bytes(meta(f"10.1.1.{n + 2}"))
    return path


def target(agent: LoopAgent, known_hosts: Path, **kw: Any) -> Target:
    return Target(HOST, agent.port, agent.client_key, known_hosts, timeout=20, **kw)


def test_a_stderr_bigger_than_the_channel_window_does_not_block_the_push(
    paths: Paths, tmp_path: Path
) -> None:
    big = 3 * 1024 * 1024  # paramiko's window is 2 MiB: stderr fills it before stdout ends

    def chatty(args: list[str], out: TextIO, err: TextIO) -> int:
        err.write("e" * big + "\n")
        out.write("done\n")
        return 0

    with loop_agent(paths, chatty) as agent:
        t = target(agent, tmp_path / "known_hosts", accept_new=True, command_timeout=20)
        with Connection(t) as conn:
            code, out, err = conn.run("/opt/cloud/bin/update_config.py f")
    assert (code, out) == (0, "done\n")
    assert len(err) == big + 1


def test_a_changed_host_key_is_refused_naming_the_host_and_the_known_hosts_file(
    paths: Paths, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "known_hosts"
    with loop_agent(paths) as agent:
        impostor = paramiko.RSAKey.generate(2048)
        known_hosts.write_text(f"[{HOST}]:{agent.port} ssh-rsa {impostor.get_base64()}\n")
        out, err = io.StringIO(), io.StringIO()
        code = push(target(agent, known_hosts), [meta_file(tmp_path, 1)], False, out, err)
        assert agent.applier.calls == []
    assert code == 1
    line = out.getvalue()
    assert f"host key of {HOST} (ssh-rsa {agent.host_key.fingerprint})" in line
    assert f"does not match {known_hosts}: expected {impostor.fingerprint}" in line
    assert known_hosts.read_text().count("\n") == 1  # not silently replaced


def test_accept_new_records_the_key_and_later_pushes_check_it_strictly(
    paths: Paths, tmp_path: Path
) -> None:
    known_hosts = tmp_path / "ssh" / "known_hosts"
    with loop_agent(paths) as agent:
        out = io.StringIO()
        first = push(target(agent, known_hosts, accept_new=True), [meta_file(tmp_path, 1)],
                     False, out, io.StringIO())  # fmt: skip
        assert first == 0, out.getvalue()
        recorded = known_hosts.read_text()
        assert recorded == f"[{HOST}]:{agent.port} ssh-rsa {agent.host_key.get_base64()}\n"
        assert stat.S_IMODE(known_hosts.stat().st_mode) == 0o600
        out = io.StringIO()
        again = push(
            target(agent, known_hosts), [meta_file(tmp_path, 2)], False, out, io.StringIO()
        )
        assert again == 0, out.getvalue()
        assert known_hosts.read_text() == recorded
        assert len(agent.applier.calls) == 2


# --- the progress bar --------------------------------------------------------------------


def test_the_progress_bar_advances_in_twentieths_and_counts_failures() -> None:
    stream = io.StringIO()
    progress = Progress(40, stream)
    for i in range(40):
        progress.advance(ok=i % 10 != 0)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 20
    assert lines[0] == "[#...................] 2/40 (1 failed)"
    assert lines[9] == "[##########..........] 20/40 (2 failed)"
    assert lines[-1] == "[####################] 40/40 (4 failed)"


def test_fewer_than_twenty_files_show_no_progress_bar() -> None:
    stream = io.StringIO()
    progress = Progress(19, stream)
    for _ in range(19):
        progress.advance(ok=True)
    assert stream.getvalue() == ""


class FakeConnection:
    """Stands in for :class:`vr.agent.client.Connection`: every command is applied."""

    def __init__(self, target: Target) -> None:
        self.uploaded: list[str] = []

    def upload(self, name: str, data: bytes) -> None:
        self.uploaded.append(name)

    def run(self, command: str) -> tuple[int, str, str]:
        return 0, "", f"{command.rsplit('/', 1)[-1]}: applied: no change (0.1 ms)\n"

    def close(self) -> None:
        pass

    def __enter__(self) -> FakeConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def test_pushing_many_files_one_by_one_shows_progress_but_a_batch_never_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pushclient, "Connection", FakeConnection)
    files = [meta_file(tmp_path, n) for n in range(25)]
    out, err = io.StringIO(), io.StringIO()
    assert push(Target("vr.example"), files, False, out, err) == 0
    assert len(out.getvalue().splitlines()) == 25
    assert err.getvalue().splitlines()[-1] == "[####################] 25/25 (0 failed)"
    out, err = io.StringIO(), io.StringIO()
    assert push(Target("vr.example"), files, True, out, err) == 0
    assert len(out.getvalue().splitlines()) == 25
    assert err.getvalue() == ""
