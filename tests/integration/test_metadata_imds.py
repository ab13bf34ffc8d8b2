"""IMDSv2 as guests meet it: hop limit, tokens required, cloud-init; real gunicorn.

A "vr" namespace runs ``python -m vr serve-metadata``; a "guest" namespace is a VM
that NATs a "container" namespace behind it (one routed hop), as Docker does.
"""

from __future__ import annotations

import base64
import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import netns
from tests.helpers.agent import AgentProcess, keygen
from tests.helpers.cloud_init import no_dns, run_ec2_datasource
from tests.helpers.service_lab import start_service
from tests.helpers.vmdata import instance_id, store_vm
from vr.ops.metrics import read_samples
from vr.paths import Paths
from vr.payloads import parse_dhcp_entry, parse_guest_network
from vr.store import Store

pytestmark = pytest.mark.root

VR = "10.52.0.1"
GUEST = "10.52.0.5"
CTR_NET_GUEST = "172.30.52.1"
CTR = "172.30.52.2"
TOKEN_URL = f"http://{VR}/latest/api/token"
TTL = "X-aws-ec2-metadata-token-ttl-seconds: 60"


class Lab:
    def __init__(self, lab: netns.Lab, tmp: Path) -> None:
        self.lab = lab
        self.paths = Paths(tmp / "vrroot")
        self.paths.ensure()
        self.log = tmp / "serve-metadata.log"
        self.vr = lab.host("vr")
        self.guest = lab.host("guest")
        self.ctr = lab.host("ctr")
        lab.link(self.vr, "eth0", f"{VR}/24", self.guest, "eth0", f"{GUEST}/24")
        lab.link(self.guest, "eth1", f"{CTR_NET_GUEST}/24", self.ctr, "eth0", f"{CTR}/24")
        self.guest.run("ip", "route", "add", "default", "via", VR)
        self.ctr.run("ip", "route", "add", "default", "via", CTR_NET_GUEST)
        # The guest routes its container and hides it behind its own address.
        self.guest.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        nat = ["iptables", "-t", "nat", "-A", "POSTROUTING", "-s", f"{CTR}/32", "-o", "eth0"]
        self.guest.run(*nat, "-j", "MASQUERADE")
        store_vm(self.paths, GUEST, name="guest-vm")
        self.server: subprocess.Popen[bytes] | None = None

    def serve(self, **settings: object) -> None:
        """(Re)start the metadata service with these vr.json settings."""
        self.stop()
        self.paths.config.write_text(json.dumps(settings))
        argv = ["serve-metadata", "--bind", f"{VR}:80", "--workers", "2"]
        self.server = start_service(self.lab, self.vr, self.paths, self.log, argv, (VR, 80))

    def stop(self) -> None:
        if self.server is not None:
            self.server.send_signal(signal.SIGTERM)
            self.server.wait(30)
            self.server = None

    def curl(self, ns: netns.Namespace, *args: str) -> subprocess.CompletedProcess[str]:
        return ns.run("curl", "-sS", *args, check=False, timeout=60)


