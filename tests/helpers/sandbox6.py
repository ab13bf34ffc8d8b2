"""A sandbox whose guest network also has an IPv6 prefix.

The VR holds :data:`ROUTER6` on its guest device (``nodad``: usable at once) and runs
``vr up``; a guest gets :func:`v6_of` its IPv4 address by DHCPv6 (``dhclient -6``)
and its default route from dnsmasq's router advertisement (:func:`dhcp6`).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator

from tests.helpers.wait import wait_for
from vr.demo.sandbox import (
    Guest,
    Sandbox,
    dhcp_payload,
    metadata_payload,
    network_payload,
    password_payload,
    sandbox,
)

ROUTER6 = "fd00:1::1"
CIDR6 = "fd00:1::/64"

Item = tuple[str, dict[str, object]]


def v6_of(g: Guest) -> str:
    """The guest's IPv6 address: its IPv4 address's last byte in :data:`CIDR6`."""
    return f"fd00:1::{g.ip.rsplit('.', 1)[1]}"


@contextlib.contextmanager
def dual_stack_sandbox(**config: object) -> Iterator[Sandbox]:
    """A :func:`sandbox` with ``config`` merged into vr.json, :data:`ROUTER6` on the
    VR's guest device and ``vr up`` running; torn down on exit."""
    with sandbox() as sb:
        if config:
            cfg = json.loads(sb.paths.config.read_text())
            cfg.update(config)
            sb.paths.config.write_text(json.dumps(cfg) + "\n")
        sb.run("vr", ["ip", "addr", "add", f"{ROUTER6}/64", "dev", "eth0", "nodad"])
        sb.start_vr()
        yield sb


def network6(**extra: object) -> Item:
    """The guest network payload with the IPv6 prefix (and ``extra`` fields)."""
    network = {
        **network_payload(),
        "router_guest_ip6": ROUTER6,
        "router_guest_ip6_cidr": CIDR6,
        **extra,
    }
    return ("guest_network.json", network)


def guest_items(g: Guest, ipv6: str, *, password: bool = False) -> list[Item]:
    """The guest's DHCP entry (with ``ipv6``), metadata and, with ``password``, password."""
    items: list[Item] = [
        (f"vm_dhcp_entry-{g.role}.json", {**dhcp_payload(g), "ipv6_address": ipv6}),
        (f"vm_metadata-{g.role}.json", metadata_payload(g)),
    ]
    if password:
        items.append((f"vm_password-{g.role}.json", password_payload(g)))
    return items


def dhcp6(sb: Sandbox, g: Guest) -> None:
    """Run ``dhclient -6`` on the guest's eth0 and wait until its address is usable
    (not tentative) and the router advertisement gave it a default route."""
    res = sb.run(
        g.role,
        ["dhclient", "-6", "-1", "-v", "-lf", "/var/lib/dhcp/dhclient6.eth0.leases",
         "-pf", "/var/lib/dhcp/dhclient6.eth0.pid", "eth0"],
        timeout=90, ok_codes=range(256),
    )  # fmt: skip
    assert res.code == 0, res.stderr
    wait_for(
        lambda: (
            f"inet6 {v6_of(g)}/128"
            in sb.run(g.role, ["ip", "-6", "-o", "addr", "show", "dev", "eth0"]).stdout
            and "tentative" not in sb.run(g.role, ["ip", "-6", "-o", "addr"]).stdout
        ),
        f"{g.role} IPv6 address",
    )
    wait_for(
        lambda: "default" in sb.run(g.role, ["ip", "-6", "route"]).stdout,
        f"{g.role} default route from the router advertisement",
    )
