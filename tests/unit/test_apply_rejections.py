"""Every way a push can be invalid: one clear stderr line naming the VM (where there
is one), the field, the value and what was expected; exit 1; the store unchanged
(full tree snapshot); the file moved to failed/."""

from __future__ import annotations

import base64
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.store import apply_cfg, drop, snapshot, update_config, vm_metadata
from vr.paths import Paths

VM = "10.1.1.23"
META = "vm_metadata.json.3f1c"


@dataclass
class Bad:
    id: str
    payload: dict[str, Any] | bytes
    says: tuple[str, ...]
    name: str = META


def meta(*triples: list[object], ip: str = VM) -> dict[str, Any]:
    return vm_metadata(ip, ["metadata", "vm-id", "changed"], *triples)


def big_userdata(n: int) -> str:
    return base64.b64encode(b"\x00" * n).decode()


NET = {"device": "eth1", "router_guest_ip": "10.1.1.1", "cidr": "10.1.1.0/24",
       "add": True, "type": "guestnetwork"}  # fmt: skip
DHCP = {"mac_address": "02:00:0a:01:01:17", "ipv4_address": VM, "host_name": "web-1",
        "type": "dhcpentry"}  # fmt: skip

CASES = [
    Bad("bad-ip", vm_metadata("10.1.1.300"), ("vm_ip_address", "'10.1.1.300'", "IPv4 address")),
    Bad("ipv6", vm_metadata("fd00::17"), ("vm_ip_address", "'fd00::17'", "not IPv6")),
    Bad("loopback", vm_metadata("127.0.0.1"), ("vm_ip_address", "'127.0.0.1'", "unicast")),
    Bad("ip-not-string", vm_metadata(167837975), ("vm_ip_address", "167837975", "string")),  # type: ignore[arg-type]
    Bad("traversal", meta(["metadata", "../x", "v"]),
        (f"VM {VM}", "vm_metadata[1].file", "'../x'", "1-128 letters")),
    Bad("slash", meta(["metadata", "a/b", "v"]), (f"VM {VM}", "'a/b'", "1-128 letters")),
    Bad("hidden", meta(["metadata", ".hidden", "v"]),
        (f"VM {VM}", "'.hidden'", "not starting with '.'")),
    Bad("dot-dot-inside", meta(["metadata", "a..b", "v"]), (f"VM {VM}", "'a..b'", "'..'")),
    Bad("control-char", meta(["metadata", "a\x07b", "v"]),
        (f"VM {VM}", "'a\\x07b'", "1-128 letters")),
    Bad("overlong-name", meta(["metadata", "k" * 129, "v"]),
        (f"VM {VM}", "vm_metadata[1].file", "'kkkkkkkkkk", "1-128")),
    Bad("index-name", meta(["metadata", "meta-data", "v"]),
        (f"VM {VM}", "'meta-data'", "other than the index")),
    Bad("triple-not-list", meta({"folder": "metadata"}),  # type: ignore[arg-type]
        (f"VM {VM}", "vm_metadata[1]", "{'folder': 'metadata'}", "[folder, file, content]")),
    Bad("triple-too-short", meta(["metadata", "x"]),
        (f"VM {VM}", "vm_metadata[1]", "['metadata', 'x']", "[folder, file, content]")),
    Bad("triples-not-list", {"vm_ip_address": VM, "vm_metadata": "x", "type": "vmdata"},
        (f"VM {VM}", "vm_metadata='x'", "a list")),
    Bad("folder-not-string", meta([7, "x", "v"]),
        (f"VM {VM}", "vm_metadata[1].folder", "7", "'metadata' or 'userdata'")),
    Bad("content-number", meta(["metadata", "vm-id", 42]),
        (f"VM {VM}", "metadata/vm-id", "42", 'a string, "" (delete) or null')),
    Bad("content-list", meta(["metadata", "tags", ["a"]]),
        (f"VM {VM}", "metadata/tags", "['a']", "a string")),
    Bad("lone-surrogate", b'{"vm_ip_address":"10.1.1.23","vm_metadata":'
        b'[["metadata","vm-id","x\\ud800"]],"type":"vmdata"}',
        (f"VM {VM}", "metadata/vm-id", "'x\\ud800'", "Unicode text")),
    Bad("bad-base64", meta(["userdata", "user-data", "not base64!"]),
        (f"VM {VM}", "userdata/user-data", "'not base64!'", "standard base64")),
    Bad("url-safe-base64", meta(["userdata", "user-data", "I2Nsb3VkLWNvbm_pZwo-"]),
        (f"VM {VM}", "userdata/user-data", "'I2Nsb3VkLWNvbm_pZwo-'", "URL-safe")),
    Bad("base64-bad-padding", meta(["userdata", "user-data", "QUFB="]),
        (f"VM {VM}", "userdata/user-data", "'QUFB='", "complete if present")),
    Bad("base64-one-char-tail", meta(["userdata", "user-data", "QUFBQ"]),
        (f"VM {VM}", "userdata/user-data", "'QUFBQ'", "standard base64")),
    Bad("base64-inner-space", meta(["userdata", "user-data", "QUFB QUFB"]),
        (f"VM {VM}", "userdata/user-data", "'QUFB QUFB'", "standard base64")),
    Bad("oversized-userdata", meta(["userdata", "user-data", big_userdata(1024 * 1024 + 1)]),
        (f"VM {VM}", "userdata/user-data", "<1048577 bytes>", "at most 1048576 bytes")),
    Bad("oversized-value", meta(["metadata", "public-keys", "k" * (64 * 1024 + 1)]),
        (f"VM {VM}", "metadata/public-keys", "<65537 bytes>", "at most 65536 bytes")),
    Bad("too-many-keys", meta(*[["metadata", f"k{i}", "v"] for i in range(512)]),
        (f"VM {VM}", "vm_metadata", "<513 keys>", "at most 512 keys")),
    Bad("oversized-payload", meta(["metadata", "pad", "x" * 60000]) | {"junk": "y" * 4_200_000},
        (f"file {META}", "size", "bytes>", "at most 4194304 bytes")),
    Bad("malformed-json", b'{"vm_ip_address": "10.1.1.23", "vm_metadata": [',
        (f"file {META}", "JSON", "line 1 column", "one valid JSON object")),
    Bad("too-deep-json", b"[" * 100_000 + b"]" * 100_000,
        (f"file {META}", "JSON", "nested too deeply", "a flat JSON object")),
    Bad("json-not-object", b'["10.1.1.23"]', (f"file {META}", "JSON", "<list>", "a JSON object")),
    Bad("non-utf8", b'{"vm_ip_address":"10.1.1.23","vm_metadata":[["metadata","a","\xff"]]}',
        (f"file {META}", "encoding", "<byte 61>", "UTF-8")),
    Bad("unknown-type", {"type": "vmfoo"}, ("file foo.json", "type='vmfoo'", "one of dhcpentry"),
        name="foo.json"),
    Bad("type-not-string", {"type": ["vmdata"]}, ("file foo.json", "type=['vmdata']", "one of"),
        name="foo.json"),
    Bad("type-against-name", vm_metadata(VM, ["metadata", "a", "b"]),
        ("file vm_password.json.9", "type='vmdata'", "'vmpassword' as the file name says"),
        name="vm_password.json.9"),
    Bad("network-bad-cidr", NET | {"cidr": "10.1.1.5/24"},
        ("guest network eth1", "cidr='10.1.1.5/24'", "host bits zero"),
        name="guest_network.json.1"),
    Bad("network-cidr-not-string", NET | {"cidr": 167837952},
        ("guest network eth1", "cidr=167837952", "as a string"), name="guest_network.json.1"),
    Bad("network-ip-outside-cidr", NET | {"router_guest_ip": "10.2.0.1"},
        ("guest network eth1", "router_guest_ip='10.2.0.1'", "inside cidr 10.1.1.0/24"),
        name="guest_network.json.1"),
    Bad("network-ip-is-broadcast", NET | {"router_guest_ip": "10.1.1.255"},
        ("guest network eth1", "router_guest_ip='10.1.1.255'", "not its network/broadcast"),
        name="guest_network.json.1"),
    Bad("network-bad-device", NET | {"device": "eth1; reboot"},
        ("guest network", "device='eth1; reboot'", "interface name"),
        name="guest_network.json.1"),
    Bad("dhcp-bad-mac", DHCP | {"mac_address": "02:00:zz:01:01:17"},
        (f"VM {VM}", "mac_address='02:00:zz:01:01:17'", "MAC address like"),
        name="vm_dhcp_entry.json.1"),
    Bad("dhcp-bad-host-name", DHCP | {"host_name": "web_1!"},
        (f"VM {VM}", "host_name='web_1!'", "host name label"), name="vm_dhcp_entry.json.1"),
    Bad("dhcp-remove-not-bool", DHCP | {"remove": "maybe"},
        (f"VM {VM}", "remove='maybe'", "true or false"), name="vm_dhcp_entry.json.1"),
    Bad("password-missing", {"ip_address": VM, "type": "vmpassword"},
        (f"VM {VM}", "password=None", "present"), name="vm_password.json.1"),
    Bad("password-lone-surrogate", b'{"ip_address":"10.1.1.23","password":"ab\\ud800",'
        b'"type":"vmpassword"}',
        (f"VM {VM}", "password=<redacted>", "no lone surrogate"), name="vm_password.json.1"),
    Bad("ip-missing", {"vm_metadata": [["metadata", "vm-id", "x"]], "type": "vmdata"},
        ("vm_ip_address=None", "expected this field to be present")),
    Bad("password-bad-ip", {"ip_address": "10.1.1.300", "password": "x", "type": "vmpassword"},
        ("ip_address='10.1.1.300'", "an IPv4 address"), name="vm_password.json.1"),
    Bad("password-ip-missing", {"password": "x", "type": "vmpassword"},
        ("ip_address=None", "present"), name="vm_password.json.1"),
    Bad("dhcp-bad-ip", DHCP | {"ipv4_address": "10.1.1.999"},
        ("ipv4_address='10.1.1.999'", "an IPv4 address"), name="vm_dhcp_entry.json.1"),
    Bad("huge-integer", b'{"vm_ip_address":"10.1.1.23","vm_metadata":[["metadata","vm-id",'
        + b"7" * 5000 + b"]],\"type\":\"vmdata\"}",
        (f"file {META}", "vm_metadata[0][2]=<integer of 5000 digits: 77777",
         "a number of at most 4300 digits")),
    Bad("huge-integer-password", b'{"ip_address":"10.1.1.23","password":' + b"7" * 5000 + b"}",
        ("file vm_password.json.1", "password=<integer of 5000 digits>", "at most 4300 digits"),
        name="vm_password.json.1"),
    Bad("huge-negative-integer-in-unknown-field", b'{"vm_ip_address":"10.1.1.23","vm_metadata":[]'
        b',"x":{"y":-' + b"1" * 4301 + b"}}",
        (f"file {META}", "x.y=<integer of 4301 digits: -1111", "at most 4300 digits")),
    Bad("json-nan", b'{"vm_ip_address":"10.1.1.23","vm_metadata":[],"x":NaN}',
        (f"file {META}", "JSON='NaN'", "no NaN or Infinity")),
    Bad("duplicate-top-level-key", b'{"vm_ip_address":"10.1.1.23","vm_metadata":[],'
        b'"vm_ip_address":"10.1.1.24"}',
        (f"file {META}", "JSON key='vm_ip_address'", "each key at most once")),
    Bad("duplicate-nested-key", b'{"vm_ip_address":"10.1.1.23","vm_metadata":[],'
        b'"x":[{"a":1,"b":2,"a":3}]}',
        (f"file {META}", "JSON key='a'", "each key at most once")),
    Bad("duplicate-password-key", b'{"ip_address":"10.1.1.23","password":"One-1",'
        b'"password":"Two-2","type":"vmpassword"}',
        ("file vm_password.json.1", "JSON key='password'", "each key at most once"),
        name="vm_password.json.1"),
    *[Bad(f"password-{label}", {"ip_address": VM, "password": f"ab{ch}cd", "type": "vmpassword"},
          (f"VM {VM}", "password=<redacted>", "printable characters"), name="vm_password.json.1")
      for label, ch in (("c1-nel", "\x85"), ("c1-csi", "\x9b"), ("line-separator", "\u2028"),
                        ("paragraph-separator", "\u2029"), ("zero-width-space", "\u200b"),
                        ("bidi-override", "\u202e"), ("private-use", "\ue000"),
                        ("unassigned", "\U000e0080"), ("del", "\x7f"))],
    Bad("network-cidr-everything", NET | {"cidr": "0.0.0.0/0", "router_guest_ip": "10.1.1.1"},
        ("guest network eth1", "cidr='0.0.0.0/0'", "at most /8"), name="guest_network.json.1"),
    Bad("network-cidr-too-wide", NET | {"cidr": "10.0.0.0/7"},
        ("guest network eth1", "cidr='10.0.0.0/7'", "at most /8"), name="guest_network.json.1"),
    Bad("network-cidr-link-local", NET | {"cidr": "169.254.0.0/16",
                                          "router_guest_ip": "169.254.0.1"},
        ("guest network eth1", "router_guest_ip='169.254.0.1'", "outside link-local"),
        name="guest_network.json.1"),
    Bad("network-cidr-covers-link-local", NET | {"cidr": "169.0.0.0/8",
                                                 "router_guest_ip": "169.1.0.1"},
        ("guest network eth1", "cidr='169.0.0.0/8'", "not overlapping 169.254.0.0/16"),
        name="guest_network.json.1"),
    Bad("network-router-ip-metadata-address", NET | {"cidr": "169.254.169.0/24",
                                                     "router_guest_ip": "169.254.169.254"},
        ("guest network eth1", "router_guest_ip='169.254.169.254'", "outside link-local"),
        name="guest_network.json.1"),
    Bad("network-router-ip-loopback", NET | {"cidr": "127.0.0.0/8", "router_guest_ip": "127.0.0.1"},
        ("guest network eth1", "router_guest_ip='127.0.0.1'", "unicast"),
        name="guest_network.json.1"),
    Bad("network-router-ip-multicast", NET | {"cidr": "224.0.0.0/24",
                                              "router_guest_ip": "224.0.0.1"},
        ("guest network eth1", "router_guest_ip='224.0.0.1'", "unicast"),
        name="guest_network.json.1"),
    Bad("network-router-ip-unspecified", NET | {"cidr": "0.0.0.0/8", "router_guest_ip": "0.0.0.0"},
        ("guest network eth1", "router_guest_ip='0.0.0.0'", "unicast"),
        name="guest_network.json.1"),
    Bad("network-gateway-link-local", NET | {"router_guest_gateway": "169.254.0.1"},
        ("guest network eth1", "router_guest_gateway='169.254.0.1'", "outside link-local"),
        name="guest_network.json.1"),
    Bad("network-device-loopback", NET | {"device": "lo"},
        ("guest network", "device='lo'", "not the loopback 'lo'"), name="guest_network.json.1"),
    Bad("dhcp-broadcast-mac", DHCP | {"mac_address": "ff:ff:ff:ff:ff:ff"},
        (f"VM {VM}", "mac_address='ff:ff:ff:ff:ff:ff'", "not multicast/broadcast"),
        name="vm_dhcp_entry.json.1"),
    Bad("dhcp-multicast-mac", DHCP | {"mac_address": "01:00:5E:00:00:fb"},
        (f"VM {VM}", "mac_address='01:00:5E:00:00:fb'", "not multicast/broadcast"),
        name="vm_dhcp_entry.json.1"),
    Bad("dhcp-zero-mac", DHCP | {"mac_address": "00:00:00:00:00:00"},
        (f"VM {VM}", "mac_address='00:00:00:00:00:00'", "not all zero"),
        name="vm_dhcp_entry.json.1"),
    Bad("network-multicast-mac", NET | {"mac_address": "33:33:00:00:00:01"},
        ("guest network eth1", "mac_address='33:33:00:00:00:01'", "not multicast"),
        name="guest_network.json.1"),
    Bad("network-device-missing", {k: v for k, v in NET.items() if k != "device"},
        ("device=None", "present"), name="guest_network.json.1"),
]  # fmt: skip


