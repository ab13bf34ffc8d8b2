"""keepalived's files and process for ``vr up`` (the I/O side of :mod:`vr.pair.keepalived`).

keepalived runs unmodified in the foreground, supervised by :mod:`vr.supervisor`
like every other service, with its own config and pid files under
``<root>/run/vr/pair`` (never the system service). Its configuration is rewritten
when the guest networks or ``vr.json`` change and applied by SIGHUP (reload), never
by a restart: a reload keeps the MASTER's virtual IPs.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass
from ipaddress import IPv4Interface
from pathlib import Path

from vr import atomic, subp
from vr.config import Config
from vr.errors import CommandError, VRError
from vr.firewall.model import merge_networks
from vr.pair.keepalived import KeepalivedConf, VrrpInstance, instances
from vr.paths import Paths
from vr.store import read_networks

LOG = logging.getLogger(__name__)

STATES = ("MASTER", "BACKUP", "FAULT", "STOP")


@dataclass(frozen=True)
class PairFiles:
    paths: Paths

    @property
    def conf(self) -> Path:
        return self.paths.pair_run / "keepalived.conf"

    @property
    def pid(self) -> Path:
        return self.paths.pair_run / "keepalived.pid"

    @property
    def vrrp_pid(self) -> Path:
        return self.paths.pair_run / "vrrp.pid"

    @property
    def sync_status(self) -> Path:
        return self.paths.pair_run / "sync.json"

    def vrrp_state(self, instance: str) -> Path:
        """Written by ``vr pair notify`` (keepalived's notify script) per instance."""
        if "/" in instance or instance.startswith("."):
            raise ValueError(f"instance {instance!r}: expected a keepalived instance name")
        return self.paths.pair_run / f"vrrp-{instance}.json"


def keepalived_binary() -> str:
    return shutil.which("keepalived") or "/usr/sbin/keepalived"


def keepalived_argv(paths: Paths) -> list[str]:
    f = PairFiles(paths)
    return [
        keepalived_binary(),
        "--dont-fork",
        "--log-console",
        "--log-detail",
        "--no-syslog",
        "--vrrp",
        "--use-file",
        str(f.conf),
        "--pid",
        str(f.pid),
        "--vrrp_pid",
        str(f.vrrp_pid),
    ]


def desired_conf(paths: Paths, cfg: Config) -> KeepalivedConf:
    nets = merge_networks(cfg.guest_networks, read_networks(paths, removals=True))
    router_id = socket.gethostname().split(".")[0] or "vr"
    notify = [sys.executable, "-m", "vr", "pair", "notify", "--root", str(paths.root)]
    return KeepalivedConf(router_id, notify, instances(cfg, nets))


def write_conf(paths: Paths, conf: KeepalivedConf) -> bool:
    """Write keepalived's config if its text changed; whether it did."""
    f = PairFiles(paths)
    text = conf.render().encode()
    try:
        if f.conf.read_bytes() == text:
            return False
    except FileNotFoundError:
        pass
    paths.pair_run.mkdir(parents=True, exist_ok=True)
    atomic.atomic_write(f.conf, text, 0o644)
    LOG.info("wrote %s (%d VRRP instances)", f.conf, len(conf.instances))
    return True


def held_addresses(device: str) -> set[IPv4Interface]:
    res = subp.run(["ip", "-4", "-j", "addr", "show", "dev", device], timeout=10)
    out: set[IPv4Interface] = set()
    for link in json.loads(res.stdout or "[]"):
        for a in link.get("addr_info", []):
            out.add(IPv4Interface(f"{a['local']}/{a['prefixlen']}"))
    return out


def release_leftover_vips(inst: tuple[VrrpInstance, ...]) -> None:
    """Remove virtual IPs a killed keepalived left on this router before it starts.

    A SIGKILLed keepalived cannot remove them; a router coming back as BACKUP with
    the gateway still on its interface would answer ARP for it next to the MASTER.
    """
    for i in inst:
        try:
            if i.vip in held_addresses(i.interface):
                subp.run(["ip", "addr", "del", i.vip.with_prefixlen, "dev", i.interface])
                LOG.warning("removed leftover virtual IP %s from %s", i.vip, i.interface)
        except (CommandError, ValueError) as exc:
            LOG.warning("cannot check %s for a leftover virtual IP: %s", i.interface, exc)


def prepare(paths: Paths, cfg: Config) -> None:
    """Before keepalived starts: its config written, no leftover virtual IP."""
    conf = desired_conf(paths, cfg)
    write_conf(paths, conf)
    for inst in conf.instances:
        with contextlib.suppress(FileNotFoundError):
            PairFiles(paths).vrrp_state(inst.name).unlink()
    release_leftover_vips(conf.instances)


def reload(paths: Paths) -> bool:
    """SIGHUP the running keepalived of this root; whether one was signalled."""
    try:
        pid = int(PairFiles(paths).pid.read_text().strip())
        os.kill(pid, signal.SIGHUP)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return False
    LOG.info("reloaded keepalived (pid %d) for a new configuration", pid)
    return True


def record_vrrp_state(paths: Paths, kind: str, instance: str, state: str, priority: str) -> None:
    """``vr pair notify``: keepalived reports a transition of ``instance``."""
    if kind != "INSTANCE":
        raise VRError(f"notify type {kind!r}: expected INSTANCE (no VRRP sync groups are made)")
    if state not in STATES:
        raise VRError(f"notify state {state!r}: expected one of {', '.join(STATES)}")
    f = PairFiles(paths)
    paths.pair_run.mkdir(parents=True, exist_ok=True)
    doc = {"instance": instance, "state": state, "priority": priority, "time": time.time()}
    atomic.atomic_write(f.vrrp_state(instance), json.dumps(doc).encode())
    LOG.info("VRRP instance %s is now %s", instance, state)


def vrrp_states(paths: Paths) -> dict[str, str]:
    """``{instance: state}`` as keepalived last reported them."""
    out: dict[str, str] = {}
    try:
        names = os.listdir(paths.pair_run)
    except FileNotFoundError:
        return out
    for n in sorted(names):
        if n.startswith("vrrp-") and n.endswith(".json"):
            try:
                doc = json.loads((paths.pair_run / n).read_text())
                out[str(doc["instance"])] = str(doc["state"])
            except (OSError, ValueError, KeyError):
                continue
    return out
