"""Subcommand ``show``: what the store holds and what guests are served."""

from __future__ import annotations

import argparse
import json
import sys
from ipaddress import IPv4Address
from typing import Any

from vr.cmd.args import add_root, open_root


def register(sub: Any) -> None:
    p = sub.add_parser(
        "show",
        help="print what the store holds and what guests are served",
        description="Print, per VM, the generation, every metadata key in index order "
        "with its value (escaped, truncated), the user-data size, kind and sha256, and "
        "whether a password is pending (never the password itself); then guest "
        "networks, DHCP entries and the last push. --json prints the same as JSON with "
        "full values (binary as base64).",
    )
    add_root(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("ip", nargs="*", help="only these VM addresses")
    p.set_defaults(func=_show)


def _show(args: argparse.Namespace) -> int:
    from vr import show, store

    paths = open_root(args, log_file=False)
    store.recover(paths)  # a batch killed mid-commit: show its outcome, not a mix
    try:
        ips = [IPv4Address(a) for a in args.ip] if args.ip else None
    except ValueError as exc:
        print(f"vr show: {exc}: expected IPv4 addresses", file=sys.stderr)
        return 2
    report = show.collect(paths, ips)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for line in show.render(report):
            print(line)
    return 0
