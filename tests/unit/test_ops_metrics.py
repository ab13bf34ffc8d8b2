"""Metrics written by each service, and the exposition that sums them."""

from __future__ import annotations

import io
import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from vr.firewall.sync import RuleCounter
from vr.ops import diagrun, metrics
from vr.ops.metrics import Instrumented, MeteredPusher, Metrics
from vr.ops.server import OpsServer, netfilter_refusals, reap_dead
from vr.paths import Paths


def fresh() -> Metrics:
    return Metrics(CollectorRegistry())


def sample(m: Metrics, name: str, **labels: str) -> float | None:
    assert m.registry is not None
    return m.registry.get_sample_value(name, labels)


def call(app: Any, environ: dict[str, Any]) -> tuple[str, list[bytes]]:
    got: list[str] = []
    body = app(environ, lambda status, headers, exc_info=None: got.append(status))
    return got[0], list(body)


@pytest.mark.parametrize(
    ("path", "view"),
    [
        ("/latest/meta-data/instance-id", "cloudstack"),
        ("/latest/user-data", "cloudstack"),
        ("/latest/api/token", "token"),
        ("/2009-04-04/meta-data/", "ec2"),
        ("/metadata/v1.json", "digitalocean"),
        ("/../../etc/passwd", "other"),
    ],
)
def test_a_metadata_request_is_labelled_by_its_api_never_by_its_path(path: str, view: str) -> None:
    assert metrics.metadata_view({"PATH_INFO": path}) == view


def test_requests_are_counted_by_view_and_status() -> None:
    m = fresh()

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("404 Not Found", [])
        return [b"x"]

    wrapped = Instrumented(app, m, "metadata", metrics.metadata_view)
    for _ in range(2):
        assert call(wrapped, {"PATH_INFO": "/latest/nope"}) == ("404 Not Found", [b"x"])
    assert (
        sample(m, "vr_http_requests_total", service="metadata", view="cloudstack", status="404")
        == 2
    )


def test_password_fetches_and_acks_are_counted_from_the_answers() -> None:
    m = fresh()
    answers = {"send_my_password": b"s3cret-value", "saved_password": b"saved_password"}

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [])
        return [answers.get(environ.get("HTTP_DOMU_REQUEST", ""), b"bad_request")]

    wrapped = Instrumented(app, m, "passwords", metrics.password_view, metrics.password_events(m))
    call(wrapped, {"REQUEST_METHOD": "GET", "HTTP_DOMU_REQUEST": "send_my_password"})
    answers["send_my_password"] = b"saved_password"  # none stored any more
    call(wrapped, {"REQUEST_METHOD": "GET", "HTTP_DOMU_REQUEST": "send_my_password"})
    call(wrapped, {"REQUEST_METHOD": "GET", "HTTP_DOMU_REQUEST": "saved_password"})
    call(wrapped, {"REQUEST_METHOD": "POST"})
    assert sample(m, "vr_password_fetches_total", result="served") == 1
    assert sample(m, "vr_password_fetches_total", result="none") == 1
    assert sample(m, "vr_password_acks_total") == 1
    assert sample(m, "vr_http_requests_total", service="passwords", view="save", status="200") == 1
    assert m.registry is not None
    from prometheus_client import generate_latest

    assert b"s3cret" not in generate_latest(m.registry)


class FakePusher:
    def __init__(self, code: int) -> None:
        self.code = code

    def update_config(self, args: list[str], out: Any, err: Any) -> int:
        return self.code

    def apply_cfg(self, args: list[str], out: Any, err: Any) -> int:
        return self.code


def test_pushes_are_counted_by_type_and_result_and_timed() -> None:
    m = fresh()
    out = io.StringIO()
    MeteredPusher(FakePusher(0), m).update_config(["vm_metadata.json.a1"], out, out)
    MeteredPusher(FakePusher(1), m).update_config(["/var/cache/cloud/vm_password.json.b"], out, out)
    MeteredPusher(FakePusher(0), m).apply_cfg(["-c", "VR-1.cfg"], out, out)
    MeteredPusher(FakePusher(1), m).update_config(["whatever"], out, out)
    assert sample(m, "vr_pushes_total", type="vm_metadata", result="applied") == 1
    assert sample(m, "vr_pushes_total", type="vm_password", result="failed") == 1
    assert sample(m, "vr_pushes_total", type="cfg", result="applied") == 1
    assert sample(m, "vr_pushes_total", type="other", result="failed") == 1
    assert sample(m, "vr_push_apply_seconds_count", type="cfg") == 1


