"""dnsmasq's configuration as data, rendered in one place. Pure: no I/O.

Modelled on neutron's ``Dnsmasq`` driver and CloudStack's ``CsDhcp``: a main
configuration that depends only on the guest networks (interfaces, ranges: dnsmasq
re-reads those only when restarted), and three files dnsmasq re-reads on SIGHUP
(hosts, options, DNS names), so a DHCP entry pushed, changed or removed never
restarts it.

- DHCP: one ``dhcp-host`` per entry (MAC, IPv4, IPv6 by MAC or DUID, host name,
  lease time; CloudStack's default ``infinite``); ``dhcp-ignore=tag:!known``: a guest
  without an entry gets no lease, as on CloudStack. Default entries get the router,
  DNS and domain options of their network; other NICs get them empty (CloudStack's
  ``dhcpopts.txt``), so they never take a default route.
- DNS: ``data-server`` and the router's name answer with the guest-facing router
  address of the network the query came from (``localise-queries``: apache/cloudstack#4943),
  each VM's host name with its addresses; ``expand-hosts`` adds the domain.
- Where: the guest devices and ``lo`` (DNS only), never the control or public ones.
- IPv6 networks: DHCPv6 (static, by MAC or DUID) and router advertisements.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv6Address

from vr.config import Config
from vr.firewall.model import merge_networks
from vr.payloads import DhcpEntry, GuestNetwork

DEFAULT_DOMAIN = "cloudnine.internal"
"""CloudStack's domain when neither the network nor the router names one."""
DATA_SERVER = "data-server"
NO_DEFAULT_TAG = "vr-nodefault"
"""Set by the hosts of non-default NICs: their router/DNS/domain options are empty."""
LEASE_MAX = 65536
"""Bound on leases dnsmasq keeps (CloudStack: 2100)."""


@dataclass(frozen=True)
class Locations:
    """Where the files live; the main configuration names the other three."""

    hosts: str
    opts: str
    names: str
    leases: str


@dataclass(frozen=True)
class DnsmasqFiles:
    conf: bytes
    """Depends on the networks and the config only: a change needs a restart."""
    hosts: bytes
    opts: bytes
    names: bytes

    def reloadable(self) -> dict[str, bytes]:
        return {"hosts": self.hosts, "opts": self.opts, "names": self.names}


def served_networks(cfg: Config, networks: Iterable[GuestNetwork]) -> list[GuestNetwork]:
    """The guest networks dnsmasq serves: configured and pushed, merged by device
    (as the firewall does), never the control or a public device."""
    return [
        n
        for n in merge_networks(cfg.guest_networks, networks)
        if n.device != cfg.control_device and n.device not in cfg.public_devices
    ]


def active_entries(entries: Iterable[DhcpEntry]) -> list[DhcpEntry]:
    """Entries not flagged ``remove``, one per IPv4 (the last), ordered by address."""
    by_ip = {e.ipv4_address: e for e in entries if not e.remove}
    return [by_ip[ip] for ip in sorted(by_ip)]


def render(
    cfg: Config,
    networks: Iterable[GuestNetwork],
    entries: Iterable[DhcpEntry],
    router_name: str,
    where: Locations,
) -> DnsmasqFiles:
    nets = served_networks(cfg, networks)
    hosts = active_entries(entries)
    return DnsmasqFiles(
        conf=_lines(_conf(cfg, nets, where)),
        hosts=_lines(_host_line(e) for e in hosts),
        opts=_lines(_opts(nets)),
        names=_lines(_names(nets, hosts, router_name)),
    )


def lease_text(seconds: int | None) -> str:
    return "infinite" if not seconds else str(seconds)


def domain_of(nets: Sequence[GuestNetwork]) -> str:
    for n in nets:
        if n.domain_name:
            return n.domain_name
    return DEFAULT_DOMAIN


def _lines(lines: Iterable[str]) -> bytes:
    text = "\n".join(lines)
    return (text + "\n").encode() if text else b""


