"""Scale: push latency flat in the VMs held, group-committed batches; each beside the
previous design, measured in the same run.

Pushes: the median time to apply one pushed file (``update_config.py``'s path, in
process: parse, store commit, firewall follow-up) for ``vmdata``, ``vmpassword``,
``dhcpentry`` (a new VM's entry) and ``guestnetwork`` (a second network added or
removed) while the router holds 0, 1,000, 5,000 and 10,000 VMs, each with a DHCP
entry, and the firewall is programmed. Two designs side by side:

* ``sets``: the MAC/IP binding in netfilter sets (a DHCP push changes one set entry);
* ``rules``: the previous design, one iptables rule per binding, re-synced per push.

Batches: a ``VR-*.cfg``-sized batch of 1,000 (and 10,000) new VMs applied to the store,
group-committed (one ``syncfs``) against one fsync per file (the previous design).

Runs as root: the firewall is real (python-iptables and ``ipset``) inside a network
namespace this script creates and removes, with dummy guest/control interfaces.

    PYTHONPATH=$PWD python bench/scale.py [--quick] [--samples 15]

Boot storm (``--storm``, only that section): 10,000 guests (1,000 with ``--quick``,
``--storm-vms N``) boot at once, each a cloud-init CloudStack crawl with a new connection
per request and every answer checked, against vr and then Apache + CloudStack's
password server in the same run; see bench/storm.py.

    PYTHONPATH=$PWD python bench/scale.py --storm [--quick]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.push import metadata, vm_ip  # noqa: E402
from vr import store as store_mod  # noqa: E402
from vr.applier import Applier  # noqa: E402
from vr.firewall import model as fw_model  # noqa: E402
from vr.firewall import state as fw  # noqa: E402
from vr.paths import Paths  # noqa: E402
from vr.payloads import parse_payload  # noqa: E402

KINDS = ("vmdata", "password", "dhcpentry", "guestnetwork")
GUEST = {"type": "guestnetwork", "device": "eth0", "router_guest_ip": "10.100.0.1",
         "cidr": "10.100.0.0/16", "add": True}  # fmt: skip
OTHER = {"type": "guestnetwork", "device": "eth2", "router_guest_ip": "10.50.0.1",
         "cidr": "10.50.0.0/24", "add": True}  # fmt: skip


def mac(n: int) -> str:
    return "02:" + ":".join(f"{(n >> s) & 0xFF:02x}" for s in (32, 24, 16, 8, 0))


def dhcp(n: int) -> dict[str, Any]:
    return {"type": "dhcpentry", "ipv4_address": str(vm_ip(100, n)), "mac_address": mac(n),
            "host_name": f"vm-{n}"}  # fmt: skip


@contextlib.contextmanager
def previous_binding_design() -> Iterator[None]:
    """One rule per binding and a full re-apply per push (before the sets)."""
    saved = (fw.compute, fw.compute_sets, fw.FirewallHooks._change_bindings)

    def compute(paths: Paths, cfg: Any) -> fw_model.RuleSet:
        return fw_model.desired(
            cfg,
            store_mod.read_networks(paths, removals=True),
            store_mod.read_dhcp(paths),
            binding_sets=False,
        )

    fw.compute = compute  # type: ignore[assignment]
    fw.compute_sets = lambda paths, cfg: ()  # type: ignore[assignment]
    fw.FirewallHooks._change_bindings = lambda self, cfg, result: False  # type: ignore[method-assign]
    try:
        yield
    finally:
        fw.compute, fw.compute_sets, fw.FirewallHooks._change_bindings = saved  # type: ignore[method-assign]


def populate(paths: Paths, n: int) -> None:
    store = store_mod.Store(paths)
    for start in range(0, n, 2000):
        batch = []
        for i in range(start, min(n, start + 2000)):
            batch.append(parse_payload("vm_metadata.json", metadata(vm_ip(100, i), f"h{i}")))
            batch.append(parse_payload("vm_dhcp_entry.json", json.dumps(dhcp(i)).encode()))
        store.apply(batch)


class Pusher:
    def __init__(self, paths: Paths) -> None:
        self.paths = paths
        self.applier = Applier(paths, hooks=fw.FirewallHooks(paths))
        self.seq = 0

    def __call__(self, name: str, obj: dict[str, Any] | bytes) -> float:
        self.seq += 1
        fname = f"{name}.{self.seq}"
        data = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
        (self.paths.cache / fname).write_bytes(data)
        t0 = time.perf_counter()
        code = self.applier.update_config([fname], io.StringIO(), io.StringIO())
        took = time.perf_counter() - t0
        if code != 0:
            raise SystemExit(f"push {fname} failed; see {self.paths.log_file}")
        return took


def measure(work: Path, held: int, samples: int) -> dict[str, float]:
    root = work / f"r{held}"
    paths = Paths(root)
    paths.ensure()
    paths.config.write_text(json.dumps({"control_device": "eth1", "public_devices": []}))
    populate(paths, held)
    push = Pusher(paths)
    push("guest_network.json", GUEST)
    fw.apply(paths, fw.real_tables())
    out: dict[str, list[float]] = {k: [] for k in KINDS}
    for s in range(samples):
        i = s % max(held, 1)
        out["vmdata"].append(push("vm_metadata.json", metadata(vm_ip(100, i), f"s{s}")))
        pw = {"type": "vmpassword", "ip_address": str(vm_ip(100, i)), "password": f"pw{s}"}
        out["password"].append(push("vm_password.json", pw))
        out["dhcpentry"].append(push("vm_dhcp_entry.json", dhcp(held + s)))
        net = {**OTHER, "add": s % 2 == 0}
        out["guestnetwork"].append(push("guest_network.json", net))
    shutil.rmtree(root)
    return {k: statistics.median(v) * 1000 for k, v in out.items()}


def clear_netfilter() -> None:
    ipt, ip6t = "iptables-legacy", "ip6tables-legacy"
    cmds = [[ipt, "-F"], [ipt, "-X"], [ipt, "-t", "nat", "-F"], [ipt, "-t", "nat", "-X"],
            [ip6t, "-F"], [ip6t, "-X"], ["ipset", "destroy"]]  # fmt: skip
    for cmd in cmds:
        subprocess.run(cmd, check=False, capture_output=True, timeout=60)


BATCH_DESIGNS = ("shared", "group", "fsync")
"""``shared``: group commit with repeated files hard-linked (one inode each); ``group``:
group commit, one inode per file (the previous design); ``fsync``: one fsync per file."""


def batch(work: Path, n: int, design: str) -> float:
    from vr import atomic

    root = work / f"b{n}{design}"
    paths = Paths(root)
    paths.ensure()
    payloads = [
        parse_payload("vm_metadata.json", metadata(vm_ip(100, i), f"b{i}")) for i in range(n)
    ]
    saved = store_mod.FEW_VMS, atomic.Transaction._link
    store_mod.FEW_VMS = 1 << 30 if design == "fsync" else saved[0]
    if design == "group":
        atomic.Transaction._link = lambda self, key, path: False  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        store_mod.Store(paths).apply(payloads)
        took = time.perf_counter() - t0
    finally:
        store_mod.FEW_VMS, atomic.Transaction._link = saved  # type: ignore[method-assign]
    shutil.rmtree(root)
    return took


def inner(args: argparse.Namespace) -> int:
    sizes = [0, 1000] if args.quick else [0, 1000, 5000, 10000]
    work = Path(tempfile.mkdtemp(prefix="vr-scale-", dir="/var/tmp"))
    try:
        print(f"median ms per push ({args.samples} each); 'rules' = one iptables rule per binding")
        print(f"{'VMs held':>8} {'design':>6} " + " ".join(f"{k:>12}" for k in KINDS))
        for held in sizes:
            for design in ("sets", "rules"):
                clear_netfilter()
                ctx = previous_binding_design() if design == "rules" else contextlib.nullcontext()
                with ctx:
                    m = measure(work, held, args.samples)
                print(f"{held:>8} {design:>6} " + " ".join(f"{m[k]:>12.1f}" for k in KINDS),
                      flush=True)  # fmt: skip
        clear_netfilter()
        print()
        print("batch of new VMs applied to the store (s): group commit with repeated files")
        print("hard-linked vs one inode per file (previous) vs fsync per file")
        for n in [1000] if args.quick else [1000, 10000]:
            t = {d: batch(work, n, d) for d in BATCH_DESIGNS}
            print(f"{n:>8} VMs  shared {t['shared']:6.2f}  group {t['group']:6.2f}"
                  f"  per-file fsync {t['fsync']:6.2f}  x{t['group'] / t['shared']:.1f}",
                  flush=True)  # fmt: skip
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def boot_storm(args: argparse.Namespace) -> int:
    """The boot storm section (its own namespaces; see bench/storm.py)."""
    from bench import storm

    vms = args.storm_vms or (1000 if args.quick else 10000)
    if not 1 <= vms <= 60000:  # 10.77.1.0 + N stays inside the guests' /16
        print(f"--storm-vms {vms}: expected 1 to 60000 guests", file=sys.stderr)
        return 2
    return storm.storm(vms)


# --- memory: the whole appliance's PSS (--memory) ------------------------------------

PREVIOUS = "a7c61b8"
"""The commit before the memory work: its ``vr up`` is the previous design."""
MEM_NET = "10.100.0.0/16"
"""On ``lo`` inside the namespace: every VM's address is local, so a client binds it."""


