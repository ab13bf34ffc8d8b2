"""Benchmark: our metadata service against Apache configured as CloudStack's VR does it.

Run as root from the repository::

    PYTHONPATH=$PWD .venv/bin/python bench/metadata.py [--vms 1000] [--duration 10]

What it does, all inside two network namespaces it creates and always removes:

* lays out ``--vms`` VMs (2 KB user-data each) with ``vr.store`` and builds the same
  bytes in CloudStack's Apache layout (``metadata/<ip>/``, ``userdata/<ip>/``, the
  ``latest/.htaccess`` rewrite rules of cloudstack-vr.md §3.3, ``AllowOverride All``,
  Debian's stock event MPM settings, its own config dir, ports and PID file);
* serves it with (a) ``python -m vr serve-metadata`` and (b) ``apache2`` in the "vr"
  namespace; clients run in the "guest" namespace, which holds every VM's address;
* drives both with ``wrk`` at 50 and 400 connections for
  ``/latest/meta-data/instance-id`` and ``/latest/user-data``: both servers run at
  once, each is warmed up first, and ``--rounds`` (3) rounds alternate which side goes
  first; each cell shows the median round (failures summed over all rounds);
* runs a boot storm: every VM does a cloud-init crawl (user-data, index, each key;
  a new connection per request as cloud-init does), 20 VMs at a time, each from its
  own source address; failed requests are counted one by one, including those a
  crawl could not send because an earlier request of it failed;
* prints a side-by-side table with our/Apache ratios.

``--guest-api`` instead measures the guest API's additions: the per-VM rate limiter's
cost per request on the hot path (the WSGI application called in-process, with and
without the limiter, in the same run), and ``--vms`` concurrent ``wait_for_change``
waiters (one per VM, each from its own address) woken by one push that changes every
VM: how long until each got its new value, beside plain GETs of the same VMs.

``--rss`` instead lays out ``--vms`` (e.g. 10000) VMs, starts our service with every
VM loaded in each worker (``--warm``) and prints the workers' RSS against an empty
store. Every load loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import netns  # noqa: E402
from tests.helpers.vmdata import vm_payload, vm_triples  # noqa: E402
from vr.http.worker import PER_ADDRESS  # noqa: E402
from vr.metadata.vmcache import MAX_VMS  # noqa: E402
from vr.paths import Paths  # noqa: E402
from vr.payloads import parse_vm_metadata  # noqa: E402
from vr.store import Store, list_vms, read_vm  # noqa: E402

VR_ADDR = "10.77.0.1"
PREFIX = 16
OUR_PORT = 80
APACHE_PORT = 8000
PATHS = ("/latest/meta-data/instance-id", "/latest/user-data")
CONNECTIONS = (50, 400)
STORM_PARALLEL = 20
WARM_UP = 3  # seconds of wrk per server before the measured rounds
STORM_TIME_LIMIT = 300.0
# wrk's connections all come from the guest's one address: our per-VM connection
# limit is raised above the largest wrk run.
BENCH_PER_ADDRESS = 1000

SHIPPED_RULES = (
    ("user-data", "../userdata/%{REMOTE_ADDR}/user-data"),
    ("meta-data", "../metadata/%{REMOTE_ADDR}/meta-data"),
)
SHIPPED_KEYS = (
    "availability-zone",
    "cloud-identifier",
    "instance-id",
    "local-hostname",
    "local-ipv4",
    "public-hostname",
    "public-ipv4",
    "public-keys",
    "service-offering",
    "vm-id",
)


def vm_address(i: int) -> str:
    return str(IPv4Address("10.77.1.0") + i)


# --- layout --------------------------------------------------------------------------


USERDATA = ((("#cloud-config\n" + "# " + "x" * 60 + "\n" * 1) * 27).encode())[:2048]


def vm_push(i: int) -> dict[str, Any]:
    """The ``vm_metadata`` payload :func:`lay_out_store` pushes for VM ``i``."""
    return vm_payload(vm_address(i), userdata=USERDATA)


def lay_out_store(paths: Paths, count: int) -> None:
    """``count`` VMs with 2 KB user-data, pushed through the store in batches."""
    paths.ensure()
    store = Store(paths)
    batch = 500
    for start in range(0, count, batch):
        payloads = [parse_vm_metadata(vm_push(i)) for i in range(start, min(count, start + batch))]
        store.apply(payloads)


def lay_out_apache(paths: Paths, docroot: Path) -> None:
    """The same bytes in CloudStack's Apache layout (cloudstack-vr.md §2, §3.3)."""
    latest = docroot / "latest"
    latest.mkdir(parents=True)
    (docroot / ".htaccess").write_text("Options -Indexes\n")
    rules = ["Options +FollowSymLinks", "RewriteEngine On"]
    rules += [f"RewriteRule ^{name}/?$  {target} [L,NC,QSA]" for name, target in SHIPPED_RULES]
    rules.append("RewriteRule ^meta-data/(.+[^/])/?$  ../metadata/%{REMOTE_ADDR}/$1 [L,NC,QSA]")
    rules += [
        f"RewriteRule ^{k}/?$  ../metadata/%{{REMOTE_ADDR}}/{k} [L,NC,QSA]" for k in SHIPPED_KEYS
    ]
    # configure.py appends a rule the first time a name is pushed, so the rules
    # keep first-push order (it decides which of two names differing only in case
    # a case-insensitive /latest/<name> answers); a dict keeps that order.
    dynamic: dict[str, None] = {}
    for ip in list_vms(paths):
        rec = read_vm(paths, ip)
        assert rec is not None
        guard = f"Options -Indexes\nOrder Deny,Allow\nDeny from all\nAllow from {ip}\n"
        for folder, files in (("metadata", rec.metadata), ("userdata", rec.userdata)):
            d = docroot / folder / str(ip)
            d.mkdir(parents=True)
            (d / ".htaccess").write_text(guard)
            for name, data in files.items():
                (d / name).write_bytes(data)
                rule = f"RewriteRule ^{name}$  ../{folder}/%{{REMOTE_ADDR}}/{name} [L,NC,QSA]"
                dynamic.setdefault(rule)
        (docroot / "metadata" / str(ip) / "meta-data").write_bytes(rec.index)
    # (configure.py appends these two after the first metadata file; where they
    # stand does not matter: no file rule matches a path below meta-data/.)
    dynamic.setdefault("RewriteRule ^meta-data/(.+)$  ../metadata/%{REMOTE_ADDR}/$1 [L,NC,QSA]")
    dynamic.setdefault("RewriteRule ^meta-data/$  ../metadata/%{REMOTE_ADDR}/meta-data [L,NC,QSA]")
    (latest / ".htaccess").write_text("\n".join(rules + list(dynamic)) + "\n")
    for d, _, files in os.walk(docroot):
        os.chmod(d, 0o755)
        for f in files:
            os.chmod(Path(d) / f, 0o644)