def _conf(cfg: Config, nets: Sequence[GuestNetwork], where: Locations) -> Iterable[str]:
    domain = domain_of(nets)
    yield "# written by vr (vr.dhcp.model): rewritten on every change, do not edit"
    # DNS on lo (the VR itself, health checks) and the guest devices; DHCP on guests only
    yield "bind-dynamic"
    yield "interface=lo"
    yield "no-dhcp-interface=lo"
    for n in nets:
        yield f"interface={n.device}"
    for dev in (cfg.control_device, *cfg.public_devices):
        yield f"except-interface={dev}"
    yield "no-hosts"
    yield "no-resolv"
    for server in sorted({d for n in nets for d in n.dns} - {n.router_guest_ip for n in nets}):
        yield f"server={server}"
    yield "domain-needed"
    yield "bogus-priv"
    yield "localise-queries"
    yield "expand-hosts"
    yield f"domain={domain}"
    yield f"local=/{domain}/"
    yield f"addn-hosts={where.names}"
    yield f"dhcp-hostsfile={where.hosts}"
    yield f"dhcp-optsfile={where.opts}"
    yield f"dhcp-leasefile={where.leases}"
    yield f"dhcp-lease-max={LEASE_MAX}"
    yield "dhcp-authoritative"
    yield "dhcp-ignore=tag:!known"
    if any(n.cidr6 is not None for n in nets):
        yield "enable-ra"
    for n in nets:
        # static: addresses come only from dhcp-host lines; the lease is the host's
        yield (
            f"dhcp-range=set:{n.device},{n.cidr.network_address},static,{n.cidr.netmask},infinite"
        )
        if n.cidr6 is not None:
            yield (
                f"dhcp-range=set:{n.device},{n.cidr6.network_address},static,"
                f"{n.cidr6.prefixlen},infinite"
            )
            yield f"ra-param={n.device},high,0"


def _host_line(e: DhcpEntry) -> str:
    """``<mac>[,set:tag],<ipv4>[,[<ipv6>]][,<name>],<lease>``; with a DUID the IPv6
    address goes to its own ``id:`` line (dnsmasq keys DHCPv6 clients by DUID)."""
    parts = [e.mac_address]
    if not e.default_entry:
        parts.append(f"set:{NO_DEFAULT_TAG}")
    parts.append(str(e.ipv4_address))
    if e.ipv6_address is not None and e.ipv6_duid is None:
        parts.append(f"[{e.ipv6_address}]")
    if e.host_name:
        parts.append(e.host_name)
    parts.append(lease_text(e.lease_time))
    line = ",".join(parts)
    if e.ipv6_address is not None and e.ipv6_duid is not None:
        v6 = [f"id:{e.ipv6_duid}", f"[{e.ipv6_address}]"]
        if e.host_name:
            v6.append(e.host_name)
        line += "\n" + ",".join([*v6, lease_text(e.lease_time)])
    return line


def _opts(nets: Sequence[GuestNetwork]) -> Iterable[str]:
    domain = domain_of(nets)
    default = f"tag:!{NO_DEFAULT_TAG}"
    for n in nets:
        tag = f"tag:{n.device}"
        gateway = n.router_guest_gateway or n.router_guest_ip
        dns = ",".join(str(a) for a in _unique([n.router_guest_ip, *n.dns]))
        yield f"{tag},{default},option:router,{gateway}"
        yield f"{tag},{default},option:dns-server,{dns}"
        yield f"{tag},{default},option:domain-name,{n.domain_name or domain}"
        yield f"{tag},{default},option:domain-search,{n.domain_name or domain}"
        if n.router_guest_ip6 is not None:
            yield f"{tag},{default},option6:dns-server,[{n.router_guest_ip6}]"
            yield f"{tag},{default},option6:domain-search,{n.domain_name or domain}"
    if nets:
        # CloudStack's non-default NICs: empty router, DNS and domain options
        for code in ("option:router", "option:dns-server", "option:domain-name"):
            yield f"tag:{NO_DEFAULT_TAG},{code}"


def _names(
    nets: Sequence[GuestNetwork], hosts: Sequence[DhcpEntry], router_name: str
) -> Iterable[str]:
    for n in nets:
        yield f"{n.router_guest_ip} {router_name} {DATA_SERVER}"
        if n.router_guest_ip6 is not None:
            yield f"{n.router_guest_ip6} {router_name} {DATA_SERVER}"
    for e in hosts:
        if e.host_name:
            yield f"{e.ipv4_address} {e.host_name}"
            if e.ipv6_address is not None:
                yield f"{e.ipv6_address} {e.host_name}"


def _unique(addrs: Iterable[IPv4Address | IPv6Address]) -> list[IPv4Address | IPv6Address]:
    seen: list[IPv4Address | IPv6Address] = []
    for a in addrs:
        if a not in seen:
            seen.append(a)
    return seen
