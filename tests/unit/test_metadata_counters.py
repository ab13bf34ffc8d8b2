"""Refusal counts live in prometheus-client's multiprocess files, shared by every
worker, and ``totals`` (read by ``vr status``) sums them."""

from __future__ import annotations

import multiprocessing
import os
from pathlib import Path

from vr.metadata import counters
from vr.ops import metrics
from vr.paths import Paths


def _refuse_in_a_worker(root: str, n: int) -> None:
    """A forked process counting as a gunicorn worker does (after init)."""
    paths = Paths(Path(root))
    metrics.init(paths)
    c = counters.RefusalCounters(paths)
    for _ in range(n):
        c.count_forwarded()


def _run_worker(root: Path, n: int) -> int:
    # spawn: a fresh interpreter, as unrelated to the test process as a worker is
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_refuse_in_a_worker, args=(str(root), n))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert p.pid is not None
    return p.pid


def test_totals_sum_the_refusals_of_every_worker_including_exited_ones(paths: Paths) -> None:
    pids = {_run_worker(paths.root, 2), _run_worker(paths.root, 3)}
    assert counters.totals(paths) == {"forwarded_refused": 5}
    files = {f for f in os.listdir(paths.metrics) if f.endswith(".db")}
    assert {f"counter_{pid}.db" for pid in pids} <= files


def test_totals_without_any_file_are_zero(paths: Paths) -> None:
    assert counters.totals(paths) == {"forwarded_refused": 0}


def test_cleaning_forgets_an_earlier_run(paths: Paths) -> None:
    _run_worker(paths.root, 4)
    metrics.clean(paths.metrics)
    assert counters.totals(paths) == {"forwarded_refused": 0}


def test_reset_removes_the_json_files_of_earlier_versions(paths: Paths) -> None:
    legacy = paths.run / "metadata"
    legacy.mkdir(parents=True)
    (legacy / "12.json").write_text('{"forwarded_refused": 4}')
    counters.reset(paths)
    assert not legacy.exists()


def _refuse_passwords_in_a_worker(root: str, n: int) -> None:
    paths = Paths(Path(root))
    metrics.init(paths)
    c = counters.RefusalCounters(paths, service="passwords")
    for _ in range(n):
        c.count_forwarded()


def test_the_password_service_counts_apart_from_the_metadata_service(paths: Paths) -> None:
    _run_worker(paths.root, 2)
    ctx = multiprocessing.get_context("spawn")
    p = ctx.Process(target=_refuse_passwords_in_a_worker, args=(str(paths.root), 3))
    p.start()
    p.join(60)
    assert p.exitcode == 0
    assert counters.totals(paths) == {"forwarded_refused": 2}
    assert counters.totals(paths, "passwords") == {"forwarded_refused": 3}