APACHE_MODULES = (
    "mpm_event",
    "authz_core",
    "authz_host",
    "authn_core",
    "access_compat",
    "alias",
    "dir",
    "env",
    "filter",
    "mime",
    "negotiation",
    "reqtimeout",
    "setenvif",
    "deflate",
    "autoindex",
    "rewrite",
)


def apache_config(conf_dir: Path, docroot: Path) -> Path:
    """Debian's stock apache2.conf essentials plus CloudStack's vhost.template."""
    mods = "\n".join(
        f"LoadModule {m}_module /usr/lib/apache2/modules/mod_{m}.so" for m in APACHE_MODULES
    )
    conf = conf_dir / "apache2.conf"
    conf.write_text(
        f"""ServerRoot {conf_dir}
DefaultRuntimeDir {conf_dir}
PidFile {conf_dir}/apache2.pid
Mutex file:{conf_dir} default
ServerName vr.bench
User www-data
Group www-data
{mods}
Include /etc/apache2/mods-available/mpm_event.conf
Include /etc/apache2/mods-available/mime.conf
Include /etc/apache2/mods-available/reqtimeout.conf
Timeout 300
KeepAlive On
MaxKeepAliveRequests 100
KeepAliveTimeout 5
HostnameLookups Off
ErrorLog {conf_dir}/error.log
LogLevel warn
AccessFileName .htaccess
<Directory />
    Options FollowSymLinks
    AllowOverride None
    Require all denied
</Directory>
# Debian's apache2.conf grants /var/www/; the VR's document root lives there.
<Directory {docroot.parent}/>
    Options Indexes FollowSymLinks
    AllowOverride None
    Require all granted
</Directory>
Listen {VR_ADDR}:{APACHE_PORT}
<VirtualHost {VR_ADDR}:{APACHE_PORT}>
    ServerName router.bench
    DocumentRoot {docroot}
    <Directory {docroot}>
        Options Indexes FollowSymLinks MultiViews
        AllowOverride All
        Order allow,deny
        allow from all
    </Directory>
</VirtualHost>
"""
    )
    return conf