def _baseline(paths: Paths) -> None:
    """A store with a VM, a password, a network and a DHCP entry, so changes show."""
    pushes = {
        "vm_metadata.json.base": vm_metadata(
            VM, ["userdata", "user-data", "I2Nsb3VkLWNvbmZpZwo="], ["metadata", "vm-id", "u1"]
        ),
        "vm_password.json.base": {"ip_address": VM, "password": "Base-Pw-1", "type": "vmpassword"},
        "guest_network.json.base": NET,
        "vm_dhcp_entry.json.base": DHCP,
    }
    for name, payload in pushes.items():
        drop(paths, name, payload)
        assert update_config(paths, name).code == 0


@pytest.mark.parametrize("bad", CASES, ids=[c.id for c in CASES])
def test_invalid_push_is_rejected_with_one_clear_line_and_changes_nothing(
    bad: Bad, paths: Paths
) -> None:
    _baseline(paths)
    before = snapshot(paths.root)
    drop(paths, bad.name, bad.payload)

    run = update_config(paths, bad.name)

    assert run.code == 1
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err[:2000]
    for fragment in bad.says:
        assert fragment in lines[0], (fragment, lines[0])
    assert bad.name in lines[0]
    assert len(lines[0]) < 600
    assert snapshot(paths.root) == before
    assert not (paths.cache / bad.name).exists()
    assert (paths.failed / bad.name).exists()


