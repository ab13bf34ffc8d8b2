"""What ``vr show`` reports: the store as guests see it. Read-only, never a password."""

from __future__ import annotations

import base64
import hashlib
import json
from ipaddress import IPv4Address
from typing import Any

from vr.paths import Paths
from vr.store import list_vms, read_dhcp, read_networks, read_passwords, read_vm

SHOWN_CHARS = 70


def _value(data: bytes) -> dict[str, Any]:
    """A value as JSON: text when it is UTF-8, else base64."""
    try:
        return {"text": data.decode("utf-8")}
    except UnicodeDecodeError:
        return {"base64": base64.b64encode(data).decode()}


def _kind(data: bytes) -> str:
    if not data:
        return "empty"
    if data[:2] == b"\x1f\x8b":
        return "gzip"
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return "binary"
    first = data.split(b"\n", 1)[0].strip()
    return first.decode() if first.startswith((b"#cloud-config", b"#!")) else "text"


def _password_status(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "none"
    return "served, waiting for the guest's ack" if rec.get("served") else "pending"


def _no_metadata(password: str) -> dict[str, Any]:
    return {"generation": None, "meta-data": {}, "user-data": {}, "password": password}


def collect(paths: Paths, ips: list[IPv4Address] | None = None) -> dict[str, Any]:
    """Everything ``vr show`` prints, as plain data."""
    passwords = read_passwords(paths)
    vms: dict[str, Any] = {}
    if ips is None:
        ips = sorted(set(list_vms(paths)) | {IPv4Address(a) for a in passwords})
    for ip in ips:
        rec = read_vm(paths, ip)
        if rec is None:
            pw = passwords.get(str(ip))
            vms[str(ip)] = None if pw is None else _no_metadata(_password_status(pw))
            continue
        vms[str(ip)] = {
            "generation": rec.gen,
            "meta-data": {k: _value(v) for k, v in rec.metadata.items()},
            "user-data": {
                name: {
                    "bytes": len(data),
                    "kind": _kind(data),
                    "sha256": hashlib.sha256(data).hexdigest(),
                }
                for name, data in rec.userdata.items()
            },
            "password": _password_status(passwords.get(str(ip))),
        }
    try:
        last = json.loads(paths.last_push.read_bytes())
    except (FileNotFoundError, ValueError):
        last = None
    return {
        "vms": vms,
        "networks": [
            {
                "device": n.device,
                "address": str(n.interface),
                "gateway": str(n.router_guest_gateway) if n.router_guest_gateway else None,
            }
            for n in read_networks(paths)
        ],
        "dhcp": [
            {"ip": str(d.ipv4_address), "mac": d.mac_address, "host_name": d.host_name}
            for d in read_dhcp(paths)
        ],
        "last_push": last,
    }


def _shown(value: dict[str, Any]) -> str:
    if "base64" in value:
        return f"<{len(base64.b64decode(value['base64']))} bytes, not UTF-8>"
    text = repr(value["text"])
    if len(text) > SHOWN_CHARS:
        text = text[:SHOWN_CHARS] + f"... ({len(value['text'])} chars)"
    return text


def render(report: dict[str, Any]) -> list[str]:
    """The text form of :func:`collect`'s report."""
    lines = []
    if not report["vms"]:
        lines.append("no VMs in the store")
    for ip, vm in report["vms"].items():
        if vm is None:
            lines.append(f"VM {ip}: unknown (nothing pushed)")
            continue
        keys = vm["meta-data"]
        if vm["generation"] is None:
            lines.append(f"VM {ip} (no metadata pushed)")
        else:
            lines.append(f"VM {ip} (generation {vm['generation']}, {len(keys)} metadata keys)")
        width = max((len(k) for k in keys), default=0)
        for k, v in keys.items():
            lines.append(f"  {k.ljust(width)}  {_shown(v)}")
        for name, u in vm["user-data"].items():
            lines.append(f"  {name}: {u['bytes']} bytes, {u['kind']}, sha256 {u['sha256'][:16]}")
        if not vm["user-data"]:
            lines.append("  user-data: none")
        lines.append(f"  password: {vm['password']}")
    for n in report["networks"]:
        gw = f" gateway {n['gateway']}" if n["gateway"] else ""
        lines.append(f"guest network {n['device']}: {n['address']}{gw}")
    for d in report["dhcp"]:
        lines.append(f"dhcp entry {d['ip']}: {d['mac']} {d['host_name'] or '-'}")
    last = report["last_push"]
    if last:
        state = "ok" if last.get("ok") else "FAILED"
        lines.append(f"last push: {last.get('file')} {state}: {last.get('summary')}")
    return lines
