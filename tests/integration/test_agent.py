"""The push agent as a real process, driven by real OpenSSH clients, paramiko and ``vr push``.

The agent listens on a free loopback port. Every client gets ``-i key -o
IdentitiesOnly=yes -o BatchMode=yes`` and its own known-hosts file, so nothing in
~/.ssh is used or changed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

import paramiko
import pytest

from tests.helpers.agent import REPO, AgentProcess, KexRecorder, keygen
from tests.helpers.procs import free_port, wait_port
from vr.agent.client import Outcome, Target, push_files
from vr.paths import Paths
from vr.store import read_vm

pytestmark = pytest.mark.root


@dataclass
class Keys:
    ed25519: Path
    rsa: Path
    ecdsa: Path
    stranger: Path
    pem_rsa: Path
    """RSA in PEM format, as CloudStack's management server keeps its key (id_rsa.cloud)."""


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    d = tmp_path_factory.mktemp("keys")
    return Keys(
        keygen(d / "mgmt_ed25519", "ed25519"),
        keygen(d / "mgmt_rsa", "rsa"),
        keygen(d / "mgmt_ecdsa", "ecdsa"),
        keygen(d / "stranger", "ed25519"),
        keygen(d / "mgmt_pem_rsa", "rsa", pem=True),
    )


def authorize(paths: Paths, *keys: Path) -> None:
    paths.authorized_keys.parent.mkdir(parents=True, exist_ok=True)
    paths.authorized_keys.write_text("".join(Path(f"{k}.pub").read_text() for k in keys))


@dataclass
class Agent:
    proc: AgentProcess
    paths: Paths
    known_hosts: Path
    keys: Keys
    work: Path

    @property
    def port(self) -> int:
        return self.proc.port

    def opts(self, key: Path | None = None, strict: str = "accept-new",
             known_hosts: Path | None = None) -> list[str]:  # fmt: skip
        return [
            "-i", str(key or self.keys.ed25519),
            "-o", "IdentitiesOnly=yes",
            "-o", "BatchMode=yes",
            "-o", f"UserKnownHostsFile={known_hosts or self.known_hosts}",
            "-o", f"StrictHostKeyChecking={strict}",
            "-o", "ConnectTimeout=20",
        ]  # fmt: skip

    def ssh(self, *command: str, key: Path | None = None, extra: tuple[str, ...] = (),
            strict: str = "accept-new",
            known_hosts: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        return run(["ssh", "-p", str(self.port), *self.opts(key, strict, known_hosts), *extra,
                    "root@127.0.0.1", *command])  # fmt: skip

    def scp(self, src: Path, dest: str, legacy: bool,
            key: Path | None = None) -> subprocess.CompletedProcess[str]:  # fmt: skip
        mode = ["-O"] if legacy else []
        return run(["scp", *mode, "-P", str(self.port), *self.opts(key), str(src),
                    f"root@127.0.0.1:{dest}"])  # fmt: skip

    def sftp(self, script: str) -> subprocess.CompletedProcess[str]:
        batch = self.work / "sftp.batch"
        batch.write_text(script)
        return run(["sftp", "-b", str(batch), "-P", str(self.port), *self.opts(),
                    "root@127.0.0.1"])  # fmt: skip

    def vr_push(self, *args: str, key: Path | None = None) -> subprocess.CompletedProcess[str]:
        return run([sys.executable, "-m", "vr", "push", "--host", "127.0.0.1",
                    "--port", str(self.port), "--key", str(key or self.keys.ed25519),
                    "--known-hosts", str(self.known_hosts), *args])  # fmt: skip

    def payload(self, ip: str, hostname: str, name: str = "vm_metadata.json") -> Path:
        path = self.work / f"{hostname}-{name}"
        path.write_text(metadata(ip, hostname))
        return path

    def hostname_of(self, ip: str) -> bytes | None:
        rec = read_vm(self.paths, IPv4Address(ip))
        return None if rec is None else rec.metadata.get("local-hostname")


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL)  # fmt: skip


def metadata(ip: str, hostname: str) -> str:
    return json.dumps(
        {
            "vm_ip_address": ip,
            "vm_metadata": [
                ["userdata", "user-data", "I2Nsb3VkLWNvbmZpZwo="],
                ["metadata", "local-hostname", hostname],
                ["metadata", "instance-id", f"i-{hostname}"],
            ],
            "type": "vmdata",
        }
    )


def start_agent(
    tmp: Path, keys: Keys, *extra: str, config: dict[str, object] | None = None
) -> Agent:
    root = tmp / "vrroot"
    paths = Paths(root)
    paths.ensure()
    if config is not None:
        paths.config.write_text(json.dumps(config))
    authorize(paths, keys.ed25519, keys.rsa, keys.ecdsa, keys.pem_rsa)
    work = tmp / "work"
    work.mkdir(exist_ok=True)
    proc = AgentProcess(root, extra=extra).start()
    return Agent(proc, paths, tmp / "known_hosts", keys, work)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Iterator[Agent]:
    a = start_agent(tmp_path_factory.mktemp("agent"), keys)
    try:
        yield a
    finally:
        a.proc.stop()


