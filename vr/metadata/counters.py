"""The metadata and password services' refusal counts, kept in the appliance's Prometheus metrics.

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
from typing import Literal

from prometheus_client import CollectorRegistry

from vr.ops.metrics import Metrics, multiprocess, process_metrics, read_samples
from vr.paths import Paths

LOG = logging.getLogger(__name__)

FIELDS = ("forwarded_refused",)
Service = Literal["metadata", "passwords"]
REASONS: dict[Service, dict[str, str]] = {
    "metadata": {"forwarded_refused": "forwarded"},
    "passwords": {"forwarded_refused": "forwarded_password"},
}
"""Per service: ``vr status`` field -> ``vr_refused_total`` reason."""


class RefusalCounters:
    """This worker's refusal counts for ``service``. ``metrics``: the process's
    :class:`Metrics`; None makes one (in the shared files after
    :func:`vr.ops.metrics.init`, else in a registry of its own)."""

    def __init__(
        self, paths: Paths, metrics: Metrics | None = None, service: Service = "metadata"
    ) -> None:
        if metrics is None:
            metrics = process_metrics() if multiprocess() else Metrics(CollectorRegistry())
        self.metrics = metrics
        self._forwarded = REASONS[service]["forwarded_refused"]

    def count_forwarded(self) -> None:
        """Count one refused request carrying X-Forwarded-For or Forwarded."""
        self.metrics.count_refused(self._forwarded)

    def count_rate(self) -> None:
        """Count one request refused by the per-VM rate limit (429)."""
        self.metrics.count_refused("rate")


def reset(paths: Paths) -> None:
    """Remove the per-worker JSON files of earlier versions (``run/vr/metadata``):
    the counts now live in the metrics files, which ``vr up`` empties at start."""
    shutil.rmtree(paths.run / "metadata", ignore_errors=True)


def totals(paths: Paths, service: Service = "metadata") -> dict[str, int]:
    """Every worker's refusals of ``service`` since ``vr up`` (or the service) started."""
    samples = read_samples(paths.metrics)
    out = dict.fromkeys(FIELDS, 0)
    for field, reason in REASONS[service].items():
        out[field] = int(samples.get(("vr_refused_total", (("reason", reason),)), 0.0))
    return out
