"""Port-based identity and the hypervisor's metadata and password applications, with
two tenant networks whose VMs share an address."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import pytest
from werkzeug.test import Client

from tests.helpers.fingerprint import fp
from tests.helpers.vmdata import store_vm, vm_triples
from vr.http.port_identity import Network, PortResolver
from vr.hypervisor import ports
from vr.hypervisor.controller import ports_file
from vr.hypervisor.ports import PortInfo, PortTable
from vr.hypervisor.services import HypervisorPasswords, HypervisorVms, networks_from
from vr.metadata.app import create_app
from vr.paths import Paths
from vr.payloads import DhcpEntry, VmPassword
from vr.store import Store

IP = "10.9.0.5"
MAC_A, MAC_B, MAC_C = "52:54:00:0a:00:05", "52:54:00:0b:00:05", "52:54:00:0c:00:05"


@dataclass
class Hv:
    hv: Paths
    a: Paths
    b: Paths
    resolver: PortResolver


def instance(ip: str, name: str) -> list[list[object]]:
    return [
        t if t[1] != "instance-id" else ["metadata", "instance-id", name] for t in vm_triples(ip)
    ]


@pytest.fixture
def hv(tmp_path: Path) -> Hv:
    roots = {}
    for name in ("hv", "a", "b"):
        p = Paths(tmp_path / name)
        p.ensure()
        roots[name] = p
    for net, mac in (("a", MAC_A), ("b", MAC_B)):
        Store(roots[net]).apply([DhcpEntry(mac, IPv4Address(IP), f"vm-{net}")])
        store_vm(roots[net], IP, instance(IP, f"instance-{net}"))
        Store(roots[net]).apply([VmPassword(IPv4Address(IP), f"secret-{net}")])
    ports.write(
        ports_file(roots["hv"]),
        [PortInfo(5, MAC_A, "vnet5"), PortInfo(6, MAC_B, "vnet6"), PortInfo(7, MAC_C, "vnet7")],
    )
    networks = [Network("a", roots["a"]), Network("b", roots["b"])]
    return Hv(
        roots["hv"],
        roots["a"],
        roots["b"],
        PortResolver(PortTable(ports_file(roots["hv"])), networks),
    )


def test_the_port_names_the_network_and_the_vm_address(hv: Hv) -> None:
    a = hv.resolver.resolve("100.127.0.5")
    b = hv.resolver.resolve("100.127.0.6")
    assert a is not None and b is not None
    assert (a.network.name, a.ip, a.ofport) == ("a", IPv4Address(IP), 5)
    assert (b.network.name, b.ip, b.ofport) == ("b", IPv4Address(IP), 6)


@pytest.mark.parametrize(
    "source",
    [IP, "100.127.0.7", "100.127.0.9", "127.0.0.1", "100.127.0.0"],
    ids=["the-vm-ip-itself", "port-without-dhcp-entry", "unknown-port", "loopback", "port-0"],
)
def test_sources_that_are_no_known_port_get_no_vm(hv: Hv, source: str) -> None:
    assert hv.resolver.resolve(source) is None


def test_a_mac_in_two_networks_is_refused_not_guessed(
    hv: Hv, caplog: pytest.LogCaptureFixture
) -> None:
    Store(hv.b).apply([DhcpEntry(MAC_A, IPv4Address("10.9.0.99"), "dup")])
    caplog.set_level(logging.ERROR)
    assert hv.resolver.resolve("100.127.0.5") is None
    assert "networks a, b" in caplog.text


def test_dhcp_changes_and_unplugs_are_seen_by_the_next_request(hv: Hv) -> None:
    assert hv.resolver.resolve("100.127.0.7") is None
    Store(hv.a).apply([DhcpEntry(MAC_C, IPv4Address("10.9.0.7"), "vm-c")])
    c = hv.resolver.resolve("100.127.0.7")
    assert c is not None and c.ip == IPv4Address("10.9.0.7")
    ports.write(ports_file(hv.hv), [PortInfo(6, MAC_B, "vnet6")])
    assert hv.resolver.resolve("100.127.0.5") is None


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "flask-only"])
def test_metadata_is_served_by_port_through_every_view(hv: Hv, fast_path: bool) -> None:
    client = create_app(hv.hv, cache=HypervisorVms(hv.resolver), fast_path=fast_path).test_client()

    def get(path: str, source: str) -> tuple[int, bytes]:
        r = client.get(path, environ_base={"REMOTE_ADDR": source})
        return r.status_code, r.data

    assert get("/latest/meta-data/instance-id", "100.127.0.5") == (200, b"instance-a")
    assert get("/latest/instance-id", "100.127.0.6") == (200, b"instance-b")
    assert get("/metadata/v1/id", "100.127.0.6") == (200, b"instance-b")
    assert get("/2009-04-04/meta-data/instance-id", "100.127.0.5") == (200, b"instance-a")
    # the guest's own address is no identity on a hypervisor
    assert get("/latest/meta-data/instance-id", IP)[0] == 404


def test_passwords_are_served_and_acked_per_port(hv: Hv) -> None:
    client = Client(HypervisorPasswords(hv.resolver))

    def ask(source: str, request: str) -> bytes:
        r = client.get("/", headers={"DomU_Request": request}, environ_base={"REMOTE_ADDR": source})
        assert r.status_code == 200
        return r.data

    assert fp(ask("100.127.0.5", "send_my_password")) == fp("secret-a")
    assert fp(ask("100.127.0.6", "send_my_password")) == fp("secret-b")
    assert ask("100.127.0.5", "saved_password") == b"saved_password"
    assert ask("100.127.0.5", "send_my_password") == b"saved_password"
    assert fp(ask("100.127.0.6", "send_my_password")) == fp("secret-b")
    assert ask("100.127.0.9", "send_my_password") == b"saved_password"
    assert ask(IP, "send_my_password") == b"saved_password"


def test_password_saves_are_refused_on_a_hypervisor(hv: Hv) -> None:
    client = Client(HypervisorPasswords(hv.resolver))
    r = client.post(
        "/",
        data={"ip": IP, "password": "x", "token": "0" * 32},
        headers={"DomU_Request": "save_password"},
        environ_base={"REMOTE_ADDR": "100.127.0.5"},
    )
    assert r.status_code == 403
    r = client.get(
        "/",
        headers={"DomU_Request": "send_my_password"},
        environ_base={"REMOTE_ADDR": "100.127.0.5"},
    )
    assert fp(r.data) == fp("secret-a")


def test_without_networks_the_hypervisor_root_is_the_one_network(tmp_path: Path) -> None:
    hv = Paths(tmp_path)
    assert networks_from([], hv) == [Network("default", hv)]
    a = Paths(tmp_path / "a")
    assert networks_from([("a", a)], hv) == [Network("a", a)]