def written_outside_cache(paths: Paths, name: str) -> list[Path]:
    """Every file called ``name`` under the root but outside var/cache/cloud."""
    return [p for p in paths.root.rglob(name) if paths.cache not in p.parents]


# --- real clients push and apply ---------------------------------------------------------


def test_scp_legacy_then_ssh_update_config_applies_the_vm(agent: Agent) -> None:
    src = agent.payload("10.1.1.10", "scp-legacy")
    name = "vm_metadata.json.0a1b2c3d"
    up = agent.scp(src, f"/var/cache/cloud/{name}", legacy=True)
    assert up.returncode == 0, up.stderr
    assert stat.S_IMODE(os.stat(agent.paths.cache / name).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(agent.paths.cache).st_mode) == 0o700
    res = agent.ssh(f"/opt/cloud/bin/update_config.py {name}")
    assert res.returncode == 0, res.stderr
    assert f"{name}: applied" in res.stderr  # the apply line goes to stderr, like a log line
    assert agent.hostname_of("10.1.1.10") == b"scp-legacy"
    assert (agent.paths.processed / f"{name}.gz").exists()
    assert not (agent.paths.cache / name).exists()


def test_scp_in_sftp_mode_then_the_bare_script_name(agent: Agent) -> None:
    src = agent.work / "vm_metadata.json.5e6f"
    src.write_text(metadata("10.1.1.11", "scp-sftp"))
    up = agent.scp(src, "/var/cache/cloud/", legacy=False)
    assert up.returncode == 0, up.stderr
    res = agent.ssh("update_config.py", "vm_metadata.json.5e6f")
    assert res.returncode == 0, res.stderr
    assert agent.hostname_of("10.1.1.11") == b"scp-sftp"


def test_sftp_batch_mode_upload_is_applied(agent: Agent) -> None:
    src = agent.payload("10.1.1.12", "sftp-batch")
    res = agent.sftp(f"put {src} /var/cache/cloud/vm_metadata.json.77aa\nls\n")
    assert res.returncode == 0, res.stderr
    assert "vm_metadata.json.77aa" in res.stdout
    res = agent.ssh("/opt/cloud/bin/update_config.py vm_metadata.json.77aa")
    assert res.returncode == 0 and agent.hostname_of("10.1.1.12") == b"sftp-batch"


def test_a_retried_update_config_succeeds_and_a_bad_payload_fails(agent: Agent) -> None:
    src = agent.payload("10.1.1.13", "retried")
    agent.scp(src, "/var/cache/cloud/vm_metadata.json.r1", legacy=True)
    assert agent.ssh("/opt/cloud/bin/update_config.py vm_metadata.json.r1").returncode == 0
    again = agent.ssh("/opt/cloud/bin/update_config.py vm_metadata.json.r1")
    assert again.returncode == 0 and "already applied" in again.stdout
    bad = agent.work / "bad.json"
    bad.write_text('{"vm_ip_address": "10.1.1.13", "vm_metadata": "nope", "type": "vmdata"}')
    agent.scp(bad, "/var/cache/cloud/vm_metadata.json.bad1", legacy=True)
    res = agent.ssh("/opt/cloud/bin/update_config.py vm_metadata.json.bad1")
    assert res.returncode == 1
    assert "vm_metadata.json.bad1: rejected" in res.stderr
    assert agent.hostname_of("10.1.1.13") == b"retried"


def test_every_client_key_type_logs_in(agent: Agent) -> None:
    for key in (agent.keys.ed25519, agent.keys.rsa, agent.keys.ecdsa):
        res = agent.ssh("/opt/cloud/bin/update_config.py vm_metadata.json.none", key=key)
        assert res.returncode == 1, res.stderr  # logged in; the file does not exist
        assert "no such file" in res.stderr


def test_rsa_key_with_legacy_ssh_rsa_sha1_signature_is_accepted(agent: Agent) -> None:
    src = agent.payload("10.1.1.14", "sha1-rsa")
    agent.scp(src, "/var/cache/cloud/vm_metadata.json.sha1", legacy=True)
    res = agent.ssh(
        "/opt/cloud/bin/update_config.py vm_metadata.json.sha1",
        key=agent.keys.rsa,
        extra=("-o", "PubkeyAcceptedAlgorithms=ssh-rsa"),
    )
    assert res.returncode == 0, res.stderr
    assert agent.hostname_of("10.1.1.14") == b"sha1-rsa"
    assert "accepted legacy ssh-rsa (SHA-1) signature" in agent.proc.cloud_log()


