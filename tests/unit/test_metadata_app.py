"""Every metadata route through the Flask test client, with the fast path on and off.

The calling VM is ``environ_base={"REMOTE_ADDR": ...}``; both doors (WSGI fast path
and plain Flask) must answer byte for byte the same, so every test runs twice.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask
from flask.testing import FlaskClient
from werkzeug.test import TestResponse

from tests.helpers.routes import Case, Vms, check_reply, route_cases, store_route_vms
from tests.helpers.vmdata import instance_id, store_vm, vm_triples
from vr.metadata.app import create_app
from vr.metadata.tokens import TOKEN_HEADER, TTL_HEADER, TokenPolicy
from vr.paths import Paths
from vr.payloads import parse_dhcp_entry, parse_guest_network
from vr.store import Store

A = "10.1.1.5"
B = "10.1.1.6"
GZ = "10.1.1.7"
BINARY = gzip.compress(bytes(range(256)) * 4 + b"\r\n\x00end", mtime=0)
KEYS_A = "ssh-ed25519 AAAAC3A alice@lab\nssh-rsa AAAAB3B bob@lab"


@pytest.fixture(params=[True, False], ids=["fast-path", "flask-only"])
def app(request: pytest.FixtureRequest, paths: Paths) -> Iterator[Flask]:
    store_vm(paths, A, keys=KEYS_A, extra={"Custom-Key": "custom value", "empty-key": None})
    store_vm(paths, B, name="other-vm", userdata=b"B's secret user-data")
    store_vm(paths, GZ, userdata=BINARY)
    yield create_app(paths, fast_path=request.param)


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


def get(client: FlaskClient, path: str, ip: str = A, **kw: Any) -> TestResponse:
    return client.get(path, environ_base={"REMOTE_ADDR": ip}, **kw)


# --- the route table (tests/helpers/routes.py; the curl tests run the same cases) ----

ROUTE_VMS = Vms(a="10.2.0.5", b="10.2.0.6", gz="10.2.0.7", unknown="10.2.0.99")


@pytest.fixture(params=[True, False], ids=["fast-path", "flask-only"])
def route_client(request: pytest.FixtureRequest, paths: Paths) -> FlaskClient:
    store_route_vms(paths, ROUTE_VMS)
    return create_app(paths, fast_path=request.param).test_client()


@pytest.mark.parametrize("case", route_cases(ROUTE_VMS), ids=lambda c: c.name)
def test_route_table(route_client: FlaskClient, case: Case) -> None:
    r = route_client.open(
        case.path,
        method=case.method,
        headers=list(case.headers),
        environ_base={"REMOTE_ADDR": case.source(ROUTE_VMS)},
    )
    headers = {k.lower(): v for k, v in r.headers.items()}
    check_reply(case, r.status_code, headers, r.data)


# --- CloudStack scheme ---------------------------------------------------------------


@pytest.mark.parametrize("path", ["/latest/meta-data/", "/latest/meta-data"])
def test_index_lists_keys_in_push_order_one_per_line(client: FlaskClient, path: str) -> None:
    r = get(client, path)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/plain"
    expected = [t[1] for t in vm_triples(A) if t[0] == "metadata"] + ["Custom-Key", "empty-key"]
    assert r.data == "".join(k + "\n" for k in expected).encode()


def test_every_index_entry_answers_200(client: FlaskClient) -> None:
    index = get(client, "/latest/meta-data/").data.decode().split("\n")
    for key in filter(None, index):
        assert get(client, f"/latest/meta-data/{key}").status_code == 200, key


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/instance-id",
        "/latest/meta-data/instance-id/",
        "/latest/instance-id",
        "/latest/instance-id/",
        "/LATEST/Meta-Data/instance-id",
        "/latest/INSTANCE-ID",
        "/latest/meta-data/instance-id?x=1&y=2",
        "/latest/instance-id?cache-buster",
    ],
)
def test_instance_id_paths_answer_the_exact_value(client: FlaskClient, path: str) -> None:
    r = get(client, path)
    assert r.status_code == 200
    assert r.data == instance_id(A).encode()
    assert r.headers["Content-Type"] == "text/plain"
    assert r.headers["Content-Length"] == str(len(instance_id(A)))


def test_stored_key_names_are_looked_up_exactly_under_meta_data(client: FlaskClient) -> None:
    assert get(client, "/latest/meta-data/Instance-ID").status_code == 404
    assert get(client, "/latest/meta-data/Custom-Key").data == b"custom value"
    assert get(client, "/latest/meta-data/custom-key").status_code == 404


@pytest.mark.parametrize(
    "path",
    ["/latest/Custom-Key", "/latest/Custom-Key/", "/latest/CUSTOM-KEY", "/latest/custom-key?x"],
)
def test_shortcuts_serve_every_stored_key_in_any_letter_case(
    client: FlaskClient, path: str
) -> None:
    """CloudStack's ``^<file>$ [L,NC,QSA]`` rule matches in any case and writes
    the stored name; only ``/latest/meta-data/<key>`` keeps the request's case."""
    assert get(client, path).data == b"custom value"
    assert get(client, "/latest/Local-Hostname").data == b"vm-10-1-1-5"
    assert get(client, "/latest/meta-data/CUSTOM-KEY").status_code == 404


