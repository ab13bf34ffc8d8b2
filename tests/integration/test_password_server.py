"""The password server as guests and the VR meet it: real gunicorn workers in a namespace.

A "vr" namespace runs ``python -m vr serve-passwords`` (default bind 0.0.0.0:8080,
several workers); a "guest" namespace holds two VM addresses. Guests ask with wget
exactly as ``cloud-set-guest-password`` and cloud-init do, with curl, with
``http.client`` and with cloud-init's own password client. Passwords are compared by
fingerprint only, so none ever reaches test output.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import netns
from tests.helpers.fingerprint import fp
from tests.helpers.service_lab import ServiceLab, guest_link, start_service
from vr.metadata.counters import totals
from vr.passwords.app import read_token
from vr.paths import Paths
from vr.payloads import VmPassword
from vr.store import Store, read_passwords

pytestmark = pytest.mark.root

VR = "10.60.0.1"
VM1 = "10.60.0.5"
VM2 = "10.60.0.6"
PORT = 8080
WORKERS = 3
SAVED = fp("saved_password")
BAD = fp("bad_request")
CLOUD_INIT_PYTHON = "/usr/bin/python3"


def new_password() -> str:
    return secrets.token_urlsafe(12)


def push(paths: Paths, ip: str, password: str) -> None:
    Store(paths).apply([VmPassword(IPv4Address(ip), password)])


@dataclass
class Setup(ServiceLab):
    client: subprocess.Popen[bytes]

    def _call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.client.stdin is not None and self.client.stdout is not None
        self.client.stdin.write((json.dumps(cmd) + "\n").encode())
        self.client.stdin.flush()
        out: dict[str, Any] = json.loads(self.client.stdout.readline())
        return out

    def ask(self, request: str | None, source: str = VM1, method: str = "GET") -> dict[str, Any]:
        """One request through http.client from ``source`` on a new connection."""
        return self._call({"op": "get", "source": source, "request": request, "method": method})

    def body(self, request: str | None, source: str = VM1) -> str:
        """Fingerprint of the answer body (asserting status 200)."""
        res = self.ask(request, source)
        assert (res["status"], res["content_type"]) == (200, "text/plain"), res
        return str(res["fp"])

    def raw(self, data: bytes, source: str = VM1) -> dict[str, Any]:
        return self._call({"op": "raw", "source": source, "data": base64.b64encode(data).decode()})

    def wget(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return self.guest.run_bytes("wget", *args, timeout=90)


def start_server(
    lab: netns.Lab, vr: netns.Namespace, paths: Paths, log: Path
) -> subprocess.Popen[bytes]:
    return start_service(
        lab, vr, paths, log, ["serve-passwords", "--workers", str(WORKERS)], (VR, PORT)
    )


def stop_server(proc: subprocess.Popen[bytes]) -> int:
    """SIGTERM the server's process group as a supervisor would; its exit code."""
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=20)