def test_vr_push_uploads_with_cloudstack_names_and_applies(agent: Agent) -> None:
    a = agent.payload("10.1.1.20", "push-a")
    b = agent.work / "pw.json"
    b.write_text('{"ip_address": "10.1.1.20", "password": "s3cret-pw", "type": "vmpassword"}')
    res = agent.vr_push("--accept-new", str(a), str(b))
    assert res.returncode == 0, res.stdout + res.stderr
    lines = res.stdout.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"ok   {a} -> vm_metadata.json.")
    assert lines[1].startswith(f"ok   {b} -> vm_password.json.")
    assert "s3cret-pw" not in res.stdout + res.stderr + agent.proc.cloud_log()
    assert agent.hostname_of("10.1.1.20") == b"push-a"


def test_vr_push_batch_applies_all_files_with_one_cfg(agent: Agent) -> None:
    files = [agent.payload(f"10.1.2.{i}", f"batch-{i}") for i in range(1, 6)]
    res = agent.vr_push("--accept-new", "--batch", *map(str, files))
    assert res.returncode == 0, res.stdout + res.stderr
    assert len(res.stdout.splitlines()) == 5
    assert all("applied with VR-" in line for line in res.stdout.splitlines())
    assert [agent.hostname_of(f"10.1.2.{i}") for i in range(1, 6)] == [
        f"batch-{i}".encode() for i in range(1, 6)
    ]
    assert list(agent.paths.processed.glob("VR-*.cfg.gz"))


def test_vr_push_reports_each_failure_and_exits_non_zero(agent: Agent) -> None:
    good = agent.payload("10.1.1.21", "mixed-good")
    bad = agent.work / "vm_metadata.json"
    bad.write_text('{"vm_ip_address": "not-an-ip", "vm_metadata": [], "type": "vmdata"}')
    res = agent.vr_push("--accept-new", str(good), str(bad))
    assert res.returncode == 1
    ok_line, fail_line = res.stdout.splitlines()
    assert ok_line.startswith("ok   ") and fail_line.startswith("FAIL ")
    assert "vm_ip_address='not-an-ip'" in fail_line
    assert "1 of 2 files failed" in res.stderr


def test_vr_push_refuses_an_unknown_host_key_without_accept_new(agent: Agent) -> None:
    src = agent.payload("10.1.1.22", "unknown-host")
    res = run([sys.executable, "-m", "vr", "push", "--host", "127.0.0.1",
               "--port", str(agent.port), "--key", str(agent.keys.ed25519),
               "--known-hosts", str(agent.work / "empty_known_hosts"), str(src)])  # fmt: skip
    assert res.returncode == 1
    assert "is not in" in res.stdout and "--accept-new" in res.stdout
    assert agent.hostname_of("10.1.1.22") is None


# --- CloudStack's management server: Trilead SSH2, SHA-1 only ------------------------------

TRILEAD_JAR = Path("/usr/share/java/trilead-ssh2.jar")
TRILEAD_PUSH = REPO / "tests/helpers/TrileadPush.java"
LEGACY_OPENSSH = ("-o", "KexAlgorithms=diffie-hellman-group14-sha1",
                  "-o", "HostKeyAlgorithms=ssh-rsa",
                  "-o", "PubkeyAcceptedAlgorithms=ssh-rsa")  # fmt: skip


def trilead_push(a: Agent, payload: Path, name: str) -> subprocess.CompletedProcess[str]:
    """SCPClient.put + execCommand(update_config.py) over Trilead, as CloudStack pushes."""
    return run(["java", "-cp", str(TRILEAD_JAR), str(TRILEAD_PUSH), "127.0.0.1", str(a.port),
                str(a.keys.pem_rsa), str(payload), name], timeout=120)  # fmt: skip


def negotiated(ssh_debug: str) -> dict[str, str]:
    """``kex: algorithm: X`` and ``kex: host key algorithm: Y`` from ``ssh -vv`` output."""
    found = {}
    for line in ssh_debug.splitlines():
        for what in ("algorithm", "host key algorithm"):
            marker = f"kex: {what}: "
            if marker in line:
                found[what] = line.split(marker, 1)[1].strip()
    return found


def test_cloudstacks_trilead_client_uploads_and_applies_over_sha1(agent: Agent) -> None:
    src = agent.payload("10.1.4.1", "trilead")
    name = "vm_metadata.json.6a0e3c1e-7d7e-4a53-9d3c-2f1c7b8e0a11"
    res = trilead_push(agent, src, name)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "exit=0" in res.stdout
    # Trilead prefers group-exchange-sha1; the agent has only group14-sha1 and is picked
    assert "kex=diffie-hellman-group14-sha1 hostkey=ssh-rsa" in res.stdout
    assert f"{name}: applied" in res.stdout
    assert agent.hostname_of("10.1.4.1") == b"trilead"
    assert (agent.paths.processed / f"{name}.gz").exists()
    assert "broke off" not in agent.proc.cloud_log()  # Trilead closes right after E


