"""A redundant router pair in network namespaces, for root tests and bench/pair.py.

Namespaces: routers ``ra`` and ``rb`` (guest ``eth0``, control ``eth1``), guests ``g1``
and ``g2`` on the guest bridge, a management host ``mg`` on the control bridge; both
bridges live in ``sw``. Each router runs ``vr up`` (keepalived included) on its own
root; the guests route through the VRRP virtual IP (the network's gateway). The
management host pushes every payload to both routers with ``vr push``, as CloudStack.

Passwords read here are never printed: compare them with :func:`same_secret`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.helpers.netns import Lab, Namespace, sh
from tests.helpers.wait import wait_for

GUEST_CIDR = "10.1.1.0/24"
VIP = "10.1.1.1"
METADATA_IP = "169.254.169.254"
MGMT_IP = "169.254.10.1"
NONE = "saved_password"
"""The password server's answer when no password is stored."""

ROUTERS = {
    "ra": {"guest": "10.1.1.2", "control": "169.254.10.11", "priority": 110},
    "rb": {"guest": "10.1.1.3", "control": "169.254.10.12", "priority": 100},
}
GUESTS = {
    "g1": {"ip": "10.1.1.21", "mac": "02:00:0a:01:01:15", "id": "i-g1-0001"},
    "g2": {"ip": "10.1.1.22", "mac": "02:00:0a:01:01:16", "id": "i-g2-0002"},
}

LOOP = r"""
import http.client, json, signal, sys, time
stop = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
host, path = sys.argv[1], sys.argv[2]
print(json.dumps(["start", time.monotonic()]), flush=True)
while not stop:
    t = time.monotonic()
    try:
        c = http.client.HTTPConnection(host, 80, timeout=0.5)
        c.request("GET", path)
        r = c.getresponse()
        rec = [t, r.status, r.read().decode(errors="replace")]
        c.close()
    except Exception as e:
        rec = [t, None, type(e).__name__]
    print(json.dumps(rec), flush=True)
    time.sleep(0.05)
"""


def same_secret(got: object, want: str) -> None:
    if got != want:
        raise AssertionError("password differs")


@dataclass
class Router:
    name: str
    ns: Namespace
    root: Path
    guest_ip: str
    control_ip: str
    proc: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.root.parent / f"{self.name}-up.log"


