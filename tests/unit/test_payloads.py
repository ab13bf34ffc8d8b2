"""Pure parsing: what the management server sends becomes typed records, or an error."""

from __future__ import annotations

import base64
import json
from ipaddress import IPv4Address

import pytest

from vr.cloudstack import parse_cfg, parse_update_config_args
from vr.errors import PayloadError
from vr.payloads import (
    DELETE,
    PayloadLimits,
    VmMetadata,
    VmPassword,
    decode_userdata,
    parse_payload,
)

HEADER = "#Apache CloudStack Virtual Router Config File\n<version>\n1.0\n</version>\n"


def cfg(*blocks: str) -> str:
    return HEADER + "".join(blocks)


def file_block(name: str, body: str) -> str:
    return f"<file>\n/var/cache/cloud/{name}\n{body}\n</file>\n"


def script(args: str) -> str:
    return f"<script>\n/opt/cloud/bin/update_config.py {args}\n</script>\n"


def test_gson_payload_parses_into_entries_in_order() -> None:
    data = (
        b'{"vm_ip_address":"10.1.1.101","vm_metadata":[["userdata","user-data",null],'
        b'["metadata","service-offering","Caf\\\\u00E9"],["metadata","cloud-identifier",""],'
        b'["password","vm_password","secret"],["metadata","","ignored"]],"type":"vmdata",'
        b'"new_field_from_a_newer_cloudstack":true}'
    )
    p = parse_payload("vm_metadata.json.1", data)
    assert isinstance(p, VmMetadata)
    assert p.ip == IPv4Address("10.1.1.101")
    assert [(e.folder, e.name, e.content) for e in p.entries] == [
        ("userdata", "user-data", b""),
        ("metadata", "service-offering", b"Caf\\u00E9"),
        ("metadata", "cloud-identifier", DELETE),
    ]


def test_type_is_taken_from_the_file_name_when_missing() -> None:
    p = parse_payload("vm_password.json.77", b'{"ip_address":"10.1.1.5","password":"pw"}')
    assert isinstance(p, VmPassword)
    assert "pw" not in repr(p)


def test_the_last_triple_for_a_key_wins() -> None:
    obj = {
        "vm_ip_address": "10.1.1.5",
        "vm_metadata": [["metadata", "a", "1"], ["metadata", "a", "2"]],
    }
    p = parse_payload("vm_metadata.json", json.dumps(obj).encode())
    assert isinstance(p, VmMetadata)
    assert [(e.name, e.content) for e in p.entries] == [("a", b"2")]


@pytest.mark.parametrize(
    ("text", "data"),
    [
        ("I2Nsb3VkLWNvbmZpZwo=", b"#cloud-config\n"),
        ("I2Nsb3VkLWNvbmZpZwo", b"#cloud-config\n"),
        ("I2Nsb3VkLWNv\nbmZpZwo=\r\n", b"#cloud-config\n"),
        ("YQ", b"a"),
        ("", b""),
        ("+/+/", b"\xfb\xff\xbf"),
    ],
)
def test_user_data_accepts_standard_base64_with_optional_padding(text: str, data: bytes) -> None:
    assert decode_userdata(text, "10.1.1.5") == data


@pytest.mark.parametrize(
    "text",
    [
        "QUFB\nQUFB\n",
        "QUFB\r\nQUFB\r\n",
        "\nQUFB\n\nQUFB",
        "QUFBQUFB",
    ],
)
def test_user_data_may_be_wrapped_in_lines_of_any_length(text: str) -> None:
    assert decode_userdata(text, "10.1.1.5") == b"AAAAAA"


# Each text below would decode if the characters outside the alphabet were dropped, as
# CloudStack's b64decode (or b64decode(validate=False)) does: what is left is whole
# base64 and the length is a multiple of 4, so only the alphabet check refuses them.
@pytest.mark.parametrize(
    "text",
    [
        "-_-_",  # URL-safe for what standard base64 spells "+/+/"
        "QUFB-_-_",
        "aGk-_w==",
        "I2Nsb3VkLWNvbmZpZwo-_w==",
        "QUFB!!!!",
        "QUFB*.*.",
        "QUFB\x00\x00\x00\x00",
        "QUFBéééé",
        "Q U F B ",  # inner and trailing spaces
        "    QUFB",
        "QUFB\t\t\t\t",
        "QUFB\r\r\r\r",  # a lone CR is no line break
        "QUFB\f\v\f\v",
    ],
)
def test_user_data_outside_the_standard_alphabet_is_refused_naming_the_value(text: str) -> None:
    with pytest.raises(PayloadError) as err:
        decode_userdata(text, "10.1.1.5")
    message = str(err.value)
    assert message.startswith(f"VM 10.1.1.5: user-data={text!r}: expected standard base64")
    assert "URL-safe '-' and '_' are not accepted" in message


