"""Subcommand ``apply-cfg``: CloudStack's ``vr_cfg.sh -c <cfg>``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vr.cloudstack import CACHE_DIR
from vr.cmd.args import add_root, open_root


def register(sub: Any) -> None:
    p = sub.add_parser(
        "apply-cfg",
        help="apply a VR-<uuid>.cfg batch as one unit (vr_cfg.sh -c)",
        description="Apply every item of a CloudStack VR-<uuid>.cfg aggregate under one "
        "lock with one convergence; nothing is applied if any item is invalid.",
    )
    add_root(p)
    p.add_argument("-c", dest="dash_c", action="store_true", help="accepted for vr_cfg.sh compat")
    p.add_argument("cfg", help=f"cfg file name in {CACHE_DIR} (or that absolute path)")
    p.set_defaults(func=_apply_cfg)


def _apply_cfg(args: argparse.Namespace) -> int:
    from vr.applier import make_applier

    paths = open_root(args, stderr=False)
    return make_applier(paths).apply_cfg([args.cfg], sys.stdout, sys.stderr)