# --- measuring -----------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    failed: int
    requests: int
    p50_ms: float
    p99_ms: float


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"wrk latency {text!r}: expected a number with us/ms/s")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str) -> WrkResult:
    """Requests/s, failed requests (non-2xx/3xx plus socket errors), p50 and p99."""
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    total = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    failed = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        failed += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        failed += sum(int(x) for x in m.groups())
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    return WrkResult(rps, failed, total, _ms(lat["50"]), _ms(lat["99"]))


def run_wrk(guest: netns.Namespace, url: str, conns: int, duration: int) -> WrkResult:
    threads = 2
    res = guest.run(
        "wrk",
        f"-t{threads}",
        f"-c{conns}",
        f"-d{duration}s",
        "--timeout",
        "2s",
        "--latency",
        url,
        timeout=duration + 60,
    )
    return parse_wrk(res.stdout)


def keys_per_vm() -> int:
    """Metadata keys every benchmark VM has (``lay_out_store`` pushes the same set)."""
    return sum(1 for folder, _, _ in vm_triples(vm_address(0)) if folder == "metadata")


def requests_per_crawl() -> int:
    """user-data, the index, then each key."""
    return 2 + keys_per_vm()


def crawl(base: str, source: str, timeout: float = 10.0) -> int:
    """One cloud-init style crawl from ``source``; returns failed requests.

    Like cloud-init: user-data, the index with its trailing slash, then every key,
    each on a new connection. A request fails on a non-200 answer or any error;
    when the index fails, the key requests it would have led to count as failed
    too, so every crawl accounts for :func:`requests_per_crawl` requests.
    """
    host, port = base.split(":")

    def get(path: str) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection(
            host, int(port), timeout=timeout, source_address=(source, 0)
        )
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            return 0, b""
        finally:
            conn.close()

    failed = 0
    status, _ = get("/latest/user-data")
    failed += status != 200
    status, index = get("/latest/meta-data/")
    if status != 200:
        return failed + 1 + keys_per_vm()
    keys = [k for k in index.decode().split("\n") if k]
    failed += max(0, keys_per_vm() - len(keys))  # keys missing from the index
    for key in keys:
        failed += get(f"/latest/meta-data/{key}")[0] != 200
    return failed


STORM_PROCESSES = 4


def _storm_chunk(base: str, indices: list[int], threads: int, deadline: float) -> int:
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        futures = [pool.submit(crawl, base, vm_address(i)) for i in indices]
        for f in futures:
            try:
                failed += f.result(timeout=max(0.1, deadline - time.monotonic()))
            except Exception:
                # Over the time limit (or a client bug): none of its requests counts
                # as answered.
                failed += requests_per_crawl()
    return failed


