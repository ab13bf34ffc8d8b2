"""image/build end to end: a Debian bookworm root filesystem with the appliance installed,
image/check run against it (chroot, systemd-analyze verify, `vr up` from the image in
network namespaces serving a pushed VM to a guest), and the SystemVM qcow2 made from it
booted under QEMU the way CloudStack's KVM agent starts a router.

Slow: a cold build runs debootstrap; later runs unpack the cached base system from
/var/cache/vr-image. The build is made once for the module. Everything lives under
/var/tmp (not /tmp, which may be a noexec tmpfs) and is removed afterwards, but only
once nothing is mounted under it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.netns import Lab, Namespace, sh, stop
from vr.demo.sandbox import Guest, dhcp_payload, metadata_payload, password_payload

REPO = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 1200  # a cold build takes a few minutes; never let CI hang on a mirror
BOOT_DEADLINE = 600  # TCG on a busy 2-core machine: generous; the figures are printed
POWEROFF_DEADLINE = 180
MAX_IMAGE_BYTES = 500 * 2**20
TCG = ["-accel", "tcg"]


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path``, from the kernel's table (octal escapes decoded)."""
    base = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if point == base or point.startswith(base + "/"):
                found.append(point)
    return found


def remove_rootfs(path: Path) -> None:
    """Unmount what a failed build may have left (deepest first), then delete the tree."""
    for point in sorted(mounts_under(path), key=len, reverse=True):
        subprocess.run(["umount", "-l", point], check=False)
    left = mounts_under(path)
    # Deleting through a bind-mounted /dev would empty the host's /dev: refuse loudly.
    assert not left, f"still mounted under {path}, not deleting: {left}"
    subprocess.run(["rm", "-rf", "--one-file-system", "--", str(path)], check=True)


@dataclass
class Build:
    workdir: Path
    rootfs: Path
    qcow2: Path
    code: int
    out: str


