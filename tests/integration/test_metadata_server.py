"""The metadata service as guests meet it: real gunicorn, curl and cloud-init in namespaces.

A "vr" namespace runs ``python -m vr serve-metadata``; a "guest" namespace holds two
VM addresses and routes by default through the VR, so cloud-init's CloudStack data
source finds the VR from ``/proc/net/route`` exactly as on a real guest.
"""

from __future__ import annotations

import base64
import contextlib
import gzip
import json
import re
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path

import pytest

from tests.helpers.cloud_init import CLOUD_INIT_PYTHON, no_dns, run_ec2_datasource
from tests.helpers.routes import Case, Vms, check_reply, route_cases, store_route_vms
from tests.helpers.service_lab import ServiceLab, guest_link, start_service
from tests.helpers.vmdata import drop_push_file, instance_id, store_vm
from vr.metadata import counters as metadata_counters
from vr.paths import Paths
from vr.store import current_gen

pytestmark = pytest.mark.root

VR = "10.50.0.1"
VM1 = "10.50.0.5"
VM2 = "10.50.0.6"
KEYS = (
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIKxyz alice@lab\nssh-rsa AAAAB3NzaC1yc2EAAAADAQAB bob@lab"
)
USERDATA = gzip.compress(b"#cloud-config\nruncmd:\n - echo hello\n" + bytes(range(256)), mtime=0)
# The VMs of the shared route table (tests/helpers/routes.py), also on the guest.
ROUTE_VMS = Vms(a="10.50.0.20", b="10.50.0.21", gz="10.50.0.22", unknown="10.50.0.29")


class Setup(ServiceLab):
    def curl(self, *args: str, source: str = VM1) -> subprocess.CompletedProcess[bytes]:
        return self.guest.run_bytes("curl", "-sS", "--interface", source, *args, timeout=30)

    def get(self, path: str, source: str = VM1) -> bytes:
        res = self.curl("--fail", f"http://{VR}{path}", source=source)
        assert res.returncode == 0, res.stderr
        return res.stdout

    def status(self, *args: str, source: str = VM1) -> str:
        res = self.curl("-o", "/dev/null", "-w", "%{http_code}", *args, source=source)
        return res.stdout.decode()


@contextlib.contextmanager
def metadata_lab(tmp: Path) -> Iterator[Setup]:
    """VR and guest namespaces, two VMs stored, the service running."""
    paths = Paths(tmp / "vrroot")
    paths.ensure()
    store_vm(paths, VM1, keys=KEYS, userdata=USERDATA)
    store_vm(paths, VM2, name="second-vm", userdata=b"second VM's user-data")
    store_route_vms(paths, ROUTE_VMS)
    guests = (VM1, VM2, ROUTE_VMS.a, ROUTE_VMS.b, ROUTE_VMS.gz, ROUTE_VMS.unknown)
    with guest_link(VR, guests) as (lab, vr, guest):
        log = tmp / "serve-metadata.log"
        # -v: each worker logs (with its pid) every VM generation it loads.
        argv = ["serve-metadata", "--bind", f"{VR}:80", "--workers", "2", "-v"]
        server = start_service(lab, vr, paths, log, argv, (VR, 80))
        yield Setup(lab, vr, guest, paths, log, server)


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with metadata_lab(tmp_path_factory.mktemp("metadata")) as s:
        yield s


# --- curl ----------------------------------------------------------------------------


def test_curl_reads_index_values_and_binary_user_data(setup: Setup) -> None:
    index = setup.get("/latest/meta-data/").decode().split("\n")
    assert index[0] == "service-offering" and index[-1] == ""
    assert setup.get("/latest/meta-data") == setup.get("/latest/meta-data/")
    assert setup.get("/latest/instance-id") == instance_id(VM1).encode()
    assert setup.get("/latest/meta-data/instance-id/?x=1") == instance_id(VM1).encode()
    assert setup.get("/latest/public-keys") == KEYS.encode()
    assert setup.get("/latest/user-data") == USERDATA
    assert (
        setup.get("/2009-04-04/meta-data/public-keys/1/openssh-key") == KEYS.split("\n")[1].encode()
    )
    assert setup.get("/metadata/v1/interfaces/private/0/ipv4/address") == VM1.encode()
    assert json.loads(setup.get("/metadata/v1.json"))["hostname"] == "vm-10-50-0-5"