@pytest.mark.parametrize("text", ["QU=B", "QUFB=QUF", "QUFB\n=QUF"])
def test_user_data_with_padding_before_the_end_is_refused(text: str) -> None:
    with pytest.raises(PayloadError, match="expected standard base64"):
        decode_userdata(text, "10.1.1.5")


def test_user_data_limit_is_configurable_and_exact() -> None:
    limits = PayloadLimits(userdata_bytes=10)
    assert decode_userdata(base64.b64encode(b"x" * 10).decode(), "vm", limits) == b"x" * 10
    with pytest.raises(PayloadError, match="at most 10 bytes"):
        decode_userdata(base64.b64encode(b"x" * 11).decode(), "vm", limits)


def test_update_config_arguments_follow_cloudstack() -> None:
    assert parse_update_config_args(["vm_metadata.json.1"]) == ("vm_metadata.json.1", True)
    assert parse_update_config_args(["vm_metadata.json.1", "false"]) == (
        "vm_metadata.json.1",
        False,
    )
    assert parse_update_config_args(["/var/cache/cloud/x.json"]) == ("x.json", True)
    for bad in ([], ["a", "b", "c"], ["a", "maybe"], ["../etc/passwd"], ["/etc/passwd"]):
        with pytest.raises(PayloadError):
            parse_update_config_args(bad)


def test_cfg_items_carry_the_newline_vr_cfg_sh_echo_adds_and_still_parse() -> None:
    body = json.dumps({"vm_ip_address": "10.1.1.5", "vm_metadata": [["metadata", "a", "b"]]})
    batch = parse_cfg(cfg(file_block("vm_metadata.json.1", body), script("vm_metadata.json.1")))
    [item] = batch.items
    assert item.data == body.encode() + b"\n"
    assert item.archive is True
    assert isinstance(parse_payload(item.name, item.data), VmMetadata)


def test_cfg_without_a_final_newline_parses_the_same() -> None:
    text = cfg(file_block("a.json", "{}"), script("a.json false"))
    assert parse_cfg(text.rstrip("\n")) == parse_cfg(text)
    assert parse_cfg(text).items[0].archive is False


def test_cfg_keeps_items_in_script_order() -> None:
    text = cfg(
        file_block("a.json", "{}"), file_block("b.json", "{}"), script("b.json"), script("a.json")
    )
    assert [i.name for i in parse_cfg(text).items] == ["b.json", "a.json"]


@pytest.mark.parametrize(
    ("text", "says"),
    [
        (file_block("a.json", "{}"), "a <version> block"),
        (cfg("<file>\n/var/cache/cloud/a.json\n{}\n"), "a closing </file>"),
        (cfg(file_block("a.json", "{}"), script("b.json")), "a file defined earlier"),
        (cfg("<file>\n/etc/passwd\nx\n</file>\n"), "a path under /var/cache/cloud/"),
        (cfg("<file>\n/var/cache/cloud/../x\nx\n</file>\n"), "'../x'"),
        (cfg("<script>\n/bin/rm -rf /\n</script>\n"), "/opt/cloud/bin/update_config.py"),
        (cfg("garbage\n"), "<version>, <file> or <script>"),
        (HEADER.replace("1.0", "2.0"), "cfg version='2.0'"),
    ],
)
def test_malformed_cfg_is_rejected_with_the_line(text: str, says: str) -> None:
    with pytest.raises(PayloadError) as exc:
        parse_cfg(text)
    assert says in str(exc.value)


def test_cfg_with_a_lone_surrogate_in_a_file_is_a_payload_error() -> None:
    text = cfg(file_block("vm_metadata.json.a", '{"x": "\ud800"}'), script("vm_metadata.json.a"))
    with pytest.raises(PayloadError, match=r"cfg file vm_metadata.json.a=.*UTF-8 text"):
        parse_cfg(text)
