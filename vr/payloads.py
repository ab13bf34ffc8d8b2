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
from ipaddress import IPv4Address, IPv4Interface, IPv4Network, ip_address
from typing import Any

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


@dataclass(frozen=True)
class Limits:
    """Size bounds; the defaults suit CloudStack's 1 MiB ``vm.userdata.max.length``."""

    userdata_bytes: int = 1024 * 1024
    value_bytes: int = 64 * 1024
    keys_per_vm: int = 512
    payload_bytes: int = DEFAULT_PAYLOAD_BYTES
    password_chars: int = 512
    cfg_bytes: int = 128 * 1024 * 1024
    """A router-start batch carries every VM of the network, user-data included."""

    def with_userdata(self, userdata_bytes: int) -> Limits:
        """These limits with another decoded user-data bound; a single payload may
        then carry that much user-data in base64 plus its metadata."""
        encoded = (userdata_bytes + 2) // 3 * 4
        return replace(
            self,
            userdata_bytes=userdata_bytes,
            payload_bytes=max(DEFAULT_PAYLOAD_BYTES, encoded + 1024 * 1024),
        )


DEFAULT_LIMITS = Limits()


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
class Entry:
    """One ``[folder, file, content]`` triple: bytes to write, or :data:`DELETE`."""

    folder: str
    name: str
    content: bytes | Delete


@dataclass(frozen=True)
class VmMetadata:
    ip: IPv4Address
    entries: tuple[Entry, ...]
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
    type: str = field(default="dhcpentry", init=False)


Payload = VmMetadata | VmPassword | GuestNetwork | DhcpEntry


def parse_ipv4(value: object, field_name: str, vm: str | None = None) -> IPv4Address:
    if not isinstance(value, str):
        raise PayloadError(field_name, value, "an IPv4 address as a string", vm)
    try:
        addr = ip_address(value)
    except ValueError:
        raise PayloadError(field_name, value, "an IPv4 address like 10.1.1.23", vm) from None
    if not isinstance(addr, IPv4Address):
        raise PayloadError(field_name, value, "an IPv4 address, not IPv6", vm)
    if (
        addr.is_unspecified
        or addr.is_multicast
        or addr.is_loopback
        or addr == IPv4Address("255.255.255.255")
    ):
        raise PayloadError(field_name, value, "a unicast guest address", vm)
    return addr


B64_EXPECTED = (
    "standard base64 (A-Z a-z 0-9 + /, '=' padding optional but complete if present;"
    " URL-safe '-' and '_' are not accepted)"
)


def decode_userdata(
    text: str, vm: str, limits: Limits = DEFAULT_LIMITS, field_name: str = "user-data"
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


def parse_vm_metadata(obj: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> VmMetadata:
    ip = parse_ipv4(_require(obj, "vm_ip_address"), "vm_ip_address")
    vm = str(ip)
    triples = _require(obj, "vm_metadata", vm)
    if not isinstance(triples, list):
        raise PayloadError("vm_metadata", triples, "a list of [folder, file, content]", vm)
    entries: dict[tuple[str, str], Entry] = {}
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
        entries[(folder, name)] = Entry(folder, name, _content(content, folder, name, vm, limits))
    if len(entries) > limits.keys_per_vm:
        raise PayloadError(
            "vm_metadata", f"<{len(entries)} keys>", f"at most {limits.keys_per_vm} keys", vm
        )
    return VmMetadata(ip, tuple(entries.values()))


def _content(content: object, folder: str, name: str, vm: str, limits: Limits) -> bytes | Delete:
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


def parse_vm_password(obj: dict[str, Any], limits: Limits = DEFAULT_LIMITS) -> VmPassword:
    ip = parse_ipv4(_require(obj, "ip_address"), "ip_address")
    vm = str(ip)
    password = _require(obj, "password", vm)
    if (
        not isinstance(password, str)
        or not password
        or len(password) > limits.password_chars
        or any(ord(c) < 0x20 or ord(c) == 0x7F or 0xD800 <= ord(c) <= 0xDFFF for c in password)
    ):
        raise PayloadError(
            "password",
            REDACTED,
            f"a non-empty string of at most {limits.password_chars} printable characters "
            "(no lone surrogate \\uD8xx)",
            vm,
        )
    return VmPassword(ip, password)


def parse_guest_network(obj: dict[str, Any]) -> GuestNetwork:
    device = _require(obj, "device")
    if not isinstance(device, str) or not DEVICE_PATTERN.fullmatch(device):
        raise PayloadError(
            "device", device, "an interface name like eth0 (1-15 chars)", subject="guest network"
        )
    net = f"guest network {device}"
    try:
        ip = parse_ipv4(_require(obj, "router_guest_ip"), "router_guest_ip")
        cidr_text = _require(obj, "cidr")
        if not isinstance(cidr_text, str):
            raise PayloadError("cidr", cidr_text, "an IPv4 network as a string")
        try:
            cidr = IPv4Network(cidr_text, strict=True)
        except ValueError:
            raise PayloadError(
                "cidr", cidr_text, "an IPv4 network like 10.1.1.0/24 (host bits zero)"
            ) from None
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
        gateway = parse_ipv4(gw_text, "router_guest_gateway") if gw_text else None
        if gateway is not None and gateway not in cidr:
            raise PayloadError("router_guest_gateway", str(gateway), f"an address inside {cidr}")
    except PayloadError as exc:
        if exc.subject is not None:
            raise
        raise PayloadError(exc.field, exc.value, exc.expected, subject=net) from None
    return GuestNetwork(device, ip, cidr, add, mac, gateway)


def parse_mac(value: object, field_name: str, vm: str | None = None) -> str:
    if not isinstance(value, str) or not MAC_PATTERN.fullmatch(value.lower()):
        raise PayloadError(field_name, value, "a MAC address like 02:00:4c:5a:00:01", vm)
    return value.lower()


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
    return DhcpEntry(mac, ip, host, remove, default)


def _parse_guest_network(obj: dict[str, Any], limits: Limits) -> Payload:
    return parse_guest_network(obj)


def _parse_dhcp_entry(obj: dict[str, Any], limits: Limits) -> Payload:
    return parse_dhcp_entry(obj)


PARSERS: dict[str, Callable[[dict[str, Any], Limits], Payload]] = {
    "vmdata": parse_vm_metadata,
    "vmpassword": parse_vm_password,
    "guestnetwork": _parse_guest_network,
    "dhcpentry": _parse_dhcp_entry,
}


def parse_payload(name: str, data: bytes, limits: Limits = DEFAULT_LIMITS) -> Payload:
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
        obj = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise PayloadError(
            "encoding", f"<byte {exc.start}>", "UTF-8 JSON text", subject=where
        ) from None
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
    if not isinstance(obj, dict):
        raise PayloadError("JSON", f"<{type(obj).__name__}>", "a JSON object", subject=where)
    stem_type = FILE_TYPES.get(file_stem(name))
    kind = obj.get("type", stem_type)
    if not isinstance(kind, str) or kind not in PARSERS:
        raise PayloadError("type", kind, "one of " + ", ".join(sorted(PARSERS)), subject=where)
    if stem_type is not None and kind != stem_type:
        raise PayloadError("type", kind, f"{stem_type!r} as the file name says", subject=where)
    return PARSERS[kind](obj, limits)