def test_password_push_rejection_never_shows_the_password(paths: Paths) -> None:
    _baseline(paths)
    before = snapshot(paths.root)
    secret = "Tab\tSecret-77"
    drop(paths, "vm_password.json.2", {"ip_address": VM, "password": secret, "type": "vmpassword"})

    run = update_config(paths, "vm_password.json.2")

    assert run.code == 1
    assert "password=<redacted>" in run.err and f"VM {VM}" in run.err
    assert "Secret-77" not in run.err + run.out
    assert snapshot(paths.root) == before


def test_rejected_files_are_kept_private_and_bounded(paths: Paths) -> None:
    for i in range(5):
        drop(paths, f"vm_metadata.json.bad{i}", b"{")
        assert update_config(paths, f"vm_metadata.json.bad{i}").code == 1
    kept = sorted(p.name for p in paths.failed.iterdir())
    assert len(kept) == 5
    assert all((paths.failed / n).stat().st_mode & 0o077 == 0 for n in kept)


def test_failed_folder_keeps_only_the_newest_files(paths: Paths) -> None:
    from io import StringIO

    from vr.applier import Applier

    applier = Applier(paths, keep_failed=3)
    for i in range(6):
        drop(paths, f"vm_metadata.json.bad{i}", json.dumps({"type": 1}).encode())
        assert applier.update_config([f"vm_metadata.json.bad{i}"], StringIO(), StringIO()) == 1
    kept = {p.name for p in paths.failed.iterdir()}
    assert len(kept) == 3
    assert "vm_metadata.json.bad5" in kept


