"""The firewall as data: which chains and rules the VR wants. Pure: no I/O, no iptc.

:func:`desired` turns the appliance config, the pushed guest networks and the
pushed DHCP entries into a :class:`RuleSet`. Every chain carries :data:`PREFIX` and
is hooked once into a built-in chain; nothing outside those chains is ours.

Ports: guests ask for 169.254.169.254 on the well-known ports 80 (metadata) and
8080 (passwords); the DNAT sends them to the VR's guest address on the configured
``metadata_port`` / ``password_port``. Filter rules match those configured service
ports, which is what a packet carries in filter INPUT after the DNAT, so one rule
covers both the direct and the redirected path.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_network
from typing import Any, Literal

from vr.config import Config
from vr.errors import FirewallError
from vr.firewall import ipsets
from vr.payloads import DhcpEntry, GuestNetwork

PREFIX = "VR-"
METADATA_ADDRESS = IPv4Address("169.254.169.254")
LINK_LOCAL_METADATA_PORT = 80
LINK_LOCAL_PASSWORD_PORT = 8080
CLOUDSTACK_SSH_PORT = 3922

NAT = "nat"
FILTER = "filter"
NAT6 = "nat6"
FILTER6 = "filter6"
"""The ip6tables tables (python-iptables ``Table6``), named apart from IPv4's."""
TABLE_ORDER = (NAT, FILTER, NAT6, FILTER6)
"""Tables are committed in this order (one commit per table)."""
IPV6_TABLES = frozenset({NAT6, FILTER6})
METADATA_ADDRESSES6 = (IPv6Address("fd00:ec2::254"), IPv6Address("fe80::a9fe:a9fe"))
"""AWS's and OpenStack's IPv6 metadata addresses, redirected like 169.254.169.254."""
LINK_LOCAL6 = IPv6Network("fe80::/10")

NAT_CHAIN = PREFIX + "PREROUTING"
INPUT_CHAIN = PREFIX + "INPUT"

STATE_VERSION = 1

Params = tuple[tuple[str, tuple[str, ...]], ...]
SetMatch = tuple[str, str, bool]
"""``-m set [!] --match-set <name> <flags>``: (name, flags, negated)."""


@dataclass(frozen=True)
class MatchSpec:
    """One ``-m <name> --<param> <values>`` block, as python-iptables saves it."""

    name: str
    params: Params = ()


@dataclass(frozen=True)
class RuleSpec:
    """A rule in the generic form the adapter speaks (and reads back for comparison)."""

    target: str
    target_params: Params = ()
    protocol: str | None = None
    src: str | None = None
    dst: str | None = None
    in_interface: str | None = None
    matches: tuple[MatchSpec, ...] = ()

    @property
    def comment(self) -> str:
        for m in self.matches:
            if m.name == "comment":
                for key, values in m.params:
                    if key == "comment":
                        return " ".join(values)
        return ""

    def render(self) -> str:
        """iptables-save style text, for logs and error messages."""
        parts: list[str] = []
        if self.src:
            parts += ["-s", self.src]
        if self.dst:
            parts += ["-d", self.dst]
        if self.in_interface:
            parts += ["-i", self.in_interface]
        if self.protocol:
            parts += ["-p", self.protocol]
        for m in self.matches:
            parts += ["-m", m.name, *_render_params(m.params)]
        parts += ["-j", self.target, *_render_params(self.target_params)]
        return " ".join(parts)


def _render_params(params: Params) -> list[str]:
    out: list[str] = []
    for key, values in params:
        vals = list(values)
        neg = bool(vals) and vals[0] == "!"
        if neg:
            vals = vals[1:]
        shown = [f'"{v}"' if " " in v else v for v in vals]
        out += (["!"] if neg else []) + [f"--{key}", *shown]
    return out


