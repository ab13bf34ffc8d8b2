"""The health verdict: ready, degraded (which service, since when) or down."""

from __future__ import annotations

from typing import Any

from vr.ops.health import DEGRADED, DOWN, READY, assess


def sup(**services: dict[str, Any]) -> dict[str, Any]:
    return {"pid": 7, "ready": True, "stopped": False, "started": 1000.0, "services": services}


def test_every_service_answering_is_ready() -> None:
    h = assess(sup(agent={"up": True}, metadata={"up": True}))
    assert (h.state, h.exit_code, h.http_status) == (READY, 0, 200)
    assert h.down == ()


def test_one_service_down_is_degraded_naming_it_and_since_when() -> None:
    h = assess(
        sup(agent={"up": True}, passwords={"up": False, "down_since": 1234.5, "restarts": 3})
    )
    assert (h.state, h.exit_code, h.http_status) == (DEGRADED, 1, 503)
    assert h.to_dict()["degraded"] == [{"service": "passwords", "since": 1234.5, "restarts": 3}]
    assert h.reason.startswith("passwords down since ")


def test_a_service_without_a_recorded_time_is_down_since_vr_up_started() -> None:
    h = assess(sup(agent={"up": True}, ops={"up": False}))
    assert h.down[0].since == 1000.0


def test_no_service_answering_is_down() -> None:
    h = assess(sup(agent={"up": False}, metadata={"up": False}))
    assert (h.state, h.exit_code) == (DOWN, 2)
    assert [d.name for d in h.down] == ["agent", "metadata"]


def test_a_stopped_or_killed_vr_up_is_down() -> None:
    assert assess({"stopped": True, "services": {}}).reason == "vr up is not running"
    died = assess({"stopped": True, "died": True, "pid": 42, "services": {}})
    assert (died.state, died.reason) == (DOWN, "vr up (pid 42) ended without stopping")


def test_a_vr_up_without_services_yet_is_down() -> None:
    assert assess(sup()).state == DOWN