@contextlib.contextmanager
def password_lab(tmp: Path) -> Iterator[Setup]:
    paths = Paths(tmp / "vrroot")
    paths.ensure()
    with guest_link(VR, (VM1, VM2)) as (lab, vr, guest):
        log = tmp / "serve-passwords.log"
        server = start_server(lab, vr, paths, log)
        client = lab.spawn(
            guest,
            [sys.executable, "-m", "tests.helpers.passwd_client", VR, str(PORT)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        yield Setup(lab, vr, guest, paths, log, server, client)


@pytest.fixture(scope="module")
def module_setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    with password_lab(tmp_path_factory.mktemp("passwd")) as s:
        yield s


@pytest.fixture
def setup(module_setup: Setup) -> Setup:
    """The shared server with an empty password store."""
    with Store(module_setup.paths).locked():
        module_setup.paths.passwords.unlink(missing_ok=True)
    assert module_setup.server.poll() is None, "the password server died"
    return module_setup


def audit_lines(s: Setup, vm: str) -> list[tuple[int, str]]:
    """(worker pid, message) of the audit lines about ``vm`` in cloud.log, in order."""
    out = []
    pattern = re.compile(r"^\S+ \S+ (\d+) vr\.passwords\.app \w+ (password .*)$")
    for line in s.paths.log_file.read_text().splitlines():
        m = pattern.match(line)
        if m and f"VM {vm}:" in m.group(2):
            out.append((int(m.group(1)), m.group(2)))
    return out


# --- the clients guests really use ----------------------------------------------------


def test_wget_as_cloud_set_guest_password_fetches_acks_and_then_gets_nothing(
    setup: Setup,
) -> None:
    password = new_password()
    push(setup.paths, VM1, password)

    def wget(request: str) -> str:
        res = setup.wget(
            "-q", "-t", "3", "-T", "20", "-O", "-",
            "--header", f"DomU_Request: {request}", f"http://{VR}:8080",
        )  # fmt: skip
        assert res.returncode == 0
        return fp(res.stdout)

    fetched, want = wget("send_my_password"), fp(password)
    assert fetched == want
    assert wget("saved_password") == SAVED
    assert wget("send_my_password") == SAVED


def test_wget_as_older_cloud_init_ran_it_without_a_scheme(setup: Setup) -> None:
    password = new_password()
    push(setup.paths, VM1, password)
    res = setup.wget(
        "--quiet", "--tries", "3", "--timeout", "20", "--output-document", "-",
        "--header", "DomU_Request: send_my_password", f"{VR}:8080",
    )  # fmt: skip
    got, want = fp(res.stdout), fp(password)
    assert res.returncode == 0
    assert got == want


def test_cloud_inits_own_password_client_gets_the_password_and_acknowledges_it(
    setup: Setup, tmp_path: Path
) -> None:
    probe = subprocess.run([CLOUD_INIT_PYTHON, "-c", "import cloudinit"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("cloud-init is not installed for /usr/bin/python3")
    password = new_password()
    push(setup.paths, VM1, password)
    driver = tmp_path / "cloud_init_password.py"
    driver.write_text(
        textwrap.dedent(
            f"""
            import hashlib, sys
            from cloudinit.sources.DataSourceCloudStack import CloudStackPasswordServerClient
            pw = CloudStackPasswordServerClient({VR!r}).get_password()
            print("none" if pw is None else hashlib.sha256(pw.encode()).hexdigest()[:16])
            """
        )
    )
    res = setup.guest.run(CLOUD_INIT_PYTHON, str(driver), timeout=120)
    got, want = res.stdout.strip(), fp(password)
    assert got == want
    assert VM1 not in read_passwords(setup.paths)  # cloud-init acknowledged it
    again = setup.guest.run(CLOUD_INIT_PYTHON, str(driver), timeout=120)
    assert again.stdout.strip() == "none"


def test_curl_sees_status_200_plain_text_and_the_exact_body(setup: Setup) -> None:
    password = new_password()
    push(setup.paths, VM1, password)

    def curl(*headers: str) -> tuple[str, dict[str, str], str]:
        args = [a for h in headers for a in ("-H", h)]
        res = setup.guest.run_bytes("curl", "-sS", "-i", *args, f"http://{VR}:8080/")
        assert res.returncode == 0
        head, _, body = res.stdout.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines[1:])
        return lines[0], {k.lower(): v for k, v in fields.items()}, fp(body)

    status, headers, body = curl("DomU_Request: send_my_password")
    want = fp(password)
    assert status.split(" ", 1)[1] == "200 OK"
    assert headers["content-type"] == "text/plain"
    assert headers["content-length"] == str(len(password))
    assert body == want
    # the header name is case-insensitive, the value is not
    assert curl("domu_request: send_my_password")[2] == want
    assert curl("DomU_Request: Send_My_Password")[2] == BAD
    assert curl()[2] == BAD


def test_http_client_walks_every_protocol_branch(setup: Setup) -> None:
    assert setup.body("send_my_password") == SAVED
    password = new_password()
    push(setup.paths, VM1, password)
    assert setup.body("bad_value") == BAD
    assert setup.body(None) == BAD
    assert setup.body("save_password") == BAD  # a save is a POST
    assert setup.body("saved_password") == SAVED  # ack before any fetch: kept
    fetched = setup.body("send_my_password")
    assert fetched == fp(password)
    assert setup.body("send_my_password") == fetched  # a fetch does not clear
    assert setup.body("saved_password") == SAVED
    assert setup.body("send_my_password") == SAVED
    for method in ("PUT", "DELETE", "HEAD"):
        assert setup.ask("send_my_password", method=method)["status"] == 405


def test_each_guest_gets_only_its_own_password(setup: Setup) -> None:
    mine, theirs = new_password(), new_password()
    push(setup.paths, VM1, mine)
    push(setup.paths, VM2, theirs)
    got = (setup.body("send_my_password", VM1), setup.body("send_my_password", VM2))
    assert got == (fp(mine), fp(theirs))
    setup.body("saved_password", VM1)
    assert setup.body("send_my_password", VM2) == fp(theirs)
    assert setup.body("send_my_password", VM1) == SAVED


def test_the_sentinel_pushed_for_templates_without_passwords_is_served(setup: Setup) -> None:
    push(setup.paths, VM1, "saved_password")
    assert setup.body("send_my_password") == SAVED


# --- several workers -------------------------------------------------------------------


def test_fetch_and_ack_in_different_workers_neither_lose_nor_resurrect(setup: Setup) -> None:
    """Every round: push, fetch, ack, fetch again; at least one pair crosses workers."""
    rounds = 40
    before = len(audit_lines(setup, VM1))
    for _ in range(rounds):
        password = new_password()
        push(setup.paths, VM1, password)
        fetched = setup.body("send_my_password")
        assert fetched == fp(password)
        assert setup.body("saved_password") == SAVED
        assert setup.body("send_my_password") == SAVED
    lines = audit_lines(setup, VM1)[before:]
    fetches = [(pid, msg) for pid, msg in lines if "served generation" in msg]
    acks = [(pid, msg) for pid, msg in lines if msg.endswith(": cleared")]
    assert len(fetches) == len(acks) == rounds
    crossed = sum(f[0] != a[0] for f, a in zip(fetches, acks, strict=True))
    assert crossed >= 1


def test_a_push_racing_an_ack_is_never_cleared_by_it(setup: Setup) -> None:
    """Ack of the old password and push of a new one at once: the new one survives."""
    for _ in range(25):
        old, new = new_password(), new_password()
        push(setup.paths, VM1, old)
        assert setup.body("send_my_password") == fp(old)
        pusher = threading.Thread(target=push, args=(setup.paths, VM1, new))
        pusher.start()
        ack = setup.body("saved_password")
        pusher.join()
        assert ack == SAVED
        after = setup.body("send_my_password")
        assert after == fp(new)


def test_update_config_written_password_is_served_by_the_running_server(
    setup: Setup, tmp_path: Path
) -> None:
    password = new_password()
    payload = {"type": "vmpassword", "ip_address": VM1, "password": password}
    (setup.paths.cache / "vm_password.json").write_text(json.dumps(payload))
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "vr",
            "update-config",
            "--root",
            str(setup.paths.root),
            "vm_password.json",
        ],
        capture_output=True,
        timeout=60,
    )
    assert res.returncode == 0
    assert setup.body("send_my_password") == fp(password)


# --- saves by POST -----------------------------------------------------------------------


def _post(ns: netns.Namespace, url: str, form: list[str]) -> str:
    """curl a save; form values are read from files or stdin, never from argv."""
    res = ns.run_bytes(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}",
        "-H", "DomU_Request: save_password", *form, url,
    )  # fmt: skip
    return res.stdout.decode()


