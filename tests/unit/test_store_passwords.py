"""The store's password life cycle: push, served, ack; the newer password always wins."""

from __future__ import annotations

import stat
from ipaddress import IPv4Address

from tests.helpers.fingerprint import fp
from vr.paths import Paths
from vr.payloads import VmMetadata, VmPassword
from vr.store import Store, read_passwords

VM = IPv4Address("10.1.1.10")


def stored(paths: Paths) -> dict[str, object] | None:
    return read_passwords(paths).get(str(VM))


def test_a_push_stores_the_password_unserved_in_a_private_file(paths: Paths) -> None:
    Store(paths).apply([VmPassword(VM, "first-pw")])
    rec = stored(paths)
    assert rec is not None
    assert fp(str(rec["password"])) == fp("first-pw")
    assert rec["served"] is False
    assert stat.S_IMODE(paths.passwords.stat().st_mode) == 0o600


def test_ack_clears_a_served_password(paths: Paths) -> None:
    store = Store(paths)
    store.apply([VmPassword(VM, "pw")])
    rec = stored(paths)
    assert rec is not None
    store.mark_password_served(VM, int(str(rec["gen"])))
    assert store.ack_password(VM) is True
    assert stored(paths) is None


def test_ack_keeps_a_password_never_served(paths: Paths) -> None:
    store = Store(paths)
    store.apply([VmPassword(VM, "pw")])
    assert store.ack_password(VM) is False
    assert stored(paths) is not None


def test_ack_of_the_old_password_keeps_a_newer_push(paths: Paths) -> None:
    store = Store(paths)
    store.apply([VmPassword(VM, "old-pw")])
    old = stored(paths)
    assert old is not None
    store.mark_password_served(VM, int(str(old["gen"])))
    store.apply([VmPassword(VM, "new-pw")])
    assert store.ack_password(VM) is False
    rec = stored(paths)
    assert rec is not None and fp(str(rec["password"])) == fp("new-pw")


def test_marking_a_superseded_generation_changes_nothing(paths: Paths) -> None:
    store = Store(paths)
    store.apply([VmPassword(VM, "old-pw")])
    old = stored(paths)
    assert old is not None
    store.apply([VmPassword(VM, "new-pw")])
    store.mark_password_served(VM, int(str(old["gen"])))
    rec = stored(paths)
    assert rec is not None and rec["served"] is False


def test_marking_twice_writes_the_file_once(paths: Paths) -> None:
    store = Store(paths)
    store.apply([VmPassword(VM, "pw")])
    rec = stored(paths)
    assert rec is not None
    store.mark_password_served(VM, int(str(rec["gen"])))
    first = paths.passwords.stat()
    store.mark_password_served(VM, int(str(rec["gen"])))
    second = paths.passwords.stat()
    assert (first.st_ino, first.st_mtime_ns) == (second.st_ino, second.st_mtime_ns)


def test_a_metadata_push_leaves_passwords_alone(paths: Paths) -> None:
    store = Store(paths)
    store.apply([VmPassword(VM, "pw")])
    rec = stored(paths)
    assert rec is not None
    store.mark_password_served(VM, int(str(rec["gen"])))
    served = stored(paths)
    store.apply([VmMetadata(VM, ())])
    assert served is not None and served["served"] is True
    assert stored(paths) == served
