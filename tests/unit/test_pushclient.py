"""The management side's naming and batch format, checked against our own parser."""

from __future__ import annotations

import json
import re

import pytest

from vr.errors import PayloadError
from vr.payloads import parse_cfg, parse_payload
from vr.pushclient import Outcome, build_cfg, payload_stem, remote_name

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
