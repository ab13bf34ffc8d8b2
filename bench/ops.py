"""Benchmark: what the metrics cost a metadata request, and what a scrape costs.

Run from the repository (no root needed)::

    PYTHONPATH=$PWD .venv/bin/python bench/ops.py [--requests 200000] [--workers 4]

In one process, in prometheus-client's multiprocess mode (a temporary folder), the
metadata application answers ``GET /latest/meta-data/instance-id`` through WSGI
directly (no sockets: the cost of counting is not hidden behind the network) as
(a) the bare application, the reference, and (b) wrapped as ``serve-metadata`` runs
it (counted by view and status, cache gauge set). Then ``--workers`` forked
processes count, and one scrape (the exposition ``vr serve-ops`` serves) is timed.
Prints microseconds per request for both and the difference.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def per_request(app: Any, n: int) -> float:
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/latest/meta-data/instance-id",
        "REMOTE_ADDR": "10.1.1.10",
        "wsgi.input": None,
    }

    def start_response(status: str, headers: Any, exc_info: Any = None) -> None:
        return None

    start = time.perf_counter()
    for _ in range(n):
        for _chunk in app(dict(environ), start_response):
            pass
    return (time.perf_counter() - start) / n * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=200_000)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vr-bench-ops-") as tmp:
        from vr.paths import Paths

        paths = Paths(Path(tmp) / "root")
        paths.ensure()
        from vr.ops import metrics

        metrics.init(paths)
        from prometheus_client import CollectorRegistry, generate_latest

        from tests.helpers.vmdata import store_vm
        from vr.metadata.app import create_app
        from vr.ops.server import ApplianceCollector

        store_vm(paths, "10.1.1.10")
        m = metrics.process_metrics()
        bare = create_app(paths)
        cache = bare.extensions["vr.metadata.vmcache"]

        held = [-1]

        def after(environ: Any, status: str, body: Any) -> None:  # as serve-metadata's
            if len(cache) != held[0]:
                held[0] = len(cache)
                m.metadata_cache_vms.set(held[0])

        wrapped = metrics.Instrumented(bare, m, "metadata", metrics.metadata_view, after)
        n = args.requests // args.rounds
        ref, ours = [], []
        for _ in range(args.rounds):  # interleaved: drift hits both alike
            ref.append(per_request(bare, n))
            ours.append(per_request(wrapped, n))
        r, o = statistics.median(ref), statistics.median(ours)
        pids = []
        for _ in range(args.workers):
            pid = os.fork()
            if pid == 0:
                metrics._PROCESS.clear()
                per_request(metrics.Instrumented(bare, metrics.process_metrics(), "metadata",
                                                 metrics.metadata_view), 1000)  # fmt: skip
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ApplianceCollector(paths, None))
        scrapes = []
        for _ in range(20):
            start = time.perf_counter()
            body = generate_latest(registry)
            scrapes.append((time.perf_counter() - start) * 1000)
        files = len(os.listdir(paths.metrics))
    print(f"metadata GET via WSGI, median of {args.rounds} rounds of {n} requests")
    print(f"  bare application (reference)   {r:8.1f} us/request")
    print(f"  counted as serve-metadata runs {o:8.1f} us/request  (+{o - r:.1f} us, x{o / r:.2f})")
    print(f"scrape of {files} multiprocess files ({args.workers + 1} processes), {len(body)} bytes")
    print(f"  median {statistics.median(scrapes):.1f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
