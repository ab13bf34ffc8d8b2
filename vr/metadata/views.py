"""What a guest sees at each URL: pure functions from one VM's data to a reply.

Three views of the same :class:`VmView` (built from a ``vr.store.VmRecord``):

* CloudStack, under ``/latest/`` (byte-compatible with the VR's Apache rules,
  cloudstack-vr.md §3.3): the index, ``meta-data/<key>[/]``, ``<key>[/]`` shortcuts,
  ``user-data[/]``. Fixed names (``latest``, ``meta-data``, ``user-data`` and the
  shortcut names Apache ships) match case-insensitively. Stored key names are looked
  up exactly under ``meta-data/`` (Apache's ``$1`` keeps the request's case) but in
  any case as ``/latest/<key>`` shortcuts (each pushed name gets a ``^<name>$ [NC]``
  rule whose substitution writes the stored name); see :func:`_shortcut`.
* EC2, under dated versions (``/2009-04-04/...``) and, where it does not clash with
  CloudStack, under ``/latest/meta-data/`` too: ``hostname``, ``placement/``,
  ``public-keys/`` (``0=<name>``), ``public-keys/0/openssh-key``. One deliberate
  choice: ``/latest/meta-data/public-keys`` (no slash) is CloudStack's raw key file,
  ``/latest/meta-data/public-keys/`` (slash) is EC2's listing.
* DigitalOcean, under ``/metadata/v1/`` and ``/metadata/v1.json``.

Nothing here does I/O, so every rule is unit-tested directly and the WSGI fast path
and the Flask views answer from the same function (:func:`resolve`).
"""

from __future__ import annotations

import contextlib
import json
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address

from vr.payloads import USERDATA_NAME, DhcpEntry, GuestNetwork

TEXT = "text/plain"
OCTETS = "application/octet-stream"
JSON = "application/json"

CLOUDSTACK_VERSION = "latest"
EC2_VERSIONS = (
    "1.0",
    "2007-01-19",
    "2007-03-01",
    "2007-08-29",
    "2007-10-10",
    "2007-12-15",
    "2008-02-01",
    "2008-09-01",
    "2009-04-04",
    "2011-01-01",
    "2011-05-01",
    "2012-01-12",
    "2014-02-25",
    "2014-11-05",
    "2015-10-20",
    "2016-04-19",
    "2016-06-30",
    "2016-09-02",
    "2018-03-28",
    "2018-08-17",
    "2018-09-24",
    "2019-10-01",
    "2020-10-27",
    "2021-01-03",
    "2021-03-23",
)
"""Dated EC2 API versions, all mapped to the same data (``/`` lists them)."""
_EC2_VERSION_SET = frozenset(EC2_VERSIONS)

SHORTCUTS = frozenset(
    {
        "availability-zone",
        "cloud-identifier",
        "instance-id",
        "local-hostname",
        "local-ipv4",
        "public-hostname",
        "public-ipv4",
        "public-keys",
        "service-offering",
        "vm-id",
        "cloud-domain",
        "cloud-domain-id",
    }
)
"""``/latest/<name>`` rules Apache ships; they match in any case (flag ``NC``).

Unlike Apache, ``cloud-domain`` and ``cloud-domain-id`` answer their own key, not
``vm-id`` (apache/cloudstack PR #14157).
"""

_KEY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@-]{0,63}")


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    body: bytes
    content_type: str = TEXT
    location: str | None = None
    headers: tuple[tuple[str, str], ...] = ()  # more response headers


NOT_FOUND = Reply(404, b"not found\n")


