"""The ``vr`` command: parse arguments, set up logging, wire objects, run.

Each area of the appliance contributes its subcommands through a ``register``
function in the modules listed in :data:`COMMAND_MODULES`; heavy imports (iptc,
gunicorn, paramiko) happen inside the handlers, not here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from vr import __version__
from vr.paths import ROOT_ENV

COMMAND_MODULES = [
    "vr.cmd.update_config",
    "vr.cmd.up",
    "vr.cmd.demo",
    "vr.cmd.serve_metadata",
    "vr.cmd.firewall",
    "vr.cmd.agent",
    "vr.cmd.serve_passwords",
]


def add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        default=None,
        help=f"prefix for every path the appliance uses (default: ${ROOT_ENV} or /)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def positive_int(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r}: expected a whole number of at least 1")
    return n


def add_connections_per_address(p: argparse.ArgumentParser) -> None:
    """``--connections-per-address`` of the gunicorn services (event worker only)."""
    p.add_argument(
        "--connections-per-address",
        type=positive_int,
        default=None,
        metavar="N",
        help="most connections one client address (one VM) may hold open per event "
        "worker (default 64); beyond it that client's oldest idle connection is closed "
        "or the new one refused with 503",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vr",
        description="CloudStack-compatible virtual router: metadata, user-data and passwords.",
    )
    parser.add_argument("--version", action="version", version=f"vr {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        module: Any = importlib.import_module(name)
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    code: int = args.func(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