def storm_client(base: str, count: int, parallel: int) -> None:
    """Run inside the guest namespace: ``count`` crawls, ``parallel`` at a time.

    The crawls are spread over several client processes (threads within each) so
    the Python client's GIL is not what the storm measures.
    """
    deadline = time.monotonic() + STORM_TIME_LIMIT
    start = time.monotonic()
    procs = min(STORM_PROCESSES, parallel)
    chunks = [list(range(count))[i::procs] for i in range(procs)]
    with concurrent.futures.ProcessPoolExecutor(procs) as pool:
        futures = [
            pool.submit(_storm_chunk, base, c, max(1, parallel // procs), deadline) for c in chunks
        ]
        failed = sum(f.result() for f in futures)
    print(f"storm {time.monotonic() - start:.3f} {failed} {count * requests_per_crawl()}")


def run_storm(guest: netns.Namespace, base: str, count: int) -> tuple[float, int, int]:
    """Seconds, failed requests and requests of a storm of ``count`` crawls."""
    res = guest.run(
        sys.executable,
        str(Path(__file__).resolve()),
        "--storm-client",
        base,
        "--vms",
        str(count),
        timeout=STORM_TIME_LIMIT + 60,
    )
    _, seconds, failed, total = res.stdout.split()
    return float(seconds), int(failed), int(total)


# --- servers -------------------------------------------------------------------------


@contextlib.contextmanager
def our_server(
    lab: netns.Lab, vr: netns.Namespace, root: Path, args: argparse.Namespace, log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    cmd = [
        sys.executable,
        "-m",
        "vr",
        "serve-metadata",
        "--root",
        str(root),
        "--bind",
        f"{VR_ADDR}:{OUR_PORT}",
        "--workers",
        str(args.workers),
        "--worker-class",
        args.worker_class,
        "--threads",
        str(args.threads),
        # wrk opens all its connections (up to 400) from the guest's one address;
        # the default per-VM limit (PER_ADDRESS per worker) would refuse most of them.
        "--connections-per-address",
        str(BENCH_PER_ADDRESS),
    ] + (["--warm"] if args.warm else [])
    with open(log, "wb") as out:
        p = lab.spawn(vr, cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO))
    try:
        vr.run(sys.executable, "-c", _WAIT_PORT.format(VR_ADDR, OUR_PORT))
        yield p
    finally:
        netns.stop(p, timeout=10)


_WAIT_PORT = (
    "import socket,time\n"
    "for _ in range(300):\n"
    "    try: socket.create_connection(({!r},{}),0.5).close(); break\n"
    "    except OSError: time.sleep(0.05)\n"
    "else: raise SystemExit('port not open')\n"
)


@contextlib.contextmanager
def apache_server(vr: netns.Namespace, conf_dir: Path, conf: Path) -> Iterator[int]:
    vr.run("/usr/sbin/apache2", "-f", str(conf), "-k", "start")
    pid = 0
    try:
        vr.run(sys.executable, "-c", _WAIT_PORT.format(VR_ADDR, APACHE_PORT))
        pid = int((conf_dir / "apache2.pid").read_text().split()[0])
        yield pid
    finally:
        if not pid:
            with contextlib.suppress(OSError, ValueError):
                pid = int((conf_dir / "apache2.pid").read_text().split()[0])
        if pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 15)
            for _ in range(100):
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)


def setup_lab(lab: netns.Lab, count: int) -> tuple[netns.Namespace, netns.Namespace]:
    vr = lab.host("vr")
    guest = lab.host("guest")
    lab.link(vr, "eth0", f"{VR_ADDR}/{PREFIX}", guest, "eth0", None)
    batch = "".join(f"addr add {vm_address(i)}/{PREFIX} dev eth0\n" for i in range(count))
    guest.run("ip", "-batch", "-", input=batch)
    return vr, guest


# --- the guest API: rate limiter and long-poll waiters --------------------------------


def limiter_cost(root: Path, calls: int = 20000) -> tuple[float, float]:
    """Microseconds per in-process GET of the metadata app without and with the limiter."""
    from vr.metadata import ratelimit
    from vr.metadata.app import create_app

    paths = Paths(root / "limiter")
    lay_out_store(paths, 1)
    table = root / "rate"
    ratelimit.create(table)
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": "/latest/meta-data/instance-id",
        "QUERY_STRING": "",
        "REMOTE_ADDR": vm_address(0),
    }
    figures = []
    for limiter in (None, ratelimit.RateLimiter(table, 10**9, 10**9)):
        app = create_app(paths, limiter=limiter).wsgi_app
        start = time.perf_counter()
        for _ in range(calls):
            app(dict(environ), lambda status, headers, exc=None: None)
        figures.append((time.perf_counter() - start) / calls * 1e6)
    return figures[0], figures[1]


def waiters_client(base: str, count: int) -> None:
    """In the guest namespace: one waiter per VM; prints the arrival time of each
    answer (CLOCK_MONOTONIC, shared with the parent) as JSON, after "HELD"."""
    import json
    import selectors
    import socket

    from vr.metadata.changes import etag

    host, port = base.split(":")
    plain = []
    for i in range(count):  # reference: the same VMs' plain GET, one connection each
        t = time.monotonic()
        c = http.client.HTTPConnection(host, int(port), source_address=(vm_address(i), 0))
        c.request("GET", "/latest/meta-data/local-hostname")
        c.getresponse().read()
        c.close()
        plain.append(time.monotonic() - t)
    sel = selectors.DefaultSelector()
    for i in range(count):
        s = socket.socket()
        s.bind((vm_address(i), 0))
        s.connect((host, int(port)))
        tag = etag(f"vm-{vm_address(i).replace('.', '-')}".encode()).strip('"')
        q = f"wait_for_change=true&last_etag={tag}&timeout_sec=120"
        s.sendall(f"GET /latest/meta-data/local-hostname?{q} HTTP/1.1\r\nHost: vr\r\n\r\n".encode())
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    print("HELD", flush=True)
    arrived: list[float] = []
    deadline = time.monotonic() + 120
    while len(arrived) < count and time.monotonic() < deadline:
        for key, _ in sel.select(1.0):
            data = key.fileobj.recv(65536)  # type: ignore[union-attr]
            if data.startswith(b"HTTP/1.1 200") or not data:
                arrived.append(time.monotonic())
                sel.unregister(key.fileobj)
                key.fileobj.close()  # type: ignore[union-attr]
    print(json.dumps({"arrived": arrived, "plain": plain}), flush=True)


