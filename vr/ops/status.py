"""What ``vr status``, the health endpoint and the SSH diagnostics report: the
services of a root's ``vr up`` (probed now), its VMs, networks, refusals, last push
and, on a pair, each network's VRRP state and the peer's."""

from __future__ import annotations

import json
import time
from typing import Any

from vr.errors import VRError
from vr.paths import Paths


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
            and (svc["port"] == 0 or port_answers(svc["port"], svc.get("host", "127.0.0.1")))
        )
    status["supervisor"] = up
    from vr.ops.health import assess

    status["health"] = assess(up).to_dict()
    status["vms"] = len(list_vms(paths))
    try:
        configured = config.load(paths).guest_networks
    except VRError:
        configured = ()
    # as the firewall counts them: a pushed network replaces a configured one on its
    # device, and a pushed removal takes a configured one away
    pushed = read_networks(paths, removals=True)
    status["networks"] = len(merge_networks(configured, pushed))
    from vr.metadata.counters import totals

    status["metadata_counters"] = totals(paths)
    status["password_counters"] = totals(paths, "passwords")
    status["pair"] = _pair_status(paths, bool(up.get("stopped")))
    try:
        status["last_push"] = json.loads(paths.last_push.read_text())
    except (OSError, ValueError):
        status["last_push"] = None
    return status


def _pair_status(paths: Paths, stopped: bool) -> dict[str, Any] | None:
    """MASTER/BACKUP per guest network and the peer sync; None for a single router."""
    from vr import config

    try:
        cfg = config.load(paths)
    except VRError:
        return None
    if not cfg.pair_peer:
        return None
    from vr.pair import manager, sync

    try:
        inst = manager.desired_conf(paths, cfg).instances
    except ValueError:
        inst = ()
    states = manager.vrrp_states(paths)
    sync_doc = sync.read_status(paths)
    stale = stopped or sync_doc is None or time.time() - float(sync_doc.get("time", 0)) > 30
    return {
        "peer": cfg.pair_peer,
        "networks": {
            i.interface: {
                "vrid": i.vrid,
                "vip": str(i.vip),
                "state": "STOPPED" if stopped else states.get(i.name, "UNKNOWN"),
            }
            for i in inst
        },
        "peer_reachable": bool(sync_doc and sync_doc.get("reachable")) and not stale,
        "in_sync": bool(sync_doc and sync_doc.get("in_sync")) and not stale,
        "last_sync": sync_doc.get("last_ok") if sync_doc else None,
        "error": sync_doc.get("error") if sync_doc else None,
    }


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
            f"  {name:<10} {updown:<5} port {svc['port'] or '-':<5} pid {svc.get('pid') or '-':<8} "
            f"restarts {svc['restarts']}"
        )
    lines.append(f"VMs: {st['vms']}  guest networks: {st['networks']}")
    refused = st["metadata_counters"].get("forwarded_refused", 0)
    lines.append(f"metadata requests refused for X-Forwarded-For/Forwarded: {refused}")
    refused = st.get("password_counters", {}).get("forwarded_refused", 0)
    lines.append(f"password requests refused for X-Forwarded-For/Forwarded: {refused}")
    pair = st.get("pair")
    if pair:
        sync = "in sync" if pair["in_sync"] else "NOT in sync"
        reach = "reachable" if pair["peer_reachable"] else "NOT reachable"
        err = f" ({pair['error']})" if pair.get("error") and not pair["peer_reachable"] else ""
        lines.append(f"pair: peer {pair['peer']} {reach}, passwords {sync}{err}")
        for dev, n in sorted(pair["networks"].items()):
            lines.append(f"  {dev:<10} {n['state']:<8} VRRP id {n['vrid']} virtual IP {n['vip']}")
    lp = st["last_push"]
    if lp:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(lp["time"]))
        result = "ok" if lp["ok"] else "FAILED"
        lines.append(f"last push: {when} {lp['file']} {result}: {lp['summary']}")
    else:
        lines.append("last push: none")
    health = st.get("health")
    if health:
        lines.append(f"health: {health['state']}: {health['reason']}")
    return "".join(line + "\n" for line in lines)