def test_save_by_post_from_the_vr_itself_in_both_encodings(setup: Setup, tmp_path: Path) -> None:
    token_file = setup.paths.password_token
    first, second = new_password(), new_password()
    pw_file = tmp_path / "pw"
    pw_file.write_text(first)
    multipart = _post(
        setup.vr,
        "http://127.0.0.1:8080/",
        ["-F", f"ip={VM1}", "-F", f"password=<{pw_file}", "-F", f"token=<{token_file}"],
    )
    assert multipart == "200"
    assert setup.body("send_my_password", VM1) == fp(first)
    pw_file.write_text(second)
    # from the VR's own guest address (not loopback): still the VR itself
    urlencoded = _post(
        setup.vr,
        f"http://{VR}:8080/",
        [
            *("--data-urlencode", f"ip={VM2}"),
            *("--data-urlencode", f"password@{pw_file}"),
            *("--data-urlencode", f"token@{token_file}"),
        ],
    )
    assert urlencoded == "200"
    assert setup.body("send_my_password", VM2) == fp(second)


def test_save_with_a_wrong_token_or_from_a_guest_is_refused(setup: Setup, tmp_path: Path) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text("0" * 32)
    pw_file = tmp_path / "pw"
    pw_file.write_text(new_password())
    form = ["-F", f"ip={VM1}", "-F", f"password=<{pw_file}"]
    assert _post(setup.vr, "http://127.0.0.1:8080/", [*form, "-F", f"token=<{wrong}"]) == "403"
    right = ["-F", f"token=<{setup.paths.password_token}"]
    assert _post(setup.guest, f"http://{VR}:8080/", [*form, *right]) == "403"
    malformed = ["-F", "ip=not-an-ip", "-F", f"password=<{pw_file}", *right]
    assert _post(setup.vr, "http://127.0.0.1:8080/", malformed) == "400"
    assert not setup.paths.passwords.exists()
    assert read_token(setup.paths) is not None