@dataclass
class PairLab:
    lab: Lab
    workdir: Path
    routers: dict[str, Router] = field(default_factory=dict)
    guests: dict[str, Namespace] = field(default_factory=dict)
    mg: Namespace | None = None

    # --- building -------------------------------------------------------------------

    def create(self, advert_ms: int = 500) -> None:
        sw = self.lab.host("sw")
        for br in ("br0", "br1"):
            sw.run("ip", "link", "add", br, "type", "bridge")
            sw.run("ip", "link", "set", br, "up")
        port = iter(range(100))

        def plug(ns: Namespace, dev: str, addr: str, br: str, mac: str | None = None) -> None:
            p = f"p{next(port)}"
            self.lab.link(ns, dev, addr, sw, p, None, a_mac=mac)
            sw.run("ip", "link", "set", p, "master", br)

        self.mg = self.lab.host("mg")
        plug(self.mg, "eth0", f"{MGMT_IP}/16", "br1")
        mkey = self.workdir / "mgmt" / "id_ed25519"
        pkey = self.workdir / "pair" / "id_ed25519"
        for k in (mkey, pkey):
            k.parent.mkdir(parents=True, mode=0o700)
            sh("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(k))
        for name, r in ROUTERS.items():
            ns = self.lab.host(name)
            plug(ns, "eth0", f"{r['guest']}/24", "br0")
            plug(ns, "eth1", f"{r['control']}/16", "br1")
            root = self.workdir / f"{name}-root"
            peer = next(v["control"] for k, v in ROUTERS.items() if k != name)
            conf = root / "etc/vr"
            conf.mkdir(parents=True, mode=0o700)
            (conf / "vr.json").write_text(
                json.dumps(
                    {
                        "control_device": "eth1",
                        "public_devices": [],
                        "pair_peer": peer,
                        "pair_priority": r["priority"],
                        "pair_advert_ms": advert_ms,
                    }
                )
            )
            (conf / "pair").mkdir(mode=0o700)
            shutil.copy(pkey, conf / "pair" / "id_key")
            ssh = root / "root/.ssh"
            ssh.mkdir(parents=True, mode=0o700)
            keys = mkey.with_suffix(".pub").read_text() + pkey.with_suffix(".pub").read_text()
            (ssh / "authorized_keys").write_text(keys)
            (ssh / "authorized_keys").chmod(0o600)
            self.routers[name] = Router(name, ns, root, str(r["guest"]), str(r["control"]))
        for name, g in GUESTS.items():
            ns = self.lab.host(name)
            plug(ns, "eth0", f"{g['ip']}/24", "br0", mac=g["mac"])
            ns.run("ip", "route", "add", "default", "via", VIP)
            self.guests[name] = ns

    # --- routers --------------------------------------------------------------------

    def start(self, name: str, timeout: float = 60) -> None:
        r = self.routers[name]
        with r.log.open("ab") as log:
            r.proc = self.lab.spawn(
                r.ns,
                [sys.executable, "-m", "vr", "up", "--root", str(r.root)],
                stdout=log.fileno(),
                stderr=log.fileno(),
            )
        proc = r.proc

        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"vr up of {name} exited {proc.returncode}; see {r.log}")
            with contextlib.suppress(OSError, ValueError):
                st = json.loads((r.root / "run/vr/status.json").read_text())
                return bool(st.get("ready") and st.get("pid") == proc.pid)
            return False

        wait_for(ready, f"vr up of {name} ready", timeout)

    def kill(self, name: str) -> float:
        """SIGKILL every process of the router (vr up, keepalived, services) at once;
        the time (monotonic) of the kill."""
        r = self.routers[name]
        pids = [int(p) for p in sh("ip", "netns", "pids", r.ns.name, check=False).stdout.split()]
        # Stopped first, so that no process sees another die (keepalived would get its
        # parent-death SIGTERM and leave gracefully, handing over at once).
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if sig == signal.SIGSTOP:
                t = time.monotonic()
        if r.proc is not None:
            r.proc.wait(10)
        return t

    def status(self, name: str) -> dict[str, Any]:
        from vr.ops.status import collect_status
        from vr.paths import Paths

        st: dict[str, Any] = collect_status(Paths(self.routers[name].root))
        return st

    def vrrp(self, name: str) -> str:
        pair = self.status(name)["pair"]
        return str(pair["networks"].get("eth0", {}).get("state", "UNKNOWN"))

    def holds_vip(self, name: str) -> bool:
        out = self.routers[name].ns.run("ip", "-4", "-o", "addr", "show", "dev", "eth0").stdout
        return f" {VIP}/" in out

    def master(self) -> str | None:
        """The one router that holds the virtual IP and says MASTER, else None."""
        holders = [n for n in self.routers if self.holds_vip(n) and self.vrrp(n) == "MASTER"]
        return holders[0] if len(holders) == 1 else None

    def in_sync(self, *names: str) -> bool:
        for n in names:
            pair = self.status(n)["pair"]
            if not (pair["peer_reachable"] and pair["in_sync"]):
                return False
        return True

    def transitions(self, name: str) -> list[str]:
        path = self.routers[name].root / "run/vr/pair/transitions.log"
        with contextlib.suppress(FileNotFoundError):
            return [ln.split()[2] for ln in path.read_text().splitlines() if " VR-eth0 " in ln]
        return []

    # --- management server ----------------------------------------------------------

    def push(self, name: str, *payloads: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        r = self.routers[name]
        d = Path(tempfile.mkdtemp(dir=self.workdir))
        files = []
        for i, p in enumerate(payloads):
            f = d / f"payload{i}.json"
            f.write_text(json.dumps(p))
            files.append(str(f))
        assert self.mg is not None
        return self.mg.run(
            sys.executable, "-m", "vr", "push", "--host", r.control_ip,
            "--key", str(self.workdir / "mgmt" / "id_ed25519"),
            "--known-hosts", str(self.workdir / "mgmt" / "known_hosts"), "--accept-new",
            *files, check=False, timeout=120,
        )  # fmt: skip

    def push_both(self, *payloads: dict[str, Any]) -> None:
        for name in self.routers:
            res = self.push(name, *payloads)
            assert res.returncode == 0, f"push to {name}: {res.stdout} {res.stderr}"

    def network_payload(self, name: str) -> dict[str, Any]:
        return {
            "device": "eth0",
            "router_guest_ip": self.routers[name].guest_ip,
            "router_guest_gateway": VIP,
            "cidr": GUEST_CIDR,
            "add": True,
            "type": "guestnetwork",
        }

    # --- what a guest sees ----------------------------------------------------------

    def ask_password(self, guest: str, host: str = VIP, request: str = "send_my_password") -> str:
        """As cloud-set-guest-password; the answer may be a password: never print it."""
        res = self.guests[guest].run(
            "wget", "-q", "-t", "1", "-T", "5", "-O", "-", "--header",
            f"DomU_Request: {request}", f"http://{host}:8080", check=False,
        )  # fmt: skip
        if res.returncode != 0:
            raise AssertionError(f"{guest} got no answer from {host}:8080 (wget {res.returncode})")
        return res.stdout.strip()

    def curl(self, guest: str, url: str) -> tuple[int, str]:
        res = self.guests[guest].run(
            "curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}", url, check=False
        )
        body, _, code = res.stdout.rpartition("\n")
        return int(code or 0), body

    def loop(self, guest: str, path: str = "/latest/instance-id") -> subprocess.Popen[bytes]:
        return self.lab.spawn(
            self.guests[guest],
            ["/usr/bin/python3", "-c", LOOP, METADATA_IP, path],
            stdout=subprocess.PIPE,
        )


def first_answers(p: subprocess.Popen[bytes], n: int = 3) -> list[list[Any]]:
    """Read a :data:`LOOP`'s records until ``n`` answers came (it is running)."""
    assert p.stdout is not None
    recs: list[list[Any]] = []
    while sum(1 for r in recs if r[1] == 200) < n:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"the guest's loop ended: {recs[-3:]}")
        rec = json.loads(line)
        if rec[0] != "start":
            recs.append(rec)
    return recs


