"""Store semantics: what a push does to one VM's files and to nobody else's."""

from __future__ import annotations

import os
from ipaddress import IPv4Address
from typing import Any

import pytest

from tests.helpers.store import served_tree, snapshot, vm_metadata
from vr.paths import Paths
from vr.payloads import Payload, parse_payload
from vr.store import (
    WRITING_MARKER,
    Store,
    current_gen,
    list_vms,
    read_dhcp,
    read_networks,
    read_passwords,
    read_vm,
    stamp_token,
)

A = IPv4Address("10.1.1.23")
B = IPv4Address("10.1.1.24")


def vm(ip: IPv4Address, *triples: list[object]) -> Payload:
    return parse_payload("vm_metadata.json.t", _json(vm_metadata(str(ip), *triples)))


def _json(obj: Any) -> bytes:
    import json

    return json.dumps(obj).encode()


def other(name: str, obj: dict[str, Any]) -> Payload:
    return parse_payload(name, _json(obj))


def meta_files(paths: Paths, ip: IPv4Address) -> dict[str, bytes]:
    d = paths.metadata_dir(ip)
    return {n: (d / n).read_bytes() for n in os.listdir(d)}


def test_push_replaces_the_keys_it_carries_and_keeps_the_others(paths: Paths) -> None:
    store = Store(paths)
    store.apply([vm(A, ["metadata", "vm-id", "one"], ["metadata", "local-hostname", "web"])])
    store.apply([vm(A, ["metadata", "vm-id", "two"])])
    rec = read_vm(paths, A)
    assert rec is not None
    assert rec.metadata == {"vm-id": b"two", "local-hostname": b"web"}


def test_empty_string_deletes_the_file_and_its_index_line(paths: Paths) -> None:
    store = Store(paths)
    store.apply([vm(A, ["metadata", "public-ipv4", "203.0.113.5"], ["metadata", "vm-id", "u"])])
    result = store.apply([vm(A, ["metadata", "public-ipv4", ""], ["metadata", "gone", ""])])
    assert not (paths.metadata_dir(A) / "public-ipv4").exists()
    assert (paths.metadata_dir(A) / "meta-data").read_bytes() == b"vm-id\n"
    assert result.vms[0].deleted == ["public-ipv4"]


def test_null_makes_an_empty_file_that_is_listed(paths: Paths) -> None:
    Store(paths).apply(
        [vm(A, ["metadata", "hypervisor-host-name", None], ["userdata", "user-data", None])]
    )
    assert (paths.metadata_dir(A) / "hypervisor-host-name").read_bytes() == b""
    assert (paths.userdata_dir(A) / "user-data").read_bytes() == b""
    assert (paths.metadata_dir(A) / "meta-data").read_bytes() == b"hypervisor-host-name\n"


def test_push_for_one_vm_leaves_other_vms_untouched(paths: Paths) -> None:
    store = Store(paths)
    store.apply([vm(B, ["metadata", "vm-id", "b"], ["userdata", "user-data", "YmJi"])])
    gen_b = current_gen(paths, B)
    b_before = {k: v for k, v in snapshot(paths.root).items() if "10.1.1.24" in k}
    store.apply([vm(A, ["metadata", "vm-id", "a"])])
    store.apply([vm(A, ["metadata", "vm-id", ""])])
    assert current_gen(paths, B) == gen_b
    assert {k: v for k, v in snapshot(paths.root).items() if "10.1.1.24" in k} == b_before


def test_values_are_stored_byte_exact_without_an_added_newline(paths: Paths) -> None:
    values = ["abc", "two\nlines\n", "  spaced  ", "Caf\\u00E9", "Ünïcödé ✓", "\t"]
    Store(paths).apply([vm(A, *[["metadata", f"k{i}", v] for i, v in enumerate(values)])])
    for i, v in enumerate(values):
        assert (paths.metadata_dir(A) / f"k{i}").read_bytes() == v.encode("utf-8")


def test_user_data_is_stored_as_the_decoded_bytes(paths: Paths) -> None:
    Store(paths).apply([vm(A, ["userdata", "user-data", "AAEC/f7/"])])
    assert (paths.userdata_dir(A) / "user-data").read_bytes() == bytes([0, 1, 2, 253, 254, 255])


def test_index_lists_exactly_the_keys_that_exist_each_ending_in_newline(paths: Paths) -> None:
    store = Store(paths)
    store.apply([vm(A, *[["metadata", k, "v"] for k in ("a", "b", "c", "d")])])
    store.apply([vm(A, ["metadata", "b", ""], ["metadata", "e", None], ["metadata", "d", ""])])
    files = meta_files(paths, A)
    index = files.pop("meta-data")
    assert index.endswith(b"\n")
    listed = index.decode().split("\n")[:-1]
    assert listed == ["a", "c", "e"]
    assert set(listed) == set(files)


def test_id_is_listed_alongside_vm_id_and_instance_alongside_instance_id(paths: Paths) -> None:
    Store(paths).apply(
        [
            vm(
                A,
                ["metadata", "vm-id", "1"],
                ["metadata", "id", "2"],
                ["metadata", "instance-id", "3"],
                ["metadata", "instance", "4"],
            )
        ]
    )
    index = (paths.metadata_dir(A) / "meta-data").read_text()
    assert index == "vm-id\nid\ninstance-id\ninstance\n"


