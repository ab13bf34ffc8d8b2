"""Subcommand ``boot``: configure a SystemVM from CloudStack's boot arguments."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from vr.cmd.args import add_root, open_root
from vr.errors import VRError
from vr.paths import Paths

LOG = logging.getLogger(__name__)

DEVICE_WAIT = 120.0
"""Seconds for udev to show the NICs the arguments name."""


def register(sub: Any) -> None:
    p = sub.add_parser(
        "boot",
        help="configure this SystemVM from CloudStack's boot arguments (before vr up)",
        description="Take CloudStack's boot arguments from the kernel command line or, as "
        "CloudStack's KVM agent delivers them through the QEMU guest agent, from "
        "/var/cache/cloud/cmdline written during this boot (waiting for it); then write "
        "vr.json (control, public and guest interfaces, SSH on the control address), "
        "install the management server's key (authorized_key= or "
        "/var/cache/cloud/authorized_keys) as root's only authorized key, set hostname, "
        "hosts and resolv.conf, and give eth0-2 their addresses and the default route. "
        "Bad arguments change nothing (exit 2).",
    )
    add_root(p)
    p.add_argument(
        "--wait",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how long to wait for new arguments when those of an earlier boot are there "
        "to fall back on (default 60, as CloudStack's bootstrap.sh); without earlier "
        "ones, wait as long as it takes",
    )
    p.add_argument(
        "--kernel-cmdline",
        type=Path,
        default=Path("/proc/cmdline"),
        metavar="FILE",
        help="where to look for arguments passed on the kernel command line",
    )
    p.add_argument(
        "--no-network",
        action="store_true",
        help="write the files only; leave interfaces, routes and the hostname alone",
    )
    p.add_argument(
        "--key-only",
        action="store_true",
        help="only (re)install the management server's key from "
        "/var/cache/cloud/authorized_keys and the current arguments (vr-boot-key.path)",
    )
    p.set_defaults(func=_boot)


def _boot(args: argparse.Namespace) -> int:
    from vr.boot import apply, cmdline

    paths = open_root(args)
    if args.wait < 0:
        LOG.error("--wait %r: expected a number of seconds, 0 or more", args.wait)
        return 2
    try:
        if args.key_only:
            return _key_only(paths)
        kernel = args.kernel_cmdline.read_text() if args.kernel_cmdline.exists() else ""
        found, source = apply.read_arguments(paths, kernel, apply.boot_time(), args.wait)
        LOG.info("boot arguments from %s: %s", source, cmdline.shown(found))
        plan = apply.plan_for(paths, found)
        if not args.no_network:
            apply.wait_for_devices(list(plan.devices), DEVICE_WAIT)
        apply.carry_out(paths, plan, network=not args.no_network)
    except VRError as exc:
        LOG.error("%s", exc)
        return 2
    LOG.info("boot configuration done")
    return 0


def _key_only(paths: Paths) -> int:
    from vr.boot import apply, cmdline, plan

    args = cmdline.parse(paths.boot_cmdline.read_text()) if paths.boot_cmdline.exists() else {}
    cfg_key = cmdline.decode_key(args["authorized_key"]) if args.get("authorized_key") else None
    keys = plan.merge_keys(cfg_key, apply.dropped_keys(paths))
    if keys is None:
        LOG.warning("no management server key to install")
        return 0
    apply.install_key(paths, keys)
    return 0
