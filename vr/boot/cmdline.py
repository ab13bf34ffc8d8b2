"""CloudStack's boot arguments, parsed into a typed router configuration (pure).

The KVM agent writes them to ``/var/cache/cloud/cmdline`` through the QEMU guest agent;
other hypervisors put them on the kernel command line. Both are one line of
whitespace-separated ``key=value`` tokens in any order; a key given twice keeps its last
value (CloudStack repeats the redundancy keys). Unlike CloudStack's ``parse_cmd_line``,
a value is everything after the *first* ``=``, so a base64 ``authorized_key`` keeps its
padding (and missing padding is tolerated).

NIC roles follow CloudStack's ``merge.py``: ``router`` eth0 guest, eth1 control, eth2
public; ``dhcpsrvr`` eth0 guest, eth1 control; ``vpcrouter`` eth0 control (its public
and guest NICs are hot-plugged later and configured by pushes).
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from vr.errors import BootError

GUEST, CONTROL, PUBLIC = "guest", "control", "public"

ROLES: dict[str, tuple[tuple[str, str], ...]] = {
    "router": (("eth0", GUEST), ("eth1", CONTROL), ("eth2", PUBLIC)),
    "dhcpsrvr": (("eth0", GUEST), ("eth1", CONTROL)),
    "vpcrouter": (("eth0", CONTROL),),
}
"""Router type -> (device, role) of the NICs present at boot."""

MTU_RANGE = (68, 65535)
HOSTNAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
DOMAIN = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?")
KEY_TYPES = ("ssh-", "ecdsa-sha2-", "sk-ssh-", "sk-ecdsa-")
SECRET_KEYS = frozenset({"vmpassword", "router_password"})
"""Never logged, never shown in an error."""


@dataclass(frozen=True)
class Nic:
    device: str
    role: str
    address: IPv4Interface
    mtu: int | None = None


@dataclass(frozen=True)
class BootConfig:
    type: str
    name: str | None
    nics: tuple[Nic, ...]
    gateway: IPv4Address | None
    dns: tuple[IPv4Address, ...]
    domain: str | None
    authorized_key: str | None
    """The management server's OpenSSH public key line (decoded ``authorized_key``)."""
    redundant: bool
    mgmt_cidr: IPv4Network | None = None
    local_gw: IPv4Address | None = None

    def nic(self, role: str) -> Nic | None:
        return next((n for n in self.nics if n.role == role), None)

    @property
    def control(self) -> Nic:
        nic = self.nic(CONTROL)
        assert nic is not None  # from_args refuses a configuration without one
        return nic


def parse(text: str) -> dict[str, str]:
    """``key=value`` tokens of one cmdline; tokens without ``=`` (``ro``, ``quiet``) are
    skipped, the last of a repeated key wins."""
    args: dict[str, str] = {}
    for token in text.split():
        key, sep, value = token.partition("=")
        if sep and key:
            args[key] = value
    return args


def is_cloudstack(args: Mapping[str, str]) -> bool:
    """Whether a (kernel) command line carries CloudStack's boot arguments."""
    return args.get("type") in ROLES or args.get("template") == "domP"


def shown(args: Mapping[str, str]) -> dict[str, str]:
    """The arguments as they may be logged: secrets replaced."""
    return {k: ("<redacted>" if k in SECRET_KEYS else v) for k, v in args.items()}


def _address(args: Mapping[str, str], key: str) -> IPv4Address:
    try:
        return IPv4Address(args[key])
    except ValueError:
        raise BootError(key, args[key], "an IPv4 address like 10.1.1.1") from None


def _interface(args: Mapping[str, str], device: str) -> IPv4Interface | None:
    ip_key, mask_key = f"{device}ip", f"{device}mask"
    if ip_key not in args:
        return None
    ip = _address(args, ip_key)
    if mask_key not in args:
        raise BootError(mask_key, None, f"a netmask for {ip_key}={ip}, like 255.255.255.0")
    mask = args[mask_key]
    try:
        iface = IPv4Interface(f"{ip}/{mask}")
    except ValueError:
        raise BootError(mask_key, mask, "a netmask like 255.255.255.0 or a prefix length") from None
    if ip.is_unspecified or ip.is_multicast or ip.is_loopback:
        raise BootError(ip_key, str(ip), "a unicast host address")
    net = iface.network
    if net.prefixlen < 31 and ip in (net.network_address, net.broadcast_address):
        raise BootError(ip_key, str(ip), f"a host address of {net}, not its network/broadcast")
    return iface


def _mtu(args: Mapping[str, str], key: str) -> int | None:
    if key not in args:
        return None
    low, high = MTU_RANGE
    value = args[key]
    if not value.isdigit() or not low <= int(value) <= high:
        raise BootError(key, value, f"an MTU from {low} to {high}")
    return int(value)


def decode_key(value: str) -> str:
    """``authorized_key``: base64 of an OpenSSH public key line, padding optional."""
    try:
        raw = base64.b64decode(value + "=" * (-len(value) % 4), validate=True)
        line = raw.decode("ascii").strip()
    except (binascii.Error, ValueError):
        raise BootError("authorized_key", value, "the base64 of an OpenSSH public key") from None
    if not line.startswith(KEY_TYPES) or "\n" in line:
        raise BootError(
            "authorized_key", value, "the base64 of one OpenSSH public key line (ssh-rsa AAAA...)"
        )
    return line


def from_args(args: Mapping[str, str]) -> BootConfig:
    """The router configuration the arguments describe; :class:`BootError` names the
    first key that cannot be used."""
    kind = args.get("type")
    if kind not in ROLES:
        raise BootError("type", kind, f"one of {', '.join(sorted(ROLES))} (a router's type)")
    mtus = {GUEST: _mtu(args, "privateMtu"), PUBLIC: _mtu(args, "publicMtu")}
    nics = []
    for device, role in ROLES[kind]:
        iface = _interface(args, device)
        if iface is not None:
            nics.append(Nic(device, role, iface, mtus.get(role)))
        elif role == CONTROL:
            raise BootError(
                f"{device}ip", None, f"the control address of a {kind} (the management "
                "server reaches the router there)"
            )  # fmt: skip
    name = args.get("name")
    if name is not None and not HOSTNAME.fullmatch(name):
        raise BootError("name", name, "a host name like r-270-VM (letters, digits, '-')")
    domain = args.get("domain") or None
    if domain is not None and not DOMAIN.fullmatch(domain):
        raise BootError("domain", domain, "a DNS domain like cs1cloud.internal")
    gateway = _address(args, "gateway") if args.get("gateway") else None
    dns = tuple(_address(args, k) for k in ("dns1", "dns2") if args.get(k))
    key = decode_key(args["authorized_key"]) if args.get("authorized_key") else None
    mgmt_cidr = None
    if args.get("mgmtcidr") and args.get("localgw"):
        try:
            mgmt_cidr = IPv4Network(args["mgmtcidr"], strict=False)
        except ValueError:
            raise BootError(
                "mgmtcidr", args["mgmtcidr"], "an IPv4 network like 10.0.0.0/8"
            ) from None
    local_gw = _address(args, "localgw") if mgmt_cidr is not None else None
    return BootConfig(
        type=kind,
        name=name,
        nics=tuple(nics),
        gateway=gateway,
        dns=dns,
        domain=domain,
        authorized_key=key,
        redundant="redundant_router" in args,
        mgmt_cidr=mgmt_cidr,
        local_gw=local_gw,
    )
