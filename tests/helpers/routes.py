"""The metadata route table as data: one list of cases, two doors that check it.

``tests/unit/test_metadata_app.py`` runs every :class:`Case` through the Flask test
client, ``tests/integration/test_metadata_server.py`` through real gunicorn with
``curl``. Expected bodies are written out from the pushed data (never computed by
the code under test). Four VMs, addresses chosen by each test module (:class:`Vms`):

* ``a``: the full CloudStack key set, two SSH keys, ``Custom-Key``, an empty key,
  and ``gone-key`` pushed then deleted;
* ``b``: another VM (``other-vm``) whose user-data was pushed then deleted;
* ``gz``: gzip'ed binary user-data;
* ``unknown``: an address with no data.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from typing import Any

from tests.helpers.vmdata import instance_id, store_vm, vm_triples
from vr.paths import Paths

KEYS = "ssh-ed25519 AAAAC3A alice@lab\nssh-rsa AAAAB3B bob@lab"
USERDATA = b"#cloud-config\nhostname: web\n"
BINARY = gzip.compress(bytes(range(256)) * 4 + b"\r\n\x00end", mtime=0)
EXTRA: dict[str, str | None] = {"Custom-Key": "custom value", "empty-key": None}
TEXT = "text/plain"
OCTETS = "application/octet-stream"


@dataclass(frozen=True)
class Vms:
    a: str
    b: str
    gz: str
    unknown: str


def store_route_vms(paths: Paths, vms: Vms) -> None:
    store_vm(paths, vms.a, keys=KEYS, extra={**EXTRA, "gone-key": "soon gone"})
    store_vm(paths, vms.a, [["metadata", "gone-key", ""]])
    store_vm(paths, vms.b, name="other-vm", userdata=b"B's user-data")
    store_vm(paths, vms.b, [["userdata", "user-data", ""]])
    store_vm(paths, vms.gz, userdata=BINARY)


@dataclass(frozen=True)
class Case:
    """One request and what must come back.

    ``body`` None: not compared (only ``absent`` and ``contains`` are checked).
    ``caller`` names the VM in :class:`Vms` the request comes from.
    """

    name: str
    path: str
    status: int
    body: bytes | None
    caller: str = "a"
    method: str = "GET"
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str | None = TEXT
    location: str | None = None
    allow: str | None = None
    absent: tuple[bytes, ...] = ()  # must not occur in the body
    contains: tuple[bytes, ...] = ()  # must occur in the body
    length: int | None = None  # Content-Length, where the body is not sent (HEAD)

    def source(self, vms: Vms) -> str:
        return str(getattr(vms, self.caller))


def _values(ip: str) -> dict[str, bytes]:
    """VM ``a``'s metadata as pushed, in index order (``gone-key`` deleted)."""
    out = {}
    for folder, name, content in vm_triples(ip, keys=KEYS, extra=EXTRA):
        if folder == "metadata":
            out[name] = b"" if content is None else str(content).encode()
    return out


