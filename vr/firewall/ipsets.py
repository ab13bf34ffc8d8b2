"""The MAC/IP binding as netfilter sets: desired state, diff, and the ``ipset`` door.

One rule per bound VM made every DHCP-entry push re-sync a chain that grows with
the VMs (and every packet to 80/8080 walk it). Instead each IPv4 guest network of
at most a /16 gets a ``bitmap:ip,mac`` set (:func:`mac_set_name`) holding its
bound (address, MAC) pairs, and :data:`BOUND_SET` (``hash:ip``) holds every
address those sets bind. Two rules per network then check every packet in O(1),
and a push changes one set entry and no rule.

This kernel has no ``hash:ip,mac`` (nor ``hash:mac``), so a binding outside every
set-capable network (a guest network wider than /16, or none) keeps its own rules,
and IPv6 bindings stay rules in ``filter6`` (:mod:`vr.firewall.model`).

Pure except :class:`IpsetCommand`, which runs ``ipset`` through :mod:`vr.subp`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Network
from typing import Protocol

from vr import subp
from vr.errors import CommandError, FirewallError
from vr.payloads import DhcpEntry, GuestNetwork

SET_PREFIX = "VR-"
BOUND_SET = "VR-BOUND4"
BITMAP = "bitmap:ip,mac"
HASH_IP = "hash:ip"
MAX_BITMAP_PREFIX = 16
"""``bitmap:ip,mac`` holds at most 65536 addresses: a /16."""
HASH_MAXELEM = 1 << 20
IPSET = "ipset"


def mac_set_name(device: str) -> str:
    """The ``bitmap:ip,mac`` set of the guest network on ``device`` (<= 31 chars)."""
    return f"{SET_PREFIX}MAC-{device}"


def set_capable(n: GuestNetwork) -> bool:
    return n.cidr.prefixlen >= MAX_BITMAP_PREFIX


@dataclass(frozen=True)
class SetDef:
    """One set's header: what ``ipset create`` is given."""

    name: str
    kind: str
    range: IPv4Network | None = None

    def create_args(self) -> list[str]:
        if self.kind == BITMAP:
            assert self.range is not None
            return [self.name, self.kind, "range", self.range.with_prefixlen]
        return [self.name, self.kind, "family", "inet", "maxelem", str(HASH_MAXELEM)]


@dataclass(frozen=True)
class IpSet:
    definition: SetDef
    members: frozenset[str]

    @property
    def name(self) -> str:
        return self.definition.name


def member(ip: IPv4Address, mac: str | None = None) -> str:
    """A member as ``ipset save`` prints it (MACs in upper case)."""
    return f"{ip},{mac.upper()}" if mac is not None else str(ip)


def set_networks(nets: Iterable[GuestNetwork]) -> list[GuestNetwork]:
    return [n for n in nets if set_capable(n)]


def in_sets(nets: Sequence[GuestNetwork], ip: IPv4Address) -> bool:
    """Whether the binding of ``ip`` is kept in sets (else it needs its own rules)."""
    return any(ip in n.cidr for n in nets if set_capable(n))


def desired(nets: Sequence[GuestNetwork], bindings: Iterable[DhcpEntry]) -> tuple[IpSet, ...]:
    """The sets for these (merged) guest networks and bindings; deterministic."""
    capable = set_networks(nets)
    members: dict[str, set[str]] = {mac_set_name(n.device): set() for n in capable}
    bound: set[str] = set()
    for e in bindings:
        for op in entry_ops(capable, e, add=True):
            (bound if op.set == BOUND_SET else members[op.set]).add(op.member)
    sets = [
        IpSet(
            SetDef(mac_set_name(n.device), BITMAP, n.cidr),
            frozenset(members[mac_set_name(n.device)]),
        )
        for n in capable
    ]
    if capable:
        sets.append(IpSet(SetDef(BOUND_SET, HASH_IP), frozenset(bound)))
    return tuple(sets)


@dataclass(frozen=True)
class SetOp:
    """One ``add``/``del`` of a member; ``exist`` makes it idempotent (``-exist``)."""

    verb: str
    set: str
    member: str

    def line(self) -> str:
        return f"{self.verb} -exist {self.set} {self.member}"


def entry_ops(nets: Sequence[GuestNetwork], e: DhcpEntry, *, add: bool) -> list[SetOp]:
    """The set changes that add (or remove) the binding of ``e``: O(networks)."""
    verb = "add" if add else "del"
    ops = [
        SetOp(verb, mac_set_name(n.device), member(e.ipv4_address, e.mac_address if add else None))
        for n in nets
        if set_capable(n) and e.ipv4_address in n.cidr
    ]
    if ops:
        ops.append(SetOp(verb, BOUND_SET, member(e.ipv4_address)))
    return ops