def run_build(rootfs: Path, qcow2: Path) -> tuple[int, str]:
    """Run image/build in its own process group; on timeout stop the whole group so its
    EXIT traps still unmount, and report what it printed."""
    proc = subprocess.Popen(
        ["bash", str(REPO / "image" / "build"), "--qcow2", str(qcow2), str(rootfs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=BUILD_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            out, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        pytest.fail(f"image/build did not finish within {BUILD_TIMEOUT}s:\n{out[-6000:]}")
    return proc.returncode, out


@pytest.fixture(scope="module")
def build() -> Iterator[Build]:
    d = Path(tempfile.mkdtemp(prefix="vr-image-test.", dir="/var/tmp"))
    try:
        rootfs, qcow2 = d / "rootfs", d / "systemvm.qcow2"
        code, out = run_build(rootfs, qcow2)
        yield Build(d, rootfs, qcow2, code, out)
    finally:
        remove_rootfs(d)


@pytest.mark.root
@pytest.mark.slow
def test_built_image_runs_the_appliance_and_passes_its_check(build: Build) -> None:
    out = build.out
    assert mounts_under(build.workdir) == [], f"image/build left mounts behind:\n{out[-3000:]}"
    assert build.code == 0, f"image/build failed (exit {build.code}):\n{out[-8000:]}"
    assert "check: all steps passed" in out, out[-8000:]
    # The image is the one just built from this checkout, not a stale tree.
    assert (build.rootfs / "etc/vr-image-build").read_text().startswith("built=")
    assert os.readlink(build.rootfs / "usr/local/bin/vr") == "/opt/vr/venv/bin/vr"


# --- the qcow2 under QEMU -------------------------------------------------------------

GUEST_NET, VR_GUEST = "10.1.1.0/24", "10.1.1.1"
VR_CONTROL, MGMT = "169.254.3.4", "169.254.0.1"  # KVM's link-local control network (cloud0)
VR_PUBLIC, PUBLIC_GW = "192.0.2.10", "192.0.2.1"
METADATA_IP = "169.254.169.254"
NIC_MACS = ("02:00:0a:01:01:01", "0e:00:a9:fe:03:04", "06:00:c0:00:02:0a")
"""eth0 guest, eth1 control, eth2 public, in CloudStack's order."""


def boot_args(name: str) -> str:
    """What CloudStack's management server sends a KVM isolated router (spec §1.4)."""
    return " ".join(
        [
            "template=domP",
            "name=" + name,
            f"eth0ip={VR_GUEST}",
            "eth0mask=255.255.255.0",
            f"eth1ip={VR_CONTROL}",
            "eth1mask=255.255.0.0",
            f"eth2ip={VR_PUBLIC}",
            "eth2mask=255.255.255.0",
            f"gateway={PUBLIC_GW}",
            "type=router",
            "domain=cs1cloud.internal",
            "dns1=192.0.2.53",
            "cidrsize=24",
            "dhcprange=10.1.1.1",
            "privateMtu=1500",
            "publicMtu=1500",
        ]
    )


class GuestAgent:
    """The host side of qemu-guest-agent, as CloudStack's patch.sh drives it through
    ``virsh qemu-agent-command``: guest-ping, guest-sync, then guest-file-open/-write/
    -close per file."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _send(self, cmd: str, **arguments: Any) -> None:
        msg: dict[str, Any] = {"execute": cmd}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")

    def _replies(self, wait: float) -> Iterator[dict[str, Any]]:
        """Replies that arrive within ``wait`` seconds (stale ones included)."""
        end = time.monotonic() + wait
        decoder = json.JSONDecoder()
        while True:
            text = self.buf.decode("utf-8", "replace").lstrip()
            while text:
                try:
                    obj, n = decoder.raw_decode(text)
                except ValueError:
                    break
                text = text[n:].lstrip()
                self.buf = text.encode()
                yield obj
            left = end - time.monotonic()
            if left <= 0:
                return
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError:
                return
            if not chunk:
                raise ConnectionError("QEMU closed the guest agent socket")
            self.buf += chunk

    def sync(self, deadline: float) -> None:
        """guest-sync until our id comes back: the agent runs and the channel is clean."""
        while time.monotonic() < deadline:
            token = secrets.randbelow(2**31)
            self._send("guest-sync", id=token)
            for reply in self._replies(2.0):
                if reply.get("return") == token:
                    return
        raise AssertionError("qemu-guest-agent never answered guest-sync")

    def call(self, cmd: str, **arguments: Any) -> Any:
        self._send(cmd, **arguments)
        for reply in self._replies(60.0):
            if "error" in reply:
                raise AssertionError(f"{cmd}: {reply['error']}")
            if "return" in reply:
                return reply["return"]
        raise AssertionError(f"{cmd}: no answer within 60s")

    def run(self, path: str, *args: str) -> tuple[int, str]:
        """guest-exec, then guest-exec-status until it exited: (exit code, stdout)."""
        pid = self.call("guest-exec", path=path, arg=list(args), **{"capture-output": True})["pid"]
        end = time.monotonic() + 60
        while time.monotonic() < end:
            st = self.call("guest-exec-status", pid=pid)
            if st.get("exited"):
                out = base64.b64decode(st.get("out-data", "")).decode("utf-8", "replace")
                return int(st.get("exitcode", -1)), out
            time.sleep(0.2)
        raise AssertionError(f"guest-exec {path}: still running after 60s")

    def write_file(self, path: str, data: bytes) -> None:
        handle = self.call("guest-file-open", path=path, mode="w+")
        self.call("guest-file-write", handle=handle, **{"buf-b64": base64.b64encode(data).decode()})
        self.call("guest-file-close", handle=handle)


def qmp(path: Path, command: str) -> None:
    """One command on QEMU's monitor (QMP), as libvirt sends it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(path))
        f = s.makefile("rwb")
        assert b"QMP" in f.readline()  # the greeting
        for cmd in ("qmp_capabilities", command):
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:
                reply = json.loads(f.readline())
                if "event" in reply:
                    continue
                assert "return" in reply, reply
                break


def kvm_boots(disk: Path, work: Path) -> bool:
    """Use KVM when it runs this image: GRUB writes to the serial port within a second
    under KVM. On machines where /dev/kvm exists but the guest hangs, nothing appears
    and the test falls back to TCG."""
    if os.environ.get("VR_TEST_QEMU_ACCEL") in ("kvm", "tcg"):
        return os.environ["VR_TEST_QEMU_ACCEL"] == "kvm"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    serial = work / "kvm-probe.log"
    probe = work / "kvm-probe.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(disk), "-F", "qcow2", str(probe))
    proc = subprocess.Popen(
        ["qemu-system-x86_64", "-accel", "kvm", "-cpu", "host", "-m", "256", "-nodefaults",
         "-display", "none", "-drive", f"file={probe},if=virtio,format=qcow2",
         "-serial", f"file:{serial}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        end = time.monotonic() + 15
        while time.monotonic() < end and proc.poll() is None:
            if serial.exists() and serial.stat().st_size > 0:
                return True
            time.sleep(0.2)
        return False
    finally:
        stop(proc)  # type: ignore[arg-type]
        probe.unlink(missing_ok=True)


@dataclass
class Rig:
    lab: Lab
    hv: Namespace
    guest: Namespace
    mgmt: Namespace
    public: Namespace


def wire(lab: Lab) -> Rig:
    """A KVM host namespace ``hv`` with three taps, each bridged to a namespace standing
    for what is behind that NIC: a guest VM, the management server, the public gateway."""
    hv = lab.host("hv")
    rig = Rig(lab, hv, lab.host("guest"), lab.host("mgmt"), lab.host("pub"))
    ends = (
        (rig.guest, f"{'10.1.1.10'}/24", "02:00:0a:01:01:0a"),
        (rig.mgmt, f"{MGMT}/16", None),
        (rig.public, f"{PUBLIC_GW}/24", None),
    )
    for i, (ns, addr, mac) in enumerate(ends):
        hv.run("ip", "tuntap", "add", "dev", f"tap{i}", "mode", "tap")
        hv.run("ip", "link", "add", f"br{i}", "type", "bridge")
        lab.link(hv, f"up{i}", None, ns, "eth0", addr, b_mac=mac)
        for dev in (f"tap{i}", f"up{i}"):
            hv.run("ip", "link", "set", dev, "master", f"br{i}")
        for dev in (f"tap{i}", f"br{i}"):
            hv.run("ip", "link", "set", dev, "up")
    rig.guest.run("ip", "route", "add", "default", "via", VR_GUEST)
    return rig


def wait_for(
    what: str, cond: Any, deadline: float, proc: subprocess.Popen[bytes], log: Path
) -> Any:
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(
                f"QEMU exited ({proc.returncode}) while waiting for {what}:\n{tail(log)}"
            )
        got = cond()
        if got:
            return got
        time.sleep(0.5)
    raise AssertionError(f"{what}: not reached in time\n{tail(log)}")


def tail(log: Path, n: int = 60) -> str:
    try:
        text = log.read_text("utf-8", "replace")
    except FileNotFoundError:
        return "(no serial log)"
    return "\n".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).splitlines()[-n:])


def push(
    rig: Rig, work: Path, key: Path, payloads: list[tuple[str, dict[str, object]]]
) -> subprocess.CompletedProcess[str]:
    files = []
    for name, obj in payloads:
        f = work / name
        f.write_text(json.dumps(obj))
        files.append(str(f))
    return rig.mgmt.run(
        sys.executable, "-m", "vr", "push", "--host", VR_CONTROL, "--key", str(key),
        "--known-hosts", str(work / "known_hosts"), "--accept-new", "--timeout", "10", *files,
        check=False, timeout=120,
    )  # fmt: skip


def tcp_open(ns: Namespace, host: str, port: int) -> bool:
    res = ns.run("timeout", "15", "bash", "-c", f"exec 3<>/dev/tcp/{host}/{port}", check=False)
    return res.returncode == 0


@pytest.mark.root
@pytest.mark.slow
def test_qcow2_boots_takes_cloudstack_boot_arguments_and_serves_guests(build: Build) -> None:
    assert build.code == 0, f"image/build failed (exit {build.code}):\n{build.out[-8000:]}"
    size = build.qcow2.stat().st_size
    assert size <= MAX_IMAGE_BYTES, f"{build.qcow2} is {size} bytes, more than 500 MB"
    work = build.workdir / "boot"
    work.mkdir()
    disk = work / "router.qcow2"  # a linked clone, as CloudStack's KVM agent makes one
    sh("qemu-img", "create", "-q", "-f", "qcow2", "-b", str(build.qcow2), "-F", "qcow2", str(disk))
    key = work / "id_mgmt"
    sh("ssh-keygen", "-q", "-t", "rsa", "-b", "2048", "-N", "", "-C", "cloud@mgmt", "-f", str(key))
    use_kvm = kvm_boots(build.qcow2, work)
    serial, qga_sock, qmp_sock = work / "serial.log", work / "qga.sock", work / "qmp.sock"
    lab = Lab()
    proc: subprocess.Popen[bytes] | None = None
    try:
        rig = wire(lab)
        argv = [
            "qemu-system-x86_64", *(["-accel", "kvm", "-cpu", "host"] if use_kvm else TCG),
            "-m", "512", "-smp", "1", "-nodefaults", "-display", "none", "-no-reboot",
            "-drive", f"file={disk},if=virtio,format=qcow2",
            "-chardev", f"socket,id=qga0,path={qga_sock},server=on,wait=off",
            "-device", "virtio-serial-pci",
            "-device", "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
            "-serial", f"file:{serial}",
            "-qmp", f"unix:{qmp_sock},server=on,wait=off",
        ]  # fmt: skip
        for i, mac in enumerate(NIC_MACS):
            argv += ["-netdev", f"tap,id=n{i},ifname=tap{i},script=no,downscript=no"]
            argv += ["-device", f"virtio-net-pci,netdev=n{i},mac={mac}"]
        t0 = time.monotonic()
        deadline = t0 + BOOT_DEADLINE
        proc = lab.spawn(rig.hv, argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for("the guest agent socket", qga_sock.exists, deadline, proc, serial)
        agent = GuestAgent(qga_sock)
        try:
            agent.sync(deadline)
            t_agent = time.monotonic()
            # patch.sh's order: the arguments first; the key may come after them.
            agent.write_file("/var/cache/cloud/cmdline", (boot_args("r-7-VM") + "\n").encode())
            pub = key.with_suffix(".pub").read_bytes()
            agent.write_file("/var/cache/cloud/authorized_keys", pub)
            guest = Guest(
                "guest",
                "10.1.1.10",
                "02:00:0a:01:01:0a",
                "web-1",
                "5b0c3b2e-0d1f-4c55-9d8e-1a2b3c4d5e01",
                secrets.token_urlsafe(12),
                b"#cloud-config\n",
                "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGuest web@x",
            )
            payloads = [
                ("vm_dhcp_entry.json", dhcp_payload(guest)),
                ("vm_metadata.json", metadata_payload(guest)),
                ("vm_password.json", password_payload(guest)),
            ]
            # Ready: the management server's first push over SSH to the control address.
            last: list[subprocess.CompletedProcess[str]] = []

            def pushed() -> bool:
                last[:] = [push(rig, work, key, payloads)]
                return last[0].returncode == 0

            try:
                wait_for("a push over SSH to the control address", pushed, deadline, proc, serial)
            except AssertionError as exc:
                raise AssertionError(
                    f"{exc}\nlast push: {last[0].stdout}{last[0].stderr}"
                ) from None
            t_ready = time.monotonic()

            url = f"http://{METADATA_IP}/latest/instance-id"
            curl = rig.guest.run("curl", "-sS", "--max-time", "20", url, check=False)
            assert curl.stdout == guest.instance_id, curl.stderr
            got = rig.guest.run("wget", "-q", "-t", "3", "-T", "20", "-O", "-", "--header",
                                "DomU_Request: send_my_password", f"http://{VR_GUEST}:8080",
                                check=False)  # fmt: skip
            if got.stdout != guest.password:
                raise AssertionError("the guest was not served its password")
            # Locked down: SSH only on the control interface, never from a guest or outside.
            assert tcp_open(rig.mgmt, VR_CONTROL, 3922)
            assert not tcp_open(rig.guest, VR_GUEST, 3922)
            assert not tcp_open(rig.public, VR_PUBLIC, 3922)
            # No password login on the console: root's password is locked ("L").
            code, out = agent.run("/usr/bin/passwd", "-S", "root")
            assert code == 0 and out.split()[:2] == ["root", "L"], out
            code, out = agent.run("/bin/hostname")
            assert out.strip() == "r-7-VM"
        finally:
            agent.close()
        # Power off cleanly: the ACPI power button, as libvirt's shutdown (CloudStack's
        # StopCommand) presses it.
        t_off = time.monotonic()
        qmp(qmp_sock, "system_powerdown")
        try:
            code = proc.wait(timeout=POWEROFF_DEADLINE)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"no poweroff within {POWEROFF_DEADLINE}s:\n{tail(serial)}"
            ) from None
        t_off = time.monotonic() - t_off
        assert code == 0, f"QEMU exited with {code}:\n{tail(serial)}"
        assert "reboot: Power down" in serial.read_text("utf-8", "replace"), tail(serial)
        built = re.findall(r"^build: disk image .*$", build.out, re.M)
        print(
            f"\n{built[-1] if built else ''}\nsystemvm image: {size / 2**20:.0f} MiB qcow2 "
            f"({'KVM' if use_kvm else 'TCG'}); "
            f"power-on -> guest agent {t_agent - t0:.1f} s, -> ready (first push over SSH) "
            f"{t_ready - t0:.1f} s; ACPI power button -> off {t_off:.1f} s",
            file=sys.stderr,
        )
    finally:
        if proc is not None:
            with contextlib.suppress(ProcessLookupError):
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(10)
        lab.close()