def test_cloudstacks_trilead_client_gets_a_non_zero_status_for_a_bad_payload(
    agent: Agent,
) -> None:
    bad = agent.work / "trilead-bad.json"
    bad.write_text('{"vm_ip_address": "10.1.4.2", "vm_metadata": "nope", "type": "vmdata"}')
    name = "vm_metadata.json.0b7c2d4e-1f2a-4b3c-8d9e-0a1b2c3d4e5f"
    res = trilead_push(agent, bad, name)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "exit=1" in res.stdout and f"{name}: rejected" in res.stdout
    assert agent.hostname_of("10.1.4.2") is None
    assert (agent.paths.failed / name).exists()


def test_openssh_limited_to_the_legacy_sha1_set_pushes(agent: Agent) -> None:
    src = agent.payload("10.1.4.3", "legacy-openssh")
    name = "vm_metadata.json.legacy1"
    agent.scp(src, f"/var/cache/cloud/{name}", legacy=True)
    res = agent.ssh(f"/opt/cloud/bin/update_config.py {name}", key=agent.keys.rsa,
                    extra=("-vv", *LEGACY_OPENSSH),
                    known_hosts=agent.work / "legacy_known_hosts")  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert negotiated(res.stderr) == {
        "algorithm": "diffie-hellman-group14-sha1",
        "host key algorithm": "ssh-rsa",
    }
    assert agent.hostname_of("10.1.4.3") == b"legacy-openssh"


def test_modern_clients_that_also_offer_sha1_never_negotiate_it(agent: Agent) -> None:
    legacy_logins = agent.proc.cloud_log().count("accepted legacy ssh-rsa")
    also_sha1 = ("-o", "KexAlgorithms=+diffie-hellman-group14-sha1",
                 "-o", "PubkeyAcceptedAlgorithms=+ssh-rsa")  # fmt: skip
    default = agent.ssh("update_config.py none", key=agent.keys.rsa,
                        extra=("-vv", *also_sha1, "-o", "HostKeyAlgorithms=+ssh-rsa"),
                        known_hosts=agent.work / "modern_known_hosts")  # fmt: skip
    assert "no such file" in default.stderr  # logged in, ran the command
    chosen = negotiated(default.stderr)
    assert "sha1" not in chosen["algorithm"] and chosen["host key algorithm"] == "ssh-ed25519"
    rsa_host = agent.ssh("update_config.py none", key=agent.keys.rsa,
                         extra=("-vv", *also_sha1, "-o",
                                "HostKeyAlgorithms=rsa-sha2-512,rsa-sha2-256,ssh-rsa"),
                         known_hosts=agent.work / "modern_rsa_known_hosts")  # fmt: skip
    assert "no such file" in rsa_host.stderr
    assert negotiated(rsa_host.stderr)["host key algorithm"] == "rsa-sha2-512"
    assert "sha1" not in negotiated(rsa_host.stderr)["algorithm"]
    # the RSA client key signed with rsa-sha2-*, not ssh-rsa
    assert agent.proc.cloud_log().count("accepted legacy ssh-rsa") == legacy_logins
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", agent.port, "root", key_filename=str(agent.keys.rsa),
                   look_for_keys=False, allow_agent=False,
                   transport_factory=KexRecorder)  # fmt: skip
    try:
        t = client.get_transport()
        assert isinstance(t, KexRecorder) and t.is_authenticated()
        assert t.kex_names and not any("sha1" in k for k in t.kex_names)
        assert t.host_key_type == "ssh-ed25519"
        assert "sha1" not in t.local_mac and "sha1" not in t.remote_mac  # type: ignore[attr-defined]
    finally:
        client.close()


def test_with_legacy_algorithms_off_sha1_only_clients_are_refused(
    tmp_path: Path, keys: Keys
) -> None:
    a = start_agent(tmp_path, keys, config={"ssh_legacy_algorithms": False})
    try:
        src = a.payload("10.1.4.4", "legacy-off")
        refused = "failed: Incompatible ssh peer (no acceptable kex algorithm)"
        res = trilead_push(a, src, "vm_metadata.json.off1")
        assert res.returncode == 255 and "kex=" not in res.stdout, res.stdout
        # What Trilead prints is a race inside Trilead: its reader thread closes the
        # socket on "Cannot negotiate", while connect() goes on to setTcpNoDelay on that
        # socket and may report "Socket is closed" instead. The agent's log says why.
        deadline = time.monotonic() + 20
        while refused not in a.proc.cloud_log():  # written once the handshake thread ends
            assert time.monotonic() < deadline, a.proc.cloud_log()
            time.sleep(0.05)
        assert a.proc.cloud_log().count(refused) == 1
        kex_only = a.ssh("true", extra=("-o", "KexAlgorithms=diffie-hellman-group14-sha1"))
        assert kex_only.returncode == 255
        assert "no matching key exchange method found" in kex_only.stderr
        host_only = a.ssh("true", extra=("-o", "HostKeyAlgorithms=ssh-rsa"))
        assert host_only.returncode == 255
        assert "no matching host key type found" in host_only.stderr
        sig_only = a.ssh("true", key=keys.rsa,
                         extra=("-o", "PubkeyAcceptedAlgorithms=ssh-rsa"))  # fmt: skip
        assert sig_only.returncode == 255 and "Permission denied (publickey)" in sig_only.stderr
        assert a.hostname_of("10.1.4.4") is None
        modern = a.ssh("update_config.py none", key=keys.rsa)
        assert modern.returncode == 1 and "no such file" in modern.stderr
        assert "ssh_legacy_algorithms is off" in a.proc.cloud_log()
    finally:
        assert a.proc.stop() == 0