def bench_guest_api(args: argparse.Namespace) -> None:
    import json
    import statistics

    tmp = Path(tempfile.mkdtemp(prefix="vr-bench-guestapi-"))
    try:
        without, with_limiter = limiter_cost(tmp)
        print(f"{'in-process GET, no rate limiter':<44} {without:>10.1f} us")
        print(f"{'in-process GET, with the shared limiter':<44} {with_limiter:>10.1f} us")
        print(f"{'limiter cost per request':<44} {with_limiter - without:>10.1f} us")
        paths = Paths(tmp / "vrroot")
        lay_out_store(paths, args.vms)
        paths.config.write_text(json.dumps({"imds_rate_burst": 1000}))
        with netns.lab() as lab:
            vr, guest = setup_lab(lab, args.vms)
            with our_server(lab, vr, paths.root, args, tmp / "serve.log"):
                client = lab.spawn(
                    guest,
                    [sys.executable, str(Path(__file__).resolve()),
                     "--waiters-client", f"{VR_ADDR}:{OUR_PORT}", "--vms", str(args.vms)],
                    stdout=subprocess.PIPE, text=True, cwd=str(REPO),
                )  # fmt: skip
                assert client.stdout is not None
                assert client.stdout.readline().strip() == "HELD"
                time.sleep(2)  # let every request reach its worker and be held
                renamed = [
                    parse_vm_metadata(
                        vm_payload(vm_address(i), [["metadata", "local-hostname", f"new-{i}"]])
                    )
                    for i in range(args.vms)
                ]
                Store(paths).apply(renamed)
                pushed = time.monotonic()
                result = json.loads(client.stdout.readline())
                client.wait(30)
        woken = sorted(t - pushed for t in result["arrived"])
        plain = sorted(result["plain"])
        print(f"{'waiters woken by one push':<44} {len(woken):>10} of {args.vms}")
        for label, values in (("push -> waiter answered", woken), ("plain GET (reference)", plain)):
            p50 = statistics.median(values) * 1000
            p99 = values[int(len(values) * 0.99) - 1] * 1000
            low, top = values[0] * 1000, values[-1] * 1000
            print(f"{label:<32} min {low:6.1f} p50 {p50:6.1f} p99 {p99:6.1f} max {top:6.1f} ms")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- main ----------------------------------------------------------------------------


def _row(label: str, ours: str, apache: str, ratio: str) -> str:
    return f"{label:<44} {ours:>14} {apache:>14} {ratio:>8}"


