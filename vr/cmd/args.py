"""Arguments and set-up shared by the ``vr`` subcommands."""

from __future__ import annotations

import argparse

from vr import logs
from vr.paths import ROOT_ENV, Paths, root_from_env


def add_root(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--root",
        default=None,
        help=f"prefix for every path the appliance uses (default: ${ROOT_ENV} or /)",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def open_root(args: argparse.Namespace, log_file: bool = True, stderr: bool = True) -> Paths:
    """The root of ``--root`` (or ``$VR_ROOT``), with logging set up: to its
    ``cloud.log`` when ``log_file``, and to stderr when ``stderr``."""
    paths = Paths(root_from_env(args.root))
    logs.setup(paths if log_file else None, args.verbose, stderr=stderr)
    return paths


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