# --- refusals ---------------------------------------------------------------------------


def test_an_unknown_key_is_refused_and_logged(agent: Agent) -> None:
    res = agent.ssh("/opt/cloud/bin/update_config.py x", key=agent.keys.stranger)
    assert res.returncode == 255
    assert "Permission denied (publickey)" in res.stderr
    assert "is not in" in agent.proc.cloud_log()


def test_repeated_failures_from_one_address_are_slowed_down(agent: Agent) -> None:
    """From an address of its own (127.0.0.9, nothing else here uses it) each failed
    login waits twice as long as the one before (0.5 s, 1 s, 2 s): measured on the
    client, so the stall is real, not only a log line. Lower bounds only."""
    took = []
    for _ in range(3):
        start = time.monotonic()
        res = agent.ssh("true", key=agent.keys.stranger, extra=("-b", "127.0.0.9"))
        took.append(time.monotonic() - start)
        assert res.returncode == 255 and "Permission denied (publickey)" in res.stderr
    assert took[2] >= 2.0 and took[2] - took[0] >= 1.0, took
    lines = [line for line in agent.proc.cloud_log().splitlines() if "from 127.0.0.9" in line]
    for n, delay in ((1, "0.5"), (2, "1.0"), (3, "2.0")):
        want = f"(failure {n} from this address; answering in {delay}s)"
        assert any(want in line for line in lines), lines


def test_password_authentication_is_refused(agent: Agent) -> None:
    res = agent.ssh(
        "true",
        extra=("-o", "PreferredAuthentications=password,keyboard-interactive",
               "-o", "PubkeyAuthentication=no"),
    )  # fmt: skip
    assert res.returncode == 255 and "Permission denied (publickey)" in res.stderr
    # a client that tries a password anyway is told only publickey is allowed
    with socket.create_connection(("127.0.0.1", agent.port)) as sock:
        t = paramiko.Transport(sock)
        try:
            t.start_client(timeout=20)
            with pytest.raises(paramiko.BadAuthenticationType) as info:
                t.auth_password("root", "guess")
            assert info.value.allowed_types == ["publickey"]
        finally:
            t.close()


def test_a_shell_request_gets_127_and_a_reason(agent: Agent) -> None:
    res = agent.ssh(extra=("-T",))
    assert res.returncode == 127
    assert "sftp, read-only diagnostics (vr status" in res.stderr  # what is allowed instead
    assert "no interactive shell" in res.stderr


def test_a_pty_is_refused(agent: Agent) -> None:
    res = agent.ssh("/opt/cloud/bin/update_config.py none", extra=("-tt",))
    assert res.returncode == 255
    assert "PTY allocation request failed" in res.stderr


def test_a_disallowed_command_gets_127_and_one_line(agent: Agent) -> None:
    res = agent.ssh("cat /etc/shadow")
    assert res.returncode == 127
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1
    assert "command not available on this appliance: 'cat'" in res.stderr


def test_port_forwarding_is_refused(agent: Agent) -> None:
    res = agent.ssh(extra=("-N", "-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"))
    assert res.returncode == 255
    assert "forwarding failed" in res.stderr.lower()


def test_a_local_forward_ssh_L_is_refused_when_used(agent: Agent) -> None:
    local = free_port()
    cmd = ["ssh", "-p", str(agent.port), *agent.opts(), "-N", "-o", "ExitOnForwardFailure=yes",
           "-L", f"127.0.0.1:{local}:127.0.0.1:{agent.port}", "root@127.0.0.1"]  # fmt: skip
    ssh = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        wait_port("127.0.0.1", local, timeout=20)  # ssh listens locally ...
        with socket.create_connection(("127.0.0.1", local), timeout=20) as s:
            assert s.recv(64) == b""  # ... but the VR refuses to carry the connection
    finally:
        # SIGKILL, not SIGTERM: OpenSSH's client sometimes takes SIGTERM inside a poll
        # that restarts and then waits on the server for ever (seen here 1 run in ~10);
        # what it printed about the refusal is in the pipe already.
        ssh.kill()
        _, err = ssh.communicate(timeout=20)
    assert "open failed: administratively prohibited" in err
    assert "refused direct-tcpip channel (ssh -L/-W)" in agent.proc.cloud_log()


