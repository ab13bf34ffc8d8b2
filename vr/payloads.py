"""Parse and validate what the management server pushes. Pure: no I/O.

Every payload type CloudStack's VR accepts through ``update_config.py`` becomes a
small frozen dataclass. Anything that is not exactly what the management server may
send raises :class:`vr.errors.PayloadError` naming the VM, the field, the value and
what was expected. Names from payloads are checked against :data:`vr.cloudstack.NAME_PATTERN`
before anything else sees them, and addresses are parsed with :mod:`ipaddress`.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from ipaddress import (
    IPv4Address,
    IPv4Interface,
    IPv4Network,
    IPv6Address,
    IPv6Network,
    ip_address,
    ip_network,
)
from typing import Any, Generic, TypeVar

from vr.cloudstack import FILE_TYPES, check_name, file_stem
from vr.errors import REDACTED, PayloadError

MAC_PATTERN = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}")
DEVICE_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")
HOSTNAME_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
B64_PATTERN = re.compile(rb"[A-Za-z0-9+/]*={0,2}")

INDEX_NAME = "meta-data"
USERDATA_NAME = "user-data"
FOLDERS = ("metadata", "userdata")


DEFAULT_PAYLOAD_BYTES = 4 * 1024 * 1024

MAX_INT_DIGITS = 4300
"""Longest JSON integer accepted (Python's own conversion limit); no field takes a
number, but a longer one must be refused as a payload error, not crash the parser."""

WIDEST_GUEST_PREFIX = 8
"""A guest network's prefix is at least /8: CloudStack's guest networks are /16 to
/30 in practice (isolated /24 by default); a wider one (0.0.0.0/0) would make every
address a guest's."""

RESERVED_NETWORKS = tuple(
    ip_network(n)
    for n in ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "240.0.0.0/4")
)
"""No guest network overlaps these: "this host", loopback, link-local (the VR's own
control network and 169.254.169.254), multicast and reserved addresses."""

RESERVED_DEVICES = ("lo",)

IPV6_METADATA_ADDRESSES = (IPv6Address("fd00:ec2::254"), IPv6Address("fe80::a9fe:a9fe"))
"""Where IPv6 guests ask for metadata and passwords: AWS's and OpenStack's addresses."""

WIDEST_GUEST_PREFIX6 = 48
"""An IPv6 guest network is at most a /48 (CloudStack hands out /64s)."""

RESERVED_NETWORKS6 = tuple(
    ip_network(n) for n in ("::/8", "fe80::/10", "ff00::/8", "fd00:ec2::/64", "64:ff9b::/96")
)
"""No IPv6 guest network overlaps these: unspecified/loopback/mapped, link-local,
multicast, the metadata prefix fd00:ec2::/64 and NAT64."""

DUID_PATTERN = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){3,129}")
"""A DHCPv6 DUID as colon-separated hex bytes (RFC 8415: 4 to 130 bytes with the type)."""

