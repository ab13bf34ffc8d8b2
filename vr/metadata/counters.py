"""The metadata service's refusal counts, kept in the appliance's Prometheus metrics.

One counting system: a refused forwarded request is ``vr_refused_total{reason=
"forwarded"}`` in prometheus-client's multiprocess files (``Paths.metrics``, see
:mod:`vr.ops.metrics`), written by the worker at once (a memory-mapped add, no
flush). ``vr status`` reads :func:`totals` from the same files the metrics endpoint
sums, so both show the same figure: everything since ``vr up`` started, including
workers that have since been replaced.
"""

from __future__ import annotations

import logging
import shutil

from prometheus_client import CollectorRegistry

from vr.ops.metrics import Metrics, multiprocess, process_metrics, read_samples
from vr.paths import Paths

LOG = logging.getLogger(__name__)

FIELDS = ("forwarded_refused",)
REASONS = {"forwarded_refused": "forwarded"}
"""``vr status`` field -> ``vr_refused_total`` reason."""


class Counters:
    """This worker's refusal counts. ``metrics``: the process's :class:`Metrics`;
    None makes one (in the shared files after :func:`vr.ops.metrics.init`, else in
    a registry of its own)."""

    def __init__(self, paths: Paths, metrics: Metrics | None = None) -> None:
        if metrics is None:
            metrics = process_metrics() if multiprocess() else Metrics(CollectorRegistry())
        self.metrics = metrics

    def count_forwarded(self) -> None:
        """Count one refused request carrying X-Forwarded-For or Forwarded."""
        self.metrics.count_refused("forwarded")


def reset(paths: Paths) -> None:
    """Remove the per-worker JSON files of earlier versions (``run/vr/metadata``):
    the counts now live in the metrics files, which ``vr up`` empties at start."""
    shutil.rmtree(paths.run / "metadata", ignore_errors=True)


def totals(paths: Paths) -> dict[str, int]:
    """Every worker's refusals since ``vr up`` (or the service) started."""
    samples = read_samples(paths.metrics)
    out = dict.fromkeys(FIELDS, 0)
    for field, reason in REASONS.items():
        out[field] = int(samples.get(("vr_refused_total", (("reason", reason),)), 0.0))
    return out