def test_agent_forwarding_is_refused(agent: Agent, tmp_path: Path) -> None:
    sock = tmp_path / "agent.sock"
    ssh_agent = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline, "ssh-agent did not start"
            time.sleep(0.05)
        before = agent.proc.cloud_log().count("refused agent forwarding")
        res = subprocess.run(
            ["ssh", "-A", "-p", str(agent.port), *agent.opts(), "root@127.0.0.1",
             "/opt/cloud/bin/update_config.py none"],
            capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
            env={**os.environ, "SSH_AUTH_SOCK": str(sock)},
        )  # fmt: skip
    finally:
        ssh_agent.terminate()
        ssh_agent.wait(20)
    assert res.returncode == 1 and "no such file" in res.stderr  # the command itself ran
    assert agent.proc.cloud_log().count("refused agent forwarding") == before + 1


def test_scp_to_etc_is_refused_and_writes_nothing(agent: Agent) -> None:
    src = agent.work / "etc-probe-7731"
    src.write_text("{}")
    legacy = agent.scp(src, "/etc/", legacy=True)
    assert legacy.returncode == 1
    assert "uploads go only to /var/cache/cloud/" in legacy.stderr
    modern = agent.scp(src, "/etc/", legacy=False)
    assert modern.returncode == 1
    assert "Permission denied" in modern.stderr
    assert written_outside_cache(agent.paths, src.name) == []
    assert not Path("/etc/etc-probe-7731").exists()


def test_upload_names_with_dotdot_are_refused(agent: Agent) -> None:
    src = agent.work / "dotdot-probe-5512"
    src.write_text("{}")
    for legacy in (True, False):
        res = agent.scp(src, "/var/cache/cloud/../../../etc/dotdot-probe-5512", legacy=legacy)
        assert res.returncode == 1
    res = agent.sftp(f"put {src} ../dotdot-probe-5512\n")
    assert res.returncode == 1 and "Permission denied" in res.stderr
    assert list(agent.paths.root.rglob("dotdot-probe-5512")) == []


def test_an_upload_that_breaks_off_leaves_no_partial_file(agent: Agent) -> None:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", agent.port, "root", key_filename=str(agent.keys.ed25519),
                   look_for_keys=False, allow_agent=False)  # fmt: skip
    transport = client.get_transport()
    assert transport is not None
    chan = transport.open_session()
    chan.exec_command("scp -t /var/cache/cloud/")
    assert chan.recv(1) == b"\0"
    chan.sendall(b"C0644 100000 vm_metadata.json.cut1\n")
    assert chan.recv(1) == b"\0"
    chan.sendall(b"x" * 5000)
    sftp = client.open_sftp()
    f = sftp.open("/var/cache/cloud/vm_metadata.json.cut2", "wb")
    f.write(b"y" * 5000)
    f.flush()
    transport.close()  # both uploads are cut off
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and list(agent.paths.cache.glob(".tmp-*cut*")):
        time.sleep(0.1)
    assert list(agent.paths.cache.glob("*cut*")) == []
    assert list(agent.paths.cache.glob(".tmp-*cut*")) == []


def test_an_oversized_upload_is_refused(tmp_path: Path, keys: Keys) -> None:
    a = start_agent(tmp_path, keys, "--max-upload", "1000")
    try:
        big = a.work / "vm_metadata.json.big1"
        big.write_bytes(b" " * 5000)
        legacy = a.scp(big, "/var/cache/cloud/", legacy=True)
        assert legacy.returncode == 1
        assert "5000 bytes is too large; at most 1000 bytes" in legacy.stderr
        modern = a.scp(big, "/var/cache/cloud/", legacy=False)
        assert modern.returncode == 1
        assert list(a.paths.cache.glob("*big1*")) == []
    finally:
        assert a.proc.stop() == 0


# --- concurrency, reload, restart --------------------------------------------------------


def test_twenty_concurrent_pushes_for_different_vms_are_all_applied(agent: Agent) -> None:
    agent.vr_push("--accept-new", str(agent.payload("10.1.3.250", "warm-up")))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    procs = []
    for i in range(20):
        src = agent.payload(f"10.1.3.{i + 1}", f"conc-{i}")
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "vr", "push", "--host", "127.0.0.1", "--port",
             str(agent.port), "--key", str(agent.keys.ed25519), "--known-hosts",
             str(agent.known_hosts), str(src)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
        ))  # fmt: skip
    results = [(p.wait(120), p.stdout.read() if p.stdout else b"") for p in procs]
    assert [code for code, _ in results] == [0] * 20, results
    assert [agent.hostname_of(f"10.1.3.{i + 1}") for i in range(20)] == [
        f"conc-{i}".encode() for i in range(20)
    ]


