"""Subcommand ``serve-metadata``: the guest-facing metadata HTTP service (port 80)."""

from __future__ import annotations

import argparse
import logging
import os
from typing import Any

from vr.cmd.args import add_connections_per_address, add_root, open_root

LOG = logging.getLogger(__name__)

DEFAULT_BIND = "0.0.0.0:80"
WORKER_CLASSES = ("event", "gthread", "sync")  # see vr.http.runner.WORKER_CLASSES


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve-metadata",
        help="serve metadata and user-data to guests over HTTP (gunicorn)",
        description="Serve /latest/... (CloudStack), dated EC2 versions and /metadata/v1 "
        "(DigitalOcean style) from the store under --root until SIGTERM. The calling VM "
        "is the TCP source address.",
    )
    add_root(p)
    p.add_argument(
        "--bind",
        action="append",
        metavar="HOST:PORT",
        help=f"listen address, repeatable (default {DEFAULT_BIND})",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: metadata_workers from the appliance config, 2)",
    )
    p.add_argument(
        "--threads", type=int, default=2, help="threads per worker (gthread only; default 2)"
    )
    p.add_argument(
        "--worker-class",
        choices=sorted(WORKER_CLASSES),
        default="event",
        help="gunicorn worker class: event (default; vr's single-threaded keep-alive "
        "worker, see vr/http/worker.py), gthread or sync (gunicorn's own)",
    )
    p.add_argument(
        "--warm",
        action="store_true",
        help="load every VM into each worker at start instead of on first request",
    )
    add_connections_per_address(p)
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from vr import config, store
    from vr.ops import metrics

    paths = open_root(args)
    metrics.init(paths)  # before any metric exists and before gunicorn forks
    from vr.http import runner as gunicorn_runner
    from vr.metadata import counters as metadata_counters
    from vr.metadata import ratelimit
    from vr.metadata.app import create_app
    from vr.metadata.identity import load_or_create
    from vr.metadata.tokens import TokenPolicy, new_key

    cfg = config.load(paths)
    workers = args.workers
    if workers is None:
        workers = cfg.metadata_workers
    policy = TokenPolicy.of(
        cfg.imds_hop_limit, cfg.imds_tokens_required, cfg.imds_tokens_required_vms
    )
    if workers < 1 or args.threads < 1:
        raise SystemExit(f"--workers={workers} --threads={args.threads}: expected at least 1")
    binds = args.bind or [DEFAULT_BIND]
    paths.run.mkdir(parents=True, exist_ok=True)
    metadata_counters.reset(paths)
    store.recover(paths)  # before any worker reads: never a batch half-renamed
    LOG.info(
        "metadata service for %s on %s: %s %s workers x %s threads (pid %s)",
        paths.root,
        ", ".join(binds),
        workers,
        args.worker_class,
        args.threads,
        os.getpid(),
    )
    warm = bool(args.warm)
    # One IMDSv2 token key for every worker (they fork from here): a token minted
    # by one worker is checked by another.
    token_key = new_key()
    signer = load_or_create(paths)  # the identity document's key, kept across restarts
    rate_table = paths.run / "metadata-rate"
    if cfg.imds_rate_per_second:
        ratelimit.create(rate_table)  # empty, before fork: every worker maps this one

    def worker_app() -> Any:
        """Per worker (after fork): the application, counted by view and status."""
        m = metrics.process_metrics()
        limiter = None
        if cfg.imds_rate_per_second:
            limiter = ratelimit.RateLimiter(
                rate_table, cfg.imds_rate_per_second, cfg.imds_rate_burst
            )
        app = create_app(
            paths,
            counters=metadata_counters.RefusalCounters(paths, m),
            warm=warm,
            token_key=token_key,
            policy=policy,
            signer=signer,
            limiter=limiter,
            waiters_per_vm=cfg.imds_waiters_per_vm,
        )
        cache = app.extensions["vr.metadata.vmcache"]

        held = [-1]

        def after(environ: Any, status: str, body: Any) -> None:
            if len(cache) != held[0]:  # a write only when the cache grew or shrank
                held[0] = len(cache)
                m.metadata_cache_vms.set(held[0])

        return metrics.Instrumented(app, m, "metadata", metrics.metadata_view, after)

    gunicorn_runner.run(
        worker_app,
        gunicorn_runner.gunicorn_options(
            "metadata",
            binds,
            workers,
            args.worker_class,
            paths.root,
            args.connections_per_address,
            args.threads,
        ),
    )
    return 0