def test_a_vm_whose_keys_were_all_deleted_has_an_empty_index(paths: Paths) -> None:
    store = Store(paths)
    store.apply([vm(A, ["metadata", "vm-id", "1"])])
    store.apply([vm(A, ["metadata", "vm-id", ""])])
    assert meta_files(paths, A) == {"meta-data": b""}


def test_unknown_vm_reads_as_none_and_is_not_listed(paths: Paths) -> None:
    Store(paths).apply([vm(B, ["metadata", "vm-id", "b"])])
    assert read_vm(paths, A) is None
    assert current_gen(paths, A) is None
    assert list_vms(paths) == [B]


def test_every_commit_changes_the_generation_and_the_stamp(paths: Paths) -> None:
    store = Store(paths)
    assert stamp_token(paths) is None
    store.apply([vm(A, ["metadata", "vm-id", "1"])])
    gen1, stamp1 = current_gen(paths, A), stamp_token(paths)
    store.apply([vm(A, ["metadata", "vm-id", "1"])])
    assert current_gen(paths, A) != gen1
    assert stamp_token(paths) != stamp1


def test_only_the_current_and_previous_generations_are_kept(paths: Paths) -> None:
    store = Store(paths)
    for i in range(6):
        store.apply([vm(A, ["metadata", "vm-id", str(i)])])
    gens = sorted(n for n in os.listdir(paths.generations) if n.startswith("10.1.1.23@"))
    assert len(gens) == 2
    assert f"10.1.1.23@{current_gen(paths, A)}" in gens


def test_served_tree_is_world_readable_whatever_the_umask(paths: Paths) -> None:
    old = os.umask(0o077)
    try:
        Store(paths).apply([vm(A, ["metadata", "vm-id", "1"], ["userdata", "user-data", "YQ=="])])
    finally:
        os.umask(old)
    for d in (paths.metadata_dir(A), paths.userdata_dir(A)):
        assert os.stat(d).st_mode & 0o005 == 0o005
        for n in os.listdir(d):
            assert os.stat(d / n).st_mode & 0o777 == 0o644


def test_a_batch_for_the_same_vm_twice_applies_both_in_order(paths: Paths) -> None:
    Store(paths).apply([vm(A, ["metadata", "x", "1"]), vm(A, ["metadata", "y", "2"])])
    assert served_tree(paths)["metadata/10.1.1.23/meta-data"] == b"x\ny\n"


def test_guest_networks_are_stored_and_removed(paths: Paths) -> None:
    net = {"device": "eth1", "router_guest_ip": "10.1.1.1", "cidr": "10.1.1.0/24"}
    store = Store(paths)
    result = store.apply([other("guest_network.json.1", net | {"type": "guestnetwork"})])
    assert result.networks_changed
    [n] = read_networks(paths)
    assert (n.device, str(n.interface)) == ("eth1", "10.1.1.1/24")
    store.apply([other("guest_network.json.2", net | {"add": False, "type": "guestnetwork"})])
    assert read_networks(paths) == []


def test_dhcp_entries_are_stored_and_removed(paths: Paths) -> None:
    entry = {"mac_address": "02:00:0A:01:01:17", "ipv4_address": "10.1.1.23", "host_name": "web"}
    store = Store(paths)
    store.apply([other("vm_dhcp_entry.json.1", entry)])
    [d] = read_dhcp(paths)
    assert (d.mac_address, str(d.ipv4_address), d.host_name) == ("02:00:0a:01:01:17", str(A), "web")
    store.apply([other("vm_dhcp_entry.json.2", entry | {"remove": True})])
    assert read_dhcp(paths) == []


def test_password_is_kept_until_served_and_acknowledged(paths: Paths) -> None:
    store = Store(paths)
    store.apply([other("vm_password.json.1", {"ip_address": str(A), "password": "Pw-1"})])
    rec = read_passwords(paths)[str(A)]
    assert (rec["password"], rec["served"]) == ("Pw-1", False)
    assert store.ack_password(A) is False  # not served yet: an ack must not clear it
    store.mark_password_served(A, rec["gen"])
    assert store.ack_password(A) is True
    assert str(A) not in read_passwords(paths)
    assert oct(paths.passwords.stat().st_mode & 0o777) == "0o600"


def test_password_pushed_after_a_fetch_survives_the_ack_of_the_old_one(paths: Paths) -> None:
    store = Store(paths)
    store.apply([other("vm_password.json.1", {"ip_address": str(A), "password": "Old"})])
    old_gen = read_passwords(paths)[str(A)]["gen"]
    store.apply([other("vm_password.json.2", {"ip_address": str(A), "password": "New"})])
    store.mark_password_served(A, old_gen)  # the guest fetched the old one just before
    assert store.ack_password(A) is False
    assert read_passwords(paths)[str(A)]["password"] == "New"


