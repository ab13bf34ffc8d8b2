"""Subcommand ``update-config``: CloudStack's ``update_config.py <file> [false]``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vr.cloudstack import CACHE_DIR
from vr.cmd.args import add_root, open_root


def register(sub: Any) -> None:
    p = sub.add_parser(
        "update-config",
        help=f"apply one pushed file from {CACHE_DIR} (update_config.py)",
        description=f"Apply FILE from <root>{CACHE_DIR} like CloudStack's "
        "update_config.py: archive it to processed/FILE.gz (or delete it when the "
        "second argument is 'false'). Exit 0 when applied or already applied.",
    )
    add_root(p)
    p.add_argument("file", help=f"file name in {CACHE_DIR} (or that absolute path)")
    p.add_argument("archive", nargs="?", choices=["true", "false"], help="'false': do not archive")
    p.set_defaults(func=_update_config)


def _update_config(args: argparse.Namespace) -> int:
    from vr.applier import make_applier

    # The applier prints its one line to stderr itself; the log file gets it too.
    paths = open_root(args, stderr=False)
    argv = [args.file] + ([args.archive] if args.archive else [])
    return make_applier(paths).update_config(argv, sys.stdout, sys.stderr)
