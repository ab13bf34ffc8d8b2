"""Boot storm: ``N`` guests boot at once, each doing cloud-init's CloudStack crawl with a
new TCP connection per request, against vr and against CloudStack's Apache + password
server, in the same run. Run through ``bench/scale.py --storm`` (root).

The crawl of one guest, as cloud-init's ``DataSourceCloudStack`` does it
(cloudstack-vr.md §6), each request on a new connection from the guest's own address:

1. readiness: ``GET /latest/meta-data/instance-id`` (``wait_for_url``, 50 s per try);
2. ``GET /latest/user-data`` (5 s);
3. ``GET /latest/meta-data/`` (the index), then ``GET /latest/meta-data/<name>`` for
   each name it lists (5 s each);
4. ``GET :8080/`` with ``DomU_Request: send_my_password`` (20 s), then the ack
   ``DomU_Request: saved_password``.

Every answer is checked: status 200 and the body equal to what was pushed for that VM
(the index: exactly the pushed names; the password: the VM's own). A request fails on
a wrong status or body, a timeout or a socket error; as in cloud-init a failure ends
that guest's crawl, and the requests it never sent count as failed too, so failures
are out of the same planned total on both sides. There are no retries.

Set-up: ``N`` VMs pushed to vr's store (bench/metadata.py's ``lay_out_store``: 2 KB
user-data each) and a password per VM; the same bytes laid out for Apache as
CloudStack's VR does (``lay_out_apache``, ``apache_config``) and the passwords in the
password file of a server built like ``passwd_server_ip.py`` (bench/passwords.py's
reference). vr runs as ``vr up`` starts it: the ``serve-metadata`` and
``serve-passwords`` command lines from ``vr.supervisor.services_for`` with the default
configuration (rate limits included). Servers run in a "vr" namespace, the guests in
a "guest" namespace holding one /32 address per VM; the vr namespace routes the guest
range through the guest namespace, so it holds one neighbour entry, not ``N`` (the
kernel's ARP table limit, gc_thresh3, is shared by every namespace of the host).
The client is asyncio in a few processes (one CPU each at most), started together.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from base64 import b64decode
from collections.abc import Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench import metadata as mb  # noqa: E402
from tests.helpers import netns  # noqa: E402
from vr import config  # noqa: E402
from vr.http.worker import PER_ADDRESS  # noqa: E402
from vr.paths import Paths  # noqa: E402
from vr.payloads import VmPassword  # noqa: E402
from vr.store import Store  # noqa: E402
from vr.supervisor import services_for  # noqa: E402

GUEST_ADDR = "10.77.0.2"  # the guest namespace's own address: the route to every VM
REF_PASSWORD_PORT = 8081
READY_TIMEOUT = 50.0  # cloud-init's wait_for_url timeout per try
METADATA_TIMEOUT = 5.0  # user-data, the index and each key
PASSWORD_TIMEOUT = 20.0
USER_AGENT = "Cloud-Init/25.1"
CLIENTS = 2
TIME_LIMIT = 900.0
SEND, SAVED = "send_my_password", "saved_password"
IP_BIND_ADDRESS_NO_PORT = 24  # Linux: pick the port at connect(), per 4-tuple


# --- what each guest must be answered (pure) ---------------------------------------------


@dataclass(frozen=True)
class Guest:
    address: str
    metadata: dict[str, bytes]  # name -> value, in pushed order
    userdata: bytes
    password: str


def guest(i: int, password: str) -> Guest:
    """What was pushed for VM ``i`` (bench/metadata.py's payload) and its password."""
    push = mb.vm_push(i)
    meta: dict[str, bytes] = {}
    userdata = b""
    for folder, name, value in push["vm_metadata"]:
        raw = b"" if value is None else str(value).encode()
        if folder == "userdata" and name == "user-data":
            userdata = b64decode(raw)
        elif folder == "metadata":
            meta[name] = raw
    return Guest(push["vm_ip_address"], meta, userdata, password)


def planned(g: Guest) -> int:
    """Requests one crawl makes when everything answers: readiness, user-data, index,
    each key, the password and its ack."""
    return 3 + len(g.metadata) + 2


def request(path: str, host: str, header: str | None = None) -> bytes:
    """A GET as python-requests sends it (cloud-init's url_helper)."""
    extra = f"DomU_Request: {header}\r\n" if header else ""
    return (
        f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: {USER_AGENT}\r\n"
        f"Accept-Encoding: gzip, deflate\r\nAccept: */*\r\nConnection: keep-alive\r\n"
        f"{extra}\r\n"
    ).encode()


def parse_response(buf: bytes, eof: bool) -> tuple[int, bytes] | None:
    """``(status, body)`` once ``buf`` holds a whole response, else None.

    The body ends at ``Content-Length`` or, without one, at the server's close (the
    reference password server answers HTTP/1.0 that way). A malformed head raises
    ValueError.
    """
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if eof:
            raise ValueError(f"connection closed before the end of the head: {buf[:80]!r}")
        return None
    lines = buf[:end].split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        raise ValueError(f"status line {lines[0][:80]!r}: expected HTTP/1.x NNN")
    length = None
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    body = buf[end + 4 :]
    if length is not None:
        return (int(parts[1]), body[:length]) if len(body) >= length else None
    return (int(parts[1]), body) if eof else None


# --- the client (runs in the guest namespace) ---------------------------------------------


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)  # seconds, requests answered
    password_latencies: list[float] = field(default_factory=list)  # those to password_port
    password_port: int = 0
    crawls: list[float] = field(default_factory=list)  # seconds, whole crawls that passed
    sent: int = 0
    failed: dict[str, int] = field(default_factory=dict)

    def fail(self, reason: str, count: int = 1) -> None:
        self.failed[reason] = self.failed.get(reason, 0) + count