@pytest.mark.parametrize("entry", ["update-config", "apply-cfg"])
def test_symlink_in_the_cache_is_refused_and_its_target_left_alone(
    entry: str, paths: Paths, tmp_path: Path
) -> None:
    """A link is not a push: never read through, and the quarantine's chmod never
    reaches what it points to."""
    _baseline(paths)
    before = snapshot(paths.root)
    target = tmp_path / "elsewhere" / "secret.json"
    target.parent.mkdir()
    if entry == "update-config":
        name = "vm_metadata.json.link"
        content = json.dumps(meta(["metadata", "vm-id", "from-the-link"])).encode()
    else:
        name = "VR-link.cfg"
        content = (
            "#Apache CloudStack Virtual Router Config File\n<version>\n1.0\n</version>\n"
            "<file>\n/var/cache/cloud/vm_metadata.json.l\n"
            + json.dumps(meta(["metadata", "vm-id", "from-the-link"]))
            + "\n</file>\n<script>\n/opt/cloud/bin/update_config.py vm_metadata.json.l\n"
            "</script>\n"
        ).encode()
    target.write_bytes(content)
    target.chmod(0o644)
    (paths.cache / name).symlink_to(target)

    run = update_config(paths, name) if entry == "update-config" else apply_cfg(paths, name)

    assert run.code == 1
    lines = run.err.splitlines()
    assert len(lines) == 1, run.err
    assert name in lines[0] and "<symbolic link>" in lines[0] and "a regular file" in lines[0]
    assert snapshot(paths.root) == before
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert target.read_bytes() == content
    assert not os.path.lexists(paths.cache / name)
    moved = paths.failed / name
    assert moved.is_symlink() and os.readlink(moved) == str(target)


def test_directory_in_the_cache_is_refused_as_not_a_regular_file(paths: Paths) -> None:
    _baseline(paths)
    before = snapshot(paths.root)
    (paths.cache / "vm_metadata.json.dir").mkdir()

    run = update_config(paths, "vm_metadata.json.dir")

    assert run.code == 1
    assert "<directory>" in run.err and "a regular file" in run.err
    assert snapshot(paths.root) == before
    assert not (paths.cache / "vm_metadata.json.dir").exists()
