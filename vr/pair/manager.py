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
from pathlib import Path

from vr import atomic
from vr.config import Config
from vr.errors import VRError
from vr.firewall.model import merge_networks
from vr.pair.keepalived import KeepalivedConf, instances
from vr.paths import Paths
from vr.store import read_networks

LOG = logging.getLogger(__name__)

STATES = ("MASTER", "BACKUP", "FAULT", "STOP", "DELETED")
"""What keepalived passes to a notify script (DELETED: the instance left the config)."""


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

    @property
    def transitions(self) -> Path:
        return self.paths.pair_run / "transitions.log"

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


def prepare(paths: Paths, cfg: Config) -> None:
    """Before keepalived starts: its config written, no VRRP state of an earlier run.

    A virtual IP that a SIGKILLed keepalived left on an interface is removed by
    keepalived itself when it starts its instance (``removing VIPs``, BACKUP state).
    """
    conf = desired_conf(paths, cfg)
    write_conf(paths, conf)
    for inst in conf.instances:
        with contextlib.suppress(FileNotFoundError):
            PairFiles(paths).vrrp_state(inst.name).unlink()


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
    # the history, one line per transition, for operators (and the flapping test)
    with open(f.transitions, "a", encoding="ascii") as log:
        log.write(f"{doc['time']:.3f} {instance} {state}\n")
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
