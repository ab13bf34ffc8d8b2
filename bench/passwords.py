"""Benchmark: our password server against a reference built like CloudStack's.

Run as root from the repository::

    PYTHONPATH=$PWD /work/devvenv/bin/python bench/passwords.py [--duration 10] [--workers 2]

What it does, inside two network namespaces it creates and always removes:

* stores a random password for the guest's address in our store and in the
  reference's password file (neither is ever printed);
* serves it with (a) ``python -m vr serve-passwords`` and (b) the reference: a Python
  ``ThreadingMixIn`` + ``HTTPServer`` (one thread per connection, HTTP/1.0, listen
  backlog ``request_queue_size = 5``, one lock around the password map) implementing
  the same DomU_Request protocol — the design of CloudStack's ``passwd_server_ip.py``,
  written here from its description, no CloudStack code;
* checks that both answer the guest's password, then drives each in turn with ``wrk``
  and the header ``DomU_Request: send_my_password`` at 50 and 400 connections
  (``--timeout 2s``: a request slower than that counts as failed);
* prints requests/s, failed requests, p50 and p99 side by side with ratios.

Our server writes its audit line for every fetch (as in production); the reference
logs nothing. Every load run is bounded by ``--duration``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, HTTPServer
from ipaddress import IPv4Address
from pathlib import Path
from socketserver import ThreadingMixIn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import netns  # noqa: E402
from vr.paths import Paths  # noqa: E402
from vr.payloads import VmPassword  # noqa: E402
from vr.store import Store  # noqa: E402

VR_ADDR = "10.78.0.1"
GUEST_ADDR = "10.78.0.2"
OUR_PORT = 8080
REF_PORT = 8081
CONNECTIONS = (50, 400)
HEADER = "DomU_Request: send_my_password"


# --- the reference server (runs in its own process inside the "vr" namespace) ----------


class _RefHandler(BaseHTTPRequestHandler):
    """CloudStack's protocol, answered the way a BaseHTTPRequestHandler does (HTTP/1.0)."""

    server: _RefServer

    def do_GET(self) -> None:
        request = self.headers.get("DomU_Request")
        ip = self.client_address[0]
        with self.server.lock:
            if request == "send_my_password":
                body = self.server.passwords.get(ip, "saved_password")
            elif request == "saved_password":
                self.server.passwords.pop(ip, None)
                body = "saved_password"
            else:
                body = "bad_request"
        self.send_response(200)
        self.send_header("Content-type", "text/plain")
        self.end_headers()
        self.wfile.write(body.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass  # quiet: logging would only slow the reference down


class _RefServer(ThreadingMixIn, HTTPServer):
    request_queue_size = 5  # the listen backlog CloudStack's server runs with
    daemon_threads = True

    def __init__(self, addr: tuple[str, int], passwords: dict[str, str]) -> None:
        super().__init__(addr, _RefHandler)
        self.passwords = passwords
        self.lock = threading.RLock()


def serve_reference(addr: str, port: int, password_file: Path) -> None:
    passwords = {}
    for line in password_file.read_text().splitlines():
        ip, _, pw = line.partition("=")
        passwords[ip] = pw
    _RefServer((addr, port), passwords).serve_forever()


# --- measuring -----------------------------------------------------------------------


@dataclass
class WrkResult:
    rps: float
    requests: int
    non_2xx: int
    connect: int
    read: int
    write: int
    timeout: int
    p50_ms: float
    p99_ms: float
    close_delimited: bool = False
    """The server ends every reply by closing (HTTP/1.0, no Content-Length)."""

    @property
    def failed(self) -> int:
        """Requests a client saw fail: bad status, refused/timed-out connections, write
        errors, and read errors (for a close-delimited server, those beyond the close
        that ends every reply)."""
        return self.non_2xx + self.connect + self.write + self.timeout + self.broken_reads

    @property
    def broken_reads(self) -> int:
        if not self.close_delimited:
            # keep-alive with Content-Length: every read error is a real one
            return self.read
        # wrk counts the server's close after a close-delimited reply as a read error
        # even though the reply was complete: one per request is expected.
        return max(0, self.read - self.requests)


_UNITS = {"us": 0.001, "ms": 1.0, "s": 1000.0}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s)", text)
    if not m:
        raise ValueError(f"wrk latency {text!r}: expected a number with us/ms/s")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_wrk(out: str, close_delimited: bool = False) -> WrkResult:
    """Requests/s, failed requests (non-2xx/3xx plus socket errors), p50 and p99.

    ``close_delimited``: the server closes after each reply, so one read error per
    request is that close, not a failure.
    """
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    if not rps or not total:
        raise ValueError(f"wrk output without totals: {out[:200]!r}")
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    non_2xx = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    connect, read, write, timeout = (int(x) for x in m.groups()) if m else (0, 0, 0, 0)
    lat = dict(re.findall(r"^\s+(50|99)%\s+(\S+)", out, re.M))
    return WrkResult(
        float(rps.group(1)),
        int(total.group(1)),
        non_2xx,
        connect,
        read,
        write,
        timeout,
        _ms(lat["50"]),
        _ms(lat["99"]),
        close_delimited,
    )


