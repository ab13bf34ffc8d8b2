"""ETags and wait_for_change: the metadata app held in the real event loop (loopback)."""

from __future__ import annotations

import time
from ipaddress import IPv4Address
from typing import Any

import pytest
from flask import Flask
from prometheus_client import CollectorRegistry

from tests.helpers.loop_server import WAIT, Reader, limits, request, serving
from tests.helpers.vmdata import store_vm
from vr.metadata import changes
from vr.metadata.app import create_app
from vr.metadata.views import VmView
from vr.metadata.vmcache import VmCache
from vr.ops import metrics
from vr.paths import Paths

VM = "10.1.1.5"
CALLER = "127.0.0.5"
PATH = "/latest/meta-data/local-hostname"


class AsVm:
    """The loopback caller plays VM 10.1.1.5 (loopback is never a guest address)."""

    def __init__(self, paths: Paths) -> None:
        self.cache = VmCache(paths)

    def view_for_address(self, remote_addr: str) -> VmView | None:
        return self.cache.view(IPv4Address(VM)) if remote_addr == CALLER else None

    def warm(self) -> int:
        return 0


def loop_app(paths: Paths, **kw: Any) -> Flask:
    return create_app(paths, cache=AsVm(paths), **kw)


def until(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", None),
        ("wait_for_change=false", None),
        ("wait_for_change=true", (None, changes.DEFAULT_TIMEOUT)),
        ("wait_for_change=true&last_etag=abc&timeout_sec=5", ('"abc"', 5)),
        ('wait_for_change=true&last_etag="abc"', ('"abc"', changes.DEFAULT_TIMEOUT)),
    ],
)
def test_wait_requests_are_read_as_gce_spells_them(
    query: str, expected: tuple[str | None, int] | None
) -> None:
    assert changes.wait_request(query) == expected


@pytest.mark.parametrize("timeout", ["0", "3601", "x", "1.5", "9" * 40])
def test_a_timeout_outside_its_range_is_refused_naming_it(timeout: str) -> None:
    with pytest.raises(changes.BadWait, match="timeout_sec="):
        changes.wait_request(f"wait_for_change=true&timeout_sec={timeout}")


def test_every_value_reply_carries_an_etag_that_changes_with_the_value(paths: Paths) -> None:
    store_vm(paths, VM, name="first")
    client = create_app(paths).test_client()
    env = {"REMOTE_ADDR": VM}
    first = client.get(PATH, environ_base=env)
    assert first.headers["ETag"] == changes.etag(b"first")
    assert client.get(PATH, environ_base=env).headers["ETag"] == first.headers["ETag"]
    assert "ETag" in client.get("/latest/user-data", environ_base=env).headers
    store_vm(paths, VM, name="second")
    assert client.get(PATH, environ_base=env).headers["ETag"] == changes.etag(b"second")
    bad = client.get(PATH + "?wait_for_change=true&timeout_sec=0", environ_base=env)
    assert bad.status_code == 400 and b"timeout_sec='0'" in bad.data


def test_a_held_request_does_not_block_the_loop_and_a_push_wakes_it(paths: Paths) -> None:
    store_vm(paths, VM, name="before")
    app = loop_app(paths, waiters_per_vm=1)
    with serving(limits(), app=app) as srv:
        with srv.connect(source=CALLER) as c:
            c.sendall(request(PATH))
            status, headers, body = Reader(c).response()
        assert (status, body) == (200, b"before")
        tag = headers["etag"].strip('"')
        wait = f"{PATH}?wait_for_change=true&last_etag={tag}&timeout_sec=300"
        with srv.connect(source=CALLER) as held, srv.connect(source=CALLER) as second:
            held.sendall(request(wait))
            until(lambda: len(srv.loop.held) == 1, "the request was never held")
            # the loop serves others meanwhile; a second waiter of the VM is refused
            second.sendall(request(wait))
            assert Reader(second).response()[0] == 429
            second.sendall(request(PATH))
            assert Reader(second).response()[2] == b"before"
            store_vm(paths, VM, name="after")
            status, headers, body = Reader(held).response()
            assert (status, body) == (200, b"after")
            assert headers["etag"] == changes.etag(b"after")
            # the connection is usable again
            held.sendall(request(PATH))
            assert Reader(held).response()[2] == b"after"
        until(lambda: not srv.loop.held_per_address, "a waiter was never released")


def test_a_held_request_times_out_with_the_unchanged_value(paths: Paths) -> None:
    store_vm(paths, VM, name="same")
    with serving(limits(), app=loop_app(paths)) as srv, srv.connect(source=CALLER) as c:
        c.sendall(request(f"{PATH}?wait_for_change=true&timeout_sec=1"))
        status, headers, body = Reader(c).response()
        assert (status, body, headers["etag"]) == (200, b"same", changes.etag(b"same"))


def test_a_stale_last_etag_is_answered_at_once(paths: Paths) -> None:
    store_vm(paths, VM, name="current")
    with serving(limits(), app=loop_app(paths)) as srv, srv.connect(source=CALLER) as c:
        c.sendall(request(f"{PATH}?wait_for_change=true&last_etag=old&timeout_sec=3600"))
        assert Reader(c).response()[2] == b"current"
        assert not srv.loop.held


def test_a_held_request_is_counted_once_when_answered(paths: Paths) -> None:
    store_vm(paths, VM, name="before")
    m = metrics.Metrics(CollectorRegistry())
    app = metrics.Instrumented(loop_app(paths), m, "metadata", metrics.metadata_view)
    view = metrics.metadata_view({"PATH_INFO": PATH, "REQUEST_METHOD": "GET"})
    counted = m.requests.labels("metadata", view, "200")
    with serving(limits(), app=app) as srv, srv.connect(source=CALLER) as c:
        tag = changes.etag(b"before").strip('"')
        c.sendall(request(f"{PATH}?wait_for_change=true&last_etag={tag}&timeout_sec=300"))
        until(lambda: len(srv.loop.held) == 1, "the request was never held")
        store_vm(paths, VM, name="after")
        assert Reader(c).response()[2] == b"after"
    assert counted._value.get() == 1


def test_etags_are_remembered_within_a_bound_and_stay_exact() -> None:
    import hashlib

    def plain(body: bytes) -> str:
        return '"' + hashlib.blake2b(body, digest_size=8).hexdigest() + '"'

    bodies = [bytes([i % 251]) * (1000 + i) for i in range(3000)]  # ~4.5 MB in all
    for b in bodies + bodies:
        assert changes.etag(b) == plain(b)
    assert sum(map(len, changes._ETAGS)) <= changes.ETAG_MEMO_BYTES
    big = b"x" * (changes.ETAG_MEMO_BYTES + 1)
    assert changes.etag(big) == plain(big) and big not in changes._ETAGS