DOMAIN_PATTERN = re.compile(
    r"(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)

MIN_LEASE_SECONDS = 120
"""dnsmasq's shortest lease; CloudStack's ``dhcp.lease.timeout`` 0 means infinite."""


@dataclass(frozen=True)
class PayloadLimits:
    """Size bounds; the defaults suit CloudStack's 1 MiB ``vm.userdata.max.length``."""

    userdata_bytes: int = 1024 * 1024
    value_bytes: int = 64 * 1024
    keys_per_vm: int = 512
    payload_bytes: int = DEFAULT_PAYLOAD_BYTES
    password_chars: int = 512
    cfg_bytes: int = 128 * 1024 * 1024
    """A router-start batch carries every VM of the network, user-data included."""

    def with_userdata(self, userdata_bytes: int) -> PayloadLimits:
        """These limits with another decoded user-data bound; a single payload may
        then carry that much user-data in base64 plus its metadata."""
        encoded = (userdata_bytes + 2) // 3 * 4
        return replace(
            self,
            userdata_bytes=userdata_bytes,
            payload_bytes=max(DEFAULT_PAYLOAD_BYTES, encoded + 1024 * 1024),
        )


DEFAULT_LIMITS = PayloadLimits()


class Delete:
    """Marker for content ``""``: remove that one file."""

    _instance: Delete | None = None

    def __new__(cls) -> Delete:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "DELETE"


DELETE = Delete()


@dataclass(frozen=True)
class MetadataEntry:
    """One ``[folder, file, content]`` triple: bytes to write, or :data:`DELETE`."""

    folder: str
    name: str
    content: bytes | Delete


@dataclass(frozen=True)
class VmMetadata:
    ip: IPv4Address
    entries: tuple[MetadataEntry, ...]
    type: str = field(default="vmdata", init=False)


@dataclass(frozen=True)
class VmPassword:
    ip: IPv4Address
    password: str = field(repr=False)
    type: str = field(default="vmpassword", init=False)


@dataclass(frozen=True)
class GuestNetwork:
    device: str
    router_guest_ip: IPv4Address
    cidr: IPv4Network
    add: bool
    mac_address: str | None = None
    router_guest_gateway: IPv4Address | None = None
    router_guest_ip6: IPv6Address | None = None
    cidr6: IPv6Network | None = None
    """``router_guest_ip6_cidr``: the guest network's IPv6 prefix, with the router's
    address ``router_guest_ip6`` in it (both or neither)."""
    router_guest_ip6_gateway: IPv6Address | None = None
    dns: tuple[IPv4Address, ...] = ()
    domain_name: str | None = None
    type: str = field(default="guestnetwork", init=False)

    @property
    def interface(self) -> IPv4Interface:
        return IPv4Interface(f"{self.router_guest_ip}/{self.cidr.prefixlen}")


@dataclass(frozen=True)
class DhcpEntry:
    mac_address: str
    ipv4_address: IPv4Address
    host_name: str
    remove: bool = False
    default_entry: bool = True
    ipv6_address: IPv6Address | None = None
    ipv6_duid: str | None = None
    lease_time: int | None = None
    """Seconds; None or 0: infinite (CloudStack's default)."""
    type: str = field(default="dhcpentry", init=False)


Payload = VmMetadata | VmPassword | GuestNetwork | DhcpEntry


_A = TypeVar("_A", IPv4Address, IPv6Address)
_N = TypeVar("_N", IPv4Network, IPv6Network)


@dataclass(frozen=True)
class _Family(Generic[_A, _N]):
    """What IPv4 and IPv6 guest-network parsing differ in: types, names in messages,
    and which networks a guest network may not overlap."""

    address: type[_A]
    network: type[_N]
    name: str
    other: str
    address_example: str
    network_example: str
    reserved: tuple[IPv4Network | IPv6Network, ...]


_IPV4 = _Family(
    IPv4Address, IPv4Network, "IPv4", "IPv6", "10.1.1.23", "10.1.1.0/24", RESERVED_NETWORKS
)
_IPV6 = _Family(
    IPv6Address, IPv6Network, "IPv6", "IPv4", "fd00:1::17", "fd00:1::/64", RESERVED_NETWORKS6
)


def _parse_address(family: _Family[_A, _N], value: object, field_name: str, vm: str | None) -> _A:
    """Any address of ``family`` (the caller checks what kind it may be)."""
    if not isinstance(value, str):
        raise PayloadError(field_name, value, f"an {family.name} address as a string", vm)
    try:
        addr = ip_address(value)
    except ValueError:
        raise PayloadError(
            field_name, value, f"an {family.name} address like {family.address_example}", vm
        ) from None
    if not isinstance(addr, family.address):
        raise PayloadError(field_name, value, f"an {family.name} address, not {family.other}", vm)
    return addr


def _parse_guest_cidr(
    family: _Family[_A, _N], value: object, field_name: str, prefixes: range, sizes: str
) -> _N:
    """A guest network of ``family`` with a prefix length in ``prefixes`` (else the
    error expects ``sizes``), overlapping none of the family's reserved networks."""
    if not isinstance(value, str):
        raise PayloadError(field_name, value, f"an {family.name} network as a string")
    try:
        cidr = family.network(value, strict=True)
    except ValueError:
        raise PayloadError(
            field_name,
            value,
            f"an {family.name} network like {family.network_example} (host bits zero)",
        ) from None
    if cidr.prefixlen not in prefixes:
        raise PayloadError(field_name, value, sizes)
    for reserved in family.reserved:
        if cidr.overlaps(reserved):
            raise PayloadError(field_name, value, f"a guest network not overlapping {reserved}")
    return cidr


def _check_gateway(gateway: _A | None, field_name: str, cidr: _N) -> None:
    if gateway is not None and gateway not in cidr:
        raise PayloadError(field_name, str(gateway), f"an address inside {cidr}")


def parse_ipv4(
    value: object, field_name: str, vm: str | None = None, *, router: bool = False
) -> IPv4Address:
    """A unicast IPv4 address; ``router``: also not link-local (169.254.0.0/16 is the
    VR's control network and holds the metadata address 169.254.169.254)."""
    addr = _parse_address(_IPV4, value, field_name, vm)
    if (
        addr.is_unspecified
        or addr.is_multicast
        or addr.is_loopback
        or addr == IPv4Address("255.255.255.255")
    ):
        raise PayloadError(field_name, value, "a unicast guest address", vm)
    if router and addr.is_link_local:
        raise PayloadError(
            field_name, value, "a guest address outside link-local 169.254.0.0/16", vm
        )
    return addr


B64_EXPECTED = (
    "standard base64 (A-Z a-z 0-9 + /, '=' padding optional but complete if present;"
    " URL-safe '-' and '_' are not accepted)"
)


def decode_userdata(
    text: str, vm: str, limits: PayloadLimits = DEFAULT_LIMITS, field_name: str = "user-data"
) -> bytes:
    """Strict standard base64 (padding optional) bounded by ``limits.userdata_bytes``.

    Line breaks (MIME-wrapped base64) are allowed; anything else outside the alphabet
    is an error, never silently dropped as CloudStack's ``b64decode`` does.
    """
    raw = text.encode("ascii", "replace")
    compact = re.sub(rb"\r?\n", b"", raw)
    max_encoded = (limits.userdata_bytes + 2) // 3 * 4
    if len(compact) > max_encoded:
        raise PayloadError(
            field_name,
            f"<{len(compact)} base64 chars>",
            f"at most {limits.userdata_bytes} bytes once decoded",
            vm,
        )
    body = compact.rstrip(b"=")
    padding = len(compact) - len(body)
    if (
        not B64_PATTERN.fullmatch(compact)
        or len(body) % 4 == 1
        or (padding and len(compact) % 4 != 0)
    ):
        raise PayloadError(field_name, text, B64_EXPECTED, vm)
    try:
        data = base64.b64decode(body + b"=" * (-len(body) % 4), validate=True)
    except binascii.Error as exc:
        raise PayloadError(field_name, text, f"{B64_EXPECTED}: {exc}", vm) from None
    if len(data) > limits.userdata_bytes:
        raise PayloadError(
            field_name,
            f"<{len(data)} bytes>",
            f"at most {limits.userdata_bytes} bytes once decoded",
            vm,
        )
    return data


def _require(obj: dict[str, Any], key: str, vm: str | None = None) -> Any:
    if key not in obj:
        raise PayloadError(key, None, "this field to be present", vm)
    return obj[key]


def _parse_bool(value: object, field_name: str, vm: str | None = None) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise PayloadError(field_name, value, "true or false", vm)


def parse_vm_metadata(obj: dict[str, Any], limits: PayloadLimits = DEFAULT_LIMITS) -> VmMetadata:
    ip = parse_ipv4(_require(obj, "vm_ip_address"), "vm_ip_address")
    vm = str(ip)
    triples = _require(obj, "vm_metadata", vm)
    if not isinstance(triples, list):
        raise PayloadError("vm_metadata", triples, "a list of [folder, file, content]", vm)
    entries: dict[tuple[str, str], MetadataEntry] = {}
    for i, triple in enumerate(triples):
        where = f"vm_metadata[{i}]"
        if not isinstance(triple, list) or len(triple) != 3:
            raise PayloadError(where, triple, "a list [folder, file, content]", vm)
        folder, name, content = triple
        if not isinstance(folder, str):
            raise PayloadError(f"{where}.folder", folder, "'metadata' or 'userdata'", vm)
        if folder not in FOLDERS:
            # CloudStack ignores other folders (e.g. "password" from config drive code).
            continue
        if name == "":
            continue
        name = check_name(name, f"{where}.file", vm)
        if folder == "metadata" and name == INDEX_NAME:
            raise PayloadError(f"{where}.file", name, "a key other than the index name", vm)
        entries[(folder, name)] = MetadataEntry(
            folder, name, _content(content, folder, name, vm, limits)
        )
    if len(entries) > limits.keys_per_vm:
        raise PayloadError(
            "vm_metadata", f"<{len(entries)} keys>", f"at most {limits.keys_per_vm} keys", vm
        )
    return VmMetadata(ip, tuple(entries.values()))


def _content(
    content: object, folder: str, name: str, vm: str, limits: PayloadLimits
) -> bytes | Delete:
    """``null`` -> empty, ``""`` -> delete, user-data base64-decoded, metadata UTF-8."""
    where = f"{folder}/{name}"
    if content is None:
        return b""
    if content == "":
        return DELETE
    if not isinstance(content, str):
        raise PayloadError(where, content, 'a string, "" (delete) or null (empty)', vm)
    if folder == "userdata":
        return decode_userdata(content, vm, limits, where)
    try:
        value = content.encode("utf-8")
    except UnicodeEncodeError:
        raise PayloadError(where, content, "Unicode text (no lone surrogate \\uD8xx)", vm) from None
    if len(value) > limits.value_bytes:
        raise PayloadError(
            where, f"<{len(value)} bytes>", f"at most {limits.value_bytes} bytes", vm
        )
    return value


def parse_vm_password(obj: dict[str, Any], limits: PayloadLimits = DEFAULT_LIMITS) -> VmPassword:
    ip = parse_ipv4(_require(obj, "ip_address"), "ip_address")
    vm = str(ip)
    password = _require(obj, "password", vm)
    if (
        not isinstance(password, str)
        or not password
        or len(password) > limits.password_chars
        or not password.isprintable()
    ):
        raise PayloadError(
            "password",
            REDACTED,
            f"a non-empty string of at most {limits.password_chars} printable characters "
            "(no control character such as tab or U+0085, no line or paragraph separator, "
            "no format, private-use or unassigned character, no lone surrogate \\uD8xx)",
            vm,
        )
    return VmPassword(ip, password)


def parse_guest_network(obj: dict[str, Any]) -> GuestNetwork:
    device = _require(obj, "device")
    if (
        not isinstance(device, str)
        or not DEVICE_PATTERN.fullmatch(device)
        or device in RESERVED_DEVICES
    ):
        raise PayloadError(
            "device",
            device,
            "a guest interface name like eth0 (1-15 chars, not the loopback 'lo')",
            subject="guest network",
        )
    net = f"guest network {device}"
    try:
        ip = parse_ipv4(_require(obj, "router_guest_ip"), "router_guest_ip", router=True)
        cidr = _parse_guest_cidr(
            _IPV4,
            _require(obj, "cidr"),
            "cidr",
            range(WIDEST_GUEST_PREFIX, 33),
            f"a guest network of at most /{WIDEST_GUEST_PREFIX} (prefix length "
            f"{WIDEST_GUEST_PREFIX}-32)",
        )
        if ip not in cidr:
            raise PayloadError("router_guest_ip", str(ip), f"an address inside cidr {cidr}")
        if cidr.prefixlen < 31 and ip in (cidr.network_address, cidr.broadcast_address):
            raise PayloadError(
                "router_guest_ip", str(ip), f"a host address of {cidr}, not its network/broadcast"
            )
        add = _parse_bool(obj.get("add", True), "add")
        mac = obj.get("mac_address")
        if mac is not None:
            mac = parse_mac(mac, "mac_address")
        gw_text = obj.get("router_guest_gateway")
        gateway = parse_ipv4(gw_text, "router_guest_gateway", router=True) if gw_text else None
        _check_gateway(gateway, "router_guest_gateway", cidr)
        ip6, cidr6, gateway6 = _parse_guest_ipv6(obj)
        dns = _parse_dns(obj.get("dns"))
        domain = obj.get("domain_name")
        if domain in (None, ""):
            domain = None
        elif not isinstance(domain, str) or not DOMAIN_PATTERN.fullmatch(domain):
            raise PayloadError("domain_name", domain, "a DNS domain like cs1cloud.internal")
    except PayloadError as exc:
        if exc.subject is not None:
            raise
        raise PayloadError(exc.field, exc.value, exc.expected, subject=net) from None
    return GuestNetwork(device, ip, cidr, add, mac, gateway, ip6, cidr6, gateway6, dns, domain)


def parse_ipv6(value: object, field_name: str, vm: str | None = None) -> IPv6Address:
    """A global or unique-local unicast IPv6 address (never link-local, multicast,
    loopback, unspecified, IPv4-mapped or a metadata address)."""
    addr = _parse_address(_IPV6, value, field_name, vm)
    if any(addr in n for n in RESERVED_NETWORKS6) or addr.ipv4_mapped is not None:
        raise PayloadError(
            field_name,
            value,
            "a unicast IPv6 guest address (not link-local, multicast, loopback, "
            "IPv4-mapped or in fd00:ec2::/64)",
            vm,
        )
    return addr


def _parse_guest_ipv6(
    obj: dict[str, Any],
) -> tuple[IPv6Address | None, IPv6Network | None, IPv6Address | None]:
    """``router_guest_ip6`` and ``router_guest_ip6_cidr`` (both or neither) and the
    optional ``router_guest_ip6_gateway``; absent or empty: an IPv4-only network."""
    ip_text = obj.get("router_guest_ip6") or None
    cidr_text = obj.get("router_guest_ip6_cidr") or None
    gw_text = obj.get("router_guest_ip6_gateway") or None
    if ip_text is None and cidr_text is None:
        if gw_text is not None:
            raise PayloadError(
                "router_guest_ip6_gateway", gw_text, "no gateway without router_guest_ip6_cidr"
            )
        return None, None, None
    if ip_text is None or cidr_text is None:
        missing = "router_guest_ip6" if ip_text is None else "router_guest_ip6_cidr"
        raise PayloadError(missing, None, "router_guest_ip6 and router_guest_ip6_cidr together")
    ip6 = parse_ipv6(ip_text, "router_guest_ip6")
    cidr6 = _parse_guest_cidr(
        _IPV6,
        cidr_text,
        "router_guest_ip6_cidr",
        range(WIDEST_GUEST_PREFIX6, 127),
        f"an IPv6 guest network of prefix length {WIDEST_GUEST_PREFIX6}-126",
    )
    if ip6 not in cidr6 or ip6 == cidr6.network_address:
        raise PayloadError("router_guest_ip6", str(ip6), f"a host address inside {cidr6}")
    gateway6 = parse_ipv6(gw_text, "router_guest_ip6_gateway") if gw_text is not None else None
    _check_gateway(gateway6, "router_guest_ip6_gateway", cidr6)
    return ip6, cidr6, gateway6


def _parse_dns(value: object, vm: str | None = None) -> tuple[IPv4Address, ...]:
    """CloudStack's ``dns``: resolvers as one comma-separated string (or a list)."""
    if value in (None, ""):
        return ()
    items: list[object]
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",") if v.strip()]
    elif isinstance(value, list):
        items = list(value)
    else:
        raise PayloadError("dns", value, "IPv4 resolvers as a comma-separated string", vm)
    if len(items) > 8:
        raise PayloadError("dns", value, "at most 8 resolvers", vm)
    return tuple(parse_ipv4(v, "dns", vm) for v in items)