class VmView:
    """One VM generation as the HTTP views need it; immutable once built.

    Kept small on purpose (one per VM per worker): the metadata dict of the record
    with interned key names, the user-data bytes and the index.
    """

    __slots__ = ("folded", "gen", "index", "metadata", "userdata")

    def __init__(
        self,
        gen: int,
        metadata: Mapping[str, bytes],
        userdata: bytes | None,
        index: bytes,
        folded: Mapping[str, str] | None = None,
    ) -> None:
        self.gen = gen
        self.metadata = metadata
        self.userdata = userdata
        self.index = index
        # Lower-cased name -> the stored name a case-insensitive shortcut answers,
        # only where that is not the lower-cased name itself (usually empty).
        self.folded: Mapping[str, str] = folded if folded is not None else _NO_FOLDS


_NO_FOLDS: Mapping[str, str] = {}


def fold_names(names: list[str]) -> dict[str, str]:
    """For each lower-cased name, the first of ``names`` (index order) with that
    spelling in any case — kept only where it differs from the lower-cased name."""
    first: dict[str, str] = {}
    for name in names:
        first.setdefault(name.lower(), name)
    return {low: name for low, name in first.items() if low != name}


def build_view(gen: int, metadata: Mapping[str, bytes], userdata: Mapping[str, bytes]) -> VmView:
    """The view of a stored VM (``metadata`` in index order)."""
    interned = {sys.intern(k): v for k, v in metadata.items()}
    index = "".join(k + "\n" for k in interned).encode()
    folded = fold_names(list(interned)) or None
    return VmView(gen, interned, userdata.get(USERDATA_NAME), index, folded)


# --- helpers -------------------------------------------------------------------------


def _text(body: bytes) -> Reply:
    return Reply(200, body)


def _listing(names: list[str]) -> Reply:
    """A directory listing: one name per line, as EC2 and DigitalOcean answer."""
    return Reply(200, "\n".join(names).encode())


def _userdata(view: VmView) -> Reply:
    if view.userdata is None:
        return NOT_FOUND
    return Reply(200, view.userdata, OCTETS)


def _strip_slash(segs: list[str]) -> tuple[list[str], bool]:
    """``['a', 'b', '']`` (from ``a/b/``) -> (['a', 'b'], True)."""
    if segs and segs[-1] == "":
        return segs[:-1], True
    return segs, False


@dataclass(frozen=True)
class PublicKey:
    name: str
    key: bytes


def public_keys(view: VmView) -> list[PublicKey]:
    """The VM's keys (CloudStack joins several with ``\\n``) with EC2-style names.

    The name is the key's comment when it is a plain word, else ``key-<n>``.
    """
    raw = view.metadata.get("public-keys")
    if not raw:
        return []
    out: list[PublicKey] = []
    for line in raw.split(b"\n"):
        line = line.strip()
        if not line:
            continue
        fields = line.split(None, 2)
        comment = fields[2].decode("utf-8", "replace") if len(fields) == 3 else ""
        name = comment if _KEY_NAME.fullmatch(comment) else f"key-{len(out)}"
        out.append(PublicKey(name, line))
    return out


# --- CloudStack ----------------------------------------------------------------------


def _cloudstack(view: VmView, rest: list[str]) -> Reply:
    """``/latest/<rest>``: CloudStack's scheme first, then EC2 extras under meta-data."""
    segs, slash = _strip_slash(rest)
    if not segs:
        names = ["meta-data"] + (["user-data"] if view.userdata is not None else [])
        return _listing(names)
    head = segs[0].lower()
    if head == "meta-data":
        sub = segs[1:]
        if not sub:
            return _text(view.index)
        if len(sub) == 1:
            value = view.metadata.get(sub[0])
            if value is not None and not (slash and sub[0] == "public-keys"):
                return _text(value)
        return _ec2_meta(view, sub, slash)
    if len(segs) != 1:
        return NOT_FOUND
    if head == USERDATA_NAME:
        return _userdata(view)
    value = _shortcut(view, segs[0], head)
    return NOT_FOUND if value is None else _text(value)