def route_cases(vms: Vms) -> list[Case]:
    a = vms.a
    values = _values(a)
    iid = instance_id(a).encode()
    index = "".join(k + "\n" for k in values).encode()
    no_leak = (iid, b"other-vm")
    cases = [
        # --- CloudStack scheme
        Case("index-slash", "/latest/meta-data/", 200, index),
        Case("index-no-slash", "/latest/meta-data", 200, index),
        Case("index-query", "/latest/meta-data/?x=1", 200, index),
        Case("index-upper", "/LATEST/META-DATA/", 200, index),
        Case("latest-listing", "/latest/", 200, b"meta-data\nuser-data"),
    ]
    ec2_keys = b"0=alice@lab\n1=bob@lab"
    for key, value in values.items():
        # One deliberate choice: meta-data/public-keys/ (slash) is EC2's listing.
        slashed = ec2_keys if key == "public-keys" else value
        cases += [
            Case(f"key-{key}", f"/latest/meta-data/{key}", 200, value),
            Case(f"key-slash-{key}", f"/latest/meta-data/{key}/", 200, slashed),
            Case(f"shortcut-{key}", f"/latest/{key}", 200, value),
            Case(f"shortcut-slash-{key}", f"/latest/{key}/", 200, value),
        ]
    cases += [
        Case("case-fixed-names", "/LATEST/Meta-Data/instance-id", 200, iid),
        Case("case-shortcut-shipped", "/latest/INSTANCE-ID", 200, iid),
        Case("case-shortcut-stored", "/latest/CUSTOM-KEY", 200, b"custom value"),
        Case("case-shortcut-stored-slash", "/latest/custom-key/", 200, b"custom value"),
        Case("case-meta-data-exact", "/latest/meta-data/Instance-ID", 404, b"not found\n"),
        Case("case-meta-data-stored", "/latest/meta-data/custom-key", 404, b"not found\n"),
        Case("query-ignored", "/latest/meta-data/instance-id?x=1&y=2", 200, iid),
        Case("query-shortcut", "/latest/instance-id?cache-buster", 200, iid),
        Case("user-data", "/latest/user-data", 200, USERDATA, content_type=OCTETS),
        Case("user-data-slash-query", "/latest/user-data/?v=2", 200, USERDATA, content_type=OCTETS),
        # --- methods
        Case("head-index", "/latest/meta-data/", 200, b"", method="HEAD", length=len(index)),
        Case(
            "head-user-data",
            "/latest/user-data",
            200,
            b"",
            "gz",
            "HEAD",
            content_type=OCTETS,
            length=len(BINARY),
        ),
        Case("post-405", "/latest/instance-id", 405, None, method="POST", allow="GET, HEAD"),
        Case("put-405", "/latest/meta-data/", 405, None, method="PUT", allow="GET, HEAD"),
        Case("delete-405", "/latest/user-data", 405, None, method="DELETE", allow="GET, HEAD"),
        Case("options-405", "/latest/instance-id", 405, None, method="OPTIONS", allow="GET, HEAD"),
        # --- never served, deleted, unknown
        Case("vm-folder-metadata", f"/metadata/{a}/instance-id", 404, None, absent=no_leak),
        Case("vm-folder-other", f"/metadata/{vms.b}/local-hostname", 404, None, absent=no_leak),
        Case("vm-folder-userdata", f"/userdata/{a}/user-data", 404, None, absent=(USERDATA,)),
        Case("vm-folder-under-latest", f"/latest/metadata/{a}/instance-id", 404, None),
        Case("vm-folder-dotdot", f"/latest/../metadata/{a}/instance-id", 404, None, absent=no_leak),
        Case("deleted-key", "/latest/meta-data/gone-key", 404, b"not found\n"),
        Case("deleted-key-shortcut", "/latest/gone-key", 404, b"not found\n"),
        Case("deleted-user-data", "/latest/user-data", 404, b"not found\n", "b"),
        Case("unknown-key", "/latest/meta-data/no-such-key", 404, b"not found\n"),
        Case("below-a-value", "/latest/meta-data/instance-id/extra", 404, b"not found\n"),
        Case("unknown-vm", "/latest/instance-id", 404, b"not found\n", "unknown"),
        Case("unknown-vm-index", "/latest/meta-data/", 404, b"not found\n", "unknown"),
        Case("unknown-top", "/nope", 404, b"not found\n"),
        Case("other-vm-own-data", "/latest/local-hostname", 200, b"other-vm", "b"),
        Case("other-vm-no-custom", "/latest/meta-data/Custom-Key", 404, b"not found\n", "b"),
        # --- binary user-data in every view
        Case("binary", "/latest/user-data", 200, BINARY, "gz", content_type=OCTETS),
        Case("binary-upper", "/LATEST/USER-DATA", 200, BINARY, "gz", content_type=OCTETS),
        Case("binary-dated", "/2009-04-04/user-data", 200, BINARY, "gz", content_type=OCTETS),
        Case("binary-do", "/metadata/v1/user-data", 200, BINARY, "gz", content_type=OCTETS),
        # --- EC2 view
        Case("versions", "/", 200, None, contains=(b"1.0\n", b"\n2009-04-04\n", b"\nlatest")),
        Case("ec2-keys-dated", "/2009-04-04/meta-data/public-keys/", 200, ec2_keys),
        Case("ec2-raw-keys", "/latest/meta-data/public-keys", 200, KEYS.encode()),
        Case("ec2-key-dir", "/latest/meta-data/public-keys/0/", 200, b"openssh-key"),
        Case(
            "ec2-key-0",
            "/latest/meta-data/public-keys/0/openssh-key",
            200,
            b"ssh-ed25519 AAAAC3A alice@lab",
        ),
        Case(
            "ec2-key-1-dated",
            "/2009-04-04/meta-data/public-keys/1/openssh-key",
            200,
            b"ssh-rsa AAAAB3B bob@lab",
        ),
        Case("ec2-key-2", "/latest/meta-data/public-keys/2/openssh-key", 404, b"not found\n"),
        Case("ec2-placement", "/latest/meta-data/placement/", 200, b"availability-zone"),
        Case("ec2-az", "/latest/meta-data/placement/availability-zone", 200, b"zone-a"),
        Case("ec2-az-dated", "/2021-03-23/meta-data/placement/availability-zone", 200, b"zone-a"),
        Case("ec2-hostname", "/latest/meta-data/hostname", 200, values["local-hostname"]),
        Case("ec2-dated-iid", "/2009-04-04/meta-data/instance-id", 200, iid),
        Case("ec2-dated-ipv4", "/2016-09-02/meta-data/local-ipv4", 200, a.encode()),
        Case("ec2-dated-listing", "/2009-04-04/", 200, b"meta-data\nuser-data"),
        Case("ec2-unknown-version", "/2001-01-01/meta-data/instance-id", 404, b"not found\n"),
        # --- DigitalOcean view
        Case(
            "do-index",
            "/metadata/v1/",
            200,
            b"id\nhostname\nuser-data\npublic-keys\nregion\ninterfaces/\nfloating_ip/",
        ),
        Case("do-index-301", "/metadata/v1", 301, None, location="/metadata/v1/"),
        Case("do-id", "/metadata/v1/id", 200, iid),
        Case("do-hostname", "/metadata/v1/hostname", 200, values["local-hostname"]),
        Case("do-region", "/metadata/v1/region", 200, b"zone-a"),
        Case("do-keys", "/metadata/v1/public-keys", 200, KEYS.encode()),
        Case("do-user-data", "/metadata/v1/user-data", 200, USERDATA, content_type=OCTETS),
        Case("do-interfaces", "/metadata/v1/interfaces/", 200, b"private/\npublic/"),
        Case(
            "do-interfaces-301",
            "/metadata/v1/interfaces",
            301,
            None,
            location="/metadata/v1/interfaces/",
        ),
        Case(
            "do-public-301",
            "/metadata/v1/interfaces/public",
            301,
            None,
            location="/metadata/v1/interfaces/public/",
        ),
        Case("do-public-0", "/metadata/v1/interfaces/public/0/", 200, b"ipv4/\ntype"),
        Case("do-public-type", "/metadata/v1/interfaces/public/0/type", 200, b"public"),
        Case("do-floating", "/metadata/v1/floating_ip/ipv4/", 200, b"active\nip_address"),
        Case("do-floating-ip", "/metadata/v1/floating_ip/ipv4/ip_address", 200, b"203.0.113.7"),
        Case("do-floating-active", "/metadata/v1/floating_ip/ipv4/active", 200, b"true"),
        # CloudStack pushes no tags, vendor-data or DNS for these VMs: none is invented
        Case("do-no-tags", "/metadata/v1/tags/", 404, b"not found\n"),
        Case("do-no-vendor-data", "/metadata/v1/vendor-data", 404, b"not found\n"),
        Case("do-no-dns", "/metadata/v1/dns/nameservers", 404, b"not found\n"),
        Case(
            "do-public-address",
            "/metadata/v1/interfaces/public/0/ipv4/address",
            200,
            b"203.0.113.7",
        ),
        Case(
            "do-private-address",
            "/metadata/v1/interfaces/private/0/ipv4/address",
            200,
            a.encode(),
        ),
        Case("do-file-slash", "/metadata/v1/id/", 404, b"not found\n"),
        Case("do-json", "/metadata/v1.json", 200, do_json(a), content_type="application/json"),
        # --- SSRF guard
        Case(
            "xff",
            "/latest/instance-id",
            403,
            b"forwarded requests are refused\n",
            headers=(("X-Forwarded-For", vms.b),),
            absent=(iid,),
        ),
        Case(
            "forwarded",
            "/latest/user-data",
            403,
            b"forwarded requests are refused\n",
            headers=(("Forwarded", f"for={vms.b}"),),
            absent=(USERDATA,),
        ),
        Case(
            "xff-head",
            "/latest/meta-data/",
            403,
            b"",
            method="HEAD",
            headers=(("X-Forwarded-For", "1.2.3.4"),),
        ),
        # --- IMDSv2 token endpoint
        Case(
            "token-put",
            "/latest/api/token",
            200,
            None,
            method="PUT",
            headers=(("X-aws-ec2-metadata-token-ttl-seconds", "60"),),
        ),
        Case("token-put-no-ttl", "/latest/api/token", 400, None, method="PUT"),
        Case("token-post", "/latest/api/token", 405, None, method="POST", allow="PUT"),
        Case(
            "token-bad",
            "/latest/instance-id",
            401,
            b"invalid or expired token\n",
            headers=(("X-aws-ec2-metadata-token", "forged"),),
            absent=(iid,),
        ),
    ]
    names = [c.name for c in cases]
    assert len(names) == len(set(names)), "route case names must be unique"
    return cases


