"""Subcommands ``agent`` (the SSH push agent on 3922) and ``push`` (management-side client)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from vr import logs
from vr.cli import add_root
from vr.paths import Paths, root_from_env

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

    p = sub.add_parser(
        "push",
        help="push payload files to a VR like the management server does",
        description="Upload each FILE to the VR's /var/cache/cloud under CloudStack's "
        "name (vm_metadata.json.<uuid> ...) and run update_config.py on it; with --batch "
        "send one VR-<uuid>.cfg and apply it with vr_cfg.sh -c. One line per file; exit 1 "
        "if any failed. The VR's host key is checked against the known-hosts file.",
    )
    p.add_argument("--host", required=True, help="the VR's control address")
    p.add_argument("--port", type=int, default=3922, help="SSH port (default 3922)")
    p.add_argument("--key", type=Path, default=None, help="private key (default: ~/.ssh keys)")
    p.add_argument(
        "--known-hosts", type=Path, default=None, help="known-hosts file (~/.ssh/known_hosts)"
    )
    p.add_argument("--accept-new", action="store_true", help="trust and record an unknown VR")
    p.add_argument("--batch", action="store_true", help="send all files as one VR-<uuid>.cfg")
    p.add_argument("--timeout", type=float, default=60.0, help="connect timeout in seconds")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("files", nargs="+", type=Path, metavar="FILE", help="payload JSON files")
    p.set_defaults(func=_push)


def _agent(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from vr import config
    from vr.agent.daemon import Agent, Listen, build_context, open_listener
    from vr.agent.limits import DEFAULT_AGENT_LIMITS
    from vr.errors import VRError

    paths = Paths(root_from_env(args.root))
    logs.setup(paths, args.verbose)
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
    agent = Agent(build_context(paths, limits, cfg.ssh_legacy_algorithms), listen)
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


def _push(args: argparse.Namespace) -> int:
    from vr.pushclient import Target, push

    logs.setup(None, args.verbose)
    target = Target(
        host=args.host,
        port=args.port,
        key=args.key,
        known_hosts=args.known_hosts,
        accept_new=args.accept_new,
        timeout=args.timeout,
    )
    return push(target, args.files, args.batch, sys.stdout, sys.stderr)
