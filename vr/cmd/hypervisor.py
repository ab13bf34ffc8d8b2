"""Subcommand ``hypervisor``: metadata and passwords for an Open vSwitch bridge.

``vr hypervisor --bridge BR`` supervises, like ``vr up``, the flow controller, the
metadata and password servers on 169.254.169.254:80/8080 (on the bridge's metadata
port) and one SSH push agent per tenant network. ``--only`` runs one of them; the
supervisor starts its children that way.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import time
from pathlib import Path
from typing import Any

from vr import logs
from vr.cmd.args import add_root, positive_int
from vr.paths import Paths, root_from_env

LOG = logging.getLogger(__name__)

ROLES = ("all", "flows", "metadata", "passwords")
NETWORK_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
META_WAIT = 30.0


def register(sub: Any) -> None:
    p = sub.add_parser(
        "hypervisor",
        help="metadata and passwords for the VMs of an Open vSwitch bridge",
        description="Serve metadata (CloudStack /latest, EC2, DigitalOcean /metadata/v1) "
        "and passwords (DomU_Request) to the VMs plugged into an OVS bridge, on every "
        "hypervisor: OVS answers ARP for 169.254.169.254 on the VM's port and NATs its "
        "connections to 100.127.<port>, so the VM is known by its switch port, never by "
        "an address it chose. Ports are followed through OVSDB (external_ids "
        "attached-mac, iface-id, vm-id); the VM is the pushed DHCP entry with that MAC. "
        "Runs until SIGTERM and then removes its flows.",
    )
    add_root(p)
    p.add_argument("--bridge", required=True, help="the OVS bridge the VMs are plugged into")
    p.add_argument(
        "--network",
        action="append",
        default=[],
        metavar="NAME=ROOT",
        help="a tenant network and its own vr root (store, DHCP entries, passwords, "
        "vr.json with its agent's ssh_port); repeatable. Default: --root itself is the "
        "one network 'default'",
    )
    p.add_argument(
        "--ovs-rundir",
        default="/var/run/openvswitch",
        help="Open vSwitch's run directory (db.sock, bridge sockets); default %(default)s",
    )
    p.add_argument(
        "--meta-port",
        default="vr-meta",
        help="name of the internal port holding 169.254.169.254 (created if missing)",
    )
    p.add_argument(
        "--return-table",
        type=int,
        default=210,
        help="OpenFlow table for the return path (default 210; must be free on the bridge)",
    )
    p.add_argument(
        "--resync",
        type=float,
        default=1.0,
        help="seconds between full reconciliations besides OVSDB events (default 1)",
    )
    p.add_argument(
        "--workers", type=positive_int, default=None, help="gunicorn workers per service"
    )
    p.add_argument("--no-agent", action="store_true", help="run no SSH push agent")
    p.add_argument("--only", choices=ROLES, default="all", help=argparse.SUPPRESS)
    p.set_defaults(func=_hypervisor)


def parse_networks(specs: list[str]) -> list[tuple[str, Paths]]:
    """``NAME=ROOT`` values -> (name, Paths); ValueError naming a bad one."""
    out: list[tuple[str, Paths]] = []
    for spec in specs:
        name, sep, root = spec.partition("=")
        if not sep or not NETWORK_NAME.match(name) or not root:
            raise ValueError(
                f"--network {spec!r}: expected NAME=ROOT, NAME of lower-case letters, "
                "digits, '-' and '_' (up to 32)"
            )
        if any(n == name for n, _ in out):
            raise ValueError(f"--network {spec!r}: network {name!r} given twice")
        out.append((name, Paths(Path(root).resolve())))
    roots = [p.root for _, p in out]
    if len(set(roots)) != len(roots):
        raise ValueError(f"--network {specs!r}: two networks share a root; expected one each")
    return out


def _child_argv(args: argparse.Namespace, paths: Paths, role: str) -> list[str]:
    argv = [sys.executable, "-m", "vr", "hypervisor", "--root", str(paths.root)]
    argv += ["--bridge", args.bridge, "--ovs-rundir", args.ovs_rundir]
    argv += ["--meta-port", args.meta_port, "--return-table", str(args.return_table)]
    argv += ["--resync", str(args.resync), "--only", role]
    for spec in args.network:
        argv += ["--network", spec]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    if args.verbose:
        argv.append("-v")
    return argv


def _hypervisor(args: argparse.Namespace) -> int:
    from vr import config, store
    from vr.errors import VRError
    from vr.hypervisor.controller import Controller
    from vr.hypervisor.ovs import Ovs
    from vr.hypervisor.services import networks_from

    paths = Paths(root_from_env(args.root))
    try:  # bad input changes nothing: checked before the root is touched
        specs = parse_networks(args.network)
        if not 1 <= args.return_table <= 254:
            raise ValueError(f"--return-table {args.return_table!r}: expected 1 to 254")
        if not 0.05 <= args.resync <= 3600:
            raise ValueError(f"--resync {args.resync!r}: expected 0.05 to 3600 seconds")
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,15}", args.meta_port):
            raise ValueError(f"--meta-port {args.meta_port!r}: expected an interface name")
        cfg = config.load(paths)
    except (ValueError, VRError) as exc:
        print(f"vr hypervisor: {exc}", file=sys.stderr)
        return 2
    paths.ensure()
    logs.setup(paths, args.verbose)
    networks = networks_from(specs, paths)
    ovs = Ovs(args.bridge, Path(args.ovs_rundir))
    controller = Controller(
        ovs, paths, args.meta_port, return_table=args.return_table, resync=args.resync
    )
    if args.only == "flows":
        return controller.run()
    if args.only in ("metadata", "passwords"):
        for n in networks:
            n.paths.ensure()
            store.recover(n.paths)
        return _serve(args.only, paths, networks, args.workers or _workers(cfg, args.only))
    return _supervise(args, paths, cfg, ovs, controller, [n.paths for n in networks])


def _workers(cfg: Any, role: str) -> int:
    return int(cfg.metadata_workers if role == "metadata" else cfg.password_workers)


def _serve(role: str, paths: Paths, networks: list[Any], workers: int) -> int:
    from vr.http import runner
    from vr.hypervisor.flows import METADATA_IP
    from vr.hypervisor.services import HypervisorPasswords, HypervisorVms, resolver_for
    from vr.metadata import counters
    from vr.metadata.app import create_app
    from vr.metadata.tokens import new_key

    if role == "metadata":
        counters.reset(paths)
        key = new_key()
        options = runner.gunicorn_options(
            "metadata", [f"{METADATA_IP}:80"], workers, "event", paths.root
        )
        LOG.info("hypervisor metadata service on %s:80, %d networks", METADATA_IP, len(networks))
        runner.run(
            lambda: create_app(
                paths, cache=HypervisorVms(resolver_for(paths, networks)), token_key=key
            ),
            options,
        )
        return 0
    options = runner.gunicorn_options(
        "passwords", [f"{METADATA_IP}:8080"], workers, "event", paths.root
    )
    LOG.info("hypervisor password service on %s:8080, %d networks", METADATA_IP, len(networks))
    runner.run(lambda: HypervisorPasswords(resolver_for(paths, networks)), options)
    return 0


def _supervise(
    args: argparse.Namespace,
    paths: Paths,
    cfg: Any,
    ovs: Any,
    controller: Any,
    roots: list[Paths],
) -> int:
    from vr import config
    from vr.errors import VRError
    from vr.hypervisor.flows import METADATA_IP
    from vr.supervisor import Service, Supervisor, probe_address

    meta_ip = str(METADATA_IP)
    try:
        if ovs.vsctl("--if-exists", "get", "Bridge", args.bridge, "name").strip() == "":
            raise ValueError(f"--bridge {args.bridge!r}: no such bridge in {ovs.db}")
        # the port and its address first: the services bind 169.254.169.254
        deadline = time.monotonic() + META_WAIT
        while controller.setup_meta() is None:
            if time.monotonic() > deadline:
                raise ValueError(f"--meta-port {args.meta_port!r}: no ofport after {META_WAIT}s")
            time.sleep(0.1)
        agents = []
        if not args.no_agent:
            for root in roots:
                ncfg = config.load(root)
                vr_cmd = [sys.executable, "-m", "vr", "agent", "--root", str(root.root)]
                agents.append(
                    Service(
                        f"agent[{root.root}]",
                        [*vr_cmd, "--listen", ncfg.ssh_listen, "--port", str(ncfg.ssh_port)],
                        ncfg.ssh_port,
                        probe_address(ncfg.ssh_listen),
                    )
                )
    except (ValueError, VRError) as exc:
        LOG.error("vr hypervisor: %s", exc)
        return 2
    services = [
        # the controller has no port of its own: ready when the metadata port answers
        Service("flows", _child_argv(args, paths, "flows"), 80, meta_ip),
        Service("metadata", _child_argv(args, paths, "metadata"), 80, meta_ip),
        Service("passwords", _child_argv(args, paths, "passwords"), 8080, meta_ip),
        *agents,
    ]
    LOG.info(
        "vr hypervisor for bridge %s: networks %s",
        args.bridge,
        ", ".join(str(r.root) for r in roots),
    )
    try:
        return Supervisor(paths, cfg, None, services).run()
    except VRError as exc:
        LOG.error("%s", exc)
        return 1
