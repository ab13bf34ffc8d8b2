"""Subcommand ``up``: run and supervise the whole appliance."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from vr import logs
from vr.cmd.args import add_root
from vr.errors import VRError
from vr.paths import Paths, root_from_env

LOG = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "up",
        help="run the whole appliance in the foreground",
        description="Apply the firewall, then run and supervise the SSH push agent (3922), "
        "the metadata server (80) and the password server (8080) until SIGTERM or "
        "SIGINT. Crashed services are restarted with backoff. One per root.",
    )
    add_root(p)
    p.add_argument(
        "--no-firewall",
        action="store_true",
        help="do not program netfilter (for hosts without iptables; never in a real VR)",
    )
    p.set_defaults(func=_up)


def _up(args: argparse.Namespace) -> int:
    from vr import config, store
    from vr.supervisor import Supervisor

    paths = Paths(root_from_env(args.root))
    paths.ensure()
    logs.setup(paths, args.verbose)
    store.recover(paths)  # before any service reads (also with --no-firewall)
    try:
        cfg = config.load(paths)
    except VRError as exc:
        LOG.error("%s", exc)
        return 2

    if cfg.pair_peer:
        from vr.pair import manager

        try:
            manager.prepare(paths, cfg)  # keepalived's config, no leftover virtual IP
        except (VRError, ValueError) as exc:
            LOG.error("%s", exc)
            return 2

    # apply, not restore: recomputed from vr.json and the saved pushes, the rules are the
    # desired state restore re-applies at boot, and also right when a push was stored but
    # its firewall follow-up never ran (killed in between) or vr.json changed since the
    # last apply, where restore would trust the rule set saved before
    firewall = [sys.executable, "-m", "vr", "firewall", "apply", "--root", str(paths.root)]
    sup = Supervisor(paths, cfg, None if args.no_firewall else firewall)
    try:
        return sup.run()
    except VRError as exc:
        LOG.error("%s", exc)
        return 1