class Failed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


async def fetch(
    loop: asyncio.AbstractEventLoop,
    source: str,
    target: tuple[str, int],
    data: bytes,
    timeout: float,
    tally: Tally,
) -> tuple[int, bytes]:
    """One request on a new connection from ``source``; closed after the answer."""
    tally.sent += 1
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    start = time.monotonic()
    try:
        sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
        sock.setblocking(False)
        sock.bind((source, 0))
        async with asyncio.timeout(timeout):
            try:
                await loop.sock_connect(sock, target)
            except OSError as exc:
                raise Failed(f"connect: {exc.strerror or exc}") from exc
            await loop.sock_sendall(sock, data)
            buf = b""
            while True:
                chunk = await loop.sock_recv(sock, 65536)
                buf += chunk
                answer = parse_response(buf, not chunk)
                if answer is not None:
                    took = time.monotonic() - start
                    tally.latencies.append(took)
                    if target[1] == tally.password_port:
                        tally.password_latencies.append(took)
                    return answer
    except TimeoutError as exc:
        raise Failed("timeout") from exc
    except ValueError as exc:
        raise Failed("malformed response") from exc
    except OSError as exc:
        raise Failed(f"socket: {exc.strerror or exc}") from exc
    finally:
        sock.close()


async def crawl(
    loop: asyncio.AbstractEventLoop, g: Guest, meta: tuple[str, int], pw: tuple[str, int],
    tally: Tally,
) -> None:  # fmt: skip
    """One guest's boot: the crawl of the module docstring, every answer checked."""
    host = meta[0]
    start = time.monotonic()
    done = 0

    async def get(target: tuple[str, int], path: str, timeout: float, header: str | None,
                  expect: bytes | None, stage: str = "key") -> bytes:  # fmt: skip
        nonlocal done
        done += 1
        try:
            status, body = await fetch(loop, g.address, target, request(path, host, header),
                                       timeout, tally)  # fmt: skip
        except Failed as exc:
            raise Failed(f"{stage}: {exc.reason}") from None
        if status != 200:
            raise Failed(f"{stage}: status {status}")
        if expect is not None and body != expect:
            raise Failed(f"{stage}: wrong body")
        return body

    try:
        iid = g.metadata["instance-id"]
        await get(meta, "/latest/meta-data/instance-id", READY_TIMEOUT, None, iid, "readiness")
        await get(meta, "/latest/user-data", METADATA_TIMEOUT, None, g.userdata, "user-data")
        index = await get(meta, "/latest/meta-data/", METADATA_TIMEOUT, None, None, "index")
        names = [line.strip() for line in index.decode().splitlines() if line.strip()]
        if sorted(names) != sorted(g.metadata):
            raise Failed("index: wrong names")
        for name in names:
            await get(meta, f"/latest/meta-data/{name}", METADATA_TIMEOUT, None, g.metadata[name])
        served = await get(pw, "/", PASSWORD_TIMEOUT, SEND, None, "password")
        if served.strip() != g.password.encode():  # cloud-init strips it
            raise Failed("password: wrong password")
        await get(pw, "/", PASSWORD_TIMEOUT, SAVED, SAVED.encode(), "ack")
    except Failed as exc:
        tally.fail(exc.reason)
        if planned(g) > done:
            tally.fail("not sent (crawl ended)", planned(g) - done)
        return
    tally.crawls.append(time.monotonic() - start)