MAC_EXPECTED = "a unicast MAC address like 02:00:4c:5a:00:01"


def parse_mac(value: object, field_name: str, vm: str | None = None) -> str:
    """A unicast MAC: a guest can never send from a multicast (first octet odd, e.g.
    the broadcast ff:ff:ff:ff:ff:ff) or the all-zero address, so a binding to one
    would lock the VM out of the metadata and password services."""
    if not isinstance(value, str) or not MAC_PATTERN.fullmatch(value.lower()):
        raise PayloadError(field_name, value, MAC_EXPECTED, vm)
    mac = value.lower()
    if int(mac[:2], 16) & 1:
        raise PayloadError(field_name, value, f"{MAC_EXPECTED}, not multicast/broadcast", vm)
    if mac == "00:00:00:00:00:00":
        raise PayloadError(field_name, value, f"{MAC_EXPECTED}, not all zero", vm)
    return mac


def parse_dhcp_entry(obj: dict[str, Any]) -> DhcpEntry:
    ip = parse_ipv4(_require(obj, "ipv4_address"), "ipv4_address")
    vm = str(ip)
    mac = parse_mac(_require(obj, "mac_address", vm), "mac_address", vm)
    host = obj.get("host_name", "")
    if host in (None, ""):
        host = ""
    elif not isinstance(host, str) or not HOSTNAME_PATTERN.fullmatch(host):
        raise PayloadError("host_name", host, "a host name label (letters, digits, '-')", vm)
    remove = _parse_bool(obj.get("remove", False), "remove", vm)
    default = _parse_bool(obj.get("default_entry", True), "default_entry", vm)
    v6_text = obj.get("ipv6_address")
    ipv6 = parse_ipv6(v6_text, "ipv6_address", vm) if v6_text not in (None, "") else None
    duid = obj.get("ipv6_duid")
    if duid in (None, ""):
        duid = None
    elif not isinstance(duid, str) or not DUID_PATTERN.fullmatch(duid.lower()):
        raise PayloadError(
            "ipv6_duid", duid, "a DHCPv6 DUID as colon-separated hex bytes (4-130 bytes)", vm
        )
    else:
        duid = duid.lower()
    if duid is not None and ipv6 is None:
        raise PayloadError("ipv6_duid", duid, "a DUID only together with ipv6_address", vm)
    return DhcpEntry(mac, ip, host, remove, default, ipv6, duid, _parse_lease(obj, vm))


