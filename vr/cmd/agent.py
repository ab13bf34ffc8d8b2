"""Subcommand ``agent``: the SSH push agent on port 3922."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from vr.cmd.args import add_root, open_root

LOG = logging.getLogger(__name__)

OPTION_NAMES = {
    "max_upload_bytes": "max-upload",
    "max_unauthenticated_per_address": "max-unauthenticated",
    "max_unauthenticated": "max-unauthenticated-total",
}
"""Agent limits whose command-line option is not the field's name."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "agent",
        help="run the SSH push agent (port 3922) in the foreground",
        description="Serve what the management server sends over SSH: uploads into "
        "<root>/var/cache/cloud (scp -t, SFTP) and the commands update_config.py and "
        "vr_cfg.sh -c, applied in-process. Public-key auth for root from "
        "<root>/root/.ssh/authorized_keys; host keys in <root>/etc/vr/ssh (created on "
        "first start). Stops cleanly on SIGTERM.",
    )
    add_root(p)
    p.add_argument("--listen", default=None, help="address to listen on (default: config)")
    p.add_argument(
        "--port",
        type=int,
        default=None,
        help="TCP port (default: config, 3922; 0: any free port, logged at start)",
    )
    p.add_argument("--max-upload", type=int, default=None, help="largest upload in bytes")
    p.add_argument(
        "--max-sessions",
        type=int,
        default=None,
        help="connections at once from addresses that have logged in before (default 64)",
    )
    p.add_argument(
        "--max-unauthenticated",
        type=int,
        default=None,
        help="connections from one other address not yet logged in (default 16)",
    )
    p.add_argument(
        "--max-unauthenticated-total",
        type=int,
        default=None,
        help="connections from all other addresses not yet logged in (default 32)",
    )
    p.add_argument(
        "--max-waiting",
        type=int,
        default=None,
        help="accepted connections waiting for a place (default 256)",
    )
    p.add_argument(
        "--auth-timeout",
        type=float,
        default=None,
        help="seconds to log in, and to wait for a place (default 30)",
    )
    p.add_argument("--idle-timeout", type=float, default=None, help="seconds without traffic")
    p.add_argument("--session-timeout", type=float, default=None, help="seconds per connection")
    p.set_defaults(func=_agent)


def _agent(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vr import config, store
    from vr.agent.daemon import Agent, Listen, build_context, open_listener
    from vr.agent.limits import DEFAULT_AGENT_LIMITS
    from vr.errors import VRError

    paths = open_root(args)
    from vr.ops import metrics

    metrics.init(paths)
    # restarted by vr up after a kill: finish its interrupted commit at once, not at
    # the next push, so the running servers stop serving a half-renamed batch
    store.recover(paths)
    try:
        cfg = config.load(paths)
    except VRError as exc:
        print(f"vr agent: {exc}", file=sys.stderr)
        return 2
    overrides = {
        "max_upload_bytes": args.max_upload,
        "max_sessions": args.max_sessions,
        "max_unauthenticated_per_address": args.max_unauthenticated,
        "max_unauthenticated": args.max_unauthenticated_total,
        "max_waiting": args.max_waiting,
        "auth_timeout": args.auth_timeout,
        "idle_timeout": args.idle_timeout,
        "session_timeout": args.session_timeout,
    }
    for key, value in overrides.items():
        zero_ok = key == "max_waiting"
        if value is not None and (value < 0 or (value == 0 and not zero_ok)):
            option = "--" + OPTION_NAMES.get(key, key).replace("_", "-")
            want = "0 or more" if zero_ok else "a positive number"
            print(f"vr agent: {option}={value!r}: expected {want}", file=sys.stderr)
            return 2
    limits = replace(DEFAULT_AGENT_LIMITS, **{k: v for k, v in overrides.items() if v is not None})
    if args.port is not None and not 0 <= args.port <= 65535:
        print(f"vr agent: --port={args.port!r}: expected 0 to 65535", file=sys.stderr)
        return 2
    listen = Listen(args.listen or cfg.ssh_listen, cfg.ssh_port if args.port is None else args.port)
    if not cfg.ssh_legacy_algorithms:
        LOG.info("ssh_legacy_algorithms is off: SHA-1 clients (CloudStack's Trilead) are refused")
    ctx = build_context(paths, limits, cfg.ssh_legacy_algorithms)
    ctx.metrics = metrics.process_metrics()
    ctx.make_applier = metrics.metered(ctx.make_applier, ctx.metrics)
    agent = Agent(ctx, listen)
    agent.install_signals()
    try:
        sock = open_listener(listen)
    except OSError as exc:
        print(
            f"vr agent: cannot listen on {listen.address} port {listen.port}: {exc}",
            file=sys.stderr,
        )
        return 1
    agent.serve(sock)
    return 0
