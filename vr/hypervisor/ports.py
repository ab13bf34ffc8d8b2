"""The bridge's VM ports: read from OVSDB rows, kept as a small table file (pure + one file).

A VM port is an Interface with an ``ofport`` and ``external_ids:attached-mac``, as
libvirt (and nova, CloudStack's KVM agent) set them; ``iface-id`` and ``vm-id`` are
kept for the logs and ``vr hypervisor`` output. Interfaces without ``attached-mac``
(uplinks, patch ports, the metadata port) are not VMs.

The flow controller writes the table to ``<root>/run/vr/hypervisor/ports.json`` (one
atomic rename) whenever it changes; the metadata and password workers read it with a
``stat`` per lookup (:class:`PortTable`), so an unplugged port stops being served at
the same moment its flows are removed.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from vr import atomic
from vr.errors import VRError, shorten
from vr.http.identity import MAX_OFPORT
from vr.hypervisor.flows import FlowError, VmPort, check_mac

LOG = logging.getLogger(__name__)


class OvsdbError(VRError):
    """OVSDB answered something we cannot read."""


@dataclass(frozen=True, order=True)
class PortInfo:
    ofport: int
    mac: str
    name: str
    iface_id: str = ""
    vm_id: str = ""

    @property
    def vm_port(self) -> VmPort:
        return VmPort(self.ofport, self.mac, self.name)


@dataclass(frozen=True)
class Interface:
    """One row of OVSDB's Interface table, as far as we use it."""

    name: str
    ofport: int | None
    external_ids: dict[str, str]
    mac_in_use: str
    type: str


def _atom(value: Any) -> Any:
    """An OVSDB JSON datum -> a Python value (``["set", []]`` is "no value")."""
    if isinstance(value, list) and len(value) == 2 and value[0] == "set":
        items = value[1]
        return items[0] if len(items) == 1 else None
    if isinstance(value, list) and len(value) == 2 and value[0] == "map":
        return {str(k): str(v) for k, v in value[1]}
    return value


def parse_interfaces(text: str) -> list[Interface]:
    """Rows of ``ovs-vsctl --format=json --columns=name,ofport,external_ids,mac_in_use,type
    list Interface``."""
    try:
        doc = json.loads(text)
        heads = doc["headings"]
        rows = [dict(zip(heads, (_atom(v) for v in row), strict=True)) for row in doc["data"]]
        return [
            Interface(
                str(r["name"]),
                r["ofport"] if isinstance(r["ofport"], int) else None,
                r["external_ids"] if isinstance(r["external_ids"], dict) else {},
                str(r["mac_in_use"] or ""),
                str(r["type"] or ""),
            )
            for r in rows
        ]
    except (ValueError, KeyError, TypeError) as exc:
        raise OvsdbError(
            f"Interface table {shorten(text)}: expected ovs-vsctl JSON ({exc})"
        ) from None


def vm_ports(interfaces: Iterable[Interface], skip: str = "") -> list[PortInfo]:
    """The VM ports among ``interfaces`` (``skip``: the metadata port's name).

    A port with a MAC that is not one, or a number the NAT address cannot hold, is
    left out with a warning naming it; the others are served.
    """
    out: list[PortInfo] = []
    for i in interfaces:
        mac = i.external_ids.get("attached-mac")
        if i.name == skip or mac is None or i.ofport is None or i.ofport < 1:
            continue
        if i.ofport > MAX_OFPORT:
            LOG.warning("port %s: ofport %s above %s, not served", i.name, i.ofport, MAX_OFPORT)
            continue
        try:
            mac = check_mac(mac)
        except FlowError as exc:
            LOG.warning("port %s: %s; not served", i.name, exc)
            continue
        out.append(
            PortInfo(
                i.ofport,
                mac,
                i.name,
                i.external_ids.get("iface-id", ""),
                i.external_ids.get("vm-id", ""),
            )
        )
    return sorted(out)


def encode(ports: Iterable[PortInfo]) -> bytes:
    table = {str(p.ofport): asdict(p) for p in sorted(ports)}
    return (json.dumps(table, sort_keys=True) + "\n").encode()


def write(path: Path, ports: Iterable[PortInfo]) -> bool:
    """Replace the table file if its content changes; whether it did."""
    data = encode(ports)
    try:
        if path.read_bytes() == data:
            return False
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic.atomic_write(path, data)
    return True


def decode(data: bytes) -> dict[int, PortInfo]:
    try:
        raw = json.loads(data)
        return {int(k): PortInfo(**v) for k, v in raw.items()}
    except (ValueError, TypeError, AttributeError) as exc:
        raise OvsdbError(f"port table: expected the JSON vr hypervisor writes ({exc})") from None


class PortTable:
    """The table file, re-read when ``stat`` shows a new file (every write renames)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._version: tuple[int, int, int] | None = None
        self._ports: dict[int, PortInfo] = {}

    def get(self, ofport: int) -> PortInfo | None:
        self._refresh()
        return self._ports.get(ofport)

    def _refresh(self) -> None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._version, self._ports = None, {}
            return
        version = (st.st_ino, st.st_size, st.st_mtime_ns)
        if version != self._version:
            with open(self.path, "rb") as f:
                fst = os.fstat(f.fileno())
                data = f.read()
            self._ports = decode(data)
            self._version = (fst.st_ino, fst.st_size, fst.st_mtime_ns)