def test_a_key_added_to_authorized_keys_works_without_restart(tmp_path: Path, keys: Keys) -> None:
    a = start_agent(tmp_path, keys)
    try:
        newcomer = keygen(tmp_path / "newcomer", "ed25519")
        assert a.ssh("update_config.py x", key=newcomer).returncode == 255
        with open(a.paths.authorized_keys, "a") as f:
            f.write(Path(f"{newcomer}.pub").read_text())
        res = a.ssh("update_config.py x", key=newcomer)
        assert res.returncode == 1 and "no such file" in res.stderr
    finally:
        a.proc.stop()


def test_restart_keeps_the_host_key_and_sigterm_stops_cleanly(tmp_path: Path, keys: Keys) -> None:
    a = start_agent(tmp_path, keys)
    first = a.ssh("update_config.py none")
    assert "no such file" in first.stderr
    assert a.proc.stop() == 0
    assert "push agent stopped" in a.proc.cloud_log()
    for name in ("ssh_host_ed25519_key", "ssh_host_rsa_key"):
        assert stat.S_IMODE(os.stat(a.paths.host_keys / name).st_mode) == 0o600
    a.proc.start()  # same root, same port
    try:
        again = a.ssh("update_config.py none", strict="yes")
        assert again.returncode == 1, again.stderr
        assert "no such file" in again.stderr
        assert "REMOTE HOST IDENTIFICATION HAS CHANGED" not in again.stderr
    finally:
        assert a.proc.stop() == 0


def logged_in_client(a: Agent) -> paramiko.SSHClient:
    client = paramiko.SSHClient()
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    client.connect("127.0.0.1", a.port, "root", key_filename=str(a.keys.ed25519),
                   look_for_keys=False, allow_agent=False)  # fmt: skip
    return client


def test_an_idle_connection_is_closed(tmp_path: Path, keys: Keys) -> None:
    a = start_agent(tmp_path, keys, "--idle-timeout", "1")
    try:
        client = logged_in_client(a)
        transport = client.get_transport()
        assert transport is not None
        deadline = time.monotonic() + 20
        while transport.is_active() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not transport.is_active()
        assert "closing connection from 127.0.0.1" in a.proc.cloud_log()
        assert "idle for 1s" in a.proc.cloud_log()
        client.close()
    finally:
        assert a.proc.stop() == 0


def wait_for_log(a: Agent, text: str, count: int = 1) -> None:
    deadline = time.monotonic() + 30
    while a.proc.cloud_log().count(text) < count:
        assert time.monotonic() < deadline, f"{count} x {text!r} not logged"
        time.sleep(0.05)