def _parse_lease(obj: dict[str, Any], vm: str) -> int | None:
    """``lease_time`` in seconds: 0 (or absent) infinite, else at least 120."""
    value = obj.get("lease_time")
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit() and len(value) <= 10:
        value = int(value)
    if (
        not isinstance(value, int)
        or isinstance(value, bool)
        or not (value == 0 or MIN_LEASE_SECONDS <= value <= 2**31 - 1)
    ):
        raise PayloadError(
            "lease_time",
            value,
            f"seconds: 0 for infinite, or {MIN_LEASE_SECONDS} to {2**31 - 1}",
            vm,
        )
    return value or None


def _parse_guest_network(obj: dict[str, Any], limits: PayloadLimits) -> Payload:
    return parse_guest_network(obj)


def _parse_dhcp_entry(obj: dict[str, Any], limits: PayloadLimits) -> Payload:
    return parse_dhcp_entry(obj)


PARSERS: dict[str, Callable[[dict[str, Any], PayloadLimits], Payload]] = {
    "vmdata": parse_vm_metadata,
    "vmpassword": parse_vm_password,
    "guestnetwork": _parse_guest_network,
    "dhcpentry": _parse_dhcp_entry,
}


class _LongInt:
    """Stands for a JSON integer too long to convert, until its place is known."""

    def __init__(self, digits: str) -> None:
        self.digits = digits

        self.size = len(digits.lstrip("-"))

    def __repr__(self) -> str:
        shown = f": {self.digits[:20]}..." if self.digits else ""
        return f"<integer of {self.size} digits{shown}>"