# --- bad input -----------------------------------------------------------------------------


def test_bad_inputs_are_answered_and_every_worker_keeps_serving(setup: Setup) -> None:
    password = new_password()
    push(setup.paths, VM1, password)
    get = b"GET / HTTP/1.1\r\nHost: x\r\n"
    huge = setup.raw(get + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n")
    assert huge["status_line"].startswith("HTTP/1.1 431")
    binary = setup.raw(get + b"DomU_Request: \x80\xff\xfesend\r\nConnection: close\r\n\r\n")
    assert binary["status_line"] == "HTTP/1.1 200 OK"
    assert binary["fp"] == BAD
    nul = setup.raw(get + b"DomU_Request: send_my\x00password\r\n\r\n")
    assert nul["status_line"].startswith("HTTP/1.1 400")
    garbage = bytes.fromhex("160301020001000200030300") + bytes(range(256))
    # not HTTP from its first byte: refused at once (llhttp), not waited on
    assert setup.raw(garbage)["status_line"].startswith("HTTP/1.1 400")
    assert setup.raw(b"GET / HTTP/1.1\nDomU_Request: send_my_password\n\n")[
        "status_line"
    ].startswith("HTTP/1.1 400")
    assert setup.raw(garbage + b"\r\n\r\n")["status_line"].startswith("HTTP/1.1 400")
    many_headers = setup.raw(get + b"".join(b"X-%d: 1\r\n" % i for i in range(500)) + b"\r\n")
    # within the 8 KiB head limit: a normal answer to a request without DomU_Request
    assert (many_headers["status_line"], many_headers["fp"]) == ("HTTP/1.1 200 OK", BAD)
    megabyte = setup.raw(get + b"X-Big: " + b"b" * 1_000_000 + b"\r\n\r\n")
    assert "error" in megabyte or megabyte["status_line"].startswith("HTTP/1.1 431")
    # every worker is still there and answers
    for _ in range(3 * WORKERS):
        assert setup.body("send_my_password") == fp(password)
    assert setup.server.poll() is None
    log = setup.log.read_text(errors="replace")
    assert "Traceback" not in log
    assert "Booting worker" in log and log.count("Booting worker") == WORKERS


def test_forwarded_requests_are_refused_with_403_and_counted_in_status(setup: Setup) -> None:
    password = new_password()
    push(setup.paths, VM1, password)
    before = totals(setup.paths, "passwords")["forwarded_refused"]
    get = b"GET / HTTP/1.1\r\nHost: x\r\nDomU_Request: send_my_password\r\n"
    for header in (b"X-Forwarded-For: 10.9.9.9", b"Forwarded: for=10.9.9.9"):
        res = setup.raw(get + header + b"\r\nConnection: close\r\n\r\n")
        assert res["status_line"] == "HTTP/1.1 403 Forbidden"
        assert res["fp"] != fp(password)
    deadline = time.monotonic() + 10  # each worker writes its count within a second
    while totals(setup.paths, "passwords")["forwarded_refused"] < before + 2:
        assert time.monotonic() < deadline, "the refusals were not counted"
        time.sleep(0.05)
    assert setup.body("send_my_password") == fp(password)  # not forwarded: served


def test_guest_noise_never_reaches_the_audit_log_and_audit_lines_do(setup: Setup) -> None:
    password = new_password()
    push(setup.paths, VM2, password)
    setup.body("send_my_password", VM2)
    for _ in range(50):
        setup.ask("not_a_request", VM1)
        setup.raw(b"GET / HTTP/1.1\r\nContent-Length: \xb2\r\n\r\n", VM1)
    audit = setup.paths.audit_log.read_text()
    assert f"password fetch by VM {VM2}: served generation" in audit
    assert "not_a_request" not in audit and "failed" not in audit
    cloud = setup.paths.log_file.read_text()
    # one line per worker per minute at most, though 50 were asked
    assert cloud.count("DomU_Request='not_a_request'") <= WORKERS


def test_audit_log_names_each_fetch_and_ack_but_never_the_password(setup: Setup) -> None:
    password = new_password()
    push(setup.paths, VM2, password)
    setup.body("send_my_password", VM2)
    setup.body("saved_password", VM2)
    messages = [msg for _, msg in audit_lines(setup, VM2)[-2:]]
    assert messages[0].startswith(f"password fetch by VM {VM2}: served generation ")
    assert messages[1] == f"password ack by VM {VM2}: cleared"
    leaked = password in setup.paths.log_file.read_text() or password in setup.log.read_text()
    assert not leaked


# --- restarts ---------------------------------------------------------------------------


def update_config_py(
    paths: Paths, name: str, ip: str, password: str
) -> subprocess.CompletedProcess[bytes]:
    """Run scripts/update_config.py (the /opt/cloud/bin shim) on a vm_password file."""
    payload = {"type": "vmpassword", "ip_address": ip, "password": password}
    (paths.cache / name).write_text(json.dumps(payload))
    script = Path(__file__).resolve().parents[2] / "scripts" / "update_config.py"
    return subprocess.run(
        [sys.executable, str(script), name],
        capture_output=True,
        timeout=60,
        env={**os.environ, "VR_ROOT": str(paths.root)},
    )


def test_passwords_survive_restarts_and_pushes_while_the_server_is_down(tmp_path: Path) -> None:
    with password_lab(tmp_path) as s:
        served, pushed_while_down = new_password(), new_password()
        push(s.paths, VM1, served)
        assert s.body("send_my_password", VM1) == fp(served)

        assert stop_server(s.server) == 0
        refused = s.ask("send_my_password", VM1)
        assert refused == {"error": "ConnectionRefusedError"}
        # CloudStack's own command, as the management server runs it over SSH: it
        # stores the password although no server is there to take it
        res = update_config_py(s.paths, "vm_password.json", VM2, pushed_while_down)
        assert res.returncode == 0, res.stderr.decode(errors="replace")
        assert not (s.paths.cache / "vm_password.json").exists()

        s.server = start_server(s.lab, s.vr, s.paths, s.log)
        assert s.body("send_my_password", VM1) == fp(served)
        assert s.body("saved_password", VM1) == SAVED  # served before the restart: cleared
        assert s.body("send_my_password", VM1) == SAVED
        assert s.body("send_my_password", VM2) == fp(pushed_while_down)
        assert stop_server(s.server) == 0