async def _storm(guests: list[Guest], meta: tuple[str, int], pw: tuple[str, int]) -> Tally:
    loop = asyncio.get_running_loop()
    tally = Tally(password_port=pw[1])
    async with asyncio.timeout(TIME_LIMIT):
        await asyncio.gather(*(crawl(loop, g, meta, pw, tally) for g in guests))
    return tally


def client(args: argparse.Namespace) -> int:
    """``--client K``: crawl every VM ``i`` with ``i % clients == K``; print READY, wait
    for a line on stdin, run, print the tally as one JSON line."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    passwords = json.loads(Path(args.secrets).read_text())
    mine = range(args.client, args.vms, args.clients)
    guests = [guest(i, passwords[i]) for i in mine]
    host, mport, pport = args.target.split(":")
    print("READY", flush=True)
    sys.stdin.readline()
    start = time.monotonic()
    tally = asyncio.run(_storm(guests, (host, int(mport)), (host, int(pport))))
    end = time.monotonic()
    out = {"start": start, "end": end, "planned": sum(planned(g) for g in guests),
           "sent": tally.sent, "failed": tally.failed, "latencies": tally.latencies,
           "password_latencies": tally.password_latencies,
           "crawls": tally.crawls}  # fmt: skip
    print(json.dumps(out), flush=True)
    return 0


# --- the run (root) -----------------------------------------------------------------------


@dataclass
class Result:
    seconds: float
    planned: int
    sent: int
    failed: dict[str, int]
    latencies: list[float]
    password_latencies: list[float]
    crawls: list[float]

    @property
    def failures(self) -> int:
        return sum(self.failed.values())

    @property
    def answered(self) -> int:
        return len(self.latencies)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def run_clients(lab: netns.Lab, ns: netns.Namespace, target: str, vms: int,
                secrets_file: Path) -> Result:  # fmt: skip
    cmd = [sys.executable, str(Path(__file__).resolve()), "--client", "0", "--clients",
           str(CLIENTS), "--vms", str(vms), "--target", target,
           "--secrets", str(secrets_file)]  # fmt: skip
    procs = []
    for k in range(CLIENTS):
        cmd[3] = str(k)
        procs.append(lab.spawn(ns, list(cmd), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               cwd=str(REPO)))  # fmt: skip
    for p in procs:  # every client has built its guests before any starts
        assert p.stdout is not None
        line = p.stdout.readline()
        if line.strip() != b"READY":
            raise SystemExit(f"storm client pid {p.pid} did not start: {line[:200]!r}")
    for p in procs:
        assert p.stdin is not None
        p.stdin.write(b"GO\n")
        p.stdin.flush()
    outs = []
    for p in procs:
        assert p.stdout is not None
        outs.append(json.loads(p.stdout.readline()))
        p.wait(60)
    failed: dict[str, int] = {}
    for o in outs:
        for k, v in o["failed"].items():
            failed[k] = failed.get(k, 0) + v
    return Result(
        max(o["end"] for o in outs) - min(o["start"] for o in outs),
        sum(o["planned"] for o in outs),
        sum(o["sent"] for o in outs),
        failed,
        [x for o in outs for x in o["latencies"]],
        [x for o in outs for x in o["password_latencies"]],
        [x for o in outs for x in o["crawls"]],
    )


def set_up_lab(lab: netns.Lab, vms: int) -> tuple[netns.Namespace, netns.Namespace]:
    vr, guests = lab.host("vr"), lab.host("guest")
    lab.link(vr, "eth0", f"{mb.VR_ADDR}/24", guests, "eth0", f"{GUEST_ADDR}/24")
    vr.run(
        "ip",
        "route",
        "add",
        f"{IPv4Network((mb.vm_address(0), mb.PREFIX), strict=False)}",
        "via",
        GUEST_ADDR,
    )
    batch = "".join(f"addr add {mb.vm_address(i)}/32 dev eth0\n" for i in range(vms))
    guests.run("ip", "-batch", "-", input=batch, timeout=300)
    # Each guest closes its connections first: 16 TIME_WAIT sockets per guest.
    guests.run("sysctl", "-qw", "net.ipv4.tcp_max_tw_buckets=1000000")
    return vr, guests


def probe(ns: netns.Namespace, url: str, header: str | None = None) -> None:
    """One request from VM 0 (its answer is never printed); raise unless 200."""
    cmd = ["curl", "-sS", "-m", "30", "-o", "/dev/null", "-w", "%{http_code}",
           "--interface", mb.vm_address(0)]  # fmt: skip
    if header:
        cmd += ["-H", f"DomU_Request: {header}"]
    res = ns.run_bytes(*cmd, url)
    if res.stdout != b"200":
        raise SystemExit(f"{url}: HTTP {res.stdout!r}, expected 200 ({res.stderr[:200]!r})")


@contextlib.contextmanager
def ours(lab: netns.Lab, vr: netns.Namespace, paths: Paths, log: Path) -> Iterator[None]:
    """vr's metadata and password services with the command lines ``vr up`` uses."""
    cfg = config.load(paths)
    services = [s for s in services_for(paths, cfg)
                if s.port in (cfg.metadata_port, cfg.password_port)]  # fmt: skip
    procs = []
    try:
        with open(log, "ab") as out:
            for s in services:
                procs.append(lab.spawn(vr, s.argv, stdout=out, stderr=subprocess.STDOUT,
                                       cwd=str(REPO)))  # fmt: skip
        for port in (cfg.metadata_port, cfg.password_port):
            vr.run(sys.executable, "-c", mb._WAIT_PORT.format(mb.VR_ADDR, port), timeout=60)
        yield
    finally:
        for p in procs:
            netns.stop(p, timeout=10)