def parse_curl(out: bytes) -> tuple[int, dict[str, str], bytes]:
    """``curl -i``/``-I`` output -> status, headers (lower-case names), body."""
    head, sep, body = out.partition(b"\r\n\r\n")
    assert sep, out[:300]
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split(" ")[1]), headers, body


@pytest.mark.parametrize("case", route_cases(ROUTE_VMS), ids=lambda c: c.name)
def test_route_table_through_gunicorn_with_curl(setup: Setup, case: Case) -> None:
    """The cases the Flask-client test runs, over the wire: the path exactly as
    written (``--path-as-is``), HEAD as ``curl -I``, other methods with ``-X``."""
    args = ["--path-as-is", "-I" if case.method == "HEAD" else "-i"]
    if case.method not in ("GET", "HEAD"):
        args += ["-X", case.method]
    for name, value in case.headers:
        args += ["-H", f"{name}: {value}"]
    res = setup.curl(*args, f"http://{VR}{case.path}", source=case.source(ROUTE_VMS))
    assert res.returncode == 0, res.stderr
    status, headers, body = parse_curl(res.stdout)
    check_reply(case, status, headers, body)


def test_each_vm_gets_only_its_own_data(setup: Setup) -> None:
    assert setup.get("/latest/local-hostname", source=VM2) == b"second-vm"
    assert setup.get("/latest/user-data", source=VM2) == b"second VM's user-data"
    assert setup.get("/latest/local-hostname", source=VM1) == b"vm-10-50-0-5"
    assert setup.status(f"http://{VR}/metadata/{VM2}/local-hostname", source=VM1) == "404"


def test_headers_head_and_methods_over_the_wire(setup: Setup) -> None:
    head = setup.curl("-I", f"http://{VR}/latest/user-data").stdout.decode()
    assert head.startswith("HTTP/1.1 200")
    assert f"Content-Length: {len(USERDATA)}\r\n" in head
    assert "Content-Type: application/octet-stream\r\n" in head
    res = setup.curl("-i", "-X", "PUT", "--data", "x", f"http://{VR}/latest/instance-id")
    assert res.stdout.startswith(b"HTTP/1.1 405") and b"Allow: GET, HEAD\r\n" in res.stdout
    assert setup.status(f"http://{VR}/latest/no-such-key") == "404"


def test_keep_alive_serves_a_whole_crawl_on_one_connection(setup: Setup) -> None:
    urls = [f"http://{VR}/latest/meta-data/{k}" for k in ("instance-id", "local-hostname", "vm-id")]
    res = setup.curl("-w", "[%{num_connects}]", *urls)
    assert res.returncode == 0
    assert res.stdout.count(b"[1]") == 1 and res.stdout.count(b"[0]") == 2


def generation_loads(s: Setup, vm: str) -> dict[int, set[int]]:
    """Generation of ``vm`` -> pids of the workers that loaded it (their debug log)."""
    pattern = re.compile(
        rf"^\S+ \S+ (\d+) vr\.metadata\.vmcache DEBUG VM {re.escape(vm)}: loaded generation (\d+)$"
    )
    out: dict[int, set[int]] = {}
    for line in s.paths.log_file.read_text().splitlines():
        m = pattern.match(line)
        if m:
            out.setdefault(int(m.group(2)), set()).add(int(m.group(1)))
    return out


def test_push_then_read_in_a_tight_loop_across_workers(setup: Setup) -> None:
    """Every GET issued after update_config returned sees the pushed value, on any worker;
    and the answers really came from both workers."""
    urls = [f"http://{VR}/latest/local-hostname"] * 6
    for _ in range(3):  # make both workers cache the VM first
        setup.curl("-H", "Connection: close", *urls)
    pushed = []
    for i in range(25):
        value = f"host-{i}-" + "x" * (i % 7)
        name = drop_push_file(setup.paths, VM1, [["metadata", "local-hostname", value]])
        push = subprocess.run(
            [sys.executable, "-m", "vr", "update-config", "--root", str(setup.paths.root), name],
            capture_output=True,
            timeout=60,
        )
        assert push.returncode == 0, push.stderr
        pushed.append(current_gen(setup.paths, ip_address(VM1)))
        # A new connection per request: the kernel hands them to either worker.
        got = setup.curl("-H", "Connection: close", *urls).stdout
        assert got == value.encode() * len(urls), (i, got)
    # A worker caches a VM until its generation changes, and logs each load: every
    # pushed generation was loaded by the worker(s) that answered for it.
    loads = generation_loads(setup, VM1)
    assert all(loads.get(gen) for gen in pushed), (pushed, loads)
    answering = set().union(*(loads[gen] for gen in pushed))
    assert len(answering) == 2, answering