def test_empty_value_is_served_as_an_empty_200(client: FlaskClient) -> None:
    r = get(client, "/latest/meta-data/empty-key")
    assert (r.status_code, r.data, r.headers["Content-Length"]) == (200, b"", "0")


def test_values_are_byte_exact_without_added_newline(client: FlaskClient) -> None:
    assert get(client, "/latest/meta-data/public-keys").data == KEYS_A.encode()
    assert get(client, "/latest/public-keys").data == KEYS_A.encode()
    assert get(client, "/latest/local-ipv4").data == A.encode()


@pytest.mark.parametrize("path", ["/latest/user-data", "/latest/user-data/", "/LATEST/USER-DATA"])
def test_binary_user_data_is_byte_exact_octet_stream(client: FlaskClient, path: str) -> None:
    r = get(client, path, ip=GZ)
    assert r.status_code == 200
    assert r.data == BINARY
    assert r.headers["Content-Type"] == "application/octet-stream"
    assert gzip.decompress(r.data).endswith(b"\r\n\x00end")


def test_other_vms_data_never_leaks(client: FlaskClient) -> None:
    assert get(client, "/latest/user-data", ip=B).data == b"B's secret user-data"
    assert get(client, "/latest/local-hostname", ip=B).data == b"other-vm"
    for path in ("/latest/user-data", "/latest/local-hostname", "/latest/meta-data/"):
        assert b"other-vm" not in get(client, path, ip=A).data
        assert b"secret" not in get(client, path, ip=A).data
    assert get(client, "/latest/meta-data/Custom-Key", ip=B).status_code == 404


@pytest.mark.parametrize(
    "path",
    [
        f"/metadata/{A}/instance-id",
        f"/metadata/{B}/instance-id",
        f"/userdata/{A}/user-data",
        f"/userdata/{B}/user-data",
        f"/latest/metadata/{A}/instance-id",
        f"/latest/../metadata/{A}/instance-id",
    ],
)
def test_vm_folders_are_never_served_directly(client: FlaskClient, path: str) -> None:
    r = get(client, path)
    assert r.status_code == 404
    assert instance_id(A).encode() not in r.data


@pytest.mark.parametrize(
    "path",
    [
        "/latest/meta-data/no-such-key",
        "/latest/no-such-key",
        "/latest/meta-data/instance-id/extra",
        "/latest/user-data/x",
        "/2009-04-04/meta-data/no-such-key",
        "/metadata/v1/nope",
        "/nope",
    ],
)
def test_unknown_keys_are_404_with_a_short_plain_body(client: FlaskClient, path: str) -> None:
    r = get(client, path)
    assert r.status_code == 404
    assert r.headers["Content-Type"] == "text/plain"
    assert 0 < len(r.data) < 40


@pytest.mark.parametrize(
    "path", ["/latest/instance-id", "/latest/meta-data/", "/latest/user-data", "/metadata/v1.json"]
)
def test_unknown_vm_gets_404_everywhere(client: FlaskClient, path: str) -> None:
    assert get(client, path, ip="10.1.1.99").status_code == 404


def test_non_ipv4_callers_are_not_vms(client: FlaskClient) -> None:
    assert get(client, "/latest/instance-id", ip="fe80::1").status_code == 404
    assert get(client, "/latest/instance-id", ip=f"::ffff:{A}").data == instance_id(A).encode()