def run_wrk(
    guest: netns.Namespace, url: str, conns: int, duration: int, close_delimited: bool
) -> WrkResult:
    res = guest.run(
        "wrk", "-t2", f"-c{conns}", f"-d{duration}s", "--timeout", "2s", "--latency",
        "-H", HEADER, url,
        timeout=duration + 60,
    )  # fmt: skip
    return parse_wrk(res.stdout, close_delimited)


def fingerprint(data: bytes | str) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return hashlib.sha256(raw).hexdigest()[:16]


def check_answers(guest: netns.Namespace, port: int, password: str) -> None:
    """The server hands the guest its password (compared by fingerprint only)."""
    res = guest.run_bytes(
        "wget", "-q", "-t", "3", "-T", "20", "-O", "-", "--header", HEADER,
        f"http://{VR_ADDR}:{port}",
    )  # fmt: skip
    if res.returncode != 0 or fingerprint(res.stdout) != fingerprint(password):
        raise SystemExit(f"server on port {port} did not answer the guest's password")


# --- servers -------------------------------------------------------------------------

_WAIT_PORT = "from tests.helpers.procs import wait_port; wait_port({!r}, {})"


@contextlib.contextmanager
def server(
    lab: netns.Lab, vr: netns.Namespace, cmd: list[str], port: int, log: Path
) -> Iterator[None]:
    with open(log, "wb") as out:
        p = lab.spawn(vr, cmd, stdout=out, stderr=subprocess.STDOUT, cwd=str(REPO))
    try:
        vr.run(sys.executable, "-c", _WAIT_PORT.format(VR_ADDR, port), timeout=30)
        yield
    finally:
        netns.stop(p, timeout=10)


def _row(label: str, ours: str, ref: str, ratio: str) -> str:
    return f"{label:<34} {ours:>12} {ref:>12} {ratio:>9}"


