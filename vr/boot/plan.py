"""What ``vr boot`` changes, decided from a :class:`BootConfig` (pure).

The plan is data: the ``ip`` commands that give each NIC its address and the routes
(each one idempotent: run twice, same result), the system files (hostname, hosts,
resolv.conf), the management server's key and the new ``vr.json``, validated by the same
code that ``vr up`` loads it with, so a plan never leaves a configuration that stops the
appliance.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from vr import config
from vr.boot.cmdline import GUEST, PUBLIC, BootConfig, Nic
from vr.errors import BootError, ConfigError

Command = tuple[str, ...]


@dataclass(frozen=True)
class Plan:
    commands: tuple[Command, ...]
    etc_files: dict[str, bytes]
    """``/etc/<name>`` -> content."""
    vr_json: dict[str, Any]
    authorized_keys: bytes | None
    """The new ``/root/.ssh/authorized_keys``; None leaves the file as it is."""
    devices: tuple[str, ...] = ()
    """The NICs the commands configure (they must exist first)."""
    warnings: tuple[str, ...] = ()


def _nic_commands(nic: Nic, up: bool) -> list[Command]:
    dev = nic.device
    cmds: list[Command] = []
    if nic.mtu is not None:
        cmds.append(("ip", "link", "set", "dev", dev, "mtu", str(nic.mtu)))
    # flush + add, not add alone: a reboot with new arguments must not keep old addresses
    cmds.append(("ip", "-4", "addr", "flush", "dev", dev))
    cmds.append(("ip", "-4", "addr", "add", str(nic.address), "brd", "+", "dev", dev))
    cmds.append(("ip", "link", "set", "dev", dev, "up" if up else "down"))
    return cmds


def network_commands(cfg: BootConfig) -> tuple[list[Command], list[str]]:
    """Addresses, links and routes; warnings for arguments that were not applied."""
    cmds: list[Command] = []
    warnings: list[str] = []
    for nic in cfg.nics:
        # A redundant router's public NIC stays down: keepalived brings it up on the
        # primary only (CloudStack's router.sh leaves eth2 down too).
        cmds += _nic_commands(nic, up=not (cfg.redundant and nic.role == PUBLIC))
    if cfg.gateway is not None and not cfg.redundant:
        # The default route leaves through the NIC whose subnet holds the gateway: the
        # public NIC on a router, the guest NIC on a DHCP server.
        order = sorted(cfg.nics, key=lambda n: (n.role != PUBLIC, n.role != GUEST))
        out = next((n for n in order if cfg.gateway in n.address.network), None)
        if out is None:
            warnings.append(
                f"gateway={cfg.gateway} is on none of the NICs' networks: no default route"
            )
        else:
            cmds.append(
                ("ip", "route", "replace", "default", "via", str(cfg.gateway), "dev", out.device)
            )
    if cfg.mgmt_cidr is not None and cfg.local_gw is not None:
        if cfg.local_gw in cfg.control.address.network:
            cmds.append(
                ("ip", "route", "replace", str(cfg.mgmt_cidr), "via", str(cfg.local_gw),
                 "dev", cfg.control.device)
            )  # fmt: skip
        else:
            warnings.append(
                f"localgw={cfg.local_gw} is not on the control network: no route to mgmtcidr"
            )
    if cfg.name is not None:
        cmds.append(("hostname", cfg.name))
    return cmds, warnings


def etc_files(cfg: BootConfig) -> dict[str, bytes]:
    files: dict[str, bytes] = {}
    if cfg.name is not None:
        files["hostname"] = f"{cfg.name}\n".encode()
        files["hosts"] = (
            "127.0.0.1\tlocalhost\n"
            f"127.0.1.1\t{cfg.name}\n"
            "::1\tlocalhost ip6-localhost ip6-loopback\n"
            "ff02::1\tip6-allnodes\nff02::2\tip6-allrouters\n"
        ).encode()
    if cfg.dns:
        lines = [f"nameserver {ip}" for ip in cfg.dns]
        if cfg.domain:
            lines.insert(0, f"search {cfg.domain}")
        files["resolv.conf"] = ("\n".join(lines) + "\n").encode()
    return files


def vr_config(cfg: BootConfig, existing: dict[str, Any]) -> dict[str, Any]:
    """``vr.json``: the operator's other settings kept, the interfaces from the boot
    arguments; validated as ``vr up`` will load it."""
    new = dict(existing)
    new["control_device"] = cfg.control.device
    new["public_devices"] = [n.device for n in cfg.nics if n.role == PUBLIC]
    # Like CloudStack's setup_sshd: the agent listens on the control address only.
    new["ssh_listen"] = str(cfg.control.address.ip)
    guest = cfg.nic(GUEST)
    if guest is not None:
        new["guest_networks"] = [
            {
                "device": guest.device,
                "router_guest_ip": str(guest.address.ip),
                "cidr": str(guest.address.network),
            }
        ]
    elif cfg.type == "vpcrouter":
        new["guest_networks"] = []  # tiers arrive by push, with their NICs
    try:
        config.from_dict(new, "vr.json from the boot arguments")
    except ConfigError as exc:
        raise BootError("type", cfg.type, f"arguments that make a valid vr.json ({exc})") from None
    return new


def merge_keys(key: str | None, dropped: str | None) -> bytes | None:
    """The management server's key(s): ``authorized_key=`` from the arguments and the
    lines of ``/var/cache/cloud/authorized_keys`` (patch ISO or guest agent), in that
    order, without repeats and comments-only lines; None when there is none at all."""
    lines: list[str] = []
    candidates = [key] if key else []
    candidates += (dropped or "").splitlines()
    for line in candidates:
        line = line.strip()
        if line and not line.startswith("#") and line not in lines:
            lines.append(line)
    return ("\n".join(lines) + "\n").encode() if lines else None


def make_plan(cfg: BootConfig, existing_vr_json: dict[str, Any], dropped_keys: str | None) -> Plan:
    cmds, warnings = network_commands(cfg)
    return Plan(
        commands=tuple(cmds),
        etc_files=etc_files(cfg),
        vr_json=vr_config(cfg, existing_vr_json),
        authorized_keys=merge_keys(cfg.authorized_key, dropped_keys),
        devices=tuple(n.device for n in cfg.nics),
        warnings=tuple(warnings),
    )