def test_deleted_key_and_user_data_404_and_leave_the_index(
    client: FlaskClient, paths: Paths
) -> None:
    assert get(client, "/latest/user-data").status_code == 200
    triples = [["metadata", "Custom-Key", ""], ["userdata", "user-data", ""]]
    store_vm(paths, A, triples)
    assert get(client, "/latest/meta-data/Custom-Key").status_code == 404
    assert get(client, "/latest/Custom-Key").status_code == 404
    assert get(client, "/latest/user-data").status_code == 404
    assert b"Custom-Key" not in get(client, "/latest/meta-data/").data
    assert get(client, "/latest/instance-id").data == instance_id(A).encode()


def test_a_push_is_visible_to_the_next_request(client: FlaskClient, paths: Paths) -> None:
    for i in range(5):
        store_vm(paths, A, [["metadata", "local-hostname", f"renamed-{i}"]])
        assert get(client, "/latest/local-hostname").data == f"renamed-{i}".encode()


# --- methods, HEAD, forwarding headers -----------------------------------------------


def test_head_has_headers_of_get_and_no_body(client: FlaskClient) -> None:
    r = client.head("/latest/user-data", environ_base={"REMOTE_ADDR": GZ})
    assert r.status_code == 200
    assert r.data == b""
    assert r.headers["Content-Length"] == str(len(BINARY))
    assert r.headers["Content-Type"] == "application/octet-stream"


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "PROPFIND"])
def test_other_methods_are_405_with_allow(client: FlaskClient, method: str) -> None:
    r = client.open("/latest/instance-id", method=method, environ_base={"REMOTE_ADDR": A})
    assert r.status_code == 405
    assert r.headers["Allow"] == "GET, HEAD"
    assert instance_id(A).encode() not in r.data


@pytest.mark.parametrize("header", [("X-Forwarded-For", "10.1.1.6"), ("Forwarded", "for=10.1.1.6")])
def test_forwarded_requests_are_refused_and_counted(
    client: FlaskClient, paths: Paths, header: tuple[str, str]
) -> None:
    for _ in range(3):
        r = get(client, "/latest/instance-id", headers=[header])
        assert r.status_code == 403
        assert instance_id(A).encode() not in r.data
        assert instance_id(B).encode() not in r.data
    registry = client.application.extensions["vr.counters"].metrics.registry
    assert registry.get_sample_value("vr_refused_total", {"reason": "forwarded"}) == 3


def test_forwarded_post_is_refused_before_method_check(client: FlaskClient) -> None:
    r = client.post(
        "/latest/instance-id",
        environ_base={"REMOTE_ADDR": A},
        headers={"X-Forwarded-For": "1.2.3.4"},
    )
    assert r.status_code == 403


# --- IMDSv2 tokens -------------------------------------------------------------------


def put_token(client: FlaskClient, ip: str = A, ttl: str | None = "21600") -> TestResponse:
    headers = {} if ttl is None else {TTL_HEADER: ttl}
    return client.put("/latest/api/token", environ_base={"REMOTE_ADDR": ip}, headers=headers)


def test_token_put_mints_a_token_that_later_gets_work_with(client: FlaskClient) -> None:
    r = put_token(client)
    assert r.status_code == 200
    assert r.headers["Content-Type"] == "text/plain"
    assert r.headers[TTL_HEADER] == "21600"
    token = r.data.decode()
    got = get(client, "/latest/meta-data/instance-id", headers={TOKEN_HEADER: token})
    assert (got.status_code, got.data) == (200, instance_id(A).encode())
    head = client.head(
        "/latest/user-data", environ_base={"REMOTE_ADDR": GZ}, headers={TOKEN_HEADER: token}
    )
    assert head.status_code == 401  # minted for A, not for GZ


@pytest.mark.parametrize("token", ["", "bogus", "AAAAAAAAAAAAAAAAAAAAAAAAAAA"])
def test_a_get_with_an_invalid_token_is_401_and_without_one_still_served(
    client: FlaskClient, token: str
) -> None:
    r = get(client, "/latest/instance-id", headers={TOKEN_HEADER: token})
    assert r.status_code == 401
    assert instance_id(A).encode() not in r.data
    assert get(client, "/latest/instance-id").data == instance_id(A).encode()


def test_token_put_without_ttl_is_400(client: FlaskClient) -> None:
    assert put_token(client, ttl=None).status_code == 400