def _pairs_once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            # json.loads would keep the last one silently: which one did the sender mean?
            raise PayloadError("JSON key", key, "each key at most once in an object")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise PayloadError("JSON", name, "standard JSON numbers (no NaN or Infinity)")


def _path_of_long_int(obj: Any) -> tuple[str, _LongInt] | None:
    """Where the first :class:`_LongInt` sits, as ``a.b[2]`` (iterative: no recursion)."""
    stack: list[tuple[str, Any]] = [("", obj)]
    while stack:
        where, value = stack.pop()
        if isinstance(value, _LongInt):
            if where.rpartition(".")[2] == "password":
                value.digits = ""  # a password's digits are never shown
            return where or "JSON", value
        if isinstance(value, dict):
            items = [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            items = [(f"{where}[{i}]", v) for i, v in enumerate(value)]
        else:
            continue
        stack.extend(reversed(items))
    return None


def load_json(text: str, where: str) -> Any:
    """Strict ``json.loads``: every failure is a :class:`PayloadError` about ``where``.

    Refused beyond what ``json.loads`` refuses: a key twice in one object, NaN and
    Infinity, integers of more than :data:`MAX_INT_DIGITS` digits (named with their
    place in the document).
    """
    long_ints: list[_LongInt] = []

    def parse_int(digits: str) -> int | _LongInt:
        if len(digits.lstrip("-")) > MAX_INT_DIGITS:
            long_ints.append(_LongInt(digits))
            return long_ints[-1]
        return int(digits)

    try:
        obj = json.loads(
            text,
            object_pairs_hook=_pairs_once,
            parse_int=parse_int,
            parse_constant=_no_constant,
        )
    except PayloadError as exc:
        raise PayloadError(exc.field, exc.value, exc.expected, subject=where) from None
    except json.JSONDecodeError as exc:
        raise PayloadError(
            "JSON",
            f"<{exc.msg} at line {exc.lineno} column {exc.colno}>",
            "one valid JSON object",
            subject=where,
        ) from None
    except RecursionError:
        raise PayloadError(
            "JSON", "<nested too deeply>", "a flat JSON object", subject=where
        ) from None
    if long_ints:
        found = _path_of_long_int(obj)
        field_name, value = found if found is not None else ("JSON", long_ints[0])
        raise PayloadError(
            field_name, value, f"a number of at most {MAX_INT_DIGITS} digits", subject=where
        )
    return obj


def parse_payload(name: str, data: bytes, limits: PayloadLimits = DEFAULT_LIMITS) -> Payload:
    """Parse one pushed file: ``name`` is its file name, ``data`` its bytes."""
    # Content is never quoted in these messages: the file may hold a password.
    where = f"file {name}"
    if len(data) > limits.payload_bytes:
        raise PayloadError(
            "size",
            f"<{len(data)} bytes>",
            f"a payload of at most {limits.payload_bytes} bytes",
            subject=where,
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(
            "encoding", f"<byte {exc.start}>", "UTF-8 JSON text", subject=where
        ) from None
    obj = load_json(text, where)
    if not isinstance(obj, dict):
        raise PayloadError("JSON", f"<{type(obj).__name__}>", "a JSON object", subject=where)
    stem_type = FILE_TYPES.get(file_stem(name))
    kind = obj.get("type", stem_type)
    if not isinstance(kind, str) or kind not in PARSERS:
        raise PayloadError("type", kind, "one of " + ", ".join(sorted(PARSERS)), subject=where)
    if stem_type is not None and kind != stem_type:
        raise PayloadError("type", kind, f"{stem_type!r} as the file name says", subject=where)
    return PARSERS[kind](obj, limits)
