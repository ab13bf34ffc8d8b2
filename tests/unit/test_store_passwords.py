"""The store's password life cycle: push, served, ack; the newer password always wins."""

from __future__ import annotations

import json
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


def test_fetch_and_ack_do_not_wait_for_a_push_holding_the_store_lock(paths: Paths) -> None:
    """A long batch (or a firewall apply) holds the store lock; the password server's
    single-threaded workers must not stall behind it."""
    store = Store(paths, lock_timeout=1.0)
    store.apply([VmPassword(VM, "pw")])
    rec = stored(paths)
    assert rec is not None
    with Store(paths).locked():  # another writer, mid-batch
        store.mark_password_served(VM, int(str(rec["gen"])))
        assert store.ack_password(VM) is True
    assert stored(paths) is None


def test_a_push_waits_for_the_passwords_lock_and_keeps_the_served_mark_of_others(
    paths: Paths,
) -> None:
    store = Store(paths)
    other = IPv4Address("10.1.1.11")
    store.apply([VmPassword(other, "other-pw")])
    rec = read_passwords(paths)[str(other)]
    store.mark_password_served(other, int(str(rec["gen"])))
    store.apply([VmPassword(VM, "new-pw")])
    assert read_passwords(paths)[str(other)]["served"] is True


def test_a_save_replaces_the_stored_password_unserved(paths: Paths) -> None:
    store = Store(paths)
    store.apply([VmPassword(VM, "pushed-pw")])
    old = stored(paths)
    assert old is not None
    store.mark_password_served(VM, int(str(old["gen"])))
    gen = store.save_password(VM, "saved-pw")
    rec = stored(paths)
    assert rec is not None
    got, want = fp(str(rec["password"])), fp("saved-pw")
    assert got == want
    assert (rec["gen"], rec["served"]) == (gen, False)
    assert gen > int(str(old["gen"]))
    assert store.ack_password(VM) is False  # the guest's ack of the pushed one


def test_a_save_after_an_acknowledged_password_is_never_marked_by_a_late_fetch(
    paths: Paths,
) -> None:
    """A fetch that read generation G before the ack must not mark the next password,
    even though G's entry is gone from the file when the save picks a generation."""
    store = Store(paths)
    store.save_password(VM, "first-pw")
    first = stored(paths)
    assert first is not None
    store.mark_password_served(VM, int(str(first["gen"])))
    assert store.ack_password(VM) is True
    store.save_password(VM, "second-pw")
    store.mark_password_served(VM, int(str(first["gen"])))  # the late fetch
    assert store.ack_password(VM) is False
    rec = stored(paths)
    assert rec is not None and rec["served"] is False


def test_saves_and_pushes_share_one_increasing_generation(paths: Paths) -> None:
    store = Store(paths)
    gens = [store.save_password(VM, "a")]
    store.apply([VmPassword(VM, "b")])
    gens.append(int(str((stored(paths) or {})["gen"])))
    gens.append(store.save_password(VM, "c"))
    store.apply([VmPassword(VM, "d")])
    gens.append(int(str((stored(paths) or {})["gen"])))
    assert gens == sorted(set(gens))
    assert stat.S_IMODE(paths.password_gen.stat().st_mode) == 0o600


def test_a_save_does_not_wait_for_a_push_holding_the_store_lock(paths: Paths) -> None:
    store = Store(paths, lock_timeout=1.0)
    with Store(paths).locked():  # another writer, mid-batch
        store.save_password(VM, "pw")
    assert stored(paths) is not None


def test_a_save_after_a_killed_commit_keeps_both_passwords(paths: Paths) -> None:
    """A commit killed before renaming its passwords file: the save must build on that
    file, and the roll-forward by the next store writer must not replace the save."""
    store = Store(paths)
    other = IPv4Address("10.1.1.11")
    staged = paths.state / ".tmp-passwords.json.dead0001"
    staged.write_text('{"10.1.1.11": {"password": "pushed-pw", "gen": 7, "served": false}}\n')
    paths.journal.write_text(json.dumps([[str(staged), str(paths.passwords)]]))
    store.save_password(VM, "saved-pw")
    store.apply([VmMetadata(other, ())])  # the next writer rolls the journal forward
    assert not paths.journal.exists()
    kept = {ip: fp(str(rec["password"])) for ip, rec in read_passwords(paths).items()}
    assert kept == {str(other): fp("pushed-pw"), str(VM): fp("saved-pw")}