def test_passwords_of_several_vms_are_all_kept(paths: Paths) -> None:
    store = Store(paths)
    store.apply([other("vm_password.json.1", {"ip_address": str(A), "password": "a"})])
    store.apply([other("vm_password.json.2", {"ip_address": str(B), "password": "b"})])
    assert {k: v["password"] for k, v in read_passwords(paths).items()} == {
        str(A): "a",
        str(B): "b",
    }


def test_next_writer_removes_leftover_temporaries_but_not_young_ones_of_others(
    paths: Paths,
) -> None:
    leftovers = [
        paths.generations / ".tmp-10.1.1.23@9.abcd",
        paths.state / ".tmp-passwords.json.abcd",
        paths.processed / ".tmp-old.gz.abcd",
    ]
    young = [
        paths.processed / ".tmp-young.gz.abcd",
        paths.state / ".tmp-last_push.json.ab",
        paths.state / ".tmp-passwords.json.young",  # the password server's, in flight
    ]
    foreign = paths.state / ".tmp-firewall.json.abcd"  # another service's, in flight
    for f in [*leftovers, *young, foreign]:
        f.write_bytes(b"x")
    os.utime(paths.processed / ".tmp-old.gz.abcd", (0, 0))
    os.utime(paths.state / ".tmp-passwords.json.abcd", (0, 0))
    (paths.state / WRITING_MARKER).touch()  # a writer was killed holding the lock
    with Store(paths).locked():
        pass
    assert [f.exists() for f in leftovers] == [False, False, False]
    assert [f.exists() for f in [*young, foreign]] == [True, True, True, True]
    assert not (paths.state / WRITING_MARKER).exists()


def test_pushes_to_a_clean_store_list_no_folder_of_vms(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A push costs the same with 10 or 10,000 VMs: nothing lists the VM folders
    (the sweep runs only after a killed writer, old generations are found by link)."""
    store = Store(paths)
    for i in range(3):
        store.apply([vm(A, ["metadata", "vm-id", str(i)]), vm(B, ["metadata", "k", str(i)])])
    listed: list[str] = []
    real = os.listdir

    def listdir(path: Any = ".") -> list[str]:
        listed.append(str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    for i in range(3, 6):
        store.apply([vm(A, ["metadata", "vm-id", str(i)])])
    monkeypatch.undo()
    assert listed == []
    gens = sorted(n for n in os.listdir(paths.generations) if n.startswith(f"{A}@"))
    assert len(gens) == 2  # the current and the one it replaced, still


def test_a_commit_interrupted_between_renames_is_finished_and_the_next_push_works(
    paths: Paths, monkeypatch: Any
) -> None:
    """Ctrl-C (or a failing rename) in the middle of a batch's renames: the journal
    decides, so the batch completes instead of being half undone, and the next
    push for the same VM is not blocked by a leftover generation."""
    import pytest

    from vr import atomic

    store = Store(paths)
    store.apply([vm(A, ["metadata", "k", "a1"]), vm(B, ["metadata", "k", "b1"])])
    real_replace = os.replace
    calls = {"n": 0}

    def interrupted(src: Any, dst: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        store.apply([vm(A, ["metadata", "k", "a2"]), vm(B, ["metadata", "k", "b2"])])
    monkeypatch.setattr(atomic.os, "replace", real_replace)
    assert {ip: read_vm(paths, ip).metadata["k"] for ip in (A, B)} == {A: b"a2", B: b"b2"}
    assert not paths.journal.exists()
    store.apply([vm(A, ["metadata", "k", "a3"])])
    assert read_vm(paths, A).metadata["k"] == b"a3"


def _batch_of(ips: list[str], user_data: bytes) -> list[Payload]:
    import base64
    import json

    ud = base64.b64encode(user_data).decode()
    triples = (["metadata", "availability-zone", "zone-a"], ["userdata", "user-data", ud])
    return [
        parse_payload(
            "vm_metadata.json",
            json.dumps(vm_metadata(ip, *triples, ["metadata", "local-ipv4", ip])).encode(),
        )
        for ip in ips
    ]


def test_a_batch_shares_one_inode_per_repeated_file_and_a_later_push_leaves_the_others(
    paths: Paths,
) -> None:
    from vr.store import FEW_VMS

    ips = [f"10.1.4.{i}" for i in range(1, FEW_VMS + 6)]
    Store(paths).apply(_batch_of(ips, b"#cloud-config\n"))

    zones = {os.stat(paths.metadata_root / ip / "availability-zone").st_ino for ip in ips}
    own = {os.stat(paths.metadata_root / ip / "local-ipv4").st_ino for ip in ips}
    assert len(zones) == 1 and len(own) == len(ips)

    Store(paths).apply(_batch_of(ips[:1], b"#changed\n"))

    assert (paths.userdata_root / ips[0] / "user-data").read_bytes() == b"#changed\n"
    assert {(paths.userdata_root / ip / "user-data").read_bytes() for ip in ips[1:]} == {
        b"#cloud-config\n"
    }
    assert [(paths.metadata_root / ip / "local-ipv4").read_bytes() for ip in ips] == [
        ip.encode() for ip in ips
    ]
