"""Subcommand ``serve-ops``: Prometheus metrics and health on the metrics port."""

from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from vr.cmd.args import add_root, open_root

LOG = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve-ops",
        help="serve Prometheus metrics and health (GET /metrics, GET /health)",
        description="Serve GET /metrics (Prometheus text format: requests, refusals, "
        "pushes, password fetches, VMs, caches, restarts of every vr process) and GET "
        "/health (JSON: ready, degraded or down; 200 or 503) on the metrics port. The "
        "firewall accepts the port only on the control device and lo.",
    )
    add_root(p)
    p.add_argument(
        "--bind",
        default=None,
        help="IPV4:PORT to listen on (default 0.0.0.0:<metrics_port from vr.json>)",
    )
    p.add_argument(
        "--no-netfilter",
        action="store_true",
        help="do not read netfilter counters (spoof drops) with python-iptables",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from vr import config
    from vr.cmd.serve_passwords import parse_bind
    from vr.errors import VRError
    from vr.ops import metrics

    paths = open_root(args)
    metrics.init(paths)
    from vr.ops.server import OpsServer

    try:
        cfg = config.load(paths)
        bind = parse_bind(args.bind or f"0.0.0.0:{cfg.metrics_port}")
    except (VRError, ValueError) as exc:
        LOG.error("metrics server not started: %s", exc)
        return 2
    read = None
    if not args.no_netfilter:

        def read() -> list[Any]:
            from vr.firewall import state as fw  # imported at the first scrape only

            return fw.live_counters(fw.real_tables())

    host, _, port = bind.rpartition(":")
    try:
        server = OpsServer((host, int(port)), paths, read)
    except OSError as exc:
        LOG.error("metrics server cannot listen on %s: %s", bind, exc)
        return 1
    stop = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        stop.set()

    for s in (signal.SIGTERM, signal.SIGINT):
        signal.signal(s, on_signal)
    thread = threading.Thread(target=server.serve_forever, name="ops-http", daemon=True)
    thread.start()
    LOG.info("metrics and health for %s on %s (GET /metrics, GET /health)", paths.root, bind)
    stop.wait()
    server.shutdown()
    server.server_close()
    LOG.info("metrics server stopped")
    return 0