@dataclass(frozen=True)
class Plan:
    """``before`` runs before the rules are synced (sets they will reference exist and
    are filled); ``after`` after (sets no rule references any more are destroyed)."""

    before: tuple[str, ...]
    after: tuple[str, ...]

    @property
    def empty(self) -> bool:
        return not self.before and not self.after

    def describe(self) -> list[str]:
        creates = sum(1 for x in self.before if x.startswith("create "))
        changes = sum(1 for x in self.before if x.startswith(("add ", "del ")))
        destroys = sum(1 for x in self.after if x.startswith("destroy "))
        out = []
        if creates:
            out.append(f"created {creates} sets")
        if changes:
            out.append(f"changed {changes} set members")
        if destroys:
            out.append(f"destroyed {destroys} sets")
        return out


def plan(live: Mapping[str, IpSet], want: Sequence[IpSet]) -> Plan:
    """The ``ipset restore`` lines that bring our live sets to ``want``.

    A set whose header differs (a network's range changed) is rebuilt aside and
    swapped in, so rules that reference it never see it missing or half filled.
    """
    before: list[str] = []
    after: list[str] = []
    for s in want:
        have = live.get(s.name)
        if have is None:
            before.append(" ".join(["create", *s.definition.create_args()]))
            before += [f"add -exist {s.name} {m}" for m in sorted(s.members)]
        elif have.definition != s.definition:
            tmp = f"{s.name[:26]}-new"
            args = s.definition.create_args()
            before.append(" ".join(["create", tmp, *args[1:]]))
            before += [f"add -exist {tmp} {m}" for m in sorted(s.members)]
            before += [f"swap {tmp} {s.name}", f"destroy {tmp}"]
        else:
            before += [f"del -exist {s.name} {m}" for m in sorted(have.members - s.members)]
            before += [f"add -exist {s.name} {m}" for m in sorted(s.members - have.members)]
    wanted = {s.name for s in want}
    after += [f"destroy {name}" for name in sorted(live) if name not in wanted]
    return Plan(tuple(before), tuple(after))


def parse_save(text: str) -> dict[str, IpSet]:
    """Our sets (``VR-*``) from ``ipset save`` output."""
    defs: dict[str, SetDef] = {}
    members: dict[str, set[str]] = {}
    for line in text.splitlines():
        words = line.split()
        if len(words) < 3 or not words[1].startswith(SET_PREFIX):
            continue
        name = words[1]
        if words[0] == "create":
            opts = dict(zip(words[3::2], words[4::2], strict=False))
            rng = IPv4Network(_range(opts["range"])) if "range" in opts else None
            defs[name] = SetDef(name, words[2], rng)
            members[name] = set()
        elif words[0] == "add" and name in members:
            members[name].add(words[2].upper() if "," in words[2] else words[2])
    return {n: IpSet(d, frozenset(members[n])) for n, d in defs.items()}


def _range(text: str) -> str:
    """``ipset save`` prints a bitmap range as ``a.b.c.d-e.f.g.h``."""
    if "-" not in text:
        return text
    first, last = (IPv4Address(x) for x in text.split("-"))
    size = int(last) - int(first) + 1
    return f"{first}/{32 - size.bit_length() + 1}"


class Sets(Protocol):
    """The two operations the firewall needs on the kernel's sets."""

    def live(self) -> dict[str, IpSet]:
        """Our sets (``VR-*``) with their members."""

    def run(self, lines: Sequence[str]) -> None:
        """Apply ``ipset restore`` lines in one call, failing on the first refusal."""


class IpsetCommand:
    """The ``ipset`` tool through :func:`vr.subp.run`."""

    def __init__(self, timeout: float = 30.0) -> None:
        self.timeout = timeout

    def live(self) -> dict[str, IpSet]:
        try:
            result = subp.run([IPSET, "save"], timeout=self.timeout)
        except CommandError as exc:
            raise FirewallError(f"cannot read the netfilter sets: {exc}") from exc
        return parse_save(result.stdout)

    def run(self, lines: Sequence[str]) -> None:
        if not lines:
            return
        script = "\n".join(lines) + "\n"
        try:
            subp.run([IPSET, "restore"], data=script.encode(), timeout=self.timeout)
        except CommandError as exc:
            raise FirewallError(
                f"ipset refused {len(lines)} set changes (first: {lines[0]!r}): {exc}"
            ) from exc