def process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(d))
    tree = [root]
    for pid in tree:
        tree.extend(children.get(pid, []))
    return tree


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_pss(root: int) -> tuple[float, int]:
    """PSS of ``vr up`` and all its descendants (MiB) and how many processes."""
    pids = process_tree(root)
    return sum(pss_kib(p) for p in pids) / 1024, len(pids)


def wait_ready(root: Path, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    status = root / "run" / "vr" / "status.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"vr up exited with {proc.returncode}: see {root}/up.log")
        with contextlib.suppress(OSError, ValueError):
            if json.loads(status.read_text()).get("ready"):
                return
        time.sleep(0.2)
    raise SystemExit(f"vr up not ready after {timeout}s: see {root}/up.log")


def fetch_all(n: int, port: int) -> int:
    """Every VM fetches its instance-id once on a new connection from its own address;
    returns the failures."""
    import http.client
    from concurrent.futures import ThreadPoolExecutor

    def one(i: int) -> int:
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=30,
                                           source_address=(str(vm_ip(100, i)), 0))  # fmt: skip
            c.request("GET", "/latest/meta-data/instance-id", headers={"Connection": "close"})
            ok = c.getresponse().status == 200
            c.close()
            return 0 if ok else 1
        except OSError:
            return 1

    with ThreadPoolExecutor(8) as pool:
        return sum(pool.map(one, range(n)))


