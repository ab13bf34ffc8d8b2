"""Build vm_metadata payloads like the management server sends, and store them."""

from __future__ import annotations

import base64
import json
import uuid
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

from vr.paths import Paths
from vr.payloads import parse_vm_metadata
from vr.store import Store


def vm_triples(
    ip: str,
    *,
    userdata: bytes | None = b"#cloud-config\nhostname: web\n",
    name: str | None = None,
    keys: str | None = None,
    extra: dict[str, str | None] | None = None,
) -> list[list[Any]]:
    """The full key set CloudStack pushes for a VM at ``ip`` (values derived from ip)."""
    n = ip.replace(".", "-")
    host = name or f"vm-{n}"
    vm_uuid = str(uuid.uuid5(uuid.NAMESPACE_URL, ip))
    triples: list[list[Any]] = [
        ["userdata", "user-data", base64.b64encode(userdata).decode() if userdata else None],
        ["metadata", "service-offering", "Small Instance"],
        ["metadata", "availability-zone", "zone-a"],
        ["metadata", "local-ipv4", ip],
        ["metadata", "local-hostname", host],
        ["metadata", "public-ipv4", "203.0.113.7"],
        ["metadata", "public-hostname", "203.0.113.7"],
        ["metadata", "instance-id", vm_uuid],
        ["metadata", "vm-id", vm_uuid],
        [
            "metadata",
            "public-keys",
            keys if keys is not None else f"ssh-ed25519 AAAAC3{n} {host}@lab",
        ],
        ["metadata", "cloud-identifier", "CloudStack-{8e1d0000-0000-0000-0000-000000000001}"],
        ["metadata", "hypervisor-host-name", None],
    ]
    for k, v in (extra or {}).items():
        triples.append(["metadata", k, v])
    return triples


def vm_payload(ip: str, triples: list[list[Any]] | None = None, **kw: Any) -> dict[str, Any]:
    return {
        "vm_ip_address": ip,
        "vm_metadata": triples if triples is not None else vm_triples(ip, **kw),
        "type": "vmdata",
    }


def store_vm(paths: Paths, ip: str, triples: list[list[Any]] | None = None, **kw: Any) -> None:
    """Apply one VM push directly through the store (unit tests)."""
    Store(paths).apply([parse_vm_metadata(vm_payload(ip, triples, **kw))])


def drop_push_file(paths: Paths, ip: str, triples: list[list[Any]] | None = None, **kw: Any) -> str:
    """Write ``vm_metadata.json.<uuid>`` into the cache folder; returns its name."""
    name = f"vm_metadata.json.{uuid.uuid4()}"
    paths.cache.mkdir(parents=True, exist_ok=True)
    Path(paths.cache / name).write_text(json.dumps(vm_payload(ip, triples, **kw)))
    return name


def instance_id(ip: str) -> str:
    return str(uuid.uuid5(uuid.NAMESPACE_URL, str(IPv4Address(ip))))