def test_token_path_allows_put_only_and_forwarded_puts_are_refused(client: FlaskClient) -> None:
    r = client.post("/latest/api/token", environ_base={"REMOTE_ADDR": A})
    assert (r.status_code, r.headers["Allow"]) == (405, "PUT")
    assert get(client, "/latest/api/token").status_code == 404
    assert client.head("/latest/api/token", environ_base={"REMOTE_ADDR": A}).status_code == 404
    forwarded = client.put(
        "/latest/api/token",
        environ_base={"REMOTE_ADDR": A},
        headers={TTL_HEADER: "60", "X-Forwarded-For": "10.9.9.9"},
    )
    assert forwarded.status_code == 403


def test_tokens_minted_by_one_worker_are_valid_on_another(app: Flask, paths: Paths) -> None:
    """(``app`` stores the VMs; two more applications share one key, as workers do.)"""
    key = b"k" * 32
    one = create_app(paths, token_key=key).test_client()
    other = create_app(paths, token_key=key).test_client()
    token = put_token(one).data.decode()
    r = get(other, "/latest/instance-id", headers={TOKEN_HEADER: token})
    assert r.data == instance_id(A).encode()


# --- EC2 view ------------------------------------------------------------------------


def test_root_lists_dated_versions_and_latest(client: FlaskClient) -> None:
    versions = get(client, "/").data.decode().split("\n")
    assert versions[-1] == "latest"
    assert "2009-04-04" in versions and "1.0" in versions


@pytest.mark.parametrize("version", ["latest", "2009-04-04", "2021-03-23"])
def test_ec2_public_keys_listing_and_openssh_keys(client: FlaskClient, version: str) -> None:
    base = f"/{version}/meta-data/public-keys"
    assert get(client, f"{base}/").data == b"0=alice@lab\n1=bob@lab"
    assert get(client, f"{base}/0/").data == b"openssh-key"
    assert get(client, f"{base}/0/openssh-key").data == b"ssh-ed25519 AAAAC3A alice@lab"
    assert get(client, f"{base}/1/openssh-key").data == b"ssh-rsa AAAAB3B bob@lab"
    assert get(client, f"{base}/2/openssh-key").status_code == 404


@pytest.mark.parametrize("version", ["latest", "2009-04-04"])
def test_ec2_hostname_placement_and_addresses(client: FlaskClient, version: str) -> None:
    md = f"/{version}/meta-data"
    assert get(client, f"{md}/hostname").data == b"vm-10-1-1-5"
    assert get(client, f"{md}/local-hostname").data == b"vm-10-1-1-5"
    assert get(client, f"{md}/placement/").data == b"availability-zone"
    assert get(client, f"{md}/placement/availability-zone").data == b"zone-a"
    assert get(client, f"{md}/local-ipv4").data == A.encode()
    assert get(client, f"{md}/public-ipv4").data == b"203.0.113.7"
    assert get(client, f"{md}/instance-id").data == instance_id(A).encode()


def test_ec2_dated_index_marks_directories_and_every_entry_resolves(client: FlaskClient) -> None:
    index = get(client, "/2009-04-04/meta-data/").data.decode().split("\n")
    assert "public-keys/" in index and "placement/" in index and "hostname" in index
    for entry in index:
        r = get(client, f"/2009-04-04/meta-data/{entry}")
        assert r.status_code == 200, entry


# A VM per shape of ``public-keys``: keys, null (an empty file: a VM without a key
# pair), blank lines only, deleted (``""``), and one line that is no key at all.
WALK_KEYS: dict[str, str | None] = {
    "10.3.0.1": KEYS_A,
    "10.3.0.2": None,
    "10.3.0.3": "\n \n\t",
    "10.3.0.4": "",
    "10.3.0.5": "not an ssh key",
}
NO_KEYS = ("10.3.0.2", "10.3.0.3", "10.3.0.4")
WALK_ROOTS = ("/", "/latest/", "/latest/meta-data/", "/2009-04-04/", "/2021-03-23/meta-data/",
              "/metadata/v1/")  # fmt: skip


@pytest.fixture(params=[True, False], ids=["fast-path", "flask-only"])
def walk_client(request: pytest.FixtureRequest, paths: Paths) -> FlaskClient:
    for ip, keys in WALK_KEYS.items():
        triples = [t for t in vm_triples(ip) if t[1] != "public-keys"]
        store_vm(paths, ip, [*triples, ["metadata", "public-keys", keys]])
    return create_app(paths, fast_path=request.param).test_client()


