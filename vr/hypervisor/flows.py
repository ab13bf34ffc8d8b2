"""The OpenFlow rules of the hypervisor metadata path, as data, and their diff (pure).

Per VM port ``p`` (ofport, MAC from the interface's ``attached-mac``) and the metadata
port ``m`` (an internal port holding 169.254.169.254 on the hypervisor):

* ARP: the VM's who-has 169.254.169.254 is answered with ``m``'s MAC; ``m``'s who-has
  ``100.127.x.y`` (the VM's NAT address) with the VM's MAC; both sent back where they
  came from, so no ARP of the metadata path ever floods the bridge.
* TCP from ``p`` to 169.254.169.254 on the metadata and password ports: conntrack
  commits it in zone ``p``, NATs the source to ``100.127.<p >> 8>.<p & 255>`` and
  stores the VM's Ethernet source in the connection's label; then out to ``m``
  addressed to its MAC (a guest routing 169.254.169.254 via its gateway sent it to
  the gateway's). Other
  IPv4 from ``p`` to 169.254.169.254 is dropped.
* The way back (one pair of flows for every port): TCP from 169.254.169.254 to
  100.127.0.0/16 takes the low 16 bits of its destination as the port and the zone,
  is un-NATed in that zone, and only a reply of a connection that port committed
  goes out, to the MAC the VM sent from (so a guest that changed its MAC still gets
  its answers, and never anyone else's).
* Anything else from ``m`` is dropped: the metadata port reaches no VM but through
  conntrack.

Identity therefore comes from the switch port: whatever MAC and IP a guest uses, the
service sees the NAT address of the port it is plugged into.

Every flow carries a cookie: :data:`COOKIE_TAG` in the top 16 bits and 48 bits of a
hash of the flow's text below, so the cookie names the exact flow. Diffing the
switch's cookies against the desired ones needs no parsing of ovs-ofctl's normalised
match syntax; a changed flow is a delete of the old cookie and an add of the new one,
both in one bundle (:func:`bundle`).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address

from vr.errors import VRError
from vr.http.identity import MAX_OFPORT, NAT_NETWORK

METADATA_IP = IPv4Address("169.254.169.254")
COOKIE_TAG = 0x5652  # "VR"
COOKIE_SHIFT = 48
COOKIE_MASK = 0xFFFF << COOKIE_SHIFT

PRIORITY = 1000
PRIORITY_GUARD = 900
DEFAULT_RETURN_TABLE = 210


class FlowError(VRError):
    """A port or setting cannot be expressed as flows."""


@dataclass(frozen=True, order=True)
class VmPort:
    """A VM's switch port: what the flows need to know about it."""

    ofport: int
    mac: str
    name: str = ""


@dataclass(frozen=True)
class MetaPort:
    """The internal port holding 169.254.169.254, where the services listen."""

    ofport: int
    mac: str


@dataclass(frozen=True)
class Flow:
    table: int
    priority: int
    match: str
    actions: str

    @property
    def text(self) -> str:
        match = f",{self.match}" if self.match else ""
        return f"table={self.table},priority={self.priority}{match},actions={self.actions}"

    @property
    def cookie(self) -> int:
        digest = hashlib.blake2b(self.text.encode(), digest_size=6).digest()
        return (COOKIE_TAG << COOKIE_SHIFT) | int.from_bytes(digest, "big")


def nat_address(ofport: int) -> IPv4Address:
    """The source address a port's metadata connections get: 100.127.<hi>.<lo>."""
    check_ofport(ofport)
    return NAT_NETWORK.network_address + ofport


def check_ofport(ofport: int) -> None:
    if not 1 <= ofport <= MAX_OFPORT:
        raise FlowError(f"ofport={ofport!r}: expected 1 to {MAX_OFPORT}")


_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def check_mac(mac: str) -> str:
    """``mac`` in lower case, or FlowError: flows load it as a 48-bit field."""
    low = mac.lower()
    if not _MAC.match(low):
        raise FlowError(f"mac={mac!r}: expected six hex pairs like 52:54:00:12:34:56")
    return low


def _hex_mac(mac: str) -> str:
    return "0x" + mac.replace(":", "")


def _arp_reply(mac: str, ip: IPv4Address) -> str:
    """Turn an ARP request into the reply "``ip`` is at ``mac``", back out its port."""
    return ",".join(
        (
            "move:NXM_OF_ETH_SRC[]->NXM_OF_ETH_DST[]",
            f"mod_dl_src:{mac}",
            "load:0x2->NXM_OF_ARP_OP[]",
            "move:NXM_NX_ARP_SHA[]->NXM_NX_ARP_THA[]",
            f"load:{_hex_mac(mac)}->NXM_NX_ARP_SHA[]",
            "move:NXM_OF_ARP_SPA[]->NXM_OF_ARP_TPA[]",
            f"load:{int(ip):#x}->NXM_OF_ARP_SPA[]",
            "IN_PORT",
        )
    )


