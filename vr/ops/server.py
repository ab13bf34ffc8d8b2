"""``vr serve-ops``: Prometheus metrics and health on the control network.

``GET /metrics``: every process's counters summed from the multiprocess files
(:mod:`vr.ops.metrics`), plus figures read at scrape time: services up and
restarted (from ``vr up``'s status file), VMs and pending passwords held (the
store), the health verdict, and the netfilter drops of spoofed and unbound guest
addresses added to ``vr_refused_total``. ``GET /health``: the verdict of
:mod:`vr.ops.health` as JSON, 200 when ready, 503 when degraded or down.

The port is bound on every address but the firewall accepts it only on the
control device and ``lo`` (``vr/firewall/model.py``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from vr.firewall.sync import RuleCounter
from vr.paths import Paths

LOG = logging.getLogger(__name__)

ReadCounters = Callable[[], list[RuleCounter]]

DROP_REASONS = (("vr: binding ", "spoof"), (" unbound guest", "unbound"))
"""Rule comment (prefix or suffix) -> refusal reason of its packets."""

LIVE_GAUGE = re.compile(r"gauge_live\w*?_(\d+)\.db$")


def netfilter_refusals(rows: list[RuleCounter]) -> dict[str, int]:
    """Packets our DROP rules refused, by reason (pure)."""
    out = {"spoof": 0, "unbound": 0}
    for r in rows:
        if r.comment.startswith("vr: binding "):
            out["spoof"] += r.packets
        elif r.comment.endswith(" unbound guest"):
            out["unbound"] += r.packets
    return out


def reap_dead(folder: str, alive: Callable[[int], bool]) -> list[int]:
    """Forget the live gauges of processes that are gone (a worker killed with its
    service has no exit hook); returns their pids."""
    from prometheus_client import multiprocess

    dead = set()
    for name in os.listdir(folder):
        m = LIVE_GAUGE.match(name)
        if m and not alive(int(m.group(1))):
            dead.add(int(m.group(1)))
    for pid in dead:
        multiprocess.mark_process_dead(pid, folder)  # type: ignore[no-untyped-call]
    return sorted(dead)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ApplianceCollector:
    """The exposition of one root (see the module docstring)."""

    def __init__(self, paths: Paths, read_counters: ReadCounters | None) -> None:
        self.paths = paths
        self.read_counters = read_counters
        self._fw_lock = threading.Lock()  # python-iptables is one process-wide object
        self._fw_warned = False

    def _netfilter(self) -> dict[str, int] | None:
        if self.read_counters is None:
            return None
        try:
            with self._fw_lock:
                rows = self.read_counters()
        except Exception as exc:
            if not self._fw_warned:
                LOG.warning("netfilter counters not readable, no spoof drops counted: %s", exc)
                self._fw_warned = True
            return None
        return netfilter_refusals(rows)

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.multiprocess import MultiProcessCollector

        folder = str(self.paths.metrics)
        refused: Metric | None = None
        if os.path.isdir(folder):
            reap_dead(folder, pid_alive)
            collector = MultiProcessCollector(None, path=folder)  # type: ignore[no-untyped-call]
            for family in collector.collect():  # type: ignore[no-untyped-call]
                if family.name == "vr_refused":
                    refused = family
                else:
                    yield family
        if refused is None:
            refused = CounterMetricFamily(
                "vr_refused", "Requests or packets refused, by reason", labels=["reason"]
            )
        drops = self._netfilter()
        for reason, packets in (drops or {}).items():
            refused.add_sample("vr_refused_total", {"reason": reason}, float(packets))
        yield refused
        yield from self._appliance()

    def _appliance(self) -> Iterator[Metric]:
        from vr.ops.status import collect_status
        from vr.store import read_passwords

        st = collect_status(self.paths)
        sup = st["supervisor"]
        up = GaugeMetricFamily("vr_service_up", "1 if the service answers", labels=["service"])
        restarts = CounterMetricFamily(
            "vr_service_restarts",
            "Service restarts: after a crash, or for settings edited in vr.json",
            labels=["service", "reason"],
        )
        for name, svc in sorted(sup.get("services", {}).items()):
            up.add_metric([name], 1.0 if svc.get("up") else 0.0)
            restarts.add_metric([name, "crash"], float(svc.get("restarts", 0)))
            restarts.add_metric([name, "reconfigure"], float(svc.get("reconfigured", 0)))
        yield up
        yield restarts
        health = GaugeMetricFamily("vr_health", "1 for the current health state", labels=["state"])
        for state in ("ready", "degraded", "down"):
            health.add_metric([state], 1.0 if st["health"]["state"] == state else 0.0)
        yield health
        yield GaugeMetricFamily("vr_vms", "VMs held (with metadata)", value=float(st["vms"]))
        yield GaugeMetricFamily(
            "vr_guest_networks", "Guest networks served", value=float(st["networks"])
        )
        try:
            pending = len(read_passwords(self.paths))
        except Exception:  # a locked or broken file is the store's to report
            pending = 0
        yield GaugeMetricFamily(
            "vr_passwords_pending", "Passwords held until a guest acknowledges them",
            value=float(pending),
        )  # fmt: skip


def health_body(paths: Paths) -> tuple[int, bytes]:
    from vr.ops.health import HTTP
    from vr.ops.status import collect_status

    st = collect_status(paths)
    doc = {
        **st["health"],
        "services": {
            name: {
                k: svc.get(k)
                for k in ("up", "pid", "port", "restarts", "reconfigured", "down_since")
            }
            for name, svc in sorted(st["supervisor"].get("services", {}).items())
        },
        "vms": st["vms"],
        "last_push": st["last_push"],
    }
    return HTTP[st["health"]["state"]], (json.dumps(doc, sort_keys=True) + "\n").encode()


class OpsHandler(BaseHTTPRequestHandler):
    server: OpsServer
    server_version = "vr-ops"
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                body = generate_latest(self.server.registry)
                self._send(200, body, "text/plain; version=0.0.4; charset=utf-8")
            elif path in ("/health", "/healthz"):
                code, body = health_body(self.server.paths)
                self._send(code, body, "application/json")
            else:
                self._send(404, b"not found: /metrics or /health\n", "text/plain")
        except Exception:
            LOG.exception("ops request for %r failed", path[:100])
            self._send(500, b"internal error, see cloud.log\n", "text/plain")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # a scrape every few seconds is not an event worth a log line


class OpsServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64

    def __init__(
        self, address: tuple[str, int], paths: Paths, read_counters: ReadCounters | None
    ) -> None:
        self.paths = paths
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ApplianceCollector(paths, read_counters))
        super().__init__(address, OpsHandler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(10)  # a client that stalls holds one thread, not forever
        super().finish_request(request, client_address)
