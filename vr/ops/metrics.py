"""Prometheus metrics of every vr process, correct across gunicorn workers.

prometheus-client's multiprocess mode: each process writes its counts into
memory-mapped files in ``Paths.metrics`` (``<root>/run/vr/metrics``, named by pid),
and the exposition (:mod:`vr.ops.server`) sums them. ``vr up`` empties the folder
when it starts and passes ``PROMETHEUS_MULTIPROC_DIR`` to its services, so every
figure is "since this vr up started", including workers that have since exited.
A service started on its own (tests, ``vr serve-metadata``) calls :func:`init`,
which points at the same folder.

prometheus-client decides between single- and multiprocess values when its
``values`` module is imported; :func:`init` therefore also sets that choice, so
the order of imports does not matter. Without :func:`init` (unit tests), metrics
stay inside the process, in the registry given to :class:`Metrics`.

Label values are fixed small sets (a view, a status code, a reason): never a VM
address, a file name or anything a guest chooses.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from vr.paths import Paths

LOG = logging.getLogger(__name__)

ENV = "PROMETHEUS_MULTIPROC_DIR"

REFUSAL_REASONS = ("forwarded", "rate_limit", "connections_full", "spoof", "unbound", "rate")
"""``vr_refused_total{reason}``: forwarded headers, the per-address connection limit,
a worker at its connection limit, and the netfilter drops (a bound address from
another MAC, an unbound address when MAC binding is required), and the per-VM
request rate of the metadata service (429, vr.metadata.ratelimit)."""

PUSH_TYPES = ("vm_metadata", "vm_password", "guest_network", "vm_dhcp_entry", "cfg", "other")
PUSH_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def init(paths: Paths) -> None:
    """Count into this root's shared folder (call before the first metric is made,
    before gunicorn forks). Keeps a folder ``vr up`` already chose."""
    folder = os.environ.setdefault(ENV, str(paths.metrics))
    os.makedirs(folder, exist_ok=True)
    from prometheus_client import values

    values.ValueClass = values.get_value_class()  # type: ignore[no-untyped-call]


def multiprocess() -> bool:
    from prometheus_client import values

    return values.ValueClass is not values.MutexValue


def clean(folder: Any) -> None:
    """Remove the counts of an earlier run (``vr up`` at start, before any service)."""
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return
    for n in names:
        if n.endswith(".db"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, n))


def push_type(name: str) -> str:
    """The label of a pushed file name: its CloudStack type, ``cfg`` for a batch."""
    from vr import cloudstack

    if name.startswith("VR-") and name.endswith(".cfg"):
        return "cfg"
    stem = cloudstack.file_stem(name)
    return stem if stem in cloudstack.FILE_TYPES else "other"


class Metrics:
    """The metrics one process writes. ``registry``: None in multiprocess mode (the
    files are the registry); a test passes its own :class:`CollectorRegistry`."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        r = self.registry = registry
        self.requests = Counter(
            "vr_http_requests",
            "HTTP requests answered, by service, view and status code",
            ["service", "view", "status"],
            registry=r,
        )
        self.refused = Counter(
            "vr_refused", "Requests or packets refused, by reason", ["reason"], registry=r
        )
        self.pushes = Counter(
            "vr_pushes", "Pushes applied over SSH, by type and result", ["type", "result"],
            registry=r,
        )  # fmt: skip
        self.push_seconds = Histogram(
            "vr_push_apply_seconds",
            "Time to apply one push (read, validate, commit, firewall), by type",
            ["type"],
            buckets=PUSH_BUCKETS,
            registry=r,
        )
        self.password_fetches = Counter(
            "vr_password_fetches",
            "Password fetches (send_my_password), by result: served or none stored",
            ["result"],
            registry=r,
        )
        self.password_acks = Counter(
            "vr_password_acks", "Password acknowledgements (saved_password)", registry=r
        )
        self.metadata_cache_vms = Gauge(
            "vr_metadata_cache_vms",
            "VMs held in the metadata workers' caches (summed over live workers)",
            multiprocess_mode="livesum",
            registry=r,
        )
        self.diagnostics = Counter(
            "vr_diagnostics",
            "Read-only diagnostic commands run over SSH, by command",
            ["command"],
            registry=r,
        )

    def count_refused(self, reason: str, n: int = 1) -> None:
        self.refused.labels(reason=reason).inc(n)


