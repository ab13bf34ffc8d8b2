"""DHCP host changes with 1,000 entries: vr's way (rewrite the hosts file, SIGHUP)
beside CloudStack's (rewrite the hosts file, restart dnsmasq), in the same run.

Two network namespaces joined by a veth pair: dnsmasq (configured by
:mod:`vr.dhcp.model`) in one, ``dhclient`` in the other. Measured per round:

- push cost: render the 1,000 entries, write the changed hosts file, reload
  (SIGHUP) or restart (until dnsmasq answers DNS again);
- push to lease: from the start of the push until ``dhclient`` holds the new
  entry's lease.

Run as root: ``.venv/bin/python bench/dhcp.py [--entries 1000] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

from vr.config import Config
from vr.dhcp import model
from vr.payloads import DhcpEntry, GuestNetwork

NET = IPv4Network("10.9.0.0/16")
ROUTER = IPv4Address("10.9.0.1")


def sh(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=60)


def entries(n: int, extra: int | None = None) -> list[DhcpEntry]:
    out = [
        DhcpEntry(f"02:00:00:00:{i // 256:02x}:{i % 256:02x}", NET[10 + i], f"vm-{i}")
        for i in range(n)
    ]
    if extra is not None:
        out.append(DhcpEntry("02:aa:00:00:00:01", NET[5000 + extra], "newcomer"))
    return out


@contextlib.contextmanager
def lab() -> Iterator[tuple[str, str, Path]]:
    tag = f"vrb{os.getpid() % 10000}"
    srv, cli = f"{tag}s", f"{tag}c"
    work = Path(tempfile.mkdtemp(prefix="vr-bench-dhcp-"))
    work.chmod(0o755)
    try:
        for ns in (srv, cli):
            sh("ip", "netns", "add", ns)
        sh("ip", "link", "add", f"{tag}a", "type", "veth", "peer", "name", f"{tag}b")
        sh("ip", "link", "set", f"{tag}a", "netns", srv)
        sh("ip", "link", "set", f"{tag}b", "netns", cli)
        sh("ip", "netns", "exec", srv, "ip", "link", "set", f"{tag}a", "name", "eth0")
        sh("ip", "netns", "exec", cli, "ip", "link", "set", f"{tag}b", "name", "eth0")
        sh("ip", "netns", "exec", cli, "ip", "link", "set", "eth0", "address", "02:aa:00:00:00:01")
        sh("ip", "netns", "exec", srv, "ip", "addr", "add", f"{ROUTER}/16", "dev", "eth0")
        for ns in (srv, cli):
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
        yield srv, cli, work
    finally:
        for ns in (srv, cli):
            for pid in sh("ip", "netns", "pids", ns, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            sh("ip", "netns", "del", ns, check=False)
        shutil.rmtree(work, ignore_errors=True)


class Server:
    def __init__(self, ns: str, work: Path) -> None:
        self.ns, self.work = ns, work
        self.where = model.Locations(
            str(work / "hosts"), str(work / "opts"), str(work / "names"), str(work / "leases")
        )
        self.net = GuestNetwork("eth0", ROUTER, NET, True)
        self.cfg = Config(control_device="eth9", public_devices=())
        self.proc: subprocess.Popen[bytes] | None = None

    def write(self, hosts: list[DhcpEntry]) -> None:
        files = model.render(self.cfg, [self.net], hosts, "router", self.where)
        (self.work / "dnsmasq.conf").write_bytes(files.conf)
        for name, data in files.reloadable().items():
            tmp = self.work / f".{name}.tmp"
            tmp.write_bytes(data)
            tmp.replace(self.work / name)

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", self.ns, "dnsmasq", "--keep-in-foreground",
             f"--conf-file={self.work / 'dnsmasq.conf'}", "--pid-file", "--log-facility=/dev/null"],
        )  # fmt: skip
        self.wait_dns()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)

    def wait_dns(self) -> None:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = sh("ip", "netns", "exec", self.ns, "dig", "+short", "+time=1", "+tries=1",
                   "@127.0.0.1", "data-server", check=False)  # fmt: skip
            if r.stdout.strip() == str(ROUTER):
                return
        raise RuntimeError("dnsmasq does not answer")


def lease(ns: str, work: Path) -> None:
    conf = work / "dhclient.conf"
    conf.write_text("timeout 30;\nretry 1;\n")
    r = sh("ip", "netns", "exec", ns, "dhclient", "-4", "-1", "-cf", str(conf), "-lf",
           str(work / "dhclient.leases"), "-pf", str(work / "dhclient.pid"), "-sf", "/bin/true",
           "eth0", check=False)  # fmt: skip
    if r.returncode != 0:
        raise RuntimeError(f"no lease: {r.stderr[-300:]}")
    sh("ip", "netns", "exec", ns, "dhclient", "-x", "-pf", str(work / "dhclient.pid"), check=False)
    (work / "dhclient.leases").unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--entries", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    results: dict[str, dict[str, list[float]]] = {
        w: {"push": [], "lease": []} for w in ("vr (SIGHUP)", "CloudStack (restart)")
    }
    with lab() as (srv, cli, work):
        server = Server(srv, work)
        server.write(entries(args.entries))
        server.start()
        try:
            for r in range(args.rounds):
                for way in results:
                    server.write(entries(args.entries))  # newcomer absent again
                    assert server.proc is not None
                    server.proc.send_signal(signal.SIGHUP)
                    server.wait_dns()
                    start = time.perf_counter()
                    server.write(entries(args.entries, extra=r))
                    if way.startswith("vr"):
                        server.proc.send_signal(signal.SIGHUP)
                    else:
                        server.stop()
                        server.start()
                    pushed = time.perf_counter()
                    lease(cli, work)
                    done = time.perf_counter()
                    results[way]["push"].append(pushed - start)
                    results[way]["lease"].append(done - start)
        finally:
            server.stop()
    print(f"{args.entries} DHCP entries, {args.rounds} rounds, median seconds")
    print(f"{'':24}{'one entry push':>16}{'push to lease':>16}")
    for way, r in results.items():
        print(
            f"{way:24}{statistics.median(r['push']):>16.4f}{statistics.median(r['lease']):>16.4f}"
        )


if __name__ == "__main__":
    main()
