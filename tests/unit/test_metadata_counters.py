"""Counter files: written rarely, summed across workers, reset per service run."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable

from vr.metadata import counters as metadata_counters
from vr.metadata.counters import FLUSH_INTERVAL, RefusalCounters
from vr.paths import Paths


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class FakeTimer:
    def __init__(self, delay: float, fn: Callable[[], None]) -> None:
        self.delay = delay
        self.fn = fn
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeTimers:
    """Records armed timers; the test fires them."""

    def __init__(self) -> None:
        self.armed: list[FakeTimer] = []

    def __call__(self, delay: float, fn: Callable[[], None]) -> FakeTimer:
        self.armed.append(FakeTimer(delay, fn))
        return self.armed[-1]

    def fire(self) -> None:
        timer = self.armed.pop(0)
        assert not timer.cancelled, "fired a cancelled timer"
        timer.fn()


def test_first_count_is_written_at_once_and_later_ones_batched(paths: Paths) -> None:
    c = RefusalCounters(paths, pid=11, start_timer=FakeTimers())
    c.count_forwarded()
    assert metadata_counters.totals(paths) == {"forwarded_refused": 1}
    c.count_forwarded()
    c.count_forwarded()
    assert c.dirty
    assert metadata_counters.totals(paths) == {"forwarded_refused": 1}
    c.flush(force=True)
    assert not c.dirty
    assert metadata_counters.totals(paths) == {"forwarded_refused": 3}


def test_totals_sum_workers_and_skip_broken_files(paths: Paths) -> None:
    RefusalCounters(paths, pid=1).count_forwarded()
    c2 = RefusalCounters(paths, pid=2)
    c2.count_forwarded()
    (paths.metadata_counters / "3.json").write_text("{not json")
    (paths.metadata_counters / "4.json").write_text(json.dumps({"forwarded_refused": "x"}))
    assert metadata_counters.totals(paths) == {"forwarded_refused": 2}


def test_reset_forgets_an_earlier_run(paths: Paths) -> None:
    RefusalCounters(paths, pid=1).count_forwarded()
    metadata_counters.reset(paths)
    assert metadata_counters.totals(paths) == {"forwarded_refused": 0}


def test_totals_without_any_file_are_zero(paths: Paths) -> None:
    assert metadata_counters.totals(paths) == {"forwarded_refused": 0}


def test_a_refusal_within_the_interval_is_written_when_it_ends_without_another_request(
    paths: Paths,
) -> None:
    clock, timers = FakeClock(), FakeTimers()
    c = RefusalCounters(paths, pid=12, start_timer=timers, clock=clock)
    c.count_forwarded()  # the first: written at once, no timer
    assert timers.armed == []
    clock.now += 0.25
    c.count_forwarded()
    c.count_forwarded()  # one timer covers both
    assert [t.delay for t in timers.armed] == [FLUSH_INTERVAL - 0.25]
    assert metadata_counters.totals(paths) == {"forwarded_refused": 1}
    clock.now += FLUSH_INTERVAL
    timers.fire()
    assert metadata_counters.totals(paths) == {"forwarded_refused": 3}
    assert not c.dirty


def test_a_refusal_after_the_interval_is_written_at_once(paths: Paths) -> None:
    clock, timers = FakeClock(), FakeTimers()
    c = RefusalCounters(paths, pid=13, start_timer=timers, clock=clock)
    c.count_forwarded()
    clock.now += FLUSH_INTERVAL
    c.count_forwarded()
    assert timers.armed == []
    assert metadata_counters.totals(paths) == {"forwarded_refused": 2}


def test_a_flush_by_a_later_request_cancels_the_pending_timer(paths: Paths) -> None:
    clock, timers = FakeClock(), FakeTimers()
    c = RefusalCounters(paths, pid=14, start_timer=timers, clock=clock)
    c.count_forwarded()
    clock.now += 0.5
    c.count_forwarded()
    clock.now += FLUSH_INTERVAL
    c.flush()  # a plain GET came first
    assert metadata_counters.totals(paths) == {"forwarded_refused": 2}
    assert timers.armed[0].cancelled


def test_the_real_timer_writes_a_pending_count(paths: Paths) -> None:
    c = RefusalCounters(paths, pid=15)
    c.count_forwarded()
    c.count_forwarded()
    assert metadata_counters.totals(paths) == {"forwarded_refused": 1}
    timer = c._timer
    assert isinstance(timer, threading.Timer)
    timer.join(timeout=10 * FLUSH_INTERVAL)
    assert metadata_counters.totals(paths) == {"forwarded_refused": 2}