def row(comment: str, packets: int) -> RuleCounter:
    return RuleCounter("filter", "VR-INPUT", 1, comment, packets, packets * 60, "")


def test_netfilter_drops_are_refusals_by_reason() -> None:
    rows = [
        row("vr: binding 10.1.1.10 02:00:00:00:00:01", 3),
        row("vr: binding 10.1.1.11 02:00:00:00:00:02", 4),
        row("vr: eth0 unbound guest", 5),
        row("vr: eth0 guests 10.1.1.0/24", 100),
        row("vr: guarded ports elsewhere", 9),
    ]
    assert netfilter_refusals(rows) == {"spoof": 7, "unbound": 5}


def test_live_gauges_of_dead_processes_are_forgotten(tmp_path: Path) -> None:
    for name in ("gauge_livesum_111.db", "gauge_livesum_222.db", "counter_111.db"):
        (tmp_path / name).write_bytes(b"")
    assert reap_dead(str(tmp_path), lambda pid: pid == 222) == [111]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["counter_111.db", "gauge_livesum_222.db"]


@pytest.fixture
def served(paths: Paths) -> Iterator[int]:
    """The exposition on a loopback port, netfilter read from a fake."""
    rows = [row("vr: binding 10.1.1.10 02:00:00:00:00:01", 6)]
    server = OpsServer(("127.0.0.1", 0), paths, lambda: rows)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def test_the_exposition_adds_spoof_drops_and_appliance_figures(served: int) -> None:
    code, body = get(served, "/metrics")
    assert code == 200
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(body.decode())
        for s in fam.samples
    }
    assert samples[("vr_refused_total", (("reason", "spoof"),))] == 6
    assert samples[("vr_vms", ())] == 0
    assert samples[("vr_health", (("state", "down"),))] == 1  # no vr up runs here


def test_health_answers_503_with_the_reason_when_vr_up_is_not_running(served: int) -> None:
    code, body = get(served, "/health")
    assert code == 503
    doc = json.loads(body)
    assert (doc["state"], doc["reason"]) == ("down", "vr up is not running")


def test_other_paths_are_not_found(served: int) -> None:
    assert get(served, "/")[0] == 404
    assert get(served, "/metrics/../etc")[0] == 404


# --- tail, in-process -----------------------------------------------------------------


def test_tail_prints_the_last_lines(tmp_path: Path) -> None:
    log = tmp_path / "cloud.log"
    log.write_text("".join(f"line {i}\n" for i in range(100_000)))
    out, err = io.StringIO(), io.StringIO()
    assert diagrun.tail(log, 3, out, err) == 0
    assert out.getvalue() == "line 99997\nline 99998\nline 99999\n"


def test_tail_of_a_missing_log_says_so(tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    assert diagrun.tail(tmp_path / "cloud.log", 3, out, err) == 1
    assert "no log yet" in err.getvalue()


def test_follow_prints_appended_lines_and_crosses_a_rotation(tmp_path: Path) -> None:
    log = tmp_path / "cloud.log"
    log.write_text("old\n")
    written: list[str] = []

    def append() -> None:
        with log.open("a") as f:
            f.write("one\n")

    def rotate() -> None:  # as vr.logs does at 5 MiB: rename, then a new file
        log.rename(tmp_path / "cloud.log.1")
        log.write_text("two\n")

    steps = iter([append, rotate, lambda: None])

    class Out:
        def write(self, s: str) -> int:
            written.append(s)
            return len(s)

    def stopped() -> bool:
        step = next(steps, None)
        if step is None:
            return True
        step()
        return False

    assert diagrun.follow(log, Out(), Out(), stopped) == 0
    assert "".join(written) == "old\none\ntwo\n"