def bench(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="vrbench-"))
    os.chmod(work, 0o755)
    try:
        paths = Paths(work / "root")
        t = time.monotonic()
        lay_out_store(paths, args.vms)
        # wrk's connections all come from one guest address, i.e. one VM: the per-VM
        # rate limit (a guard against one VM, not a cost of serving) is off here, as
        # Apache has none; --guest-api measures the limiter's cost on the hot path.
        paths.config.write_text(json.dumps({"imds_rate_per_second": 0}))
        docroot = work / "apache" / "html"
        lay_out_apache(paths, docroot)
        conf_dir = work / "apache" / "conf"
        conf_dir.mkdir(parents=True)
        conf = apache_config(conf_dir, docroot)
        # Tens of thousands of files were just written: flush them now, or the
        # kernel's write-back competes with whichever server is measured first.
        os.sync()
        print(f"laid out {args.vms} VMs in {time.monotonic() - t:.1f}s under {work}")
        sides = [n for n in ("ours", "apache") if n not in args.skip]
        results: dict[str, dict[str, object]] = {n: {} for n in ("ours", "apache")}
        with netns.lab() as lab, contextlib.ExitStack() as running:
            vr, guest = setup_lab(lab, args.vms)
            base = {"ours": f"{VR_ADDR}:{OUR_PORT}", "apache": f"{VR_ADDR}:{APACHE_PORT}"}
            # Both servers run for the whole measurement (an idle one costs nothing),
            # so the rounds can alternate which side goes first.
            for name in sides:
                running.enter_context(
                    our_server(lab, vr, paths.root, args, work / "ours.log")
                    if name == "ours"
                    else apache_server(vr, conf_dir, conf)
                )
                for path in PATHS:
                    check_200(guest, name, f"http://{base[name]}{path}")
                # Warm-up, not counted: first requests load the VM, fill caches and
                # grow the server's pools.
                run_wrk(guest, f"http://{base[name]}{PATHS[0]}", CONNECTIONS[-1], WARM_UP)
            runs: dict[str, dict[str, list[WrkResult]]] = {n: {} for n in sides}
            for rnd in range(args.rounds):
                order = sides if rnd % 2 == 0 else sides[::-1]
                for path in PATHS:
                    for c in CONNECTIONS:
                        for name in order:
                            r = run_wrk(guest, f"http://{base[name]}{path}", c, args.duration)
                            runs[name].setdefault(f"{path} c={c}", []).append(r)
                            print(f"round {rnd + 1} {name:>6} {path} c={c}: {r}", flush=True)
            for name in sides:
                for key, rs in runs[name].items():
                    results[name][key] = median_run(rs)
            if not args.no_storm:
                for name in sides:
                    results[name]["storm"] = run_storm(guest, base[name], args.vms)
                    print(f"{name:>6} storm: {results[name]['storm']}", flush=True)
        report(results, args)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def check_200(guest: netns.Namespace, name: str, url: str) -> None:
    check = guest.run_bytes("curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", url)
    if check.stdout != b"200":
        raise SystemExit(f"{name} {url}: HTTP {check.stdout!r}, expected 200")


