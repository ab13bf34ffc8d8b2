"""A private Open vSwitch for root tests and benchmarks: ovsdb-server and ovs-vswitchd
(userspace datapath) run from their own directory inside a hypervisor namespace;
VMs are namespaces plugged into the bridge by veth pairs, their ports described in
OVSDB as libvirt does (external_ids attached-mac, iface-id, vm-id).

Nothing system-wide: no /var/run/openvswitch, no kernel module, no system service.
:meth:`OvsLab.close` stops both daemons by PID and removes the directory; the
namespaces go with the :class:`tests.helpers.netns.Lab`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tests.helpers import netns
from tests.helpers.wait import wait_for

SCHEMA = Path("/usr/share/openvswitch/vswitch.ovsschema")
COOKIE_MASK = "cookie=0x5652000000000000/0xffff000000000000"


@dataclass
class Vm:
    ns: netns.Namespace
    port: str
    mac: str
    ip: str
    ofport: int = 0

    def run(self, *cmd: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return self.ns.run(*cmd, check=False, timeout=timeout)

    def curl(self, url: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return self.run("curl", "-sS", "-m", "10", "-f", *extra, url, timeout=20)


@dataclass
class OvsLab:
    lab: netns.Lab
    hv: netns.Namespace
    work: Path
    bridge: str = "br-vm"
    vms: list[Vm] = field(default_factory=list)

    @property
    def rundir(self) -> Path:
        return self.work / "run"

    @property
    def env(self) -> dict[str, str]:
        w = self.work
        return {
            **os.environ,
            "OVS_RUNDIR": str(w / "run"),
            "OVS_LOGDIR": str(w / "log"),
            "OVS_DBDIR": str(w / "db"),
            "OVS_SYSCONFDIR": str(w / "etc"),
        }

    def tool(self, *cmd: str, check: bool = True, timeout: float = 30) -> str:
        res = subprocess.run(
            ["ip", "netns", "exec", self.hv.name, *cmd],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and res.returncode != 0:
            raise AssertionError(f"{cmd!r} failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout

    def vsctl(self, *args: str) -> str:
        return self.tool("ovs-vsctl", "--timeout=30", *args)

    # --- daemons -------------------------------------------------------------------

    def start(self) -> None:
        for d in ("run", "log", "db", "etc"):
            (self.work / d).mkdir(parents=True, exist_ok=True)
        self.tool("ovsdb-tool", "create", str(self.work / "db/conf.db"), str(SCHEMA))
        self.tool(
            "ovsdb-server", str(self.work / "db/conf.db"), f"--remote=punix:{self.rundir}/db.sock",
            "--pidfile", "--detach", "--log-file",
        )  # fmt: skip
        self.vsctl("--no-wait", "init")
        self.start_vswitchd()
        self.vsctl(
            "add-br", self.bridge, "--", "set", "Bridge", self.bridge,
            "datapath_type=netdev", "fail_mode=secure",
        )  # fmt: skip

    def start_vswitchd(self) -> None:
        self.tool(
            "ovs-vswitchd", f"unix:{self.rundir}/db.sock", "--disable-system",
            "--pidfile", "--detach", "--log-file",
        )  # fmt: skip

    def pid(self, daemon: str) -> int | None:
        try:
            return int((self.rundir / f"{daemon}.pid").read_text().strip())
        except (FileNotFoundError, ValueError):
            return None

    def stop_daemon(self, daemon: str, sig: int = signal.SIGTERM) -> None:
        """Stop the daemon we started, by the PID in its pidfile."""
        pid = self.pid(daemon)
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        wait_for(lambda: not _alive(pid), f"{daemon} (pid {pid}) to exit", timeout=15)
        (self.rundir / f"{daemon}.pid").unlink(missing_ok=True)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_daemon("ovs-vswitchd")
        with contextlib.suppress(Exception):
            self.stop_daemon("ovsdb-server")
        shutil.rmtree(self.work, ignore_errors=True)

    # --- VMs -----------------------------------------------------------------------

    def plug(self, mac: str, cidr: str, vm_id: str, ns: netns.Namespace | None = None) -> Vm:
        """A VM namespace (eth0 with ``mac`` and ``cidr``) on a new bridge port."""
        vm = ns or self.lab.host("vm")
        port = netns.unique("vp")
        netns.sh(
            "ip", "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", vm.name
        )
        netns.sh("ip", "link", "set", port, "netns", self.hv.name)
        self.hv.run("ip", "link", "set", port, "up")
        vm.run("sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1")
        vm.run("ip", "link", "set", "eth0", "address", mac)
        vm.run("ip", "addr", "add", cidr, "dev", "eth0")
        vm.run("ip", "link", "set", "eth0", "up")
        # veth hands AF_PACKET (the userspace datapath) partial checksums: a real VM's
        # tap does not, so turn it off here (see /work/shared/ovs-datapath)
        vm.run("ethtool", "-K", "eth0", "tx", "off")
        vm.run("ip", "route", "add", "169.254.169.254/32", "dev", "eth0")
        self.vsctl(
            "add-port", self.bridge, port, "--", "set", "Interface", port,
            f'external_ids:attached-mac="{mac}"', f'external_ids:vm-id="{vm_id}"',
            f'external_ids:iface-id="{vm_id}-nic0"',
        )  # fmt: skip
        v = Vm(
            vm, port, mac, cidr.split("/")[0], int(self.vsctl("get", "Interface", port, "ofport"))
        )
        self.vms.append(v)
        return v

    def unplug(self, vm: Vm) -> None:
        self.vsctl("del-port", self.bridge, vm.port)

    def our_flows(self, check: bool = True) -> list[str]:
        """vr's flows on the bridge (``check=False``: none while ovs-vswitchd is not up)."""
        out = self.tool(
            "ovs-ofctl", "dump-flows", "--no-stats", self.bridge, COOKIE_MASK, check=check
        )
        return [line for line in out.splitlines() if "cookie=" in line]

    def flows_of(self, ofport: int) -> list[str]:
        return [
            f for f in self.our_flows() if f"in_port={ofport}," in f or f"in_port={ofport} " in f
        ]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # a detached daemon re-parented to PID 1 may linger as a zombie until reaped
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"
    return False


@contextlib.contextmanager
def ovs_lab() -> Iterator[OvsLab]:
    """A hypervisor namespace with a private OVS and one netdev bridge; all removed after."""
    work = Path(tempfile.mkdtemp(prefix="vrovs", dir="/tmp"))  # sockets: short paths
    with netns.lab() as lab:
        hv = lab.host("hv")
        ol = OvsLab(lab, hv, work)
        try:
            ol.start()
            yield ol
        finally:
            ol.close()


def vr_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "vr", *args]
