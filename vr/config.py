"""The appliance's own configuration: ``<root>/etc/vr/vr.json``.

Everything has a default that suits a CloudStack isolated router (guest eth0,
control eth1, public eth2). Unknown keys are refused so a typo is not silently
ignored. Guest networks listed here are active from boot; more arrive by push.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from ipaddress import IPv4Address
from typing import Any

from vr.errors import ConfigError, PayloadError
from vr.paths import Paths
from vr.payloads import GuestNetwork, load_json, parse_guest_network


@dataclass(frozen=True)
class Config:
    control_device: str = "eth1"
    """The interface the management server reaches (SSH 3922 accepted only here)."""
    public_devices: tuple[str, ...] = ("eth2",)
    ssh_listen: str = "0.0.0.0"
    ssh_port: int = 3922
    ssh_legacy_algorithms: bool = True
    """Also offer SHA-1 SSH algorithms (diffie-hellman-group14-sha1 key exchange, ssh-rsa
    host-key and client signatures), after every modern one: CloudStack's management
    server (Trilead SSH2) cannot connect without them. Modern clients never use them."""
    metadata_port: int = 80
    password_port: int = 8080
    metadata_workers: int = 2
    password_workers: int = 2
    require_mac_binding: bool = False
    """Refuse 80/8080 from addresses that have no DHCP entry (MAC binding)."""
    guest_networks: tuple[GuestNetwork, ...] = field(default_factory=tuple)
    dnsmasq: bool = True
    """Run dnsmasq on the guest networks (DHCP, DNS, router advertisements)."""
    userdata_max_bytes: int = 1024 * 1024
    """Decoded user-data bound per VM (CloudStack's ``vm.userdata.max.length`` allows
    1 MiB of base64); raise it here when the management server allows more."""
    metrics_port: int = 9180
    """Prometheus metrics and health (``vr serve-ops``): reachable only on the control
    device and ``lo`` (the firewall drops it everywhere else)."""
    pair_peer: str = ""
    """The other router's control address: this router is one of a redundant pair
    (keepalived VRRP on each guest network that has a gateway, passwords synced to the
    peer). Empty: a single router."""
    pair_priority: int = 100
    """VRRP priority; with ``nopreempt`` it only decides who wins when both start."""
    pair_advert_ms: int = 500
    """VRRP (version 3) advertisement interval; a BACKUP takes over about 3.5 of them
    after the MASTER's last one."""
    pair_vrid: int = 51
    """VRRP id of the first guest network (sorted by device); the next get +1, +2..."""
    imds_hop_limit: int = 1
    """IP TTL of the IMDSv2 token reply (EC2's ``http-put-response-hop-limit``)."""
    imds_tokens_required: bool = False
    """Every metadata GET needs an IMDSv2 token (EC2's ``HttpTokens=required``)."""
    imds_tokens_required_vms: tuple[str, ...] = ()
    """VM addresses that need a token even when ``imds_tokens_required`` is off."""
    imds_rate_per_second: int = 50
    """Metadata requests each VM may make per second, sustained (0: no limit)."""
    imds_rate_burst: int = 200
    """Requests a VM may make at once before the per-second rate applies."""
    imds_waiters_per_vm: int = 8
    """``wait_for_change`` requests one VM may hold open at once."""


USERDATA_MAX_RANGE = (1024, 32 * 1024 * 1024)
"""Below 1 KiB no cloud-config fits; above 32 MiB a push no longer fits an upload."""

PORT_RANGE = (1, 65535)
WORKERS_RANGE = (1, 64)
"""A router has a few vCPUs; more than 64 processes per service only costs memory."""

RANGES: dict[str, tuple[tuple[int, int], str]] = {
    "ssh_port": (PORT_RANGE, "a TCP port"),
    "metadata_port": (PORT_RANGE, "a TCP port"),
    "password_port": (PORT_RANGE, "a TCP port"),
    "metadata_workers": (WORKERS_RANGE, "a number of worker processes"),
    "password_workers": (WORKERS_RANGE, "a number of worker processes"),
    "userdata_max_bytes": (USERDATA_MAX_RANGE, "a number of bytes"),
    "metrics_port": (PORT_RANGE, "a TCP port"),
    "pair_priority": ((1, 254), "a VRRP priority"),
    "pair_advert_ms": ((100, 10000), "milliseconds"),
    "pair_vrid": ((1, 255), "a VRRP id"),
    "imds_hop_limit": ((1, 64), "a hop limit (EC2's bounds)"),
    "imds_rate_per_second": ((0, 100000), "requests per second per VM (0: unlimited)"),
    "imds_rate_burst": ((1, 1000000), "a number of requests"),
    "imds_waiters_per_vm": ((1, 1024), "a number of held requests"),
}
"""Integer settings and the values they may take (inclusive)."""