@dataclass(frozen=True)
class Rule:
    """One rule of ours, typed. ``comment`` says why it exists (shown by iptables -L)."""

    target: str
    comment: str
    in_interface: str | None = None
    source: IPv4Network | IPv6Network | None = None
    destination: IPv4Network | IPv6Network | None = None
    protocol: str | None = "tcp"
    dports: tuple[int, ...] = ()
    ctstate: tuple[str, ...] = ()
    mac_source: str | None = None
    mac_negate: bool = False
    to_destination: str | None = None
    match_sets: tuple[SetMatch, ...] = ()

    def spec(self) -> RuleSpec:
        matches: list[MatchSpec] = []
        if len(self.dports) == 1:
            matches.append(MatchSpec("tcp", (("dport", (str(self.dports[0]),)),)))
        elif self.dports:
            ports = ",".join(str(p) for p in self.dports)
            matches.append(MatchSpec("multiport", (("dports", (ports,)),)))
        for name, flags, negate in self.match_sets:
            neg_set: tuple[str, ...] = ("!",) if negate else ()
            matches.append(MatchSpec("set", (("match-set", (*neg_set, name, flags)),)))
        if self.mac_source is not None:
            neg: tuple[str, ...] = ("!",) if self.mac_negate else ()
            matches.append(MatchSpec("mac", (("mac-source", (*neg, self.mac_source)),)))
        if self.ctstate:
            matches.append(MatchSpec("conntrack", (("ctstate", (",".join(self.ctstate),)),)))
        matches.append(MatchSpec("comment", (("comment", (self.comment,)),)))
        target_params: Params = ()
        if self.to_destination is not None:
            target_params = (("to-destination", (self.to_destination,)),)
        return RuleSpec(
            target=self.target,
            target_params=target_params,
            protocol=self.protocol,
            src=self.source.with_prefixlen if self.source else None,
            dst=self.destination.with_prefixlen if self.destination else None,
            in_interface=self.in_interface,
            matches=tuple(matches),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "comment": self.comment,
            "in_interface": self.in_interface,
            "source": str(self.source) if self.source else None,
            "destination": str(self.destination) if self.destination else None,
            "protocol": self.protocol,
            "dports": list(self.dports),
            "ctstate": list(self.ctstate),
            "mac_source": self.mac_source,
            "mac_negate": self.mac_negate,
            "to_destination": self.to_destination,
            "match_sets": [list(m) for m in self.match_sets],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Rule:
        return cls(
            target=str(d["target"]),
            comment=str(d["comment"]),
            in_interface=d.get("in_interface"),
            source=ip_network(d["source"]) if d.get("source") else None,
            destination=ip_network(d["destination"]) if d.get("destination") else None,
            protocol=d.get("protocol"),
            dports=tuple(int(p) for p in d.get("dports", ())),
            ctstate=tuple(str(s) for s in d.get("ctstate", ())),
            mac_source=d.get("mac_source"),
            mac_negate=bool(d.get("mac_negate", False)),
            to_destination=d.get("to_destination"),
            match_sets=tuple((str(n), str(f), bool(neg)) for n, f, neg in d.get("match_sets", ())),
        )


@dataclass(frozen=True)
class Chain:
    """One chain of ours; ``hooks`` are the built-in chains that jump to it (once each)."""

    table: str
    name: str
    hooks: tuple[str, ...]
    rules: tuple[Rule, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class RuleSet:
    chains: tuple[Chain, ...]

    def tables(self) -> list[str]:
        present = {c.table for c in self.chains}
        return [t for t in TABLE_ORDER if t in present]

    def in_table(self, table: str) -> list[Chain]:
        return [c for c in self.chains if c.table == table]

    def chain(self, name: str) -> Chain:
        for c in self.chains:
            if c.name == name:
                return c
        raise KeyError(name)

    def split(self, tables: frozenset[str]) -> tuple[RuleSet, RuleSet]:
        """(the chains not in ``tables``, the chains in ``tables``), order kept."""
        return (
            RuleSet(tuple(c for c in self.chains if c.table not in tables)),
            RuleSet(tuple(c for c in self.chains if c.table in tables)),
        )

    def render(self) -> str:
        """The rule set as iptables-save style text (our chains and hooks only)."""
        lines: list[str] = []
        for table in self.tables():
            lines.append(f"*{table}")
            for c in self.in_table(table):
                lines.append(f":{c.name} - [0:0]")
            for c in self.in_table(table):
                for hook in c.hooks:
                    lines.append(f"-A {hook} -j {c.name}")
            for c in self.in_table(table):
                for r in c.rules:
                    lines.append(f"-A {c.name} {r.spec().render()}")
            lines.append("COMMIT")
        return "\n".join(lines) + "\n"

    def to_json(self) -> bytes:
        doc = {
            "version": STATE_VERSION,
            "chains": [
                {
                    "table": c.table,
                    "name": c.name,
                    "hooks": list(c.hooks),
                    "rules": [r.to_dict() for r in c.rules],
                }
                for c in self.chains
            ],
        }
        return (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()

    @classmethod
    def from_json(cls, data: bytes, where: str = "firewall state") -> RuleSet:
        try:
            doc = json.loads(data)
            if doc.get("version") != STATE_VERSION:
                raise ValueError(f"version {doc.get('version')!r}, expected {STATE_VERSION}")
            chains = tuple(
                Chain(
                    table=str(c["table"]),
                    name=str(c["name"]),
                    hooks=tuple(str(h) for h in c["hooks"]),
                    rules=tuple(Rule.from_dict(r) for r in c["rules"]),
                )
                for c in doc["chains"]
            )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise FirewallError(f"{where}: not a saved rule set: {exc}") from None
        for c in chains:
            if c.table not in TABLE_ORDER or not c.name.startswith(PREFIX):
                raise FirewallError(
                    f"{where}: chain {c.table}/{c.name}: expected a {PREFIX}* chain "
                    f"in one of {TABLE_ORDER}"
                )
        return cls(chains)


# --- the rules the VR wants ---------------------------------------------------------


def desired(
    config: Config,
    networks: Iterable[GuestNetwork],
    dhcp_entries: Iterable[DhcpEntry],
    *,
    binding_sets: bool = True,
) -> RuleSet:
    """The complete rule set for this config, these guest networks and DHCP entries.

    ``networks`` from the store and from ``config.guest_networks`` are merged by
    device (a pushed network replaces the configured one on the same device).
    Deterministic: the same inputs always give the same rules in the same order.
    With ``binding_sets`` false, every IPv4 binding is its own rule (the design
    before the sets; ``bench/scale.py`` measures both).
    """
    nets = merge_networks(config.guest_networks, networks)
    bound = bindings(dhcp_entries)
    return RuleSet(
        (
            Chain(NAT, NAT_CHAIN, ("PREROUTING",), tuple(_redirects(config, nets))),
            Chain(
                FILTER, INPUT_CHAIN, ("INPUT",), tuple(_input(4, config, nets, bound, binding_sets))
            ),
            Chain(NAT6, NAT_CHAIN, ("PREROUTING",), tuple(_redirects6(config, nets))),
            Chain(FILTER6, INPUT_CHAIN, ("INPUT",), tuple(_input(6, config, nets, bound))),
        )
    )


def bindings(dhcp_entries: Iterable[DhcpEntry]) -> list[DhcpEntry]:
    """The MAC/IP bindings: one per address (the last entry wins), by address."""
    return sorted(
        {e.ipv4_address: e for e in dhcp_entries if not e.remove}.values(),
        key=lambda e: e.ipv4_address,
    )


def merge_networks(
    configured: Sequence[GuestNetwork], pushed: Iterable[GuestNetwork]
) -> list[GuestNetwork]:
    by_device = {n.device: n for n in configured if n.add}
    for n in pushed:
        if n.add:
            by_device[n.device] = n
        else:
            by_device.pop(n.device, None)
    return [by_device[d] for d in sorted(by_device)]


def service_ports(config: Config) -> tuple[int, ...]:
    return tuple(sorted({config.metadata_port, config.password_port}))


def guarded_ports(config: Config) -> tuple[int, ...]:
    """Dropped everywhere but where they are offered: the configured service ports,
    the metrics port and always CloudStack's own 80, 8080 and 3922, whatever the
    services use."""
    return tuple(
        sorted(
            {
                config.metadata_port,
                config.password_port,
                config.ssh_port,
                config.metrics_port,
                LINK_LOCAL_METADATA_PORT,
                LINK_LOCAL_PASSWORD_PORT,
                CLOUDSTACK_SSH_PORT,
            }
        )
    )


def _redirects(config: Config, nets: Sequence[GuestNetwork]) -> Iterable[Rule]:
    link_local = IPv4Network(f"{METADATA_ADDRESS}/32")
    for n in nets:
        for asked, port, what in (
            (LINK_LOCAL_METADATA_PORT, config.metadata_port, "metadata"),
            (LINK_LOCAL_PASSWORD_PORT, config.password_port, "password"),
        ):
            yield Rule(
                target="DNAT",
                comment=f"vr: {n.device} {what} {METADATA_ADDRESS}:{asked}",
                in_interface=n.device,
                destination=link_local,
                dports=(asked,),
                to_destination=f"{n.router_guest_ip}:{port}",
            )


def _input(
    family: Literal[4, 6],
    config: Config,
    nets: Sequence[GuestNetwork],
    bindings: Sequence[DhcpEntry],
    binding_sets: bool = True,
) -> Iterable[Rule]:
    """The INPUT chain of one address family (4: iptables, 6: ip6tables): loopback,
    the MAC/IP bindings and each guest network's guests, the control network, then
    the guarded ports dropped everywhere else. The services listen on IPv6 too, so
    every interface that is not a guest network with an IPv6 prefix is refused the
    guarded ports there."""
    service = service_ports(config)
    guarded = guarded_ports(config)
    # Local clients (health checks, the VR itself) talk to its services over lo.
    yield Rule("ACCEPT", "vr: loopback", in_interface="lo", dports=guarded)
    if family == 4:
        yield from _guests4(config, nets, bindings, binding_sets, service)
    else:
        yield from _guests6(config, nets, bindings, service)
    control = config.control_device
    yield _accept(f"vr: {control} ssh", (config.ssh_port,), in_interface=control)
    if family == 4:
        # Metrics and health for the management server: the control network only.
        yield _accept(f"vr: {control} metrics", (config.metrics_port,), in_interface=control)
    # Drop the service ports everywhere else; other traffic returns to INPUT untouched.
    yield Rule("DROP", "vr: guarded ports elsewhere", dports=guarded)


def _accept(
    comment: str,
    dports: tuple[int, ...],
    in_interface: str,
    source: IPv4Network | IPv6Network | None = None,
    match_sets: tuple[SetMatch, ...] = (),
) -> Rule:
    """Accept new and established connections to ``dports``."""
    return Rule(
        "ACCEPT",
        comment,
        in_interface=in_interface,
        source=source,
        dports=dports,
        ctstate=("NEW", "ESTABLISHED"),
        match_sets=match_sets,
    )


def _binding(address: IPv4Address | IPv6Address, mac: str, service: tuple[int, ...]) -> Rule:
    """Drop ``address`` on the service ports unless it comes from ``mac``."""
    return Rule(
        "DROP",
        f"vr: binding {address} {mac}",
        source=ip_network(address),
        dports=service,
        mac_source=mac,
        mac_negate=True,
    )


def _bound_guest(device: str, address: IPv4Address | IPv6Address, service: tuple[int, ...]) -> Rule:
    return _accept(
        f"vr: {device} bound guest {address}",
        service,
        in_interface=device,
        source=ip_network(address),
    )


def _guests4(
    config: Config,
    nets: Sequence[GuestNetwork],
    bindings: Sequence[DhcpEntry],
    binding_sets: bool,
    service: tuple[int, ...],
) -> Iterable[Rule]:
    # MAC/IP binding before any accept: a bound address from another MAC is dropped.
    # Every packet is checked, not only NEW ones, so a spoofer cannot ride an
    # established connection. Bindings in a set-capable network are set members
    # (two rules per network, O(1) per packet and per push, see vr.firewall.ipsets);
    # the others keep one rule each, so each has its own counter.
    loose = [e for e in bindings if not binding_sets or not ipsets.in_sets(nets, e.ipv4_address)]
    for e in loose:
        yield _binding(e.ipv4_address, e.mac_address, service)
    set_nets = ipsets.set_networks(nets) if binding_sets else []
    for n in set_nets:
        yield Rule(
            "DROP",
            f"vr: binding {n.device} {n.cidr} from another MAC",
            source=n.cidr,
            dports=service,
            match_sets=(
                (ipsets.BOUND_SET, "src", False),
                (ipsets.mac_set_name(n.device), "src,src", True),
            ),
        )
    for n in nets:
        if config.require_mac_binding:
            if n in set_nets:
                yield _accept(
                    f"vr: {n.device} bound guests",
                    service,
                    in_interface=n.device,
                    source=n.cidr,
                    match_sets=((ipsets.BOUND_SET, "src", False),),
                )
            for e in loose:
                if e.ipv4_address in n.cidr:
                    yield _bound_guest(n.device, e.ipv4_address, service)
            yield Rule(
                "DROP",
                f"vr: {n.device} unbound guest",
                in_interface=n.device,
                source=n.cidr,
                dports=service,
            )
        else:
            yield _accept(
                f"vr: {n.device} guests {n.cidr}", service, in_interface=n.device, source=n.cidr
            )


# --- IPv6 (ip6tables): the same services, for guest networks with an IPv6 prefix ------


def eui64_link_local(mac: str) -> IPv6Address:
    """The link-local address a NIC with ``mac`` forms by modified EUI-64."""
    b = bytes(int(x, 16) for x in mac.split(":"))
    iid = bytes([b[0] ^ 0x02, b[1], b[2], 0xFF, 0xFE, b[3], b[4], b[5]])
    return IPv6Address(b"\xfe\x80" + bytes(6) + iid)


def _redirects6(config: Config, nets: Sequence[GuestNetwork]) -> Iterable[Rule]:
    """On IPv6 guest devices only, [fd00:ec2::254] and [fe80::a9fe:a9fe] on 80/8080 go
    to the router's guest IPv6 address on the configured service ports. python-iptables
    cannot build an IPv6 target extension (DNAT) in a process that built an IPv4 one
    (ldx/python-iptables#112): the IPv6 tables are applied from a child process
    (:func:`vr.firewall.sync.sync`)."""
    for n in nets:
        if n.router_guest_ip6 is None:
            continue
        for address in METADATA_ADDRESSES6:
            for asked, port, what in (
                (LINK_LOCAL_METADATA_PORT, config.metadata_port, "metadata"),
                (LINK_LOCAL_PASSWORD_PORT, config.password_port, "password"),
            ):
                yield Rule(
                    target="DNAT",
                    comment=f"vr: {n.device} {what} [{address}]:{asked}",
                    in_interface=n.device,
                    destination=IPv6Network(f"{address}/128"),
                    dports=(asked,),
                    to_destination=f"[{n.router_guest_ip6}]:{port}",
                )


def _guests6(
    config: Config,
    nets: Sequence[GuestNetwork],
    bindings: Sequence[DhcpEntry],
    service: tuple[int, ...],
) -> Iterable[Rule]:
    # No set type binds an IPv6 address to a MAC on this kernel (hash:ip,mac is
    # missing), so IPv6 bindings stay one rule per address. Without a guest network
    # with an IPv6 prefix they would be dead (every guest packet to the service ports
    # is dropped below), so they are left out: an IPv4-only router's IPv6 chain
    # does not grow with the VMs.
    if not any(n.cidr6 is not None for n in nets):
        bindings = ()
    for e in bindings:
        own: list[IPv6Address] = [eui64_link_local(e.mac_address)]
        if e.ipv6_address is not None:
            own.insert(0, e.ipv6_address)
        for address in own:
            yield _binding(address, e.mac_address, service)
    for n in nets:
        if n.cidr6 is None:
            continue
        if config.require_mac_binding:
            for e in bindings:
                own6: list[IPv6Address] = []
                if e.ipv6_address is not None and e.ipv6_address in n.cidr6:
                    own6.append(e.ipv6_address)
                if e.ipv4_address in n.cidr:
                    # asking fe80::a9fe:a9fe, a guest speaks from its EUI-64 link-local
                    own6.append(eui64_link_local(e.mac_address))
                for address in own6:
                    yield _bound_guest(n.device, address, service)
        else:
            # link-local callers ask fe80::a9fe:a9fe; the binding above guards them
            for source in (n.cidr6, LINK_LOCAL6):
                yield _accept(
                    f"vr: {n.device} guests {source}", service, in_interface=n.device, source=source
                )
