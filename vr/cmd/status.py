"""Subcommand ``status``: services, VMs, networks and the last push of a root."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from vr.cmd.args import add_root, open_root
from vr.ops.status import collect_status, format_status


def register(sub: Any) -> None:
    p = sub.add_parser(
        "status",
        help="print services, VMs, networks and the last push",
        description="Print the state of a running (or stopped) vr up on this root: each "
        "service up/down with pid and restarts, number of VMs and guest networks, the "
        "time and result of the last push, and the health verdict. Exit status: 0 ready, "
        "1 degraded (a service does not answer), 2 down (vr up not running or no "
        "service answers).",
    )
    add_root(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)


def _status(args: argparse.Namespace) -> int:
    paths = open_root(args, log_file=False)
    st = collect_status(paths)
    from vr.ops.health import EXIT

    code = EXIT[st["health"]["state"]]
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
        return code
    sys.stdout.write(format_status(st))
    return code