def cached_vms(metrics_port: int) -> float:
    """The metadata workers' summed ``vr_metadata_cache_vms`` from ``GET /metrics``."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=30) as r:
        for line in r.read().decode().splitlines():
            if line.startswith("vr_metadata_cache_vms"):
                return float(line.split()[-1])
    return 0.0


def memory_run(src: Path, root: Path, n: int, rounds: int | None) -> dict[str, Any]:
    """``vr up`` from the tree ``src`` on a fresh ``root``: PSS idle, then with ``n`` VMs
    pushed and fetched from every worker (``rounds`` of fetches by every VM; None: until
    every worker's cache holds every VM)."""
    paths = Paths(root)
    paths.ensure()
    paths.config.write_text(json.dumps({"control_device": "eth1", "public_devices": ["eth2"]}))
    env = {**os.environ, "PYTHONPATH": str(src)}
    with open(root / "up.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "vr", "up", "--root", str(root)],
                                cwd=src, env=env, stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_ready(root, proc)
        time.sleep(3)  # let start-up garbage settle
        idle, procs = tree_pss(proc.pid)
        workers = json.loads(paths.config.read_text()).get("metadata_workers", 2)
        store = store_mod.Store(paths)
        t0 = time.perf_counter()
        for start in range(0, n, 2000):
            store.apply([parse_payload("vm_metadata.json", metadata(vm_ip(100, i), f"m{i}"))
                         for i in range(start, min(n, start + 2000))])  # fmt: skip
        pushed = time.perf_counter() - t0
        done, failed = 0, 0
        while rounds is None or done < rounds:
            failed += fetch_all(n, 80)
            done += 1
            if rounds is None and (cached_vms(9180) >= workers * n or done >= 40):
                break
        loaded, loaded_procs = tree_pss(proc.pid)
        return {"idle": idle, "procs": procs, "loaded": loaded, "loaded_procs": loaded_procs,
                "rounds": done, "failed": failed, "pushed": pushed,
                "cached": cached_vms(9180)}  # fmt: skip
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def previous_tree(work: Path) -> Path:
    """The previous design's source: ``git archive`` of :data:`PREVIOUS`."""
    dest = work / "previous"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", PREVIOUS, "vr"],
                             check=True, capture_output=True, timeout=60).stdout  # fmt: skip
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True, timeout=60)
    return dest