@contextlib.contextmanager
def cloudstack(
    lab: netns.Lab, vr: netns.Namespace, conf_dir: Path, conf: Path, pw_file: Path, log: Path
) -> Iterator[None]:
    """Apache as CloudStack's VR configures it, and the reference password server."""
    cmd = [sys.executable, str(REPO / "bench" / "passwords.py"), "--reference-server",
           mb.VR_ADDR, str(REF_PASSWORD_PORT), str(pw_file)]  # fmt: skip
    with open(log, "ab") as out:
        ref = lab.spawn(vr, cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO))
    try:
        vr.run(sys.executable, "-c", mb._WAIT_PORT.format(mb.VR_ADDR, REF_PASSWORD_PORT))
        with mb.apache_server(vr, conf_dir, conf):
            yield
    finally:
        netns.stop(ref, timeout=10)


def storm(vms: int) -> int:
    """Lay out ``vms`` VMs for both, storm vr then Apache, print the table."""
    work = Path(tempfile.mkdtemp(prefix="vr-storm-", dir="/var/tmp"))
    os.chmod(work, 0o755)  # Apache's workers (www-data) read the document root
    private = work / "private"
    private.mkdir(mode=0o700)
    try:
        t = time.monotonic()
        paths = Paths(work / "root")
        mb.lay_out_store(paths, vms)
        docroot = work / "apache" / "html"
        mb.lay_out_apache(paths, docroot)
        conf_dir = work / "apache" / "conf"
        conf_dir.mkdir(parents=True)
        conf = mb.apache_config(conf_dir, docroot)
        passwords = [secrets.token_urlsafe(12) for _ in range(vms)]
        store = Store(paths)
        for start in range(0, vms, 1000):
            store.apply([VmPassword(IPv4Address(mb.vm_address(i)), passwords[i])
                         for i in range(start, min(vms, start + 1000))])  # fmt: skip
        pw_file = private / "passwords-reference"
        pw_file.write_text("".join(f"{mb.vm_address(i)}={passwords[i]}\n" for i in range(vms)))
        secrets_file = private / "expected-passwords.json"
        secrets_file.write_text(json.dumps(passwords))
        del passwords
        print(f"laid out {vms} VMs for vr and for Apache in {time.monotonic() - t:.1f}s",
              flush=True)  # fmt: skip
        cfg = config.load(paths)
        results: dict[str, Result] = {}
        with netns.lab() as lab:
            vr, guests = set_up_lab(lab, vms)
            sides: list[tuple[str, int, int, contextlib.AbstractContextManager[None]]] = [
                ("vr", cfg.metadata_port, cfg.password_port,
                 ours(lab, vr, paths, work / "ours.log")),
                ("apache", mb.APACHE_PORT, REF_PASSWORD_PORT,
                 cloudstack(lab, vr, conf_dir, conf, pw_file, work / "reference.log")),
            ]  # fmt: skip
            for name, mport, pport, server in sides:
                with server:
                    base = f"http://{mb.VR_ADDR}"
                    probe(guests, f"{base}:{mport}/latest/meta-data/instance-id")
                    probe(guests, f"{base}:{pport}/", SEND)
                    target = f"{mb.VR_ADDR}:{mport}:{pport}"
                    results[name] = run_clients(lab, guests, target, vms, secrets_file)
                    r = results[name]
                    print(f"{name}: {r.seconds:.1f}s, {r.failures} failed of {r.planned}",
                          flush=True)  # fmt: skip
        report(results, vms, cfg)
        if all(r.failures == 0 for r in results.values()):
            return 0
        kept = Path(tempfile.mkdtemp(prefix="vr-storm-logs-", dir="/var/tmp"))
        for log in ("ours.log", "reference.log", "apache/conf/error.log"):
            with contextlib.suppress(FileNotFoundError):
                shutil.copy(work / log, kept / log.replace("/", "-"))
        print(f"failures: the servers' logs (no passwords in them) are kept in {kept}")
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(results: dict[str, Result], vms: int, cfg: config.Config) -> None:
    a, b = results["vr"], results["apache"]
    print()
    print(f"boot storm: {vms} guests at once, each a cloud-init CloudStack crawl "
          f"({planned(guest(0, 'x'))} requests, a new connection each, "
          "every answer checked)")  # fmt: skip
    print(f"vr: serve-metadata + serve-passwords as `vr up` runs them ({cfg.metadata_workers}"
          f"+{cfg.password_workers} workers), default limits: {cfg.imds_rate_per_second}/s "
          f"per VM (burst {cfg.imds_rate_burst}), {PER_ADDRESS} connections per address "
          f"per worker")  # fmt: skip
    print(
        "apache: CloudStack's layout and vhost (event MPM, .htaccess rewrites) + a "
        "passwd_server_ip.py-style password server (bench/passwords.py)"
    )
    print(f"client: asyncio, {CLIENTS} processes, {os.cpu_count()} CPUs shared with the servers")
    rows = [
        ("total time s", lambda r: f"{r.seconds:.2f}"),
        ("requests answered", lambda r: f"{r.answered}"),
        ("failed (of planned)", lambda r: f"{r.failures} of {r.planned}"),
        ("requests/s", lambda r: f"{r.answered / r.seconds:.0f}"),
        ("request p50 ms", lambda r: f"{percentile(r.latencies, 0.5) * 1000:.1f}"),
        ("request p99 ms", lambda r: f"{percentile(r.latencies, 0.99) * 1000:.1f}"),
        ("  password p50 ms", lambda r: f"{percentile(r.password_latencies, 0.5) * 1000:.1f}"),
        ("  password p99 ms", lambda r: f"{percentile(r.password_latencies, 0.99) * 1000:.1f}"),
        ("crawl p50 s", lambda r: f"{percentile(r.crawls, 0.5):.2f}"),
        ("crawl p99 s", lambda r: f"{percentile(r.crawls, 0.99):.2f}"),
    ]
    print(f"{'':<22} {'vr':>16} {'apache':>16}")
    for label, fmt in rows:
        print(f"{label:<22} {fmt(a):>16} {fmt(b):>16}")
    print(f"{'time apache/vr':<22} {b.seconds / a.seconds:>16.2f}")
    for name, r in results.items():
        for reason, n in sorted(r.failed.items()):
            print(f"  {name} failed: {reason}: {n}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--client", type=int, required=True)
    ap.add_argument("--clients", type=int, required=True)
    ap.add_argument("--vms", type=int, required=True)
    ap.add_argument("--target", required=True, help="HOST:METADATA_PORT:PASSWORD_PORT")
    ap.add_argument("--secrets", required=True, help="JSON list of the expected passwords")
    return client(ap.parse_args())


if __name__ == "__main__":
    sys.exit(main())
