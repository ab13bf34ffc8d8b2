"""A network sandbox that runs a whole VR the way a cloud does, on one host.

Namespaces: ``vr`` (the appliance: guest eth0, control eth1, public eth2), ``sw``
(a bridge joining the guest network), two guests ``ga``/``gb``, a management host
``mg`` on the control network and an outsider ``out`` on the public side. The
appliance runs as ``vr up`` in the VR namespace with its own root directory; the
management host pushes with ``vr push`` over SSH, exactly as a management server.

Used by ``vr demo`` and by the end-to-end tests. Everything it creates (namespaces,
``/etc/netns/<ns>`` overlays, processes, the work directory) is removed by
:meth:`Sandbox.close`, which is safe to call after any failure.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vr import subp
from vr.paths import Paths

LOG = logging.getLogger(__name__)

VR_GUEST_IP = "10.1.1.1"
GUEST_CIDR = "10.1.1.0/24"
VR_CONTROL_IP = "169.254.10.10"
MGMT_IP = "169.254.10.1"
VR_PUBLIC_IP = "203.0.113.10"
OUTSIDER_IP = "203.0.113.20"
METADATA_IP = "169.254.169.254"


@dataclass(frozen=True)
class Guest:
    role: str
    ip: str
    mac: str
    name: str
    instance_id: str
    password: str = field(repr=False)
    user_data: bytes = b""
    ssh_key: str = ""


def demo_guests() -> list[Guest]:
    return [
        Guest(
            "ga",
            "10.1.1.23",
            "02:00:0a:01:01:17",
            "web-1",
            "5b0c3b2e-0d1f-4c55-9d8e-1a2b3c4d5e01",
            secrets.token_urlsafe(9),
            b"#cloud-config\nhostname: web-1\nruncmd:\n - echo hello from web-1\n",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKeyForWeb1Only0000000000000000000 alice@mgmt",
        ),
        Guest(
            "gb",
            "10.1.1.24",
            "02:00:0a:01:01:18",
            "db-1",
            "7f1d4c3e-2a3b-4c5d-8e9f-0a1b2c3d4e02",
            secrets.token_urlsafe(9),
            b"#!/bin/sh\necho db-1 user-data\n",
            "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIDemoKeyForDb1Only00000000000000000000 bob@mgmt",
        ),
    ]


def metadata_payload(g: Guest, zone: str = "zone-a") -> dict[str, object]:
    return {
        "vm_ip_address": g.ip,
        "vm_metadata": [
            ["userdata", "user-data", base64.b64encode(g.user_data).decode()],
            ["metadata", "service-offering", "Small Instance"],
            ["metadata", "availability-zone", zone],
            ["metadata", "local-ipv4", g.ip],
            ["metadata", "local-hostname", g.name],
            ["metadata", "public-ipv4", VR_PUBLIC_IP],
            ["metadata", "public-hostname", VR_PUBLIC_IP],
            ["metadata", "instance-id", g.instance_id],
            ["metadata", "vm-id", g.instance_id],
            ["metadata", "public-keys", g.ssh_key],
            ["metadata", "cloud-identifier", "CloudStack-{vr-demo}"],
            ["metadata", "hypervisor-host-name", None],
        ],
        "type": "vmdata",
    }


def password_payload(g: Guest, password: str | None = None) -> dict[str, object]:
    return {"ip_address": g.ip, "password": password or g.password, "type": "vmpassword"}


def dhcp_payload(g: Guest) -> dict[str, object]:
    return {
        "mac_address": g.mac,
        "ipv4_address": g.ip,
        "host_name": g.name,
        "default_entry": True,
        "remove": False,
        "type": "dhcpentry",
    }


def network_payload(add: bool = True) -> dict[str, object]:
    return {
        "device": "eth0",
        "router_guest_ip": VR_GUEST_IP,
        "cidr": GUEST_CIDR,
        "add": add,
        "type": "guestnetwork",
    }


# cloud-init's own CloudStack data source, run by the guest's system python3.
CLOUD_INIT_PROBE = r"""
import base64, json, logging, sys, tempfile
from cloudinit import distros, helpers, settings
from cloudinit.sources.DataSourceCloudStack import DataSourceCloudStack
logging.basicConfig(level=logging.WARNING)
tmp = tempfile.mkdtemp()
paths = helpers.Paths({"cloud_dir": tmp, "run_dir": tmp})
distro = distros.fetch("debian")("debian", {}, paths)
cfg = dict(settings.CFG_BUILTIN)
cfg["datasource"] = {"CloudStack": {"max_wait": 30, "timeout": 5}}
ds = DataSourceCloudStack(cfg, distro, paths)
ok = ds.get_data()
md = ds.metadata or {}
out = {
    "ok": ok,
    "vr_address": ds.vr_addr,
    "instance_id": md.get("instance-id"),
    "local_hostname": ds.get_hostname().hostname if ok else None,
    "availability_zone": md.get("availability-zone"),
    "public_keys": ds.get_public_ssh_keys() if ok else [],
    "user_data_b64": base64.b64encode(ds.userdata_raw or b"").decode(),
    "password": ds.get_config_obj().get("password"),
}
json.dump(out, sys.stdout)
"""


@dataclass
class Sandbox:
    """Build with :meth:`create`; always :meth:`close` (or use :func:`sandbox`)."""

    workdir: Path
    tag: str
    namespaces: dict[str, str] = field(default_factory=dict)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    guests: list[Guest] = field(default_factory=demo_guests)

    @property
    def vr_root(self) -> Path:
        return self.workdir / "vr-root"

    @property
    def paths(self) -> Paths:
        return Paths(self.vr_root)

    @property
    def key(self) -> Path:
        return self.workdir / "mgmt" / "id_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.workdir / "mgmt" / "known_hosts"

    @property
    def vr_log(self) -> Path:
        return self.workdir / "vr-up.log"

    def ns(self, role: str) -> str:
        return self.namespaces[role]

    # --- commands -------------------------------------------------------------------

    def run(
        self, role: str, argv: Sequence[str], timeout: float = 60, ok_codes: Sequence[int] = (0,)
    ) -> subp.Result:
        return subp.run(
            ["ip", "netns", "exec", self.ns(role), *self._guest_view(role, argv)],
            timeout=timeout,
            ok_codes=ok_codes,
        )

    def guest_dir(self, role: str) -> Path:
        return self.workdir / "guests" / role

    def _guest_view(self, role: str, argv: Sequence[str]) -> list[str]:
        """A guest's command sees its own DHCP lease directory (``/var/lib/dhcp``,
        where dhclient writes and cloud-init reads) and no systemd-networkd leases of
        the host, in a mount and UTS namespace of its own (dhclient may set a name)."""
        if role not in {g.role for g in self.guests}:
            return list(argv)
        d = self.guest_dir(role)
        return [
            "unshare", "-m", "-u", "sh", "-c",
            'mount --bind "$1/dhcp" /var/lib/dhcp || exit 97; '
            'if [ -d /run/systemd/netif/leases ]; then '
            'mount --bind "$1/netif" /run/systemd/netif/leases || exit 97; fi; '
            'shift; exec "$@"',
            "sh", str(d), *argv,
        ]  # fmt: skip

    def dhcp(self, role: str, timeout: int = 30) -> subp.Result:
        """Run ``dhclient`` on the guest's eth0 once, as a booting Debian guest does;
        it stays to renew. Exit 0 with a lease, non-zero when none came in ``timeout``."""
        conf = self.guest_dir(role) / "dhclient.conf"
        conf.write_text(
            f"timeout {timeout};\nretry 1;\n"
            "request subnet-mask, broadcast-address, routers, domain-name, "
            "domain-name-servers, domain-search, host-name;\n"
        )
        return self.run(
            role,
            ["dhclient", "-4", "-1", "-v", "-cf", str(conf),
             "-lf", "/var/lib/dhcp/dhclient.eth0.leases",
             "-pf", "/var/lib/dhcp/dhclient.eth0.pid", "eth0"],
            timeout=timeout + 30,
            ok_codes=range(256),
        )  # fmt: skip

    def lease(self, role: str) -> str:
        """The guest's dhclient lease file, as cloud-init reads it."""
        f = self.guest_dir(role) / "dhcp" / "dhclient.eth0.leases"
        return f.read_text() if f.exists() else ""

    def vr_cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "vr", *args]

    # --- building -------------------------------------------------------------------

    def _add_ns(self, role: str) -> str:
        name = f"{self.tag}-{role}"
        subp.run(["ip", "netns", "add", name])
        self.namespaces[role] = name
        subp.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"])
        return name

    def _veth(self, a: str, a_dev: str, b: str, b_dev: str) -> None:
        ta, tb = f"{self.tag}{a}{a_dev}"[-15:], f"{self.tag}{b}{b_dev}"[-15:]
        subp.run(["ip", "link", "add", ta, "type", "veth", "peer", "name", tb])
        subp.run(["ip", "link", "set", ta, "netns", self.ns(a)])
        subp.run(["ip", "link", "set", tb, "netns", self.ns(b)])
        self.run(a, ["ip", "link", "set", ta, "name", a_dev])
        self.run(b, ["ip", "link", "set", tb, "name", b_dev])

    def _addr(self, role: str, dev: str, cidr: str, mac: str | None = None) -> None:
        if mac:
            self.run(role, ["ip", "link", "set", dev, "address", mac])
        if cidr:
            self.run(role, ["ip", "addr", "add", cidr, "dev", dev])
        self.run(role, ["ip", "link", "set", dev, "up"])

    def create(self) -> None:
        for role in ("vr", "sw", "mg", "out"):
            self._add_ns(role)
        # guest network: a bridge in "sw" joins the VR's eth0 and every guest
        self.run("sw", ["ip", "link", "add", "br0", "type", "bridge"])
        self.run("sw", ["ip", "link", "set", "br0", "up"])
        self._veth("vr", "eth0", "sw", "p0")
        self._addr("vr", "eth0", f"{VR_GUEST_IP}/24")
        self.run("sw", ["ip", "link", "set", "p0", "master", "br0", "up"])
        for g in self.guests:
            self._attach(g)
        self._veth("vr", "eth1", "mg", "eth0")
        self._addr("vr", "eth1", f"{VR_CONTROL_IP}/16")
        self._addr("mg", "eth0", f"{MGMT_IP}/16")
        self._veth("vr", "eth2", "out", "eth0")
        self._addr("vr", "eth2", f"{VR_PUBLIC_IP}/24")
        self._addr("out", "eth0", f"{OUTSIDER_IP}/24")
        self.run("out", ["ip", "route", "add", "default", "via", VR_PUBLIC_IP])
        self._prepare_vr_root()

    def _attach(self, g: Guest) -> None:
        """Create guest ``g``'s namespace and plug it into the guest network bridge."""
        for sub in ("dhcp", "netif"):
            (self.guest_dir(g.role) / sub).mkdir(parents=True, exist_ok=True)
        self._add_ns(g.role)
        port = f"p{len(self.namespaces)}"
        self._veth(g.role, "eth0", "sw", port)
        # no address: the guest gets it from the VR's dnsmasq (see :meth:`dhcp`)
        self._addr(g.role, "eth0", "", g.mac)
        self.run("sw", ["ip", "link", "set", port, "master", "br0", "up"])
        self._guest_etc(g.role)

    def add_guest(self, g: Guest) -> None:
        """Boot one more guest on the guest network (while everything runs)."""
        self.guests.append(g)
        self._attach(g)

    def _guest_etc(self, role: str) -> None:
        """A guest's own ``/etc/hosts`` (localhost only: ``data-server`` comes from the
        VR's DNS) and ``/etc/resolv.conf``, which dhclient fills from its lease."""
        etc = Path("/etc/netns") / self.ns(role)
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "hosts").write_text("127.0.0.1 localhost\n")
        (etc / "resolv.conf").write_text("")

    def _prepare_vr_root(self) -> None:
        paths = self.paths
        paths.ensure()
        paths.config.write_text(
            json.dumps({"control_device": "eth1", "public_devices": ["eth2"]}) + "\n"
        )
        self.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        subp.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "mgmt", "-f", str(self.key)])
        paths.authorized_keys.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        paths.authorized_keys.write_text(self.key.with_suffix(".pub").read_text())
        paths.authorized_keys.chmod(0o600)

    # --- the appliance --------------------------------------------------------------

    def start_vr(self, timeout: float = 60) -> None:
        log = self.vr_log.open("ab")
        proc = subp.spawn(
            ["ip", "netns", "exec", self.ns("vr"), *self.vr_cmd("up", "--root", str(self.vr_root))],
            stdout=log.fileno(),
            stderr=log.fileno(),
            die_with_parent=True,
        )
        log.close()
        self.procs.append(proc)
        status = self.vr_root / "run/vr/status.json"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"vr up exited with {proc.returncode}; see {self.vr_log}")
            with contextlib.suppress(OSError, ValueError):
                st = json.loads(status.read_text())
                # this vr up's status, not one a killed predecessor left behind
                if st.get("ready") and st.get("pid") == proc.pid:
                    return
            time.sleep(0.1)
        raise RuntimeError(f"vr up not ready after {timeout}s; see {self.vr_log}")

    def stop_vr(self) -> int | None:
        code = None
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
                try:
                    code = p.wait(10)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
                    code = p.wait()
            else:
                code = p.returncode
        self.procs.clear()
        return code

    def write_payloads(self, payloads: Sequence[tuple[str, dict[str, object]]]) -> list[Path]:
        """Write payload files (``(file name, JSON object)``) for ``vr push``."""
        out = self.workdir / "push" / secrets.token_hex(4)
        out.mkdir(parents=True)
        files = []
        for name, obj in payloads:
            f = out / name
            f.write_text(json.dumps(obj))
            files.append(f)
        return files

    def push(self, files: Sequence[Path], batch: bool = False) -> subp.Result:
        argv = self.vr_cmd(
            "push",
            "--host",
            VR_CONTROL_IP,
            "--key",
            str(self.key),
            "--known-hosts",
            str(self.known_hosts),
            "--accept-new",
            *(["--batch"] if batch else []),
            *map(str, files),
        )
        return self.run("mg", argv, timeout=120)

    def initial_payloads(self) -> list[tuple[str, dict[str, object]]]:
        items: list[tuple[str, dict[str, object]]] = [("guest_network.json", network_payload())]
        for g in self.guests:
            items.append((f"vm_dhcp_entry-{g.role}.json", dhcp_payload(g)))
            items.append((f"vm_metadata-{g.role}.json", metadata_payload(g)))
            items.append((f"vm_password-{g.role}.json", password_payload(g)))
        return items

    # --- what a guest sees ----------------------------------------------------------

    def curl(self, role: str, url: str) -> subp.Result:
        return self.run(role, ["curl", "-sS", "--max-time", "10", url], ok_codes=range(256))

    def wget_password(
        self, role: str, request: str = "send_my_password", host: str = VR_GUEST_IP
    ) -> subp.Result:
        """Exactly as CloudStack's cloud-set-guest-password asks; ``host`` is the VR's
        guest address (what the script finds as its DHCP server) or ``METADATA_IP``.

        The answer (``stdout``) may be a password: never print or log it."""
        return self.run(
            role,
            [
                "wget",
                "-q",
                "-t",
                "3",
                "-T",
                "20",
                "-O",
                "-",
                "--header",
                f"DomU_Request: {request}",
                f"http://{host}:8080",
            ],
            ok_codes=range(256),
        )

    def cloud_init(self, role: str) -> dict[str, object]:
        """Run cloud-init's CloudStack data source in the guest; return what it read."""
        res = self.run(role, ["/usr/bin/python3", "-c", CLOUD_INIT_PROBE], timeout=120)
        data: dict[str, object] = json.loads(res.stdout)
        return data

    # --- teardown -------------------------------------------------------------------

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stop_vr()
        for role, name in list(self.namespaces.items()):
            res = subp.run(["ip", "netns", "pids", name], ok_codes=range(256))
            for pid in res.stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subp.run(["ip", "netns", "del", name], ok_codes=range(256))
            shutil.rmtree(Path("/etc/netns") / name, ignore_errors=True)
            del self.namespaces[role]
        with contextlib.suppress(OSError):
            Path("/etc/netns").rmdir()  # only if empty: never remove others' overlays


@contextlib.contextmanager
def sandbox(keep_dir: Path | None = None) -> Iterator[Sandbox]:
    """Create a sandbox and always tear it down."""
    workdir = keep_dir or Path(tempfile.mkdtemp(prefix="vr-sandbox-"))
    # dnsmasq drops root (to nobody) and re-reads its hosts files under the VR root
    workdir.chmod(0o711)
    sb = Sandbox(workdir, f"vr{secrets.token_hex(2)}")
    try:
        sb.create()
        yield sb
    finally:
        sb.close()
        if keep_dir is None:
            shutil.rmtree(workdir, ignore_errors=True)
