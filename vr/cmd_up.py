"""Subcommands ``up`` (run the whole appliance) and ``status``."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from typing import Any

from vr import logs
from vr.cli import add_root
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

    p = sub.add_parser(
        "status",
        help="print services, VMs, networks and the last push",
        description="Print the state of a running (or stopped) vr up on this root: each "
        "service up/down with pid and restarts, number of VMs and guest networks, and "
        "the time and result of the last push.",
    )
    add_root(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_status)


def _up(args: argparse.Namespace) -> int:
    from vr import config
    from vr.supervisor import Supervisor

    paths = Paths(root_from_env(args.root))
    paths.ensure()
    logs.setup(paths, args.verbose)
    try:
        cfg = config.load(paths)
    except VRError as exc:
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


def collect_status(paths: Paths) -> dict[str, Any]:
    from vr import config
    from vr.firewall.model import merge_networks
    from vr.store import list_vms, read_networks
    from vr.supervisor import Supervisor, instance_running, port_answers

    status: dict[str, Any] = {"root": str(paths.root)}
    try:
        up = json.loads(Supervisor.status_file(paths).read_text())
    except (OSError, ValueError):
        up = {"stopped": True, "services": {}}
    if not up.get("stopped") and not instance_running(paths):
        # written by a vr up that was killed (SIGKILL, power cut) before it could say so
        up.update(stopped=True, ready=False, died=True)
    for svc in up.get("services", {}).values():
        # re-check now: the file is as old as the last change the supervisor saw
        svc["up"] = (
            bool(svc.get("pid"))
            and not up.get("stopped")
            and port_answers(svc["port"], svc.get("host", "127.0.0.1"))
        )
    status["supervisor"] = up
    status["vms"] = len(list_vms(paths))
    try:
        configured = config.load(paths).guest_networks
    except VRError:
        configured = ()
    # as the firewall counts them: a pushed network replaces a configured one on its
    # device, and a pushed removal takes a configured one away
    pushed = read_networks(paths, removals=True)
    status["networks"] = len(merge_networks(configured, pushed))
    from vr.metadata_counters import totals

    status["metadata_counters"] = totals(paths)
    status["password_counters"] = totals(paths, paths.passwd_counters)
    try:
        status["last_push"] = json.loads(paths.last_push.read_text())
    except (OSError, ValueError):
        status["last_push"] = None
    return status


def _status(args: argparse.Namespace) -> int:
    paths = Paths(root_from_env(args.root))
    logs.setup(None, args.verbose)
    st = collect_status(paths)
    if args.json:
        print(json.dumps(st, indent=1, sort_keys=True))
        return 0
    sys.stdout.write(format_status(st))
    return 0


def format_status(st: dict[str, Any]) -> str:
    """The plain-text ``vr status`` report of :func:`collect_status`'s result."""
    sup = st["supervisor"]
    state = "stopped" if sup.get("stopped") else ("ready" if sup.get("ready") else "starting")
    if sup.get("died"):
        state = f"stopped (vr up pid {sup.get('pid')} ended without stopping its services)"
    lines = [f"vr up: {state}" + (f" (pid {sup['pid']})" if not sup.get("stopped") else "")]
    for name, svc in sorted(sup.get("services", {}).items()):
        updown = "up" if svc["up"] else "down"
        lines.append(
            f"  {name:<10} {updown:<5} port {svc['port']:<5} pid {svc.get('pid') or '-':<8} "
            f"restarts {svc['restarts']}"
        )
    lines.append(f"VMs: {st['vms']}  guest networks: {st['networks']}")
    refused = st["metadata_counters"].get("forwarded_refused", 0)
    lines.append(f"metadata requests refused for X-Forwarded-For/Forwarded: {refused}")
    refused = st.get("password_counters", {}).get("forwarded_refused", 0)
    lines.append(f"password requests refused for X-Forwarded-For/Forwarded: {refused}")
    lp = st["last_push"]
    if lp:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lp["time"]))
        result = "ok" if lp["ok"] else "FAILED"
        lines.append(f"last push: {when} {lp['file']} {result}: {lp['summary']}")
    else:
        lines.append("last push: none")
    return "".join(line + "\n" for line in lines)
