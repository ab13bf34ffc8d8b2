"""The per-VM token buckets shared by every worker, on a fake clock."""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from tests.helpers.vmdata import store_vm
from vr.metadata import ratelimit
from vr.metadata.app import create_app
from vr.metadata.ratelimit import PROBES, RateLimiter, retry_after
from vr.paths import Paths


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def table(tmp_path: Path) -> Path:
    path = tmp_path / "rate"
    ratelimit.create(path)
    return path


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(table: Path, clock: Clock) -> Iterator[RateLimiter]:
    lim = RateLimiter(table, rate=2, burst=5, clock=clock)
    yield lim
    lim.close()


VM = int(IPv4Address("10.1.1.5"))


def test_a_vm_gets_its_burst_then_waits_for_the_refill(limiter: RateLimiter, clock: Clock) -> None:
    assert [limiter.take(VM) for _ in range(5)] == [0.0] * 5
    wait = limiter.take(VM)
    assert wait == pytest.approx(0.5)  # one token at 2 per second
    assert retry_after(wait) == "1"
    clock.now += 0.5
    assert limiter.take(VM) == 0.0
    assert limiter.take(VM) > 0


def test_every_worker_spends_from_the_same_bucket(table: Path, clock: Clock) -> None:
    workers = [RateLimiter(table, rate=2, burst=5, clock=clock) for _ in range(3)]
    granted = sum(1 for i in range(30) if workers[i % 3].take(VM) == 0.0)
    assert granted == 5
    for w in workers:
        w.close()


def test_a_thousand_vms_booting_at_once_are_not_throttled(limiter: RateLimiter) -> None:
    base = int(IPv4Address("10.8.0.1"))
    refused = [vm for vm in range(base, base + 1000) for _ in range(5) if limiter.take(vm)]
    assert refused == []


def test_a_full_probe_window_takes_over_the_longest_idle_slot_never_refusing(
    table: Path, clock: Clock
) -> None:
    # a slow refill: every bucket stays busy, so no slot is free for reuse
    lim = RateLimiter(table, rate=0.001, burst=1, clock=clock)
    vms = [int(IPv4Address("10.9.0.0")) + i for i in range(ratelimit.SLOTS * 2)]
    # more VMs than slots: some windows fill up, and a newcomer still gets served
    refused = 0
    for vm in vms[: PROBES * 4096]:
        clock.now += 0.001
        refused += lim.take(vm) > 0
    assert refused == 0
    lim.close()


def test_a_file_that_is_not_a_rate_table_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="not a rate table"):
        RateLimiter(other, rate=1, burst=1)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "flask-only"])
def test_the_app_answers_429_with_retry_after_and_counts_it(
    paths: Paths, table: Path, clock: Clock, fast_path: bool
) -> None:
    store_vm(paths, "10.1.1.5")
    limiter = RateLimiter(table, rate=1, burst=2, clock=clock)
    app = create_app(paths, fast_path=fast_path, limiter=limiter)
    client = app.test_client()
    env = {"REMOTE_ADDR": "10.1.1.5"}
    assert client.get("/latest/instance-id", environ_base=env).status_code == 200
    assert client.put("/latest/api/token", environ_base=env).status_code == 400  # counted too
    r = client.get("/latest/instance-id", environ_base=env)
    assert (r.status_code, r.headers["Retry-After"], r.data) == (429, "1", b"too many requests\n")
    counts = app.extensions["vr.counters"].metrics.refused.labels(reason="rate")
    assert counts._value.get() == 1
    other = client.get("/latest/instance-id", environ_base={"REMOTE_ADDR": "10.1.1.6"})
    assert other.status_code == 404  # another VM (unknown here) is not limited
    clock.now += 1
    assert client.get("/latest/instance-id", environ_base=env).status_code == 200
    limiter.close()