def walk(client: FlaskClient, ip: str, directory: str) -> list[str]:
    """Every path reachable from the listing at ``directory``, each checked to answer 200.

    As cloud-init crawls: a name ending in ``/`` is a directory, ``N=name`` is the
    directory ``N/`` (EC2 public keys), anything else a leaf fetched as listed.
    """
    r = get(client, directory, ip)
    assert r.status_code == 200, (ip, directory)
    found = [directory]
    for name in filter(None, (line.strip() for line in r.data.decode().split("\n"))):
        key_dir = re.fullmatch(r"(\d+)=.*", name)
        path = directory + (f"{key_dir.group(1)}/" if key_dir else name)
        if path.endswith("/"):
            found += walk(client, ip, path)
        else:
            assert get(client, path, ip).status_code == 200, (ip, path)
            found.append(path)
    return found


@pytest.mark.parametrize("ip", list(WALK_KEYS))
def test_every_listed_entry_of_every_index_tree_answers_200(
    walk_client: FlaskClient, ip: str
) -> None:
    found = [p for root in WALK_ROOTS for p in walk(walk_client, ip, root)]
    assert "/latest/meta-data/instance-id" in found
    assert "/2021-03-23/meta-data/instance-id" in found
    # Whether a line that is no SSH key is offered as one is not this test's business;
    # only that what is listed is served.
    if ip == "10.3.0.1":
        assert "/2021-03-23/meta-data/public-keys/1/openssh-key" in found
    if ip in NO_KEYS:
        assert not [p for p in found if "public-keys/" in p]
    assert "/2009-04-04/user-data" in found and "/metadata/v1/interfaces/" in found
    # CloudStack's index lists its raw file whenever one is stored, even an empty one.
    assert ("/latest/meta-data/public-keys" in found) == (WALK_KEYS[ip] != "")


@pytest.mark.parametrize("ip", NO_KEYS)
@pytest.mark.parametrize("version", ["2009-04-04", "2021-03-23"])
def test_ec2_index_leaves_out_public_keys_when_no_key_is_there(
    walk_client: FlaskClient, ip: str, version: str
) -> None:
    index = get(walk_client, f"/{version}/meta-data/", ip).data.decode().split("\n")
    assert "instance-id" in index
    assert not [n for n in index if n.startswith("public-keys/")]
    assert get(walk_client, f"/{version}/meta-data/public-keys/", ip).status_code == 404


def test_ec2_dated_user_data_is_the_same_bytes(client: FlaskClient) -> None:
    assert get(client, "/2009-04-04/user-data", ip=GZ).data == BINARY


# --- DigitalOcean view ---------------------------------------------------------------


def test_do_tree(client: FlaskClient) -> None:
    v1 = "/metadata/v1"
    assert get(client, f"{v1}/").data.split(b"\n") == [
        b"id",
        b"hostname",
        b"user-data",
        b"public-keys",
        b"region",
        b"interfaces/",
        b"floating_ip/",
    ]
    assert get(client, f"{v1}/id").data == instance_id(A).encode()
    assert get(client, f"{v1}/hostname").data == b"vm-10-1-1-5"
    assert get(client, f"{v1}/region").data == b"zone-a"
    assert get(client, f"{v1}/public-keys").data == KEYS_A.encode()
    assert get(client, f"{v1}/interfaces/").data == b"private/\npublic/"
    assert get(client, f"{v1}/interfaces/public/0/ipv4/address").data == b"203.0.113.7"
    assert get(client, f"{v1}/interfaces/private/0/ipv4/address").data == A.encode()
    assert get(client, f"{v1}/user-data", ip=GZ).data == BINARY


@pytest.mark.parametrize(
    "path", ["/metadata/v1", "/metadata/v1/interfaces", "/metadata/v1/interfaces/public"]
)
def test_do_directory_without_slash_redirects_to_the_slash_form(
    client: FlaskClient, path: str
) -> None:
    r = get(client, path)
    assert r.status_code == 301
    assert r.headers["Location"] == path + "/"
    assert get(client, path + "/").status_code == 200