def _shortcut(view: VmView, name: str, low: str) -> bytes | None:
    """``/latest/<name>``: the stored key ``name`` names, in any letter case.

    CloudStack appends ``RewriteRule ^<file>$ ../metadata/%{REMOTE_ADDR}/<file>
    [L,NC,QSA]`` for every pushed file, after the shipped rules: the pattern
    ignores case and the substitution writes the stored name, so
    ``/latest/CUSTOM-KEY`` answers the stored ``custom-key``. Order here: the exact
    name; a shipped shortcut name (Apache's shipped rules come first and write the
    lower-case name); then, among stored names equal ignoring case, the first in
    index (push) order — as the first-appended of Apache's rules would win. One
    deliberate difference: an exact match wins even where Apache would take an
    earlier-pushed name that differs only in case.
    """
    md = view.metadata
    value = md.get(name)
    if value is not None:
        return value
    if low in SHORTCUTS:
        value = md.get(low)
        if value is not None:
            return value
    return md.get(view.folded.get(low, low))


# --- EC2 -----------------------------------------------------------------------------


def _ec2_index(view: VmView) -> list[str]:
    names = []
    for k in view.metadata:
        names.append("public-keys/" if k == "public-keys" else k)
    if "public-keys/" in names and not public_keys(view):
        names.remove("public-keys/")
    if "hostname" not in view.metadata and "local-hostname" in view.metadata:
        names.append("hostname")
    if "availability-zone" in view.metadata:
        names.append("placement/")
    return names


def _ec2_meta(view: VmView, sub: list[str], slash: bool) -> Reply:
    """EC2 paths below ``meta-data/`` (``sub`` without the trailing slash)."""
    head = sub[0].lower()
    if len(sub) == 1 and head == "hostname" and "hostname" not in view.metadata:
        value = view.metadata.get("local-hostname")
        return NOT_FOUND if value is None else _text(value)
    if head == "placement":
        zone = view.metadata.get("availability-zone")
        if zone is None:
            return NOT_FOUND
        if len(sub) == 1:
            return _listing(["availability-zone"])
        if len(sub) == 2 and sub[1].lower() == "availability-zone" and not slash:
            return _text(zone)
        return NOT_FOUND
    if head == "public-keys":
        keys = public_keys(view)
        if not keys:
            return NOT_FOUND
        if len(sub) == 1:
            return _listing([f"{i}={k.name}" for i, k in enumerate(keys)])
        index = _index(sub[1])
        if index is None or index >= len(keys) or len(sub) > 3:
            return NOT_FOUND
        key = keys[index]
        if len(sub) == 2:
            return _listing(["openssh-key"])
        if sub[2].lower() == "openssh-key" and not slash:
            return _text(key.key)
    return NOT_FOUND


def _ec2(view: VmView, rest: list[str]) -> Reply:
    """``/<dated version>/<rest>``: the EC2 tree."""
    segs, slash = _strip_slash(rest)
    if not segs:
        names = ["meta-data"] + (["user-data"] if view.userdata is not None else [])
        return _listing(names)
    head = segs[0].lower()
    if head == USERDATA_NAME and len(segs) == 1:
        return _userdata(view)
    if head != "meta-data":
        return NOT_FOUND
    sub = segs[1:]
    if not sub:
        return _listing(_ec2_index(view))
    if len(sub) == 1 and sub[0] != "public-keys":
        value = view.metadata.get(sub[0])
        if value is not None:
            return _text(value)
    return _ec2_meta(view, sub, slash)


# --- DigitalOcean --------------------------------------------------------------------


@dataclass(frozen=True)
class Lan:
    """What the router knows of a VM's guest NIC, from CloudStack's pushes: the MAC
    of its DHCP entry and its guest network's netmask, gateway and DNS servers —
    the values DHCP hands the VM (vr.dhcp.model), so both always agree."""

    mac: str | None = None
    netmask: str | None = None
    gateway: str | None = None
    nameservers: tuple[str, ...] = ()