def load(paths: Paths) -> Config:
    """Read the config file; a missing file means all defaults."""
    try:
        raw = load_json(paths.config.read_text(), str(paths.config))
    except FileNotFoundError:
        return Config()
    except PayloadError as exc:
        raise ConfigError(f"not readable JSON: {exc}") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{paths.config}: not readable JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{paths.config}: expected a JSON object")
    return from_dict(raw, str(paths.config))


def from_dict(raw: dict[str, Any], where: str = "config") -> Config:
    known = {f.name: f for f in fields(Config)}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; expected some of {sorted(known)}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "guest_networks":
            if not isinstance(value, list):
                raise ConfigError(f"{where}: guest_networks={value!r}: expected a list")
            try:
                values[key] = tuple(parse_guest_network({**n, "add": True}) for n in value)
            except (PayloadError, TypeError) as exc:
                raise ConfigError(f"{where}: guest_networks: {exc}") from None
        elif key == "public_devices":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{where}: public_devices={value!r}: expected a list of names")
            values[key] = tuple(value)
        elif key == "imds_tokens_required_vms":
            values[key] = _vm_addresses(value, key, where)
        else:
            default = getattr(Config(), key)
            if type(value) is not type(default):
                raise ConfigError(f"{where}: {key}={value!r}: expected {type(default).__name__}")
            values[key] = value
    cfg = Config(**values)
    for net in cfg.guest_networks:
        if net.device == cfg.control_device or net.device in cfg.public_devices:
            role = "control" if net.device == cfg.control_device else "public"
            raise ConfigError(
                f"{where}: guest_networks: device={net.device!r} is the {role} "
                "interface: expected a guest interface (metadata and passwords are "
                "never offered on control or public interfaces)"
            )
    for key, ((low, high), what) in RANGES.items():
        value = getattr(cfg, key)
        if not low <= value <= high:
            raise ConfigError(f"{where}: {key}={value!r}: expected {what} from {low} to {high}")
    ports = {"ssh_port": cfg.ssh_port, "metadata_port": cfg.metadata_port}
    ports["password_port"] = cfg.password_port
    ports["metrics_port"] = cfg.metrics_port
    if len(set(ports.values())) < len(ports):
        shown = ", ".join(f"{k}={v}" for k, v in ports.items())
        raise ConfigError(f"{where}: {shown}: expected {len(ports)} different ports")
    if cfg.pair_advert_ms % 10:
        raise ConfigError(
            f"{where}: pair_advert_ms={cfg.pair_advert_ms!r}: expected a multiple of 10 "
            "(VRRP version 3 counts centiseconds)"
        )
    if cfg.pair_peer:
        try:
            IPv4Address(cfg.pair_peer)
        except ValueError:
            raise ConfigError(
                f"{where}: pair_peer={cfg.pair_peer!r}: expected the peer router's "
                'control IPv4 address, or "" for a single router'
            ) from None
    try:
        IPv4Address(cfg.ssh_listen)
    except ValueError:
        # IPv6 is not firewalled (no ip6tables rules): never listen there.
        raise ConfigError(
            f"{where}: ssh_listen={cfg.ssh_listen!r}: expected an IPv4 address"
        ) from None
    return cfg


def _vm_addresses(value: Any, key: str, where: str) -> tuple[str, ...]:
    """A list of VM IPv4 addresses, in their canonical spelling."""
    if not isinstance(value, list):
        raise ConfigError(f"{where}: {key}={value!r}: expected a list of IPv4 addresses")
    out = []
    for item in value:
        try:
            out.append(str(IPv4Address(item)))
        except ValueError:
            raise ConfigError(
                f"{where}: {key}: {item!r}: expected an IPv4 address of a VM"
            ) from None
    return tuple(out)
