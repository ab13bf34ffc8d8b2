"""The per-worker cache: one stat per lookup, reloads only what a commit changed."""

from __future__ import annotations

from ipaddress import IPv4Address

import pytest

from tests.helpers.vmdata import store_vm
from vr.metadata import vmcache
from vr.metadata.vmcache import VmCache
from vr.paths import Paths
from vr.store import read_vm

A, B = IPv4Address("10.1.1.5"), IPv4Address("10.1.1.6")


def test_unchanged_store_is_served_from_memory(paths: Paths) -> None:
    store_vm(paths, str(A))
    cache = VmCache(paths)
    first = cache.view(A)
    assert first is not None and first.metadata["local-ipv4"] == b"10.1.1.5"
    for _ in range(10):
        assert cache.view(A) is first
    assert cache.loads == 1


def test_a_commit_reloads_only_the_vm_it_changed(paths: Paths) -> None:
    store_vm(paths, str(A))
    store_vm(paths, str(B))
    cache = VmCache(paths)
    a, b = cache.view(A), cache.view(B)
    store_vm(paths, str(B), [["metadata", "local-hostname", "renamed"]])
    assert cache.view(A) is a
    new_b = cache.view(B)
    assert new_b is not b and new_b is not None
    assert new_b.metadata["local-hostname"] == b"renamed"
    assert cache.loads == 3


def test_unknown_vm_becomes_known_after_its_push(paths: Paths) -> None:
    cache = VmCache(paths)
    assert cache.view(A) is None
    store_vm(paths, str(A))
    view = cache.view(A)
    assert view is not None and view.metadata["local-ipv4"] == b"10.1.1.5"


def test_address_strings_map_through_identity(paths: Paths) -> None:
    store_vm(paths, str(A))
    cache = VmCache(paths)
    assert cache.view_for_address("10.1.1.5") is cache.view(A)
    assert cache.view_for_address("::ffff:10.1.1.5") is cache.view(A)
    assert cache.view_for_address("not an address") is None
    assert cache.view_for_address("2001:db8::1") is None


def test_unknown_callers_are_bounded(paths: Paths, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(vmcache, "MAX_UNKNOWN", 10)
    store_vm(paths, str(A))
    cache = VmCache(paths)
    assert cache.view(A) is not None
    for i in range(50):
        assert cache.view(IPv4Address("10.2.0.0") + i) is None
    assert len(cache._entries) + len(cache._unknown) <= 11
    assert cache.view(A) is not None and cache.loads == 1


def test_a_worker_keeps_at_most_max_vms_the_least_recently_asked_dropped_first(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(vmcache, "MAX_VMS", 3)
    vms = [IPv4Address("10.1.2.0") + i for i in range(5)]
    for ip in vms:
        store_vm(paths, str(ip))
    cache = VmCache(paths)
    for ip in vms[:3]:
        assert cache.view(ip) is not None
    cache.view(vms[0])  # asked again: now the most recent
    cache.view(vms[3])  # drops vms[1], the least recently asked
    cache.view(vms[4])  # drops vms[2]
    assert len(cache) == 3 and cache.loads == 5
    for ip in (vms[0], vms[3], vms[4]):
        assert cache.view(ip) is not None
    assert cache.loads == 5
    view = cache.view(vms[1])  # dropped: read again, still right
    assert view is not None and view.metadata["local-ipv4"] == str(vms[1]).encode()
    assert cache.loads == 6 and len(cache) == 3


def test_warm_loads_every_vm(paths: Paths) -> None:
    store_vm(paths, str(A))
    store_vm(paths, str(B))
    cache = VmCache(paths)
    assert cache.warm() == 2
    assert cache.loads == 2
    cache.view(A)
    assert cache.loads == 2


def test_loader_sees_the_generation_after_the_stamp(paths: Paths) -> None:
    """A reader that checked the stamp must not keep data older than that commit."""
    store_vm(paths, str(A))
    seen: list[int] = []

    def loader(p: Paths, ip: IPv4Address) -> object:
        rec = read_vm(p, ip)
        assert rec is not None
        seen.append(rec.gen)
        return rec

    cache = VmCache(paths, loader=loader)  # type: ignore[arg-type]
    cache.view(A)
    for i in range(20):
        store_vm(paths, str(A), [["metadata", "local-hostname", f"h{i}"]])
        view = cache.view(A)
        assert view is not None and view.metadata["local-hostname"] == f"h{i}".encode()
    assert seen == sorted(seen) and len(seen) == 21


def test_len_counts_the_vms_held_through_loads_reloads_and_removals(paths: Paths) -> None:
    store_vm(paths, str(A))
    store_vm(paths, str(B))
    gone: set[IPv4Address] = set()

    def loader(p: Paths, ip: IPv4Address) -> object:
        return None if ip in gone else read_vm(p, ip)

    cache = VmCache(paths, loader=loader)  # type: ignore[arg-type]
    assert len(cache) == 0
    cache.view(A), cache.view(B), cache.view(IPv4Address("10.1.1.7"))
    assert len(cache) == 2
    store_vm(paths, str(B), [["metadata", "local-hostname", "renamed"]])
    assert cache.view(B) is not None and len(cache) == 2
    gone.add(B)
    store_vm(paths, str(B), [["metadata", "local-hostname", "again"]])
    assert cache.view(B) is None and len(cache) == 1
    gone.clear()
    store_vm(paths, str(B), [["metadata", "local-hostname", "back"]])
    assert cache.view(B) is not None and len(cache) == 2
