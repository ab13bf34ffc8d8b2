"""Counter files: written rarely, summed across workers, reset per service run."""

from __future__ import annotations

import json

from vr import metadata_counters
from vr.metadata_counters import Counters
from vr.paths import Paths


def test_first_count_is_written_at_once_and_later_ones_batched(paths: Paths) -> None:
    c = Counters(paths, pid=11)
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
    Counters(paths, pid=1).count_forwarded()
    c2 = Counters(paths, pid=2)
    c2.count_forwarded()
    (paths.metadata_counters / "3.json").write_text("{not json")
    (paths.metadata_counters / "4.json").write_text(json.dumps({"forwarded_refused": "x"}))
    assert metadata_counters.totals(paths) == {"forwarded_refused": 2}


def test_reset_forgets_an_earlier_run(paths: Paths) -> None:
    Counters(paths, pid=1).count_forwarded()
    metadata_counters.reset(paths)
    assert metadata_counters.totals(paths) == {"forwarded_refused": 0}


def test_totals_without_any_file_are_zero(paths: Paths) -> None:
    assert metadata_counters.totals(paths) == {"forwarded_refused": 0}
