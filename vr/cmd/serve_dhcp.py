"""Subcommand ``serve-dhcp``: dnsmasq (DHCP, DNS, router advertisements) for the
guest networks, configured from the pushes."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from vr import logs
from vr.cmd.args import add_root
from vr.paths import Paths, root_from_env

LOG = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "serve-dhcp",
        help="run dnsmasq for the guest networks (DHCP, DNS, router advertisements)",
        description="Render dnsmasq's files from <root>/etc/vr/vr.json and the pushed guest "
        "networks and DHCP entries, then run dnsmasq in the foreground until SIGTERM/SIGINT. "
        "SIGHUP re-reads the files (pushes send it): hosts without a restart, a changed "
        "network with one. Files in <root>/run/vr/dnsmasq/, leases in "
        "<root>/var/lib/misc/dnsmasq.leases. Exits 1 when dnsmasq dies (vr up restarts it).",
    )
    add_root(p)
    p.add_argument("--dnsmasq", default=None, help="the dnsmasq binary (default /usr/sbin/dnsmasq)")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    from vr import store
    from vr.dhcp.service import DNSMASQ, DhcpService
    from vr.errors import VRError

    paths = Paths(root_from_env(args.root))
    paths.ensure()
    logs.setup(paths, args.verbose)
    store.recover(paths)
    try:
        return DhcpService(paths, args.dnsmasq or DNSMASQ).run()
    except (VRError, OSError) as exc:
        LOG.error("dnsmasq service: %s", exc)
        return 1
