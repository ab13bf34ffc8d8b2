"""Subcommand ``pair``: the redundant router pair's sync daemon and keepalived's notify."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from vr.cmd.args import add_root, open_root
from vr.errors import VRError

LOG = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "pair",
        help="redundant router pair: password sync daemon, keepalived notify",
        description="Parts of a redundant router pair (vr.json pair_peer). 'vr up' runs "
        "'vr pair run' and keepalived itself; keepalived calls 'vr pair notify'.",
    )
    psub = p.add_subparsers(dest="pair_command", metavar="ACTION", required=True)
    run = psub.add_parser(
        "run",
        help="sync passwords with the peer; keep keepalived's config current",
        description="Exchange the password ledger with the peer router over SSH (its "
        "agent on ssh_port, the key etc/vr/pair/id_key) whenever the passwords file "
        "changes and every 2 s, and rewrite and reload keepalived's configuration "
        "when the guest networks change. Runs until SIGTERM.",
    )
    add_root(run)
    run.set_defaults(func=_run)
    notify = psub.add_parser(
        "notify",
        help="record a VRRP transition (keepalived's notify script)",
        description="Called by keepalived as: notify INSTANCE <name> <state> <priority>.",
    )
    add_root(notify)
    notify.add_argument("kind", help="INSTANCE")
    notify.add_argument("instance", help="the VRRP instance (VR-<device>)")
    notify.add_argument("state", help="MASTER, BACKUP, FAULT or STOP")
    notify.add_argument("priority", nargs="?", default="", help="the instance's priority")
    notify.set_defaults(func=_notify)


def _run(args: argparse.Namespace) -> int:
    from vr import config, store
    from vr.pair.sync import PeerLink, SyncDaemon, peer_target

    paths = open_root(args)
    store.recover(paths)
    try:
        cfg = config.load(paths)
    except VRError as exc:
        LOG.error("%s", exc)
        return 2
    if not cfg.pair_peer:
        LOG.error(
            "%s: pair_peer is not set: expected the peer router's control address", paths.config
        )
        return 2
    return SyncDaemon(paths, cfg, PeerLink(peer_target(paths, cfg))).run()


def _notify(args: argparse.Namespace) -> int:
    from vr.pair.manager import record_vrrp_state

    paths = open_root(args)
    try:
        record_vrrp_state(paths, args.kind, args.instance, args.state, args.priority)
    except (VRError, ValueError, OSError) as exc:
        LOG.error("%s", exc)
        return 1
    return 0
