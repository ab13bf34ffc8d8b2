"""Push latency and throughput: the vr agent against the CloudStack-style path, same run.

CloudStack-style path: OpenSSH ``sshd`` started here on a free loopback port with
its own config and host key, ``scp -O`` of the file, then ``ssh ... update_config.py``
which starts a new Python process (``scripts/update_config.py`` -> ``vr update-config``)
for every push. Our path: ``python -m vr agent`` on another port, reached (a) with
the same OpenSSH clients and (b) with ``vr push``'s paramiko client.

Figures: median push latency (connect + upload + apply) for one VM while the VR
holds 0, 1,000 and 5,000 VMs; total for 1,000 VMs one by one and as one batch.

The OpenSSH one-by-one totals (a new ssh and scp per VM, and for the CloudStack-style
path a new Python process per VM) take many minutes for 1,000 VMs, so by default each
is cut off after ``--budget`` seconds (60) and the total is extrapolated from the VMs
done: such a figure, and every ratio computed from it, is marked ``est`` with the count
actually measured. For a full run with no extrapolation pass ``--budget 0`` (each
phase runs to the end: 1,000 scp + ssh round trips per OpenSSH phase, many minutes).

Run as root:  PYTHONPATH=$PWD python bench/push.py [--samples 15] [--budget 60 | --budget 0]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.agent import AgentProcess, keygen  # noqa: E402
from tests.helpers.procs import free_port, wait_port  # noqa: E402
from vr.agent.client import Connection, Target, push_batch, push_files  # noqa: E402
from vr.paths import Paths  # noqa: E402
from vr.payloads import parse_payload  # noqa: E402
from vr.store import Store  # noqa: E402


def metadata(ip: IPv4Address, tag: str) -> bytes:
    return json.dumps(
        {
            "vm_ip_address": str(ip),
            "vm_metadata": [
                ["userdata", "user-data", "I2Nsb3VkLWNvbmZpZwpydW5jbWQ6IFtbZWNobywgaGldXQo="],
                ["metadata", "service-offering", "Small Instance"],
                ["metadata", "availability-zone", "zone-a"],
                ["metadata", "local-ipv4", str(ip)],
                ["metadata", "local-hostname", f"vm-{tag}"],
                ["metadata", "instance-id", f"i-{tag}"],
                ["metadata", "vm-id", f"i-{tag}"],
                ["metadata", "public-keys", "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIbench bench"],
            ],
            "type": "vmdata",
        }
    ).encode()


def vm_ip(block: int, n: int) -> IPv4Address:
    return IPv4Address(f"10.{block}.0.0") + n + 1


@dataclass
class Sshd:
    proc: subprocess.Popen[bytes]
    port: int


SSHD_CONFIG = """Port {port}
ListenAddress 127.0.0.1
HostKey {dir}/ssh_host_ed25519_key
PidFile {dir}/sshd.pid
AuthorizedKeysFile {dir}/authorized_keys
StrictModes no
UsePAM no
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
MaxStartups 100
SetEnv VR_ROOT={root} PYTHONPATH={repo}
Subsystem sftp internal-sftp
"""


@contextlib.contextmanager
def sshd(work: Path, root: Path, client_pub: Path) -> Iterator[Sshd]:
    d = work / "sshd"
    d.mkdir()
    subprocess.run(
        ["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / "ssh_host_ed25519_key")],
        check=True,
    )
    shutil.copy(client_pub, d / "authorized_keys")
    port = free_port()
    cfg = d / "sshd_config"
    cfg.write_text(SSHD_CONFIG.format(port=port, dir=d, root=root, repo=REPO))
    made_privsep = not Path("/run/sshd").exists()
    if made_privsep:
        Path("/run/sshd").mkdir(mode=0o755)
    proc = subprocess.Popen(
        ["/usr/sbin/sshd", "-D", "-e", "-f", str(cfg)],
        stderr=open(d / "sshd.log", "wb"),  # noqa: SIM115
        start_new_session=True,
    )
    try:
        wait_port("127.0.0.1", port)
        yield Sshd(proc, port)
    finally:
        proc.terminate()
        proc.wait(10)
        if made_privsep:
            with contextlib.suppress(OSError):
                Path("/run/sshd").rmdir()


class Bench:
    def __init__(self, work: Path, key: Path, agent_port: int, sshd_port: int, root: Path):
        self.work = work
        self.key = key
        self.agent_port = agent_port
        self.sshd_port = sshd_port
        self.root = root
        self.paths = Paths(root)
        self.kh = work / "known_hosts"
        self.src = work / "payloads"
        self.src.mkdir()
        self.count = 0

    def opts(self) -> list[str]:
        return ["-i", str(self.key), "-o", "IdentitiesOnly=yes", "-o", "BatchMode=yes",
                "-o", f"UserKnownHostsFile={self.kh}", "-o", "StrictHostKeyChecking=accept-new",
                "-q"]  # fmt: skip

    def file(self, ip: IPv4Address, tag: str) -> Path:
        self.count += 1
        path = self.src / f"vm_metadata.json.{self.count:08d}"
        path.write_bytes(metadata(ip, tag))
        return path

    def openssh_push(self, port: int, src: Path, remote_dir: str, command: str) -> None:
        subprocess.run(["scp", "-O", "-P", str(port), *self.opts(), str(src),
                        f"root@127.0.0.1:{remote_dir}/"], check=True)  # fmt: skip
        subprocess.run(["ssh", "-p", str(port), *self.opts(), "root@127.0.0.1",
                        f"{command} {src.name}"], check=True, capture_output=True)  # fmt: skip

    # --- the three ways of pushing one VM -------------------------------------------

    def cloudstack(self, src: Path) -> None:
        """sshd + scp -O + ssh running update_config.py as a new process."""
        self.openssh_push(
            self.sshd_port,
            src,
            str(self.paths.cache),
            f"{sys.executable} {REPO}/scripts/update_config.py",
        )

    def agent_openssh(self, src: Path) -> None:
        self.openssh_push(
            self.agent_port, src, "/var/cache/cloud", "/opt/cloud/bin/update_config.py"
        )

    def agent_vrpush(self, src: Path) -> None:
        target = Target("127.0.0.1", self.agent_port, self.key, self.kh, accept_new=True)
        with Connection(target) as conn:
            conn.upload(src.name, src.read_bytes())
            code, _, err = conn.run(f"/opt/cloud/bin/update_config.py {src.name}")
        if code != 0:
            raise RuntimeError(f"push of {src.name} failed: {err}")


def timed(fn: Callable[[Path], None], src: Path) -> float:
    t0 = time.perf_counter()
    fn(src)
    return time.perf_counter() - t0


def populate(paths: Paths, total: int) -> None:
    """Make the store hold VMs 10.100.x.y up to ``total`` (in-process, in batches)."""
    store = Store(paths)
    have = sum(1 for _ in paths.metadata_root.glob("10.100.*"))
    for start in range(have, total, 1000):
        batch = [
            parse_payload("vm_metadata.json", metadata(vm_ip(100, n), f"held-{n}"))
            for n in range(start, min(total, start + 1000))
        ]
        store.apply(batch)


def one_by_one(fn: Callable[[Path], None], files: list[Path], budget: float) -> tuple[float, int]:
    """Push ``files`` in turn; stop after ``budget`` seconds (``budget <= 0``: never)."""
    t0 = time.perf_counter()
    done = 0
    for f in files:
        fn(f)
        done += 1
        if budget > 0 and time.perf_counter() - t0 > budget:
            break
    return time.perf_counter() - t0, done


def fmt_total(seconds: float, done: int, total: int) -> str:
    if done == total:
        return f"{seconds:8.2f} s"
    return f"{seconds * total / done:8.2f} s est ({done} done in {seconds:.1f} s)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=15, help="pushes per latency figure")
    ap.add_argument(
        "--budget",
        type=float,
        default=60.0,
        help="seconds per OpenSSH one-by-one run before it is extrapolated (est); 0: full run",
    )
    ap.add_argument("--vms", type=int, default=1000, help="VMs for the totals")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("run as root (sshd needs it)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="vr-bench-push-") as tmp:
        work = Path(tmp)
        root = work / "vrroot"
        paths = Paths(root)
        paths.ensure()
        key = keygen(work / "mgmt_key", "ed25519")
        paths.authorized_keys.parent.mkdir(parents=True)
        shutil.copy(f"{key}.pub", paths.authorized_keys)
        agent = AgentProcess(root).start()
        try:
            with sshd(work, root, Path(f"{key}.pub")) as server:
                return run(args, Bench(work, key, agent.port, server.port, root))
        finally:
            agent.stop()


def run(args: argparse.Namespace, b: Bench) -> int:
    ways = {
        "vr agent + vr push": b.agent_vrpush,
        "vr agent + OpenSSH": b.agent_openssh,
        "sshd + update_config.py": b.cloudstack,
    }
    for fn in ways.values():  # warm-up: known_hosts entries, page cache
        fn(b.file(vm_ip(99, 0), "warm"))
    print(f"median push latency (connect + upload + apply), {args.samples} pushes each")
    print(f"{'VMs held':>9} | " + " | ".join(f"{w:>24}" for w in ways) + " | sshd/agent")
    for held in (0, 1000, 5000):
        populate(b.paths, held)
        samples: dict[str, list[float]] = {w: [] for w in ways}
        for i in range(args.samples):
            for w, fn in ways.items():  # interleaved, so drift hits all alike
                samples[w].append(timed(fn, b.file(vm_ip(100, i), f"upd-{i}")))
        med = {w: statistics.median(s) * 1000 for w, s in samples.items()}
        cells = " | ".join(f"{med[w]:>21.1f} ms" for w in ways)
        ratio = med["sshd + update_config.py"] / med["vr agent + OpenSSH"]
        ratio2 = med["sshd + update_config.py"] / med["vr agent + vr push"]
        print(f"{held:>9} | {cells} | {ratio:.1f}x (OpenSSH), {ratio2:.1f}x (vr push)")
        sys.stdout.flush()

    n = args.vms
    print(f"\ntotal for {n} VMs (new VMs; the VR already holds 5,000)")
    files = [b.file(vm_ip(101, i), f"obo-{i}") for i in range(n)]
    t0 = time.perf_counter()
    outcomes = push_files(
        Target("127.0.0.1", b.agent_port, b.key, b.kh), files, io.StringIO(), io.StringIO()
    )
    ours = time.perf_counter() - t0
    assert all(o.ok for o in outcomes), [o for o in outcomes if not o.ok][:3]
    print(f"  one by one, vr push (one connection)     {fmt_total(ours, n, n)}")
    files = [b.file(vm_ip(102, i), f"obo2-{i}") for i in range(n)]
    secs, done_ossh = one_by_one(b.agent_openssh, files, args.budget)
    agent_ossh = secs * n / done_ossh
    print(f"  one by one, vr agent + OpenSSH per VM    {fmt_total(secs, done_ossh, n)}")
    files = [b.file(vm_ip(103, i), f"obo3-{i}") for i in range(n)]
    secs, done_cs = one_by_one(b.cloudstack, files, args.budget)
    cs = secs * n / done_cs
    print(f"  one by one, sshd + update_config.py      {fmt_total(secs, done_cs, n)}")
    est_cs = "" if done_cs == n else " est"
    est_both = "" if done_cs == n and done_ossh == n else " est"
    print(
        f"    ratio sshd / vr push {cs / ours:.1f}x{est_cs}, "
        f"sshd / agent+OpenSSH {cs / agent_ossh:.1f}x{est_both}"
    )
    if est_both:
        print("    (est: extrapolated after --budget; --budget 0 measures every VM)")

    files = [b.file(vm_ip(104, i), f"bat-{i}") for i in range(n)]
    t0 = time.perf_counter()
    outcomes = push_batch(
        Target("127.0.0.1", b.agent_port, b.key, b.kh), files, io.StringIO(), io.StringIO()
    )
    ours_batch = time.perf_counter() - t0
    assert all(o.ok for o in outcomes), outcomes[:1]
    print(f"  one batch,  vr push --batch              {fmt_total(ours_batch, n, n)}")
    cfg = b.work / "VR-bench.cfg"
    from vr.agent.client import payload_stem, remote_name
    from vr.cloudstack import build_cfg

    items = []
    for i in range(n):
        data = metadata(vm_ip(105, i), f"bat2-{i}")
        items.append((remote_name(payload_stem("x", data)), data))
    cfg.write_text(build_cfg(items))
    t0 = time.perf_counter()
    # vr_cfg.sh -c <cfg> is `vr apply-cfg`, as a new process like on CloudStack's VR
    b.openssh_push(b.sshd_port, cfg, str(b.paths.cache), f"{sys.executable} -m vr apply-cfg -c")
    cs_batch = time.perf_counter() - t0
    print(f"  one batch,  sshd + vr_cfg.sh (new proc)  {fmt_total(cs_batch, n, n)}")
    print(f"    ratio sshd / vr push --batch {cs_batch / ours_batch:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