def do_json(ip: str) -> bytes:
    """``/metadata/v1.json`` of VM ``a``, written out from what was pushed."""
    doc: dict[str, Any] = {
        "droplet_id": instance_id(ip),
        "hostname": f"vm-{ip.replace('.', '-')}",
        "user_data": USERDATA.decode(),
        "public_keys": KEYS.split("\n"),
        "region": "zone-a",
        "interfaces": {
            "private": [{"ipv4": {"ip_address": ip}, "type": "private"}],
            "public": [{"ipv4": {"ip_address": "203.0.113.7"}, "type": "public"}],
        },
        "floating_ip": {"ipv4": {"active": True, "ip_address": "203.0.113.7"}},
    }
    return json.dumps(doc, sort_keys=True).encode()


def check_reply(case: Case, status: int, headers: dict[str, str], body: bytes) -> None:
    """Assert that a reply (``headers`` with lower-case names) matches ``case``."""
    assert status == case.status, (case.name, status, body[:200])
    if case.body is not None:
        assert body == case.body, case.name
    if case.content_type is not None:
        assert headers.get("content-type") == case.content_type, case.name
    if case.location is not None:
        assert headers.get("location") == case.location, case.name
    if case.allow is not None:
        assert headers.get("allow") == case.allow, case.name
    if case.length is not None:
        assert headers.get("content-length") == str(case.length), case.name
    elif case.method != "HEAD":
        assert headers.get("content-length") == str(len(body)), case.name
    for text in case.absent:
        assert text not in body, case.name
    for text in case.contains:
        assert text in body, case.name
