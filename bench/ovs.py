"""Benchmark of ``vr hypervisor`` on a private Open vSwitch (userspace datapath).

Two figures, each beside a reference measured in the same run:

* **flow programming for N ports** (default 1,000): vr's way (compute the flows,
  dump the switch's cookies, diff, one bundle) for the first install, a pass with
  nothing to change, the cheap check the controller runs every second between OVSDB
  events (our flow count), and one port unplugged among N; against ``ovs-ofctl add-flows``
  of the same flows without a bundle (first install) and ``ovs-ofctl replace-flows``
  of the whole table (what a controller without per-flow cookies does on a change).
  The flows name ports that need not exist, so no interfaces are made for them.
* **requests per second**: ``wrk`` in a VM namespace plugged into the bridge, asking
  ``http://169.254.169.254/latest/meta-data/instance-id`` through the OVS path (ARP
  responder, conntrack NAT, ``vr hypervisor``'s metadata server), against ``wrk`` in
  a guest namespace asking ``vr serve-metadata`` on a router over a veth link (the
  router path), same workers and connections.

Needs root, ``openvswitch-switch``, ``ethtool`` and ``wrk``. Everything runs in
namespaces and a private OVS directory it removes at the end.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from ipaddress import IPv4Address
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.metadata import WrkResult, run_wrk  # noqa: E402
from tests.helpers import netns  # noqa: E402
from tests.helpers.ovs import OvsLab, ovs_lab, vr_argv  # noqa: E402
from tests.helpers.vmdata import vm_payload, vm_triples  # noqa: E402
from tests.helpers.wait import wait_for  # noqa: E402
from vr.hypervisor import flows  # noqa: E402
from vr.hypervisor.ovs import Ovs  # noqa: E402
from vr.paths import Paths  # noqa: E402
from vr.payloads import DhcpEntry, parse_vm_metadata  # noqa: E402
from vr.store import Store  # noqa: E402

URL_PATH = "/latest/meta-data/instance-id"


def timed(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def ofctl(lab: OvsLab, *args: str) -> None:
    cmd = ["ovs-ofctl", "-O", "OpenFlow14", *args]
    res = subprocess.run(cmd, env=lab.env, text=True, capture_output=True, timeout=600)
    if res.returncode != 0:
        raise SystemExit(f"ovs-ofctl {' '.join(args)} failed: {res.stderr.strip()}")


def flow_file(want: list[flows.Flow]) -> str:
    return "".join(f"cookie={f.cookie:#x},{f.text}\n" for f in want)


def bench_flows(lab: OvsLab, n: int) -> list[tuple[str, float, float | None, str]]:
    ovs = Ovs(lab.bridge, lab.rundir, timeout=600)
    ovs.ensure_meta_port("vr-meta")
    wait_for(lambda: ovs.meta_port("vr-meta") is not None, "the metadata port")
    meta = ovs.meta_port("vr-meta")
    assert meta is not None
    ports = [
        flows.VmPort(p, f"52:54:00:{p >> 16 & 255:02x}:{p >> 8 & 255:02x}:{p & 255:02x}")
        for p in range(10, 10 + n)
    ]
    want: list[flows.Flow] = []
    t_compute = timed(lambda: want.extend(flows.desired(ports, meta)))

    def reconcile(target: list[flows.Flow]) -> None:
        change = flows.diff(target, ovs.cookies())
        if change:
            ovs.apply(change)

    t_first = timed(lambda: reconcile(want))
    assert len(ovs.cookies()) == len(want)
    t_noop = timed(lambda: reconcile(want))
    t_count = timed(ovs.flow_count)
    fewer = flows.desired(ports[1:], meta)
    t_one = timed(lambda: reconcile(fewer))
    assert len(ovs.cookies()) == len(fewer)

    ovs.delete_ours()
    with tempfile.NamedTemporaryFile("w", suffix=".flows") as f:
        f.write(flow_file(want))
        f.flush()
        r_first = timed(lambda: ofctl(lab, "add-flows", lab.bridge, f.name))
    with tempfile.NamedTemporaryFile("w", suffix=".flows") as f:
        f.write(flow_file(fewer))
        f.flush()
        r_one = timed(lambda: ofctl(lab, "replace-flows", lab.bridge, f.name))
    ovs.delete_ours()
    lab.vsctl("del-port", lab.bridge, "vr-meta")
    return [
        (f"compute {len(want)} flows", t_compute, None, "-"),
        ("first install", t_first, r_first, "ovs-ofctl add-flows (no bundle)"),
        ("full pass, no change", t_noop, None, "-"),
        ("check between events", t_count, None, "-"),
        ("one port unplugged", t_one, r_one, "ovs-ofctl replace-flows (whole table)"),
    ]


def store_vm(paths: Paths, ip: str, mac: str) -> None:
    triples = [t if t[1] != "instance-id" else ["metadata", "instance-id", "bench-vm"]
               for t in vm_triples(ip)]  # fmt: skip
    Store(paths).apply(
        [DhcpEntry(mac, IPv4Address(ip), "bench"), parse_vm_metadata(vm_payload(ip, triples))]
    )


def serve(lab: netns.Lab, ns: netns.Namespace, argv: list[str], log: Path) -> None:
    with open(log, "ab") as out:
        lab.spawn(ns, argv, stdout=out, stderr=subprocess.STDOUT)


def bench_rps(lab: OvsLab, work: Path, args: argparse.Namespace) -> tuple[WrkResult, WrkResult]:
    hv = Paths(work / "hv")
    hv.ensure()
    vm = lab.plug("52:54:00:aa:00:05", "10.40.0.5/24", "bench-vm")
    store_vm(hv, vm.ip, vm.mac)
    serve(lab.lab, lab.hv, vr_argv(
        "hypervisor", "--root", str(hv.root), "--bridge", lab.bridge, "--ovs-rundir",
        str(lab.rundir), "--workers", str(args.workers), "--no-agent",
    ), work / "hypervisor.log")  # fmt: skip
    url = f"http://169.254.169.254{URL_PATH}"
    wait_for(lambda: vm.curl(url).stdout == "bench-vm", "the OVS path", timeout=60)
    ovs_rps = run_wrk(vm.ns, url, args.conns, args.duration)

    router = Paths(work / "router")
    router.ensure()
    vr_ns, guest = lab.lab.host("vr"), lab.lab.host("guest")
    lab.lab.link(vr_ns, "eth0", "10.41.0.1/24", guest, "eth0", "10.41.0.5/24")
    store_vm(router, "10.41.0.5", "52:54:00:aa:00:06")
    serve(lab.lab, vr_ns, vr_argv(
        "serve-metadata", "--root", str(router.root), "--bind", "10.41.0.1:80",
        "--workers", str(args.workers),
    ), work / "router.log")  # fmt: skip
    rurl = f"http://10.41.0.1{URL_PATH}"
    ok = ["curl", "-sS", "-m", "5", rurl]
    wait_for(lambda: guest.run(*ok, check=False).stdout == "bench-vm", "the router path", 60)
    router_rps = run_wrk(guest, rurl, args.conns, args.duration)
    return ovs_rps, router_rps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--ports", type=int, default=1000, help="ports to program flows for")
    ap.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    ap.add_argument("--conns", type=int, default=50, help="wrk connections (below 64 per VM)")
    ap.add_argument("--workers", type=int, default=2, help="gunicorn workers of both servers")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("bench/ovs.py needs root (network namespaces, Open vSwitch)")
    work = Path(tempfile.mkdtemp(prefix="vrbench-ovs"))
    try:
        with ovs_lab() as lab:
            rows = bench_flows(lab, args.ports)
            ovs_rps, router_rps = bench_rps(lab, work, args)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nflow programming, {args.ports} ports (vr: dump cookies, diff, one bundle)")
    print(f"{'step':<28}{'vr':>10}{'reference':>12}  reference is")
    for name, ours, ref, what in rows:
        r = f"{ref * 1000:>10.0f}ms" if ref is not None else f"{'-':>12}"
        print(f"{name:<28}{ours * 1000:>8.0f}ms{r}  {what}")
    print(f"\nrequests/s, wrk -c{args.conns} {args.duration}s, {args.workers} workers, {URL_PATH}")
    print(f"{'path':<34}{'req/s':>10}{'p50':>9}{'p99':>9}{'failed':>8}")
    for name, r in (
        ("OVS (ARP responder, ct NAT)", ovs_rps),
        ("router (veth, source IP)", router_rps),
    ):
        print(f"{name:<34}{r.rps:>10.0f}{r.p50_ms:>7.1f}ms{r.p99_ms:>7.1f}ms{r.failed:>8}")
    print(f"OVS path / router path: {ovs_rps.rps / router_rps.rps:.2f}")


if __name__ == "__main__":
    main()