def port_flows(port: VmPort, meta: MetaPort, service_ports: Sequence[int]) -> list[Flow]:
    """The flows of one VM port."""
    check_ofport(port.ofport)
    mac = check_mac(port.mac)
    nat = nat_address(port.ofport)
    p = port.ofport
    flows = [
        Flow(
            0,
            PRIORITY,
            f"in_port={p},arp,arp_op=1,arp_tpa={METADATA_IP}",
            _arp_reply(meta.mac, METADATA_IP),
        ),
        Flow(
            0, PRIORITY, f"in_port={meta.ofport},arp,arp_op=1,arp_tpa={nat}", _arp_reply(mac, nat)
        ),
        Flow(0, PRIORITY_GUARD, f"in_port={p},ip,nw_dst={METADATA_IP}", "drop"),
    ]
    for tp in service_ports:
        flows.append(
            Flow(
                0,
                PRIORITY,
                f"in_port={p},tcp,nw_dst={METADATA_IP},tp_dst={tp}",
                f"ct(commit,zone={p},nat(src={nat}),"
                "exec(move:NXM_OF_ETH_SRC[]->NXM_NX_CT_LABEL[0..47])),"
                f"mod_dl_dst:{meta.mac},output:{meta.ofport}",
            )
        )
    return flows


def desired(
    ports: Iterable[VmPort],
    meta: MetaPort,
    service_ports: Sequence[int] = (80, 8080),
    return_table: int = DEFAULT_RETURN_TABLE,
) -> list[Flow]:
    """Every flow of the metadata path for ``ports``, in a stable order.

    Raises :class:`FlowError` naming the value when a port, MAC or setting cannot be
    expressed, or when two VM ports share the metadata port's number.
    """
    check_ofport(meta.ofport)
    meta_mac = check_mac(meta.mac)
    meta = MetaPort(meta.ofport, meta_mac)
    if not 1 <= return_table <= 254:
        raise FlowError(f"return_table={return_table!r}: expected 1 to 254")
    for tp in service_ports:
        if not 1 <= tp <= 65535:
            raise FlowError(f"service port={tp!r}: expected 1 to 65535")
    flows: list[Flow] = []
    for port in sorted(set(ports)):
        if port.ofport == meta.ofport:
            raise FlowError(f"ofport={port.ofport!r} of {port.name!r}: the metadata port's own")
        flows += port_flows(port, meta, service_ports)
    for tp in service_ports:
        flows.append(
            Flow(
                0,
                PRIORITY,
                f"in_port={meta.ofport},tcp,nw_src={METADATA_IP},tp_src={tp},nw_dst={NAT_NETWORK}",
                "move:NXM_OF_IP_DST[0..15]->NXM_NX_REG0[0..15],"
                f"ct(table={return_table},zone=NXM_NX_REG0[0..15],nat)",
            )
        )
    flows += [
        Flow(0, PRIORITY_GUARD, f"in_port={meta.ofport}", "drop"),
        Flow(
            return_table,
            PRIORITY,
            "ct_state=+trk+est+rpl,tcp",
            "move:NXM_NX_CT_LABEL[0..47]->NXM_OF_ETH_DST[],output:NXM_NX_REG0[0..15]",
        ),
        Flow(return_table, 0, "", "drop"),
    ]
    return flows


@dataclass(frozen=True)
class Diff:
    delete: tuple[int, ...]
    add: tuple[Flow, ...]

    def __bool__(self) -> bool:
        return bool(self.delete or self.add)


def diff(want: Sequence[Flow], have: Iterable[int]) -> Diff:
    """What turns the switch's cookies ``have`` into ``want`` (ours only: other
    cookies are never touched)."""
    by_cookie: dict[int, Flow] = {}
    for f in want:
        other = by_cookie.setdefault(f.cookie, f)
        if other != f:
            raise FlowError(f"cookie {f.cookie:#x} names two flows: {other.text!r} and {f.text!r}")
    ours = {c for c in have if c & COOKIE_MASK == COOKIE_TAG << COOKIE_SHIFT}
    delete = tuple(sorted(ours - by_cookie.keys()))
    add = tuple(f for c, f in by_cookie.items() if c not in ours)
    return Diff(delete, add)


def bundle(change: Diff) -> str:
    """The ``ovs-ofctl --bundle add-flows`` input applying ``change`` in one transaction.

    Deletions come first, so a flow replaced by another with the same match (a port
    whose MAC changed) is deleted by its old cookie and then added.
    """
    lines = [f"delete cookie={c:#x}/-1" for c in change.delete]
    lines += [f"add cookie={f.cookie:#x},{f.text}" for f in change.add]
    return "".join(line + "\n" for line in lines)


_COOKIE = re.compile(r"\bcookie=(0x[0-9a-f]+)")


def parse_cookies(dump: str) -> list[int]:
    """Cookies of the flows in ``ovs-ofctl dump-flows`` output, one per flow, in order."""
    return [int(m.group(1), 16) for m in map(_COOKIE.search, dump.splitlines()) if m]
