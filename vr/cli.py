"""The ``vr`` command: parse arguments, set up logging, wire objects, run.

Each subcommand is one module of :mod:`vr.cmd` with a ``register`` function, listed
in :data:`COMMAND_MODULES`; heavy imports (iptc, gunicorn, paramiko) happen inside
the handlers, not here.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from typing import Any

from vr import __version__

COMMAND_MODULES = [
    "vr.cmd.update_config",
    "vr.cmd.apply_cfg",
    "vr.cmd.show",
    "vr.cmd.up",
    "vr.cmd.status",
    "vr.cmd.demo",
    "vr.cmd.serve_metadata",
    "vr.cmd.firewall",
    "vr.cmd.agent",
    "vr.cmd.push",
    "vr.cmd.serve_passwords",
    "vr.cmd.hypervisor",
    "vr.cmd.serve_dhcp",
    "vr.cmd.serve_ops",
    "vr.cmd.boot",
    "vr.cmd.pair",
    "vr.cmd.identity_cert",
]


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
