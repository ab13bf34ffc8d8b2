"""The pure URL -> reply rules, without HTTP."""

from __future__ import annotations

import pytest

from vr.metadata.views import NOT_FOUND, build_view, do_document, public_keys, resolve

BASIC = {
    "availability-zone": b"zone-a",
    "local-ipv4": b"10.1.1.5",
    "local-hostname": b"web",
    "instance-id": b"i-1",
    "public-keys": b"ssh-ed25519 AAAA one word comment\n\nssh-rsa BBBB me@host",
}


def test_unknown_vm_and_relative_paths_are_not_found() -> None:
    assert resolve(None, "/latest/instance-id") is NOT_FOUND
    assert resolve(build_view(1, BASIC, {}), "latest/instance-id") is NOT_FOUND


def test_index_is_keys_in_given_order() -> None:
    v = build_view(1, {"b": b"1", "a": b"2"}, {})
    assert resolve(v, "/latest/meta-data/").body == b"b\na\n"


def test_public_key_names_fall_back_when_the_comment_is_not_a_word() -> None:
    keys = public_keys(build_view(1, BASIC, {}))
    assert [k.name for k in keys] == ["key-0", "me@host"]
    assert keys[0].key == b"ssh-ed25519 AAAA one word comment"


def test_latest_public_keys_without_slash_is_cloudstacks_raw_file() -> None:
    v = build_view(1, BASIC, {})
    assert resolve(v, "/latest/meta-data/public-keys").body == BASIC["public-keys"]
    assert resolve(v, "/latest/meta-data/public-keys/").body == b"0=key-0\n1=me@host"


def test_ec2_extras_are_missing_when_their_source_key_is() -> None:
    v = build_view(1, {"instance-id": b"i-1"}, {})
    for path in (
        "/latest/meta-data/hostname",
        "/latest/meta-data/placement/",
        "/latest/meta-data/public-keys/",
        "/2009-04-04/meta-data/public-keys/0/openssh-key",
    ):
        assert resolve(v, path).status == 404, path
    assert resolve(v, "/2009-04-04/meta-data/").body == b"instance-id"


def test_a_stored_hostname_key_wins_over_the_derived_one() -> None:
    v = build_view(1, {**BASIC, "hostname": b"own"}, {})
    assert resolve(v, "/latest/meta-data/hostname").body == b"own"
    assert resolve(v, "/2009-04-04/meta-data/").body.split(b"\n").count(b"hostname") == 1


def test_do_id_falls_back_to_vm_id_and_interfaces_need_addresses() -> None:
    v = build_view(1, {"vm-id": b"v-9"}, {})
    assert resolve(v, "/metadata/v1/id").body == b"v-9"
    assert resolve(v, "/metadata/v1/interfaces/").status == 404
    assert do_document(v) == {"droplet_id": "v-9", "public_keys": [], "interfaces": {}}


@pytest.mark.parametrize(
    "path",
    ["/metadata/v1/interfaces/public/1/ipv4/address", "/metadata/v1/id/", "/metadata/v2/id"],
)
def test_do_paths_outside_the_tree_are_not_found(path: str) -> None:
    assert resolve(build_view(1, BASIC, {}), path).status == 404


def test_user_data_absent_is_not_listed() -> None:
    v = build_view(1, BASIC, {})
    assert resolve(v, "/latest/").body == b"meta-data"
    assert b"user-data" not in resolve(v, "/metadata/v1/").body
    assert resolve(v, "/latest/user-data").status == 404


def test_shortcut_case_rules_exact_first_then_first_pushed_spelling() -> None:
    v = build_view(1, {"Zone-Note": b"first", "zone-note": b"second", "ZONE-NOTE": b"third"}, {})
    assert resolve(v, "/latest/zone-note").body == b"second"
    assert resolve(v, "/latest/ZONE-NOTE").body == b"third"
    assert resolve(v, "/latest/Zone-NOTE").body == b"first"
    assert resolve(v, "/latest/meta-data/Zone-NOTE").status == 404


def test_shipped_shortcut_name_prefers_the_lower_case_key_as_apache_rewrites_it() -> None:
    v = build_view(1, {"Instance-Id": b"mixed", "instance-id": b"i-1"}, {})
    assert resolve(v, "/latest/INSTANCE-ID").body == b"i-1"
    assert resolve(v, "/latest/Instance-Id").body == b"mixed"


def test_lower_case_only_names_need_no_folding_table() -> None:
    v = build_view(1, BASIC, {})
    assert v.folded == {}
    assert resolve(v, "/latest/Local-IPv4").body == b"10.1.1.5"