def inner_memory(args: argparse.Namespace) -> int:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
    subprocess.run(["ip", "addr", "add", MEM_NET, "dev", "lo"], check=True, timeout=30)
    work = Path(tempfile.mkdtemp(prefix="vr-mem-", dir="/var/tmp"))
    try:
        before = memory_run(previous_tree(work), work / "before", args.vms, None)
        clear_netfilter()
        now = memory_run(REPO, work / "now", args.vms, before["rounds"])
        clear_netfilter()
        print(f"whole appliance PSS (vr up and all its children), MiB; {args.vms} VMs pushed, "
              f"then {before['rounds']} rounds of one fetch per VM (new connection each) until "
              f"every worker of the previous design held every VM")  # fmt: skip
        print(f"{'design':>22} {'procs':>5} {'idle':>7} {'procs':>5} {'loaded':>7} "
              f"{'cached':>7} {'failed':>6}")  # fmt: skip
        for label, r in ((f"previous ({PREVIOUS})", before), ("now", now)):
            row = f"{label:>22} {r['procs']:>5} {r['idle']:>7.1f} {r['loaded_procs']:>5} "
            print(row + f"{r['loaded']:>7.1f} {r['cached']:>7.0f} {r['failed']:>6}", flush=True)
    finally:
        clear_netfilter()
        shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="0 and 1,000 VMs, 1,000-VM batch only")
    ap.add_argument("--samples", type=int, default=15, help="pushes per median")
    ap.add_argument("--inner", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--storm", action="store_true",
                    help="only the boot storm: 10,000 guests (1,000 with --quick) at once, "
                    "vr against Apache (bench/storm.py)")  # fmt: skip
    ap.add_argument("--storm-vms", type=int, default=None, metavar="N",
                    help="guests of the boot storm (1-60000; default 10000)")  # fmt: skip

    what = "PSS of the whole appliance idle and with --vms VMs, vs the previous design"
    ap.add_argument("--memory", action="store_true", help=what)
    ap.add_argument("--vms", type=int, default=10000, help="VMs for --memory")
    args = ap.parse_args()
    if args.inner:
        return inner_memory(args) if args.memory else inner(args)
    if os.geteuid() != 0:
        print("bench/scale.py needs root (a network namespace, iptables, ipset)", file=sys.stderr)
        return 2
    if args.storm:
        return boot_storm(args)
    ns = f"vrscale{os.getpid()}"
    run: Callable[..., Any] = subprocess.run
    run(["ip", "netns", "add", ns], check=True, timeout=30)
    try:
        for dev in ("eth0", "eth1", "eth2"):  # veth pairs inside the namespace
            link = ["ip", "-n", ns, "link"]
            run([*link, "add", dev, "type", "veth", "peer", "name", f"p{dev}"], check=True)
            run([*link, "set", dev, "up"], check=True, timeout=30)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--inner",
               "--samples", str(args.samples), *(["--quick"] if args.quick else []),
               *(["--memory", "--vms", str(args.vms)] if args.memory else [])]  # fmt: skip
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        return run(["ip", "netns", "exec", ns, *cmd], env=env, check=False).returncode  # type: ignore[no-any-return]
    finally:
        run(["ip", "netns", "del", ns], check=False, timeout=30)


if __name__ == "__main__":
    sys.exit(main())