HOG_CLIENT = textwrap.dedent(
    """
    import json, select, socket, sys
    vr, port, source, count = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.bind((source, 0))
        s.connect((vr, port))
        socks.append(s)
    # Over the limit the server closes this address's oldest idle connections at
    # once (or refuses the new one with a 503); the ones it holds stay silent.
    closed, waiting = 0, list(socks)
    for _ in range(10):  # until a second passes with no news (at most 10 s)
        ready, _, _ = select.select(waiting, [], [], 1.0)
        if not ready:
            break
        for s in ready:
            s.recv(4096)
            closed += 1
            waiting.remove(s)
    print(json.dumps({"closed": closed}))
    sys.stdout.flush()
    sys.stdin.read()  # hold the rest open until told
    """
)


def test_one_vm_holding_connections_is_limited_and_others_are_still_served(
    setup: Setup, tmp_path: Path
) -> None:
    """A second server, one worker, at most 3 connections per address: VM2 opening 12
    idle connections keeps 3 of them, and VM1 is answered meanwhile."""
    log = tmp_path / "limited.log"
    cmd = [sys.executable, "-m", "vr", "serve-metadata", "--root", str(setup.paths.root)]
    cmd += ["--bind", f"{VR}:81", "--workers", "1", "--connections-per-address", "3"]
    with open(log, "wb") as out:
        server = setup.lab.spawn(setup.vr, cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait = f"from tests.helpers.procs import wait_port; wait_port({VR!r}, 81)"
        setup.vr.run(sys.executable, "-c", wait, timeout=30)
        hog = setup.guest.popen(
            [sys.executable, "-c", HOG_CLIENT, VR, "81", VM2, "12"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        try:
            assert hog.stdout is not None
            report = json.loads(hog.stdout.readline())
            assert report == {"closed": 9}
            res = setup.curl("--fail", f"http://{VR}:81/latest/instance-id")
            assert res.returncode == 0 and res.stdout == instance_id(VM1).encode()
        finally:
            hog.kill()
            hog.wait(timeout=10)
    finally:
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=15) == 0


# --- SSRF guard, counters, stopping --------------------------------------------------


def test_forwarded_requests_are_refused_counted_and_sigterm_stops_cleanly(
    tmp_path: Path,
) -> None:
    with metadata_lab(tmp_path) as s:
        for header in ("X-Forwarded-For: 10.50.0.6", "Forwarded: for=10.50.0.6"):
            for _ in range(2):
                res = s.curl("-i", "-H", header, f"http://{VR}/latest/instance-id")
                assert res.stdout.startswith(b"HTTP/1.1 403")
                assert instance_id(VM1).encode() not in res.stdout
        assert s.get("/latest/instance-id") == instance_id(VM1).encode()
        s.server.send_signal(signal.SIGTERM)
        assert s.server.wait(timeout=15) == 0
        # Workers write their last counts when they exit.
        assert metadata_counters.totals(s.paths) == {"forwarded_refused": 4}
        assert "Shutting down: Master" in s.log.read_text()


# --- cloud-init ----------------------------------------------------------------------

CLOUD_INIT_DRIVER = textwrap.dedent(
    """
    import base64, json, sys
    from cloudinit import distros, helpers
    from cloudinit.sources import DataSourceCloudStack as cs

    work = sys.argv[1]
    paths = helpers.Paths({"cloud_dir": work + "/cloud", "run_dir": work + "/run"})
    distro = distros.fetch("debian")("debian", {}, paths)
    cfg = {"datasource": {"CloudStack": {"max_wait": 20, "timeout": 5}}}
    ds = cs.DataSourceCloudStack(cfg, distro, paths)
    ok = ds.get_data()
    print(json.dumps({
        "ok": ok,
        "vr": ds.vr_addr,
        "instance_id": ds.get_instance_id() if ok else None,
        "local_hostname": ds.metadata.get("local-hostname") if ok else None,
        "availability_zone": ds.availability_zone if ok else None,
        "public_keys": ds.get_public_ssh_keys() if ok else None,
        "userdata": base64.b64encode(ds.get_userdata_raw() or b"").decode(),
    }))
    """
)


@pytest.fixture
def guest_etc(setup: Setup) -> Iterator[None]:
    """Per-namespace /etc files: no DNS and no data-server name, so discovery falls
    through to the default gateway (``ip netns exec`` bind-mounts /etc/netns/<ns>)."""
    with no_dns(setup.guest):
        yield


@pytest.mark.skipif(
    subprocess.run([CLOUD_INIT_PYTHON, "-c", "import cloudinit"], capture_output=True).returncode,
    reason="Debian's cloud-init is not installed",
)
def test_cloud_init_cloudstack_datasource_reads_everything(
    setup: Setup, guest_etc: None, tmp_path: Path
) -> None:
    # A fresh VM whose data nothing else in this module changes.
    store_vm(setup.paths, "10.50.0.7", name="ci-guest", keys=KEYS, userdata=USERDATA)
    setup.guest.run("ip", "addr", "add", "10.50.0.7/24", "dev", "eth0")
    # The guest's own address is the source of everything it sends to the VR.
    setup.guest.run("ip", "route", "replace", "10.50.0.0/24", "dev", "eth0", "src", "10.50.0.7")
    driver = tmp_path / "driver.py"
    driver.write_text(CLOUD_INIT_DRIVER)
    res = setup.guest.run(CLOUD_INIT_PYTHON, str(driver), str(tmp_path), timeout=120)
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["ok"] is True, res.stderr[-3000:]
    assert got["vr"] == VR
    assert got["instance_id"] == instance_id("10.50.0.7")
    assert got["local_hostname"] == "ci-guest"
    assert got["availability_zone"] == "zone-a"
    assert got["public_keys"] == KEYS.split("\n")
    assert base64.b64decode(got["userdata"]) == USERDATA


EC2_GUEST = "10.50.0.8"


@pytest.fixture
def ec2_guest(setup: Setup) -> Iterator[str]:
    """A VM of its own whose address is the guest's source address meanwhile."""
    store_vm(setup.paths, EC2_GUEST, name="ec2-guest", keys=KEYS, userdata=USERDATA)
    setup.guest.run("ip", "addr", "replace", f"{EC2_GUEST}/24", "dev", "eth0")
    route = ["ip", "route", "replace", "10.50.0.0/24", "dev", "eth0", "src"]
    setup.guest.run(*route, EC2_GUEST)
    try:
        yield EC2_GUEST
    finally:
        setup.guest.run(*route, VM1)


@pytest.mark.parametrize("platform", ["unknown", "aws"])
def test_cloud_init_ec2_datasource_reads_everything(
    setup: Setup, guest_etc: None, ec2_guest: str, tmp_path: Path, platform: str
) -> None:
    got, res = run_ec2_datasource(setup.guest, tmp_path, f"http://{VR}", platform)
    assert got["ok"] is True, res.stderr[-3000:]
    assert got["address"] == f"http://{VR}"
    assert got["instance_id"] == instance_id(ec2_guest)
    assert got["local_hostname"] == "ec2-guest"
    assert got["placement"] == {"availability-zone": "zone-a"}
    assert got["availability_zone"] == "zone-a"
    assert got["public_keys"] == KEYS.split("\n")
    assert base64.b64decode(got["userdata"]) == USERDATA
    calls = got["calls"]
    fetched = {url.removeprefix(f"http://{VR}/"): status for _, url, status, _ in calls}
    version = "2021-03-23"  # the newest cloud-init 22.4 asks for: we answer it
    for leaf in ("public-keys/0/openssh-key", "public-keys/1/openssh-key"):
        assert fetched[f"{version}/meta-data/{leaf}"] == 200
    assert fetched[f"{version}/meta-data/placement/availability-zone"] == 200
    assert fetched[f"{version}/user-data"] == 200
    tree = [c for c in calls if "/meta-data/" in c[1] or c[1].endswith("/user-data")]
    assert tree and all(status == 200 for _, _, status, _ in tree), tree
    puts = [c for c in calls if c[0] == "PUT"]
    if platform == "unknown":
        # Not on EC2: cloud-init asks no token and reads with plain GETs (IMDSv1).
        assert puts == []
    else:
        # The token on the first try, then sent with every GET.
        assert puts == [calls[0]] and calls[0][1:3] == [f"http://{VR}/latest/api/token", 200]
        assert all("X-aws-ec2-metadata-token" in c[3] for c in calls[1:])
