"""Subcommand ``serve-passwords``: the password server (TCP 8080) under gunicorn."""

from __future__ import annotations

import argparse
import logging
from ipaddress import ip_address
from typing import Any

from vr import logs
from vr.cmd.args import add_connections_per_address, add_root
from vr.paths import Paths, root_from_env

LOG = logging.getLogger(__name__)

WORKER_CLASSES = ("event", "sync")  # see vr.http.runner.WORKER_CLASSES


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve-passwords",
        help="serve guest passwords on TCP 8080 (CloudStack DomU_Request protocol)",
        description="Run the password server in the foreground under gunicorn until "
        "SIGTERM/SIGINT. Guests GET their password with 'DomU_Request: send_my_password' "
        "and ack it with 'DomU_Request: saved_password'; the VR itself may POST "
        "'save_password' with the token from <root>/var/lib/vr/passwd_token (created "
        "mode 0600 if missing). One audit line per fetch, ack and save goes to "
        "<root>/var/log/cloud.log (and to stderr too with -v).",
    )
    add_root(p)
    p.add_argument(
        "--bind",
        action="append",
        metavar="HOST:PORT",
        help="address to listen on, repeatable (default 0.0.0.0:<password_port from "
        "the appliance config>, i.e. 0.0.0.0:8080)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="worker processes (default: password_workers from the appliance config)",
    )
    p.add_argument(
        "--worker-class",
        choices=sorted(WORKER_CLASSES),
        default="event",
        help="gunicorn worker class: event (default; vr's keep-alive event loop) or sync",
    )
    add_connections_per_address(p)
    p.set_defaults(func=_serve)


def parse_bind(value: str) -> str:
    """Check ``HOST:PORT`` (IPv4 literal or bracketed IPv6) and return it unchanged."""
    host, sep, port = value.rpartition(":")
    bracketed = host.startswith("[") and host.endswith("]")
    try:
        version = ip_address(host[1:-1] if bracketed else host).version
        ok = bool(sep) and version == (6 if bracketed else 4) and 0 < int(port) < 65536
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"--bind {value!r}: expected IPV4:PORT or [IPV6]:PORT such as 0.0.0.0:8080 or [::]:8080"
        )
    return value


def _audit_to_file_only() -> None:
    """One audit line per request belongs in cloud.log, not on the supervisor's stderr
    (it would be written twice at thousands of requests per second); warnings and
    errors still go to both."""
    for h in logging.getLogger().handlers:
        if type(h) is logging.StreamHandler:
            h.setLevel(logging.WARNING)


def _serve(args: argparse.Namespace) -> int:
    from vr import config, store
    from vr.errors import VRError
    from vr.http.runner import gunicorn_options, run
    from vr.passwords.app import ensure_token, make_app

    paths = Paths(root_from_env(args.root))
    paths.ensure()
    logs.setup(paths, args.verbose)
    from vr.ops import metrics

    metrics.init(paths)  # before any metric exists and before gunicorn forks
    if not args.verbose:
        _audit_to_file_only()
    store.recover(paths)  # a batch killed mid-commit may hold a passwords file
    try:
        cfg = config.load(paths)
        binds = [parse_bind(b) for b in (args.bind or [f"0.0.0.0:{cfg.password_port}"])]
        workers = args.workers if args.workers is not None else cfg.password_workers
        if workers < 1:
            raise ValueError(f"--workers {workers}: expected at least 1")
        ensure_token(paths)
    except (VRError, ValueError) as exc:
        LOG.error("password server not started: %s", exc)
        return 2
    LOG.info(
        "password server for %s on %s: %d %s workers",
        paths.root,
        ", ".join(binds),
        workers,
        args.worker_class,
    )
    options = gunicorn_options(
        "passwords", binds, workers, args.worker_class, paths.root, args.connections_per_address
    )

    def worker_app() -> Any:
        """Per worker (after fork): the application, counted by view and status."""
        m = metrics.process_metrics()
        return metrics.Instrumented(
            make_app(paths), m, "passwords", metrics.password_view, metrics.password_events(m)
        )

    run(worker_app, options)
    return 0