class Instrumented:
    """WSGI middleware counting each answer by ``view(environ)`` and status code.

    ``after(environ, status, body)`` is called after each answer (the password
    service counts fetches and acknowledgements there); the body is only compared,
    never recorded.
    """

    def __init__(
        self,
        app: Callable[..., Iterable[bytes]],
        metrics: Metrics,
        service: str,
        view: Callable[[dict[str, Any]], str],
        after: Callable[[dict[str, Any], str, Iterable[bytes]], None] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.service = service
        self.view = view
        self.after = after
        self._children: dict[tuple[str, str], Any] = {}

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        status = ["000"]

        def recording(code: str, headers: Any, exc_info: Any = None) -> Any:
            status[0] = code[:3]
            return start_response(code, headers, exc_info) if exc_info else start_response(
                code, headers
            )  # fmt: skip

        body = self.app(environ, recording)
        if environ.get("vr.held"):  # parked until a change (vr.http.worker): no answer yet
            return body
        if self.after is not None:
            self.after(environ, status[0], body)
        key = (self.view(environ), status[0])
        child = self._children.get(key)
        if child is None:  # labels() costs a lock and a dict build: once per series
            child = self._children[key] = self.metrics.requests.labels(self.service, *key)
        child.inc()
        return body


def metadata_view(environ: dict[str, Any]) -> str:
    """Which API a metadata request used (a fixed label, never the path itself)."""
    path = environ.get("PATH_INFO", "")
    if path.startswith("/latest/api/token"):
        return "token"
    if path.startswith("/metadata/v1"):
        return "digitalocean"
    if path.startswith("/latest/"):
        return "cloudstack"
    if path[1:5].isdigit() and path[5:6] == "-":
        return "ec2"
    return "other"


PASSWORD_VIEWS = {"send_my_password": "fetch", "saved_password": "ack"}


def password_view(environ: dict[str, Any]) -> str:
    if environ.get("REQUEST_METHOD") == "POST":
        return "save"
    return PASSWORD_VIEWS.get(environ.get("HTTP_DOMU_REQUEST", ""), "other")


def password_events(
    metrics: Metrics,
) -> Callable[[dict[str, Any], str, Iterable[bytes]], None]:
    """Counts fetches (served or none stored) and acknowledgements from the answers."""
    from vr.passwords.app import SAVED

    none = SAVED.encode()

    def after(environ: dict[str, Any], status: str, body: Iterable[bytes]) -> None:
        view = password_view(environ)
        if status != "200" or not isinstance(body, list):
            return
        if view == "fetch":
            served = body != [none]
            metrics.password_fetches.labels("served" if served else "none").inc()
        elif view == "ack":
            metrics.password_acks.inc()

    return after


class MeteredPusher:
    """Counts each push by type and result and times its apply (wraps the applier)."""

    def __init__(self, inner: Any, metrics: Metrics) -> None:
        self.inner = inner
        self.metrics = metrics

    def _timed(self, kind: str, run: Callable[[], int]) -> int:
        start = time.monotonic()
        code = 1
        try:
            code = run()
            return code
        finally:
            self.metrics.push_seconds.labels(kind).observe(time.monotonic() - start)
            self.metrics.pushes.labels(kind, "applied" if code == 0 else "failed").inc()

    def update_config(self, args: list[str], out: Any, err: Any) -> int:
        kind = push_type(os.path.basename(args[0])) if args else "other"
        return self._timed(kind, lambda: int(self.inner.update_config(args, out, err)))

    def apply_cfg(self, args: list[str], out: Any, err: Any) -> int:
        return self._timed("cfg", lambda: int(self.inner.apply_cfg(args, out, err)))


_PROCESS: dict[int, Metrics] = {}


def process_metrics() -> Metrics:
    """This process's one :class:`Metrics` in multiprocess mode (made on first use,
    again after a fork). One per process, not one per caller: each metric object
    keeps its own running value of a file entry and writes it back whole, so two
    objects counting the same labels in one process would overwrite each other."""
    pid = os.getpid()
    m = _PROCESS.get(pid)
    if m is None:
        _PROCESS.clear()  # a parent's, inherited through fork
        m = _PROCESS[pid] = Metrics()
    return m


def refusal_counter() -> Callable[[str], None]:
    """``count(reason)`` for a gunicorn worker: into the shared files when
    :func:`init` ran before the fork, else nothing (unit tests of the worker)."""
    if not multiprocess():
        return lambda reason: None
    return process_metrics().count_refused


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def read_samples(folder: Any) -> Samples:
    """Every sample summed over the multiprocess files in ``folder``:
    ``{(sample name, sorted labels): value}``; an absent folder is no sample."""
    from prometheus_client.multiprocess import MultiProcessCollector

    if not os.path.isdir(folder):
        return {}
    out: Samples = {}
    collector = MultiProcessCollector(None, path=str(folder))  # type: ignore[no-untyped-call]
    for family in collector.collect():  # type: ignore[no-untyped-call]
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def metered(make: Callable[[Paths], Any], metrics: Metrics) -> Callable[[Paths], Any]:
    """The agent's applier factory, each applier counted by :class:`MeteredPusher`."""
    return lambda paths: MeteredPusher(make(paths), metrics)
