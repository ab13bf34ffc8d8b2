"""Subcommands ``update-config``, ``apply-cfg`` and ``show``."""

from __future__ import annotations

import argparse
import json
import sys
from ipaddress import IPv4Address
from typing import Any

from vr import logs
from vr.cli import add_root
from vr.paths import Paths, root_from_env


def register(sub: Any) -> None:
    p = sub.add_parser(
        "update-config",
        help="apply one pushed file from /var/cache/cloud (update_config.py)",
        description="Apply FILE from <root>/var/cache/cloud like CloudStack's "
        "update_config.py: archive it to processed/FILE.gz (or delete it when the "
        "second argument is 'false'). Exit 0 when applied or already applied.",
    )
    add_root(p)
    p.add_argument("file", help="file name in /var/cache/cloud (or that absolute path)")
    p.add_argument("archive", nargs="?", choices=["true", "false"], help="'false': do not archive")
    p.set_defaults(func=_update_config)

    p = sub.add_parser(
        "apply-cfg",
        help="apply a VR-<uuid>.cfg batch as one unit (vr_cfg.sh -c)",
        description="Apply every item of a CloudStack VR-<uuid>.cfg aggregate under one "
        "lock with one convergence; nothing is applied if any item is invalid.",
    )
    add_root(p)
    p.add_argument("-c", dest="dash_c", action="store_true", help="accepted for vr_cfg.sh compat")
    p.add_argument("cfg", help="cfg file name in /var/cache/cloud (or that absolute path)")
    p.set_defaults(func=_apply_cfg)

    p = sub.add_parser(
        "show",
        help="print what the store holds and what guests are served",
        description="Print, per VM, the generation, every metadata key in index order "
        "with its value (escaped, truncated), the user-data size, kind and sha256, and "
        "whether a password is pending (never the password itself); then guest "
        "networks, DHCP entries and the last push. --json prints the same as JSON with "
        "full values (binary as base64).",
    )
    add_root(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("ip", nargs="*", help="only these VM addresses")
    p.set_defaults(func=_show)


def make_applier(paths: Paths) -> Any:
    """The Applier with the appliance's hooks wired in.

    Firewall: guest networks are validated before the store commits (unknown or
    control/public device -> rejected, nothing stored); after a commit that changed
    guest networks or DHCP entries the rules are re-applied (python-iptables is
    imported only then).

    User-data is bounded by ``userdata_max_bytes`` of the appliance config; a config
    that cannot be read makes every push fail with that reason.
    """
    from vr import config
    from vr.apply import Applier
    from vr.errors import ConfigError
    from vr.firewall.apply import push_hooks
    from vr.payloads import DEFAULT_LIMITS

    before, after = push_hooks(paths)
    try:
        limits = DEFAULT_LIMITS.with_userdata(config.load(paths).userdata_max_bytes)
    except ConfigError as exc:
        return Applier(paths, after_commit=after, before_commit=before, config_error=str(exc))
    return Applier(paths, limits=limits, after_commit=after, before_commit=before)


def _update_config(args: argparse.Namespace) -> int:
    paths = Paths(root_from_env(args.root))
    # The applier prints its one line to stderr itself; the log file gets it too.
    logs.setup(paths, args.verbose, stderr=False)
    argv = [args.file] + ([args.archive] if args.archive else [])
    code: int = make_applier(paths).update_config(argv, sys.stdout, sys.stderr)
    return code


def _apply_cfg(args: argparse.Namespace) -> int:
    paths = Paths(root_from_env(args.root))
    logs.setup(paths, args.verbose, stderr=False)
    code: int = make_applier(paths).apply_cfg([args.cfg], sys.stdout, sys.stderr)
    return code


def _show(args: argparse.Namespace) -> int:
    from vr import show, store

    paths = Paths(root_from_env(args.root))
    logs.setup(None, args.verbose)
    store.recover(paths)  # a batch killed mid-commit: show its outcome, not a mix
    try:
        ips = [IPv4Address(a) for a in args.ip] if args.ip else None
    except ValueError as exc:
        print(f"vr show: {exc}: expected IPv4 addresses", file=sys.stderr)
        return 2
    report = show.collect(paths, ips)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for line in show.render(report):
            print(line)
    return 0