def lan_of(ip: IPv4Address, networks: list[GuestNetwork], dhcp: list[DhcpEntry]) -> Lan:
    """The :class:`Lan` of VM ``ip``; what no push told is None (never guessed)."""
    mac = next((e.mac_address for e in dhcp if e.ipv4_address == ip and not e.remove), None)
    net = next((n for n in networks if ip in n.cidr), None)
    if net is None:
        return Lan(mac)
    gateway = net.router_guest_gateway or net.router_guest_ip
    servers = list(dict.fromkeys([net.router_guest_ip, *net.dns]))
    return Lan(mac, str(net.cidr.netmask), str(gateway), tuple(str(a) for a in servers))


NO_LAN = Lan()


def _do_fields(view: VmView) -> dict[str, bytes]:
    md = view.metadata
    out: dict[str, bytes] = {}
    for name, keys in (
        ("id", ("instance-id", "vm-id")),
        ("hostname", ("local-hostname",)),
        ("public-keys", ("public-keys",)),
        ("region", ("availability-zone",)),
    ):
        for k in keys:
            if k in md:
                out[name] = md[k]
                break
    return out


def _do_interfaces(view: VmView, lan: Lan) -> dict[str, dict[str, str]]:
    """Per kind (``private``: the guest NIC; ``public``: CloudStack's public-ipv4),
    the leaves DigitalOcean names (``mac``, ``type``, ``ipv4/address``, ...)."""
    out: dict[str, dict[str, str]] = {}
    local = view.metadata.get("local-ipv4")
    if local:
        leaves = {"ipv4/address": local.decode("utf-8", "replace")}
        if lan.netmask is not None and lan.gateway is not None:
            leaves["ipv4/netmask"] = lan.netmask
            leaves["ipv4/gateway"] = lan.gateway
        if lan.mac is not None:
            leaves["mac"] = lan.mac
        leaves["type"] = "private"
        out["private"] = leaves
    public = view.metadata.get("public-ipv4")
    if public:
        out["public"] = {"ipv4/address": public.decode("utf-8", "replace"), "type": "public"}
    return out


def _floating(view: VmView) -> str | None:
    """CloudStack's public-ipv4 when it is a NAT address (not the VM's own)."""
    public = view.metadata.get("public-ipv4")
    if not public or public == view.metadata.get("local-ipv4"):
        return None
    return public.decode("utf-8", "replace")


def do_document(view: VmView, lan: Lan = NO_LAN) -> dict[str, object]:
    """The whole DigitalOcean-style document (``/metadata/v1.json``).

    User-data that is not UTF-8 (e.g. gzip) cannot travel in JSON: it is left out
    there and served byte-exact at ``/metadata/v1/user-data``.
    """
    fields = _do_fields(view)
    doc: dict[str, object] = {}
    if "id" in fields:
        doc["droplet_id"] = fields["id"].decode("utf-8", "replace")
    if "hostname" in fields:
        doc["hostname"] = fields["hostname"].decode("utf-8", "replace")
    if view.userdata is not None:
        with contextlib.suppress(UnicodeDecodeError):
            doc["user_data"] = view.userdata.decode("utf-8")
    doc["public_keys"] = [k.key.decode("utf-8", "replace") for k in public_keys(view)]
    if "region" in fields:
        doc["region"] = fields["region"].decode("utf-8", "replace")
    interfaces: dict[str, object] = {}
    for kind, leaves in _do_interfaces(view, lan).items():
        iface: dict[str, object] = {}
        ipv4: dict[str, str] = {}
        for leaf, value in leaves.items():
            if leaf.startswith("ipv4/"):
                ipv4["ip_address" if leaf == "ipv4/address" else leaf[5:]] = value
            else:
                iface[leaf] = value
        iface["ipv4"] = ipv4
        interfaces[kind] = [iface]
    doc["interfaces"] = interfaces
    if lan.nameservers:
        doc["dns"] = {"nameservers": list(lan.nameservers)}
    floating = _floating(view)
    if floating is not None:
        doc["floating_ip"] = {"ipv4": {"active": True, "ip_address": floating}}
    return doc


