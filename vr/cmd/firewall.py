"""Subcommand ``firewall``: apply, restore, show and counters.

Run inside the VR's network namespace: the rules land in the namespace of the
process (``ip netns exec <vr> vr firewall apply``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from vr import logs
from vr.cmd.args import add_root
from vr.errors import VRError
from vr.paths import Paths, root_from_env

if TYPE_CHECKING:
    from vr.firewall.sync import SyncReport, Tables


def register(sub: Any) -> None:
    p = sub.add_parser(
        "firewall",
        help="169.254.169.254 redirection, guest-only 80/8080, control-only 3922",
        description="Manage the VR's iptables rules (chains VR-*, legacy backend): "
        "compute them from the config and the pushed guest networks and DHCP entries, "
        "apply them in one commit per table, re-apply the saved set at boot.",
    )
    fw = p.add_subparsers(dest="action", metavar="ACTION", required=True)

    a = fw.add_parser(
        "apply",
        help="compute from config + store and apply",
        description="Compute the rule set from <root>/etc/vr/vr.json and the pushed guest "
        "networks and DHCP entries, apply it and save it. Applying twice changes nothing.",
    )
    add_root(a)
    a.set_defaults(func=_apply)

    r = fw.add_parser(
        "restore",
        help="re-apply the saved rule set (boot)",
        description="Re-apply the rule set saved by the last apply; computes it afresh "
        "when none is saved or the last apply did not finish.",
    )
    add_root(r)
    r.set_defaults(func=_restore)

    s = fw.add_parser(
        "show",
        help="print the saved rule set",
        description="Print the saved desired rule set in iptables-save form (or JSON); "
        "when nothing is saved yet, print what 'apply' would install.",
    )
    add_root(s)
    s.add_argument("--json", action="store_true", help="print the saved JSON document")
    s.set_defaults(func=_show)

    c = fw.add_parser(
        "counters",
        help="print live packet counters of our rules",
        description="Read every rule of the VR-* chains from the kernel with its packet "
        "and byte counters (e.g. MAC/IP binding drops).",
    )
    add_root(c)
    c.add_argument("--json", action="store_true", help="one JSON object per rule")
    c.add_argument(
        "--family",
        choices=("4", "6"),
        default=None,
        help="only the iptables (4) or ip6tables (6) tables, read in this process",
    )
    c.set_defaults(func=_counters)

    six = fw.add_parser(
        "sync6",
        help="(internal) apply the IPv6 tables of a rule set read on stdin",
        description="Run by 'apply' and 'restore' in a child process: python-iptables "
        "cannot program IPv6 NAT in a process that programmed IPv4 NAT. Reads the "
        "IPv6 part of a rule set (JSON) on stdin, applies it, prints the report (JSON).",
    )
    six.add_argument(
        "--xtables-lock-held",
        action="store_true",
        help="the parent holds the xtables lock for this run: do not take it",
    )
    six.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    six.set_defaults(func=_sync6)


def _paths(args: argparse.Namespace, log_file: bool = True) -> Paths:
    paths = Paths(root_from_env(args.root))
    logs.setup(paths if log_file else None, args.verbose)
    return paths


def _apply(args: argparse.Namespace) -> int:
    from vr.firewall import state as fw

    return _program(args, fw.apply, "applied")


def _restore(args: argparse.Namespace) -> int:
    from vr.firewall import state as fw

    return _program(args, fw.restore, "restored")


def _program(
    args: argparse.Namespace, action: Callable[[Paths, Tables], SyncReport], done: str
) -> int:
    """Run ``apply`` or ``restore`` on the real tables; one line says what happened."""
    from vr.firewall import state as fw

    paths = _paths(args)
    try:
        report = action(paths, fw.real_tables())
    except VRError as exc:
        print(f"firewall not {done}: {exc}", file=sys.stderr)
        return 1
    print(f"firewall {done}: {fw.summary(report)}")
    return 0


def _sync6(args: argparse.Namespace) -> int:
    from vr.firewall import child6

    logs.setup(None, args.verbose)
    try:
        report = child6.apply_here(sys.stdin.buffer.read(), args.xtables_lock_held)
    except VRError as exc:
        print(f"IPv6 tables not applied: {exc}", file=sys.stderr)
        return 1
    print(child6.report_to_json(report))
    return 0


def _show(args: argparse.Namespace) -> int:
    from vr import config
    from vr.firewall import state as fw

    paths = _paths(args, log_file=False)
    try:
        ruleset = fw.load_saved(paths)
        header = f"# saved in {paths.firewall_state}"
        if ruleset is None:
            ruleset = fw.compute(paths, config.load(paths))
            header = "# nothing saved yet: what 'vr firewall apply' would install"
    except VRError as exc:
        print(f"cannot show the firewall: {exc}", file=sys.stderr)
        return 1
    if args.json:
        sys.stdout.write(ruleset.to_json().decode())
    else:
        print(header)
        sys.stdout.write(ruleset.render())
    return 0


def _counters(args: argparse.Namespace) -> int:
    from vr.firewall import model
    from vr.firewall import state as fw
    from vr.firewall.iptc_adapter import IptcTables
    from vr.firewall.sync import counters

    _paths(args, log_file=False)
    try:
        if args.family is None:
            rows = fw.live_counters(fw.real_tables())
        else:
            six = args.family == "6"
            names = [t for t in model.TABLE_ORDER if (t in model.IPV6_TABLES) == six]
            rows = counters(IptcTables(), names)
    except VRError as exc:
        print(f"cannot read counters: {exc}", file=sys.stderr)
        return 1
    for row in rows:
        if args.json:
            print(json.dumps(asdict(row), sort_keys=True))
        else:
            where = f"{row.table}/{row.chain} #{row.index}"
            print(f"{where} {row.packets} pkts {row.bytes} bytes  {row.rule}")
    return 0