def bench(args: argparse.Namespace) -> None:
    password = secrets.token_urlsafe(12)
    results: dict[tuple[str, int], WrkResult] = {}
    with tempfile.TemporaryDirectory(prefix="vr-bench-pw-") as tmp, netns.lab() as lab:
        os.chmod(tmp, 0o700)
        paths = Paths(Path(tmp) / "root")
        paths.ensure()
        Store(paths).apply([VmPassword(IPv4Address(GUEST_ADDR), password)])
        ref_file = Path(tmp) / "passwords-reference"
        ref_file.write_text(f"{GUEST_ADDR}={password}\n")
        vr, guest = lab.host("vr"), lab.host("guest")
        lab.link(vr, "eth0", f"{VR_ADDR}/24", guest, "eth0", f"{GUEST_ADDR}/24")
        ours = [sys.executable, "-m", "vr", "serve-passwords", "--root", str(paths.root)]
        ours += ["--bind", f"{VR_ADDR}:{OUR_PORT}", "--workers", str(args.workers)]
        ours += ["--worker-class", args.worker_class]
        # wrk's 400 connections all come from one address; the default per-VM
        # limit (64 per worker) would refuse most of them.
        ours += ["--connections-per-address", "1000"]
        ref = [sys.executable, str(Path(__file__).resolve()), "--reference-server"]
        ref += [VR_ADDR, str(REF_PORT), str(ref_file)]
        # Only the reference answers HTTP/1.0 and closes after every reply; ours keeps
        # connections alive, so a read error there is a real failure.
        servers = (("ours", ours, OUR_PORT, False), ("reference", ref, REF_PORT, True))
        for name, cmd, port, close_delimited in servers:
            with server(lab, vr, cmd, port, Path(tmp) / f"{name}.log"):
                check_answers(guest, port, password)
                for conns in CONNECTIONS:
                    url = f"http://{VR_ADDR}:{port}/"
                    results[(name, conns)] = run_wrk(
                        guest, url, conns, args.duration, close_delimited
                    )
    report(results, args)


def report(results: dict[tuple[str, int], WrkResult], args: argparse.Namespace) -> None:
    print(
        f"password server benchmark: wrk -t2 --timeout 2s, {args.duration}s per cell, "
        f"header '{HEADER}'\nours = vr serve-passwords ({args.workers} {args.worker_class} "
        f"workers, audit log on); reference = ThreadingMixIn HTTPServer, backlog 5"
    )
    print(_row("", "ours", "reference", "ratio"))
    for conns in CONNECTIONS:
        o, r = results[("ours", conns)], results[("reference", conns)]
        print(_row(f"{conns} conns: requests/s", f"{o.rps:.0f}", f"{r.rps:.0f}", _x(o.rps, r.rps)))
        print(_row(f"{conns} conns: requests", str(o.requests), str(r.requests), ""))
        print(_row(f"{conns} conns: failed requests", str(o.failed), str(r.failed), ""))
        for what in ("non_2xx", "connect", "timeout", "write", "read"):
            a, b = getattr(o, what), getattr(r, what)
            print(_row(f"  wrk {what.replace('_', '-')} errors", str(a), str(b), ""))
        print(
            _row(
                f"{conns} conns: p50 ms",
                f"{o.p50_ms:.2f}",
                f"{r.p50_ms:.2f}",
                _x(r.p50_ms, o.p50_ms),
            )
        )
        print(
            _row(
                f"{conns} conns: p99 ms",
                f"{o.p99_ms:.2f}",
                f"{r.p99_ms:.2f}",
                _x(r.p99_ms, o.p99_ms),
            )
        )
    print("ratio: how many times better ours is (throughput ours/ref, latency ref/ours)")
    print(
        "failed = non-2xx + connect + timeout + write + read errors; for the reference only\n"
        "the read errors beyond one per request (wrk counts the close ending each HTTP/1.0\n"
        "reply as a read error; ours keeps connections alive, so all of its count)"
    )


def _x(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b else "-"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run (default 10)")
    ap.add_argument("--workers", type=int, default=2, help="our worker processes (default 2)")
    ap.add_argument("--worker-class", choices=["event", "sync"], default="event")
    ap.add_argument("--reference-server", nargs=3, metavar=("ADDR", "PORT", "FILE"))
    args = ap.parse_args()
    if args.reference_server:
        addr, port, path = args.reference_server
        serve_reference(addr, int(port), Path(path))
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root: the benchmark builds network namespaces")
    if not 1 <= args.duration <= 120:
        raise SystemExit(f"--duration {args.duration}: expected 1..120 seconds")
    bench(args)


if __name__ == "__main__":
    main()