_Tree = tuple[dict[tuple[str, ...], list[str]], dict[tuple[str, ...], str | bytes]]


def _do_tree(view: VmView, lan: Lan) -> _Tree:
    """Every directory (path -> listing) and leaf (path -> text) of ``/metadata/v1/``."""
    fields = _do_fields(view)
    leaves: dict[tuple[str, ...], str | bytes] = {}
    for name in ("id", "hostname", "public-keys", "region"):
        if name in fields:
            leaves[(name,)] = fields[name]
    for kind, values in _do_interfaces(view, lan).items():
        for leaf, value in values.items():
            leaves[("interfaces", kind, "0", *leaf.split("/"))] = value
    if lan.nameservers:
        leaves[("dns", "nameservers")] = "\n".join(lan.nameservers)
    floating = _floating(view)
    if floating is not None:
        leaves[("floating_ip", "ipv4", "active")] = "true"
        leaves[("floating_ip", "ipv4", "ip_address")] = floating
    top: list[str] = [n for n in ("id", "hostname") if n in fields]
    if view.userdata is not None:
        top.append(USERDATA_NAME)
    top += [n for n in ("public-keys", "region") if n in fields]
    dirs: dict[tuple[str, ...], list[str]] = {(): top}
    for path in leaves:
        for i in range(len(path)):
            name = path[i] + ("/" if i < len(path) - 1 else "")
            listing = dirs.setdefault(path[:i], [])
            if name not in listing:
                listing.append(name)
    return dirs, leaves


def _do(view: VmView, path: str, rest: list[str], lan: Lan = NO_LAN) -> Reply:
    """``/metadata/v1/<rest>``; every directory without its slash, ``/metadata/v1``
    itself included, gets a 301 to the slash form (as DigitalOcean does)."""
    segs, slash = _strip_slash(rest)
    dirs, leaves = _do_tree(view, lan)
    key = tuple(s.lower() for s in segs)
    if key in dirs:
        if not slash:
            return Reply(301, b"moved\n", TEXT, location=path + "/")
        return _listing(dirs[key])
    if slash:
        return NOT_FOUND
    if key == (USERDATA_NAME,):
        return _userdata(view)
    value = leaves.get(key)
    if value is None:
        return NOT_FOUND
    return _text(value if isinstance(value, bytes) else value.encode())


# --- entry point ---------------------------------------------------------------------


def resolve(view: VmView | None, path: str, lan: Lan = NO_LAN) -> Reply:
    """The reply for a GET of ``path`` (``PATH_INFO``, no query) by the VM ``view``.

    ``None`` means the caller is not a known VM: every path is 404 then. ``lan`` (the
    VM's NIC as pushes describe it) completes the DigitalOcean tree.
    The VM folders (``/metadata/<ip>/...``, ``/userdata/<ip>/...``) are never served.
    """
    if view is None or not path.startswith("/"):
        return NOT_FOUND
    segs = path[1:].split("/")
    top = segs[0].lower()
    if top == CLOUDSTACK_VERSION:
        return _cloudstack(view, segs[1:])
    if top in _EC2_VERSION_SET:
        return _ec2(view, segs[1:])
    if top == "metadata" and len(segs) >= 2:
        second = segs[1].lower()
        if second == "v1":
            return _do(view, path, segs[2:], lan)
        if second == "v1.json" and len(segs) == 2:
            body = json.dumps(do_document(view, lan), sort_keys=True).encode()
            return Reply(200, body, JSON)
        return NOT_FOUND
    if path == "/":
        return _listing([*list(EC2_VERSIONS), CLOUDSTACK_VERSION])
    return NOT_FOUND


def _index(text: str) -> int | None:
    """A key index: ASCII digits only (``str.isdigit`` also takes "²", which
    ``int`` refuses), and short (``int`` refuses thousands of digits)."""
    if not text.isascii() or not text.isdigit() or len(text) > 6:
        return None
    return int(text)
