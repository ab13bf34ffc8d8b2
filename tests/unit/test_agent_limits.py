"""The slow-down of repeated failed logins, with a hand-driven clock."""

from __future__ import annotations

from vr.agent.limits import AuthThrottle, PreAuthSlots


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_each_failure_from_one_address_doubles_the_delay_up_to_the_cap() -> None:
    throttle = AuthThrottle(base=0.5, cap=4.0, clock=Clock())
    delays = [throttle.failure("192.0.2.1")[1] for _ in range(6)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]


def test_other_addresses_are_not_slowed_by_someone_elses_failures() -> None:
    throttle = AuthThrottle(base=0.5, clock=Clock())
    for _ in range(5):
        throttle.failure("192.0.2.1")
    assert throttle.failure("192.0.2.2") == (1, 0.5)


def test_a_successful_login_resets_the_count() -> None:
    throttle = AuthThrottle(clock=Clock())
    throttle.failure("192.0.2.1")
    throttle.failure("192.0.2.1")
    throttle.success("192.0.2.1")
    assert throttle.failures("192.0.2.1") == 0
    assert throttle.failure("192.0.2.1")[0] == 1


def test_failures_are_forgotten_after_a_quiet_window() -> None:
    clock = Clock()
    throttle = AuthThrottle(window=60, clock=clock)
    throttle.failure("192.0.2.1")
    throttle.failure("192.0.2.1")
    clock.now += 61
    assert throttle.failures("192.0.2.1") == 0
    assert throttle.failure("192.0.2.1")[0] == 1


def test_memory_is_bounded_by_forgetting_the_oldest_address() -> None:
    clock = Clock()
    throttle = AuthThrottle(max_tracked=3, clock=clock)
    for i in range(5):
        clock.now += 1
        throttle.failure(f"192.0.2.{i}")
    assert throttle.failures("192.0.2.0") == 0
    assert throttle.failures("192.0.2.1") == 0
    assert throttle.failures("192.0.2.4") == 1


def test_one_address_gets_only_so_many_connections_before_login() -> None:
    slots = PreAuthSlots(per_address=2)
    first, second = slots.take("192.0.2.1"), slots.take("192.0.2.1")
    assert first is not None and second is not None
    assert slots.take("192.0.2.1") is None
    assert slots.take("192.0.2.2") is not None  # others are not affected


def test_a_login_or_a_close_gives_the_slot_back_once() -> None:
    slots = PreAuthSlots(per_address=1)
    slot = slots.take("192.0.2.1")
    assert slot is not None
    slot.release()  # logged in
    slot.release()  # and later closed: not given back twice
    assert slots.waiting("192.0.2.1") == 0
    again = slots.take("192.0.2.1")
    assert again is not None and slots.take("192.0.2.1") is None
