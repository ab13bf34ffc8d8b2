"""Subcommand ``push``: the management side, uploading and applying like CloudStack."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from vr import logs


def register(sub: Any) -> None:
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


def _push(args: argparse.Namespace) -> int:
    from vr.agent.client import Target, push

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