@pytest.fixture(scope="module")
def imds(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    with netns.lab() as lab:
        setup = Lab(lab, tmp_path_factory.mktemp("imds"))
        try:
            yield setup
        finally:
            setup.stop()


def time_exceeded_sent(ns: netns.Namespace) -> int:
    """ICMP "time exceeded" messages ``ns`` has sent (packets whose TTL ran out there)."""
    out = ns.run("nstat", "-az", "IcmpOutTimeExcds").stdout
    return int(out.split("IcmpOutTimeExcds")[1].split()[0])


def test_a_container_one_hop_behind_the_guest_gets_no_token_at_hop_limit_1_but_at_2(
    imds: Lab,
) -> None:
    imds.serve(imds_hop_limit=1)
    # the guest itself is zero hops away: it gets its token
    direct = imds.curl(imds.guest, "-X", "PUT", "-H", TTL, "-i", TOKEN_URL)
    assert direct.returncode == 0 and direct.stdout.startswith("HTTP/1.1 200"), direct.stderr
    assert "X-aws-ec2-metadata-token-ttl-seconds: 60" in direct.stdout
    # the reply to the container dies in the guest's forwarding: TTL exceeded there
    before = time_exceeded_sent(imds.guest)
    far = imds.curl(imds.ctr, "-X", "PUT", "-H", TTL, "--max-time", "3", TOKEN_URL)
    assert far.returncode == 28, (far.returncode, far.stderr)  # 28: no reply in time
    assert time_exceeded_sent(imds.guest) > before
    # a plain GET is not hop-limited (IMDSv1 as on EC2)
    plain = imds.curl(imds.ctr, "--fail", f"http://{VR}/latest/meta-data/instance-id")
    assert plain.stdout == instance_id(GUEST)

    imds.serve(imds_hop_limit=2)
    far = imds.curl(imds.ctr, "-X", "PUT", "-H", TTL, "--fail", TOKEN_URL)
    assert far.returncode == 0, far.stderr
    token = far.stdout
    got = imds.curl(
        imds.ctr,
        "--fail",
        "-H",
        f"X-aws-ec2-metadata-token: {token}",
        f"http://{VR}/latest/meta-data/instance-id",
    )
    assert got.stdout == instance_id(GUEST)


def test_tokens_required_refuses_imdsv1_with_401_over_curl_and_wget(imds: Lab) -> None:
    imds.serve(imds_tokens_required=True)
    url = f"http://{VR}/latest/meta-data/instance-id"
    status = imds.curl(imds.guest, "-o", "/dev/null", "-w", "%{http_code}", url)
    assert status.stdout == "401"
    # AWS's errors: no TTL 400, a forwarded PUT 403, GET on the token path 405
    for args, code in (
        (["-X", "PUT", TOKEN_URL], "400"),
        (["-X", "PUT", "-H", "X-aws-ec2-metadata-token-ttl-seconds: 21601", TOKEN_URL], "400"),
        (["-X", "PUT", "-H", TTL, "-H", "X-Forwarded-For: 1.2.3.4", TOKEN_URL], "403"),
        (["-H", "X-aws-ec2-metadata-token: forged", url], "401"),
    ):
        got = imds.curl(imds.guest, "-o", "/dev/null", "-w", "%{http_code}", *args)
        assert got.stdout == code, args
    token = imds.curl(imds.guest, "--fail", "-X", "PUT", "-H", TTL, TOKEN_URL).stdout
    wget = imds.guest.run(
        "wget", "-qO-", f"--header=X-aws-ec2-metadata-token: {token}", url, check=False
    )
    assert wget.stdout == instance_id(GUEST), wget.stderr
    refused = imds.guest.run("wget", "-qO-", "--tries=1", url, check=False)
    assert refused.returncode == 6  # wget: server issued an error response (401)


@pytest.fixture
def guest_etc(imds: Lab) -> Iterator[None]:
    """No DNS in the guest (``ip netns exec`` bind-mounts /etc/netns/<ns>)."""
    with no_dns(imds.guest):
        yield


def test_cloud_init_ec2_datasource_reads_everything_with_tokens_required(
    imds: Lab, guest_etc: None, tmp_path: Path
) -> None:
    imds.serve(imds_tokens_required=True)
    got, res = run_ec2_datasource(imds.guest, tmp_path, f"http://{VR}", "aws")
    assert got["ok"] is True, res.stderr[-3000:]
    assert got["instance_id"] == instance_id(GUEST)
    assert got["local_hostname"] == "guest-vm"
    calls = got["calls"]
    assert calls[0][0] == "PUT" and calls[0][2] == 200
    assert all("X-aws-ec2-metadata-token" in c[3] for c in calls[1:]), calls
    assert [c for c in calls if c[2] != 200] == []
    # on EC2 cloud-init takes the instance id and zone from the identity document
    assert got["identity"]["instanceId"] == instance_id(GUEST)
    assert got["identity"]["availabilityZone"] == "zone-a"


def test_the_identity_document_verifies_with_openssl_against_vr_identity_cert(
    imds: Lab, tmp_path: Path
) -> None:
    imds.serve()
    base = f"http://{VR}/latest/dynamic/instance-identity"
    assert imds.curl(imds.guest, "--fail", base + "/").stdout.split() == [
        "document",
        "pkcs7",
        "signature",
    ]
    doc = tmp_path / "document"
    doc.write_bytes(imds.guest.run_bytes("curl", "-sS", "--fail", base + "/document").stdout)
    fields = json.loads(doc.read_bytes())
    assert fields["instanceId"] == instance_id(GUEST)
    assert fields["privateIp"] == GUEST
    assert fields["hostname"] == "guest-vm"
    cert = tmp_path / "cert.pem"
    out = subprocess.run(
        [sys.executable, "-m", "vr", "identity-cert", "--root", str(imds.paths.root)],
        capture_output=True,
        check=True,
    )
    cert.write_bytes(out.stdout)
    pubkey = tmp_path / "pub.pem"
    subprocess.run(
        ["openssl", "x509", "-in", cert, "-pubkey", "-noout", "-out", pubkey], check=True
    )
    sig = tmp_path / "signature"
    raw = imds.curl(imds.guest, "--fail", base + "/signature").stdout
    sig.write_bytes(base64.b64decode(raw))
    verify = ["openssl", "dgst", "-sha256", "-verify", pubkey, "-signature", sig, doc]
    assert subprocess.run(verify, capture_output=True, text=True).stdout.strip() == "Verified OK"
    p7 = tmp_path / "pkcs7.pem"
    body = imds.curl(imds.guest, "--fail", base + "/pkcs7").stdout
    p7.write_text(f"-----BEGIN PKCS7-----\n{body}\n-----END PKCS7-----\n")
    smime = ["openssl", "smime", "-verify", "-in", p7, "-inform", "PEM", "-content", doc]
    ok = subprocess.run([*smime, "-certfile", cert, "-CAfile", cert], capture_output=True)
    assert ok.returncode == 0, ok.stderr
    # a changed document fails both checks
    doc.write_bytes(doc.read_bytes().replace(b"guest-vm", b"other-vm"))
    assert subprocess.run(verify, capture_output=True).returncode != 0
    bad = subprocess.run([*smime, "-certfile", cert, "-CAfile", cert], capture_output=True)
    assert bad.returncode != 0


def test_the_digitalocean_tree_over_wget_and_curl(imds: Lab) -> None:
    imds.serve()
    net = {"device": "eth0", "router_guest_ip": VR, "cidr": "10.52.0.0/24", "add": True}
    dhcp = {"mac_address": "02:00:0a:34:00:05", "ipv4_address": GUEST, "host_name": "guest-vm"}
    Store(imds.paths).apply([parse_guest_network(net), parse_dhcp_entry(dhcp)])
    v1 = f"http://{VR}/metadata/v1"
    private = f"{v1}/interfaces/private/0"
    expected = {
        f"{private}/mac": "02:00:0a:34:00:05",
        f"{private}/type": "private",
        f"{private}/ipv4/address": GUEST,
        f"{private}/ipv4/netmask": "255.255.255.0",
        f"{private}/ipv4/gateway": VR,
        f"{v1}/dns/nameservers": VR,
        f"{v1}/floating_ip/ipv4/ip_address": "203.0.113.7",
        f"{v1}/hostname": "guest-vm",
    }
    for url, value in expected.items():
        assert imds.guest.run("wget", "-qO-", url).stdout == value, url
        assert imds.curl(imds.guest, "--fail", url).stdout == value, url
    doc = json.loads(imds.curl(imds.guest, "--fail", f"http://{VR}/metadata/v1.json").stdout)
    assert doc["interfaces"]["private"][0]["mac"] == "02:00:0a:34:00:05"
    assert doc["dns"] == {"nameservers": [VR]}


def test_one_vm_over_its_rate_gets_429_from_every_worker_and_others_are_served(
    imds: Lab,
) -> None:
    other = "10.52.0.6"
    store_vm(imds.paths, other, name="other-vm")
    imds.guest.run("ip", "addr", "replace", f"{other}/24", "dev", "eth0")
    imds.serve(imds_rate_per_second=1, imds_rate_burst=5)
    url = f"http://{VR}/latest/meta-data/instance-id"
    start = time.monotonic()
    # each request on a new connection, so both workers answer some
    codes = [
        imds.curl(imds.guest, "-o", "/dev/null", "-w", "%{http_code}", url).stdout
        for _ in range(20)
    ]
    elapsed = time.monotonic() - start
    granted = codes.count("200")
    # one shared bucket: the burst plus what refilled meanwhile, not a burst per worker
    assert 5 <= granted <= 5 + int(elapsed) + 1, (codes, elapsed)
    assert codes.count("429") == 20 - granted
    head = imds.curl(imds.guest, "-sS", "-i", url).stdout
    assert head.startswith("HTTP/1.1 429") and "Retry-After: 1" in head, head
    served = imds.curl(imds.guest, "--fail", "--interface", other, url)
    assert served.stdout == instance_id(other), (served.returncode, served.stderr)
    refused = read_samples(imds.paths.metrics)[("vr_refused_total", (("reason", "rate"),))]
    assert refused == 20 - granted + 1


def test_a_long_poll_is_woken_by_a_push_through_the_ssh_agent(imds: Lab, tmp_path: Path) -> None:
    imds.serve()
    key = keygen(tmp_path / "mgmt", "ed25519")
    imds.paths.authorized_keys.parent.mkdir(parents=True, exist_ok=True)
    imds.paths.authorized_keys.write_text(Path(f"{key}.pub").read_text())
    agent = AgentProcess(imds.paths.root).start()
    try:
        url = f"http://{VR}/latest/meta-data/local-hostname"
        head = imds.curl(imds.guest, "--fail", "-D", "-", "-o", "/dev/null", url).stdout
        tag = next(
            line.split(":", 1)[1].strip()
            for line in head.splitlines()
            if line.lower().startswith("etag:")
        )
        # last_etag makes the order safe: a push before the request arrives is
        # answered at once, a push after it wakes the held request
        query = f"wait_for_change=true&last_etag={tag.strip(chr(34))}&timeout_sec=300"
        waiter = imds.lab.spawn(
            imds.guest,
            ["curl", "-sS", "--fail", "-D", "-", f"{url}?{query}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        payload = tmp_path / "vm_metadata.json"
        triples = [["metadata", "local-hostname", "renamed-vm"]]
        payload.write_text(json.dumps({"vm_ip_address": GUEST, "vm_metadata": triples}))
        push = subprocess.run(
            [sys.executable, "-m", "vr", "push", "--host", "127.0.0.1",
             "--port", str(agent.port), "--key", str(key),
             "--known-hosts", str(tmp_path / "known_hosts"), "--accept-new", str(payload)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert push.returncode == 0, push.stdout + push.stderr
        out, err = waiter.communicate(timeout=120)
        assert waiter.returncode == 0, err
        headers, _, body = out.decode().partition("\r\n\r\n")
        assert body == "renamed-vm"
        assert f"etag: {tag}".lower() not in headers.lower()
    finally:
        agent.stop()