def ssh_in_background(a: Agent, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        ["ssh", "-p", str(a.port), *a.opts(), *extra, "root@127.0.0.1", "update_config.py x"],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def test_connections_beyond_the_session_limit_wait_for_a_free_place(
    tmp_path: Path, keys: Keys
) -> None:
    a = start_agent(tmp_path, keys, "--max-sessions", "1")
    try:
        holder = logged_in_client(a)  # 127.0.0.1 is now known: its sessions count here
        waiting = ssh_in_background(a)
        try:
            wait_for_log(a, "waits for a free place: 1 sessions already open")
            assert waiting.poll() is None  # not turned away: accepted, held back
            holder.close()
            _, err = waiting.communicate(timeout=60)
        finally:
            waiting.kill()
            waiting.wait(20)
        assert waiting.returncode == 1 and "no such file" in err, err
    finally:
        assert a.proc.stop() == 0


def test_one_address_cannot_hold_more_unauthenticated_connections_than_its_share(
    tmp_path: Path, keys: Keys
) -> None:
    a = start_agent(tmp_path, keys, "--max-unauthenticated", "2")
    silent: list[socket.socket] = []
    try:
        for _ in range(2):  # connect, say nothing: each holds a place until the auth timeout
            s = socket.create_connection(("127.0.0.1", a.port), timeout=20)
            silent.append(s)
            assert s.recv(64).startswith(b"SSH-2.0-vr_agent")
        third = ssh_in_background(a)
        try:
            wait_for_log(a, "waits for a free place: 2 connections from 127.0.0.1 not logged in")
            # another address is not held up by 127.0.0.1's connections
            other = a.ssh("update_config.py x", extra=("-b", "127.0.0.2"))
            assert other.returncode == 1 and "no such file" in other.stderr, other.stderr
            assert third.poll() is None
            for s in silent:
                s.close()
            _, err = third.communicate(timeout=60)
        finally:
            third.kill()
            third.wait(20)
        assert third.returncode == 1 and "no such file" in err, err
        # logged-in connections do not count against it
        held = [logged_in_client(a) for _ in range(3)]
        res = a.ssh("update_config.py x")
        assert res.returncode == 1 and "no such file" in res.stderr
        for c in held:
            c.close()
    finally:
        for s in silent:
            s.close()
        assert a.proc.stop() == 0


# --- the management server is never locked out -------------------------------------------

STRANGERS = ("127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5")


def pinned_known_hosts(a: Agent) -> Path:
    """A known-hosts file with the agent's host keys, so concurrent clients write nothing."""
    path = a.work / "pinned_known_hosts"
    lines = []
    for name in ("ssh_host_ed25519_key.pub", "ssh_host_rsa_key.pub"):
        kind, blob, _ = (a.paths.host_keys / name).read_text().split()
        lines.append(f"[127.0.0.1]:{a.port} {kind} {blob}\n")
    path.write_text("".join(lines))
    return path


def push_at_once(a: Agent, net: str, count: int = 64) -> list[str]:
    """``count`` pushes (paramiko, as ``vr push``) from 127.0.0.1 started together, each
    on its own connection; returns the hostnames the store holds afterwards."""
    target = Target("127.0.0.1", a.port, a.keys.ed25519, pinned_known_hosts(a))
    files = [a.payload(f"{net}.{i + 1}", f"burst-{net}-{i}") for i in range(count)]
    outcomes: list[Outcome | None] = [None] * count
    barrier = threading.Barrier(count)

    def one(i: int) -> None:
        barrier.wait(60)
        outcomes[i] = push_files(target, [files[i]], io.StringIO(), io.StringIO())[0]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    failed = [o.line() for o in outcomes if o is None or not o.ok]  # type: ignore[union-attr]
    assert failed == [], failed[:5]
    return [(a.hostname_of(f"{net}.{i + 1}") or b"").decode() for i in range(count)]


@contextlib.contextmanager
def idle_strangers(a: Agent, each: int) -> Iterator[list[socket.socket]]:
    """``each`` TCP connections from every address in STRANGERS that never say a word."""
    socks: list[socket.socket] = []
    try:
        for address in STRANGERS:
            for _ in range(each):
                socks.append(socket.create_connection(
                    ("127.0.0.1", a.port), timeout=20, source_address=(address, 0)))  # fmt: skip
        yield socks
    finally:
        for s in socks:
            s.close()


def stranger_lines(a: Agent, *texts: str) -> int:
    """Lines of the agent's log about a connection from STRANGERS containing a text."""
    return sum(
        any(t in line for t in texts) and any(f"from {s}:" in line for s in STRANGERS)
        for line in a.proc.cloud_log().splitlines()
    )


def test_sixty_four_pushes_at_once_from_a_new_address_are_all_applied(
    tmp_path: Path, keys: Keys
) -> None:
    """More than the 16 an unknown address may have before login: the rest wait, and
    start as soon as the first one has logged in."""
    a = start_agent(tmp_path, keys)
    try:
        assert push_at_once(a, "10.2.1") == [f"burst-10.2.1-{i}" for i in range(64)]
        assert "refused connection" not in a.proc.cloud_log()
    finally:
        assert a.proc.stop() == 0


def test_strangers_holding_idle_connections_do_not_keep_the_management_server_out(
    tmp_path: Path, keys: Keys
) -> None:
    a = start_agent(tmp_path, keys)
    try:
        warm_up = a.vr_push("--accept-new", str(a.payload("10.2.2.250", "warm-up")))
        assert warm_up.returncode == 0, warm_up.stdout + warm_up.stderr
        with idle_strangers(a, each=40):
            # 32 of the 160 hold the strangers' places, 128 wait (an agent that closed
            # what it could not serve would log "refused connection" instead)
            deadline = time.monotonic() + 30
            while stranger_lines(a, "waits for a free place", "refused connection") < 96:
                assert time.monotonic() < deadline, a.proc.cloud_log()[-2000:]
                time.sleep(0.05)
            assert push_at_once(a, "10.2.2") == [f"burst-10.2.2-{i}" for i in range(64)]
            assert stranger_lines(a, "waits for a free place") == 128
    finally:
        assert a.proc.stop() == 0


def test_strangers_cannot_lock_out_a_management_server_that_never_logged_in(
    tmp_path: Path, keys: Keys
) -> None:
    """Before its first login the management server is a stranger too: its connections
    wait, take their turn ahead of addresses that already hold places once the idle
    ones time out, and once one has logged in the rest start at once."""
    a = start_agent(tmp_path, keys, "--auth-timeout", "3")
    try:
        with idle_strangers(a, each=40):
            wait_for_log(a, "waits for a free place", count=128)
            assert push_at_once(a, "10.2.3") == [f"burst-10.2.3-{i}" for i in range(64)]
        log = a.proc.cloud_log()
        assert "refused connection from 127.0.0.2" in log  # waited 3s and was closed
        assert "waited 3s for a free place" in log
        assert "handshake with 127.0.0.2" in log and "Error reading SSH protocol banner" in log
    finally:
        assert a.proc.stop() == 0