def answers_after(p: subprocess.Popen[bytes], t: float, limit: float = 30) -> list[list[Any]]:
    """Read a :data:`LOOP`'s records up to its first answer sent after ``t``."""
    assert p.stdout is not None
    recs: list[list[Any]] = []
    while True:
        line = p.stdout.readline()
        if not line:
            raise AssertionError(f"the guest's loop ended: {recs[-3:]}")
        rec = json.loads(line)
        if rec[0] == "start":
            continue
        recs.append(rec)
        if rec[0] > t and rec[1] == 200:
            return recs
        if rec[0] > t + limit:
            raise AssertionError(f"no answer within {limit}s after the event")


def stop_loop(p: subprocess.Popen[bytes]) -> list[list[Any]]:
    """Stop a :data:`LOOP` and return its records ``[t, status or None, body]`` not read yet."""
    os.killpg(p.pid, signal.SIGTERM)
    out, _ = p.communicate(timeout=10)
    recs = [json.loads(line) for line in out.decode().splitlines() if line.strip()]
    return [r for r in recs if r[0] != "start"]


def gap_around(recs: list[list[Any]], t: float, ok: Callable[[list[Any]], bool]) -> float:
    """Longest time without a good answer that contains ``t`` (last good before, first after)."""
    before = [r[0] for r in recs if r[0] <= t and ok(r)]
    after = [r[0] for r in recs if r[0] > t and ok(r)]
    if not before or not after:
        raise AssertionError("no answers on both sides of the event")
    return float(after[0] - before[-1])


@contextlib.contextmanager
def pair_lab(advert_ms: int = 500) -> Iterator[PairLab]:
    workdir = Path(tempfile.mkdtemp(prefix="vr-pair-"))
    lab = Lab()
    try:
        pl = PairLab(lab, workdir)
        pl.create(advert_ms)
        yield pl
    finally:
        lab.close()
        shutil.rmtree(workdir, ignore_errors=True)