def median_run(rs: list[WrkResult]) -> WrkResult:
    """The run with the median req/s; its failures are the sum over every run."""
    mid = sorted(rs, key=lambda r: r.rps)[len(rs) // 2]
    return WrkResult(
        mid.rps,
        sum(r.failed for r in rs),
        sum(r.requests for r in rs),
        mid.p50_ms,
        mid.p99_ms,
    )


def report(results: dict[str, dict[str, object]], args: argparse.Namespace) -> None:
    ours, apache = results["ours"], results["apache"]
    print()
    print(
        f"metadata benchmark: {args.vms} VMs, wrk {args.duration}s per run, median of "
        f"{args.rounds} rounds per cell (order alternating; failed/requests over all), ours = "
        f"{args.workers} {args.worker_class} workers"
        + (f" x {args.threads} threads" if args.worker_class == "gthread" else "")
        + ", "
        f"{os.cpu_count()} CPUs"
    )
    print(
        f"ours runs with --connections-per-address {BENCH_PER_ADDRESS}: wrk opens all its "
        f"connections from one address, which the default per-VM limit ({PER_ADDRESS} "
        "per worker) would refuse"
    )
    print(
        "clients (wrk, storm) run in a 'guest' namespace, reaching both servers in a 'vr' "
        "namespace over a veth pair"
    )
    print(_row("", "ours", "apache", "ratio"))
    skipped = "-"  # a side left out with --skip

    def cell(r: object, fmt: Callable[[WrkResult], str]) -> str:
        return fmt(r) if isinstance(r, WrkResult) else skipped

    for path in PATHS:
        for c in CONNECTIONS:
            key = f"{path} c={c}"
            a, b = ours.get(key), apache.get(key)
            if not isinstance(a, WrkResult) and not isinstance(b, WrkResult):
                continue
            ratio = (
                f"{a.rps / b.rps:.2f}"
                if isinstance(a, WrkResult) and isinstance(b, WrkResult)
                else ""
            )
            print(_row(f"{key} req/s", cell(a, lambda r: f"{r.rps:.0f}"),
                       cell(b, lambda r: f"{r.rps:.0f}"), ratio))  # fmt: skip
            print(_row("   failed / requests", cell(a, lambda r: f"{r.failed}/{r.requests}"),
                       cell(b, lambda r: f"{r.failed}/{r.requests}"), ""))  # fmt: skip
            print(_row("   p50 ms", cell(a, lambda r: f"{r.p50_ms:.2f}"),
                       cell(b, lambda r: f"{r.p50_ms:.2f}"), ""))  # fmt: skip
            print(_row("   p99 ms", cell(a, lambda r: f"{r.p99_ms:.2f}"),
                       cell(b, lambda r: f"{r.p99_ms:.2f}"), ""))  # fmt: skip
    sa, sb = ours.get("storm"), apache.get("storm")
    if isinstance(sa, tuple) or isinstance(sb, tuple):
        both = isinstance(sa, tuple) and isinstance(sb, tuple)
        print(
            _row(
                f"boot storm {args.vms} crawls x{STORM_PARALLEL} s",
                f"{sa[0]:.2f}" if isinstance(sa, tuple) else skipped,
                f"{sb[0]:.2f}" if isinstance(sb, tuple) else skipped,
                f"{sb[0] / sa[0]:.2f}" if both else "",  # type: ignore[index]
            )
        )
        print(
            _row(
                "   failed / requests",
                f"{sa[1]}/{sa[2]}" if isinstance(sa, tuple) else skipped,
                f"{sb[1]}/{sb[2]}" if isinstance(sb, tuple) else skipped,
                "",
            )
        )
    print("ratio: ours/apache for req/s; apache/ours for storm time (>1 = we are faster)")


# --- RSS -----------------------------------------------------------------------------


def worker_pids(arbiter: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if ppid == arbiter:
            out.append(int(d))
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise ValueError(f"no VmRSS for pid {pid}")


def find_arbiter(p: subprocess.Popen[bytes]) -> int:
    """``ip netns exec`` execs the command, so the spawned PID is gunicorn's arbiter."""
    return p.pid


def measure_rss(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="vrbench-rss-"))
    try:
        sizes = {}
        for label, count in (("empty store", 0), (f"{args.vms} VMs", args.vms)):
            paths = Paths(work / f"root{count}")
            t = time.monotonic()
            lay_out_store(paths, count)
            laid = time.monotonic() - t
            args.warm = True
            with netns.lab() as lab:
                vr = lab.host("vr")
                vr.run("ip", "addr", "add", f"{VR_ADDR}/32", "dev", "lo")
                log = work / f"rss{count}.log"
                with our_server(lab, vr, paths.root, args, log) as p:
                    deadline = time.monotonic() + 300
                    held = min(count, MAX_VMS)  # a worker keeps at most MAX_VMS
                    while log.read_text().count(f"loaded {held} VMs") < args.workers:
                        if time.monotonic() > deadline:
                            raise SystemExit(f"workers did not load {count} VMs: see {log}")
                        time.sleep(0.2)
                    pids = worker_pids(find_arbiter(p))
                    rss = [rss_kib(pid) for pid in pids]
                    sizes[label] = (rss, rss_kib(p.pid))
            print(
                f"{label}: laid out in {laid:.1f}s, worker RSS KiB {rss}, arbiter {sizes[label][1]}"
            )
        (e, _ea), (f, fa) = sizes["empty store"], sizes[f"{args.vms} VMs"]
        per_vm = (sum(f) - sum(e)) * 1024 / max(1, args.vms) / max(1, len(f))
        print(
            f"RSS of all {len(f)} workers: {sum(e) / 1024:.1f} MiB empty, "
            f"{sum(f) / 1024:.1f} MiB with {args.vms} VMs loaded in each "
            f"(~{per_vm:.0f} bytes per VM per worker; arbiter {fa / 1024:.1f} MiB)"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--vms", type=int, default=1000)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--rounds", type=int, default=3, help="wrk runs per cell; the median counts")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--worker-class", default="event")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warm", action="store_true", help="load all VMs in workers at start")
    ap.add_argument("--skip", nargs="*", default=[], choices=["ours", "apache"])
    ap.add_argument("--no-storm", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    ap.add_argument("--rss", action="store_true", help="measure worker RSS instead")
    ap.add_argument("--storm-client", metavar="HOST:PORT", help=argparse.SUPPRESS)
    ap.add_argument("--guest-api", action="store_true", help="rate limiter and waiters")
    ap.add_argument("--waiters-client", metavar="HOST:PORT", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.waiters_client:
        waiters_client(args.waiters_client, args.vms)
        return
    if args.storm_client:
        storm_client(args.storm_client, args.vms, STORM_PARALLEL)
        return
    if os.geteuid() != 0:
        raise SystemExit("bench/metadata.py needs root (network namespaces, apache2)")
    if args.guest_api:
        bench_guest_api(args)
    elif args.rss:
        measure_rss(args)
    else:
        bench(args)


if __name__ == "__main__":
    main()