def test_do_json_document(client: FlaskClient) -> None:
    r = get(client, "/metadata/v1.json")
    assert r.headers["Content-Type"] == "application/json"
    doc = json.loads(r.data)
    assert doc["droplet_id"] == instance_id(A)
    assert doc["hostname"] == "vm-10-1-1-5"
    assert doc["region"] == "zone-a"
    assert doc["public_keys"] == KEYS_A.split("\n")
    assert doc["user_data"] == "#cloud-config\nhostname: web\n"
    assert doc["interfaces"]["public"][0]["ipv4"]["ip_address"] == "203.0.113.7"
    assert doc["interfaces"]["private"][0]["ipv4"]["ip_address"] == A


def test_do_json_leaves_out_binary_user_data(client: FlaskClient) -> None:
    doc = json.loads(get(client, "/metadata/v1.json", ip=GZ).data)
    assert "user_data" not in doc
    assert doc["droplet_id"] == instance_id(GZ)


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "flask-only"])
def test_tokens_required_refuses_plain_gets_with_401_and_serves_token_gets(
    paths: Paths, fast_path: bool
) -> None:
    store_vm(paths, A)
    store_vm(paths, B, name="other-vm")
    policy = TokenPolicy.of(1, required=False, required_vms=[A])
    client = create_app(paths, fast_path=fast_path, policy=policy).test_client()
    assert get(client, "/latest/meta-data/instance-id").status_code == 401
    assert client.head("/latest/user-data", environ_base={"REMOTE_ADDR": A}).status_code == 401
    # another VM is not listed: IMDSv1 still works for it
    assert get(client, "/latest/meta-data/instance-id", ip=B).data == instance_id(B).encode()
    token = put_token(client).data.decode()
    got = get(client, "/latest/meta-data/instance-id", headers={TOKEN_HEADER: token})
    assert (got.status_code, got.data) == (200, instance_id(A).encode())
    everyone = create_app(paths, fast_path=fast_path, policy=TokenPolicy.of(1, True, []))
    assert get(everyone.test_client(), "/latest/meta-data/instance-id", ip=B).status_code == 401


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "flask-only"])
def test_do_interfaces_carry_mac_netmask_gateway_and_dns_from_the_pushes(
    paths: Paths, fast_path: bool
) -> None:
    store_vm(paths, A)
    net = {"device": "eth0", "router_guest_ip": "10.1.1.1", "cidr": "10.1.1.0/24"}
    dhcp = {"mac_address": "02:00:0a:01:01:05", "ipv4_address": A, "host_name": "vm-a"}
    Store(paths).apply(
        [
            parse_guest_network({**net, "add": True, "dns": "8.8.8.8"}),
            parse_dhcp_entry(dhcp),
        ]
    )
    client = create_app(paths, fast_path=fast_path).test_client()
    v1 = "/metadata/v1"
    private = f"{v1}/interfaces/private/0"
    assert get(client, f"{private}/").data == b"ipv4/\nmac\ntype"
    assert get(client, f"{private}/ipv4/").data == b"address\nnetmask\ngateway"
    assert get(client, f"{private}/mac").data == b"02:00:0a:01:01:05"
    assert get(client, f"{private}/type").data == b"private"
    assert get(client, f"{private}/ipv4/netmask").data == b"255.255.255.0"
    assert get(client, f"{private}/ipv4/gateway").data == b"10.1.1.1"
    assert get(client, f"{v1}/dns/").data == b"nameservers"
    # what DHCP hands the VM: the router first, then the network's servers
    assert get(client, f"{v1}/dns/nameservers").data == b"10.1.1.1\n8.8.8.8"
    doc = json.loads(get(client, "/metadata/v1.json").data)
    assert doc["interfaces"]["private"] == [
        {
            "ipv4": {"ip_address": A, "netmask": "255.255.255.0", "gateway": "10.1.1.1"},
            "mac": "02:00:0a:01:01:05",
            "type": "private",
        }
    ]
    assert doc["dns"] == {"nameservers": ["10.1.1.1", "8.8.8.8"]}
    assert "tags" not in doc and "vendor_data" not in doc
    # a DHCP change alone (no VM push) is seen by the next request
    moved = {**dhcp, "mac_address": "02:00:0a:01:01:99"}
    Store(paths).apply([parse_dhcp_entry(moved)])
    assert get(client, f"{private}/mac").data == b"02:00:0a:01:01:99"
