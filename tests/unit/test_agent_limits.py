"""The slow-down of repeated failed logins, with a hand-driven clock."""

from __future__ import annotations

from vr.agent.limits import Admission, AgentLimits, AuthThrottle, Decisions


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


# --- admission: who starts, who waits, who is turned away --------------------------------

MGMT = "192.0.2.1"
STRANGERS = ["198.51.100.1", "198.51.100.2", "198.51.100.3", "198.51.100.4"]


def admission(clock: Clock | None = None, **limits: int) -> Admission[str]:
    return Admission(AgentLimits(**limits), clock=clock or Clock())


def started(d: Decisions[str]) -> list[str]:
    return [item for item, _ in d.start]


def test_a_strangers_connections_beyond_its_share_wait_and_start_when_a_place_frees() -> None:
    adm = admission(max_unauthenticated_per_address=2)
    first, second = adm.arrive("a1", STRANGERS[0]), adm.arrive("a2", STRANGERS[0])
    third = adm.arrive("a3", STRANGERS[0])
    assert started(first) == ["a1"] and started(second) == ["a2"]
    assert third.start == [] and third.close == []
    assert third.waiting == [("a3", f"2 connections from {STRANGERS[0]} not logged in yet")]
    assert started(adm.arrive("b1", STRANGERS[1])) == ["b1"]  # others are not affected
    assert started(adm.done(first.start[0][1])) == ["a3"]


def test_a_login_gives_the_place_back_and_makes_the_address_known() -> None:
    adm = admission(max_unauthenticated_per_address=1)
    ((_, ticket),) = adm.arrive("m1", MGMT).start
    waits = adm.arrive("m2", MGMT)
    assert waits.start == []
    assert started(adm.login(ticket)) == ["m2"]
    assert adm.is_known(MGMT) and adm.running() == (2, 0)
    adm.done(ticket)
    adm.done(ticket)  # twice: given back once
    assert adm.running() == (1, 0)


def test_the_management_servers_first_64_pushes_all_start_after_its_first_login() -> None:
    adm = admission()
    first = adm.arrive("m0", MGMT)
    rest = [adm.arrive(f"m{i}", MGMT) for i in range(1, 64)]
    assert sum(len(d.start) for d in rest) == 15  # 16 from an unknown address at once ...
    assert all(d.close == [] for d in rest)  # ... the others wait, none is turned away
    assert len(started(adm.login(first.start[0][1]))) == 48  # ... and start once it is known
    assert adm.waiting() == 0


def test_strangers_holding_every_place_cannot_keep_a_known_address_out() -> None:
    adm = admission()
    adm.login(adm.arrive("warm-up", MGMT).start[0][1])
    held = [adm.arrive(f"s{i}", STRANGERS[i % 4]) for i in range(400)]
    assert sum(len(d.start) for d in held) == 32
    assert adm.waiting() == 256  # and 112 strangers were closed
    pushes = [adm.arrive(f"m{i}", MGMT) for i in range(63)]
    assert all(len(d.start) == 1 for d in pushes)  # 63 + the warm-up = 64 at once
    # beyond max_sessions the management server waits, taking a stranger's waiting place
    more = adm.arrive("m63", MGMT)
    assert more.start == [] and more.waiting and len(more.close) == 1
    assert more.close[0][0].startswith("s") and adm.waiting() == 256


def test_a_stranger_filling_the_wait_makes_room_for_others_not_for_itself() -> None:
    adm = admission(max_unauthenticated=1, max_waiting=4)
    for i in range(5):
        adm.arrive(f"a{i}", STRANGERS[0])
    assert adm.waiting() == 4
    own = adm.arrive("a5", STRANGERS[0])
    assert [item for item, _ in own.close] == ["a5"]
    other = adm.arrive("b0", STRANGERS[1])
    assert [item for item, _ in other.close] == ["a4"]  # the hoarder's newest
    assert other.waiting == [("b0", "1 connections not logged in yet")]


def test_a_freed_place_goes_to_the_address_with_the_fewest_running() -> None:
    adm = admission(max_unauthenticated=2)
    a1 = adm.arrive("a1", STRANGERS[0])
    adm.arrive("a2", STRANGERS[0])
    for i in range(3):
        adm.arrive(f"a{i + 3}", STRANGERS[0])  # waits first
    adm.arrive("b1", STRANGERS[1])  # waits last, but its address runs nothing
    assert started(adm.done(a1.start[0][1])) == ["b1"]


def test_waiting_connections_are_closed_after_the_auth_timeout() -> None:
    clock = Clock()
    adm = admission(clock, max_unauthenticated_per_address=1, auth_timeout=30)
    adm.arrive("a1", STRANGERS[0])
    adm.arrive("a2", STRANGERS[0])
    clock.now += 30
    assert adm.expire().close == []
    clock.now += 1
    assert adm.expire().close == [("a2", "waited 30s for a free place")]
    assert adm.waiting() == 0
