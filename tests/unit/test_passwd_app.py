"""The password server's WSGI app against a real store in a temporary root."""

from __future__ import annotations

import logging
import os
import secrets
import stat
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path
from urllib.parse import urlencode

import pytest
from werkzeug.test import Client, TestResponse

from tests.helpers.fingerprint import fp
from vr.passwords import cache as passwd_cache
from vr.passwords.app import MAX_BODY, PasswordApp, ensure_token, is_own_address, read_token
from vr.passwords.cache import PasswordCache, PasswordEntry
from vr.passwords.forms import FormError, parse_form
from vr.paths import Paths
from vr.payloads import VmPassword
from vr.store import Store, read_passwords

VM = "10.1.1.10"
OTHER_VM = "10.1.1.11"
VR_GUEST_IP = "10.1.1.1"


def new_password() -> str:
    return secrets.token_urlsafe(12)


def push(paths: Paths, ip: str, password: str) -> None:
    Store(paths).apply([VmPassword(IPv4Address(ip), password)])


def own_addresses(addr: IPv4Address) -> bool:
    """The VR of these tests: loopback plus its guest-facing address."""
    return addr.is_loopback or str(addr) == VR_GUEST_IP


@pytest.fixture
def app(paths: Paths) -> PasswordApp:
    return PasswordApp(paths, is_own=own_addresses)


def get(app: PasswordApp, request: str | None, caller: str = VM, path: str = "/") -> TestResponse:
    headers = {"DomU_Request": request} if request is not None else {}
    return Client(app).get(path, headers=headers, environ_base={"REMOTE_ADDR": caller})


def body_fp(resp: TestResponse) -> str:
    return fp(resp.get_data())


# --- GET ------------------------------------------------------------------------------


def test_fetch_without_a_stored_password_answers_saved_password(app: PasswordApp) -> None:
    resp = get(app, "send_my_password")
    assert resp.status_code == 200
    assert resp.get_data() == b"saved_password"


def test_fetch_serves_the_pushed_password_exactly_as_plain_text(
    app: PasswordApp, paths: Paths
) -> None:
    password = new_password()
    push(paths, VM, password)
    resp = get(app, "send_my_password")
    got, want = body_fp(resp), fp(password)
    assert resp.status_code == 200
    assert resp.headers["Content-Type"] == "text/plain"
    assert got == want


def test_fetch_does_not_clear_the_password(app: PasswordApp, paths: Paths) -> None:
    password = new_password()
    push(paths, VM, password)
    get(app, "send_my_password")
    second = body_fp(get(app, "send_my_password"))
    assert second == fp(password)


def test_first_fetch_marks_the_password_served_and_later_fetches_write_nothing(
    app: PasswordApp, paths: Paths
) -> None:
    push(paths, VM, new_password())
    assert read_passwords(paths)[VM]["served"] is False
    get(app, "send_my_password")
    assert read_passwords(paths)[VM]["served"] is True
    before = os.stat(paths.passwords)
    get(app, "send_my_password")
    after = os.stat(paths.passwords)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)


def test_ack_after_fetch_clears_the_password(app: PasswordApp, paths: Paths) -> None:
    push(paths, VM, new_password())
    get(app, "send_my_password")
    ack = get(app, "saved_password")
    assert (ack.status_code, ack.get_data()) == (200, b"saved_password")
    assert get(app, "send_my_password").get_data() == b"saved_password"
    assert VM not in read_passwords(paths)


def test_ack_of_a_password_never_fetched_keeps_it(app: PasswordApp, paths: Paths) -> None:
    password = new_password()
    push(paths, VM, password)
    assert get(app, "saved_password").get_data() == b"saved_password"
    assert body_fp(get(app, "send_my_password")) == fp(password)


def test_push_after_fetch_survives_the_ack_of_the_old_password(
    app: PasswordApp, paths: Paths
) -> None:
    old, new = new_password(), new_password()
    push(paths, VM, old)
    assert body_fp(get(app, "send_my_password")) == fp(old)
    push(paths, VM, new)
    get(app, "saved_password")
    assert body_fp(get(app, "send_my_password")) == fp(new)


def test_ack_without_anything_stored_answers_saved_password_and_writes_nothing(
    app: PasswordApp, paths: Paths
) -> None:
    resp = get(app, "saved_password")
    assert (resp.status_code, resp.get_data()) == (200, b"saved_password")
    assert not paths.passwords.exists()


def test_each_vm_gets_only_its_own_password(app: PasswordApp, paths: Paths) -> None:
    mine, theirs = new_password(), new_password()
    push(paths, VM, mine)
    push(paths, OTHER_VM, theirs)
    got_mine = body_fp(get(app, "send_my_password", caller=VM))
    got_theirs = body_fp(get(app, "send_my_password", caller=OTHER_VM))
    assert (got_mine, got_theirs) == (fp(mine), fp(theirs))
    get(app, "saved_password", caller=VM)
    assert body_fp(get(app, "send_my_password", caller=OTHER_VM)) == fp(theirs)


def test_the_sentinel_pushed_for_templates_without_passwords_is_served_as_is(
    app: PasswordApp, paths: Paths
) -> None:
    push(paths, VM, "saved_password")
    assert get(app, "send_my_password").get_data() == b"saved_password"
    assert VM in read_passwords(paths)


def test_an_ipv4_mapped_ipv6_caller_is_that_ipv4_vm(app: PasswordApp, paths: Paths) -> None:
    password = new_password()
    push(paths, VM, password)
    assert body_fp(get(app, "send_my_password", caller=f"::ffff:{VM}")) == fp(password)


@pytest.mark.parametrize(
    "value",
    [None, "", "SEND_MY_PASSWORD", "send_my_password ", "save_password", "x" * 5000, "\x80\xff"],
)
def test_unknown_or_missing_request_values_answer_bad_request(
    app: PasswordApp, paths: Paths, value: str | None
) -> None:
    push(paths, VM, new_password())
    resp = get(app, value)
    assert (resp.status_code, resp.get_data()) == (200, b"bad_request")
    assert resp.headers["Content-Type"] == "text/plain"
    assert read_passwords(paths)[VM]["served"] is False


def test_path_and_query_are_ignored(app: PasswordApp, paths: Paths) -> None:
    password = new_password()
    push(paths, VM, password)
    assert body_fp(get(app, "send_my_password", path="/some/where?x=1")) == fp(password)


@pytest.mark.parametrize("method", ["PUT", "DELETE", "HEAD", "PATCH", "OPTIONS"])
def test_other_methods_answer_405(app: PasswordApp, method: str) -> None:
    resp = Client(app).open(
        "/",
        method=method,
        headers={"DomU_Request": "send_my_password"},
        environ_base={"REMOTE_ADDR": VM},
    )
    assert resp.status_code == 405
    assert resp.headers["Allow"] == "GET, POST"


def test_a_second_worker_sees_pushes_fetches_and_acks_of_the_first(paths: Paths) -> None:
    one = PasswordApp(paths, is_own=own_addresses)
    two = PasswordApp(paths, is_own=own_addresses)
    first, second = new_password(), new_password()
    assert get(two, "send_my_password").get_data() == b"saved_password"
    push(paths, VM, first)
    assert body_fp(get(one, "send_my_password")) == fp(first)
    get(two, "saved_password")  # the fetch in `one` made this ack count
    assert get(one, "send_my_password").get_data() == b"saved_password"
    push(paths, VM, second)
    assert body_fp(get(two, "send_my_password")) == fp(second)


def test_a_store_failure_answers_503_and_the_password_stays(paths: Paths) -> None:
    class BrokenStore(Store):
        def mark_password_served(self, ip: IPv4Address, gen: int) -> None:
            raise OSError("disk on fire")

    password = new_password()
    push(paths, VM, password)
    app = PasswordApp(paths, store=BrokenStore(paths), is_own=own_addresses)
    resp = get(app, "send_my_password")
    assert resp.status_code == 503
    assert fp(password) not in {body_fp(resp)}
    assert read_passwords(paths)[VM]["served"] is False


def test_audit_lines_name_vm_action_and_outcome_but_never_the_password(
    app: PasswordApp, paths: Paths, caplog: pytest.LogCaptureFixture
) -> None:
    password = new_password()
    token = ensure_token(paths)
    caplog.set_level(logging.INFO, logger="vr.passwords.app")
    push(paths, VM, password)
    get(app, "send_my_password")
    get(app, "saved_password")
    get(app, "send_my_password")
    post(app, {"ip": VM, "password": password, "token": token}, caller="127.0.0.1")
    post(app, {"ip": VM, "password": password, "token": "0" * 32}, caller="127.0.0.1")
    lines = [r.getMessage() for r in caplog.records]
    assert f"password fetch by VM {VM}: served generation" in lines[0]
    assert lines[1] == f"password ack by VM {VM}: cleared"
    assert lines[2] == f"password fetch by VM {VM}: none stored, answered saved_password"
    assert lines[3] == f"password save from 127.0.0.1 for VM {VM}: stored"
    assert lines[4] == "password save from 127.0.0.1: refused (forbidden: wrong token)"
    leaked = [i for i, line in enumerate(lines) if password in line or token in line]
    assert leaked == []


# --- POST (save) -------------------------------------------------------------------


def post(
    app: PasswordApp,
    fields: dict[str, str],
    caller: str = "127.0.0.1",
    request: str = "save_password",
    multipart: bool = False,
) -> TestResponse:
    headers = {"DomU_Request": request}
    if multipart:
        return Client(app).post(
            "/", data=fields, headers=headers, environ_base={"REMOTE_ADDR": caller}
        )
    return Client(app).post(
        "/",
        data=urlencode(fields),
        content_type="application/x-www-form-urlencoded",
        headers=headers,
        environ_base={"REMOTE_ADDR": caller},
    )


@pytest.mark.parametrize("multipart", [False, True], ids=["urlencoded", "multipart"])
def test_save_from_loopback_with_the_token_stores_the_password(
    app: PasswordApp, paths: Paths, multipart: bool
) -> None:
    token = ensure_token(paths)
    password = new_password() + " &=%+é"
    resp = post(app, {"ip": VM, "password": password, "token": token}, multipart=multipart)
    assert resp.status_code == 200
    assert body_fp(get(app, "send_my_password")) == fp(password)


HOLD_STORE_LOCK = """
import sys
from pathlib import Path
from vr.paths import Paths
from vr.store import Store
with Store(Paths(Path(sys.argv[1]))).locked():
    print("locked", flush=True)
    sys.stdin.read()
"""


def test_save_completes_while_another_process_holds_the_store_lock(paths: Paths) -> None:
    """A batch or a firewall apply in another process holds the store lock; a save
    must not wait for it (the event worker serving it serves other guests too)."""
    token = ensure_token(paths)
    password = new_password()
    app = PasswordApp(paths, store=Store(paths, lock_timeout=1.0), is_own=own_addresses)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_STORE_LOCK, str(paths.root)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "locked\n"
        resp = post(app, {"ip": VM, "password": password, "token": token})
        served = body_fp(get(app, "send_my_password"))
        assert holder.poll() is None  # the lock was held throughout
    finally:
        holder.communicate("", timeout=10)
    assert resp.status_code == 200
    assert served == fp(password)


def test_save_from_the_vrs_own_guest_address_is_accepted(app: PasswordApp, paths: Paths) -> None:
    token = ensure_token(paths)
    resp = post(app, {"ip": VM, "password": new_password(), "token": token}, caller=VR_GUEST_IP)
    assert resp.status_code == 200
    assert VM in read_passwords(paths)


def test_save_from_a_guest_is_forbidden_and_changes_nothing(app: PasswordApp, paths: Paths) -> None:
    token = ensure_token(paths)
    resp = post(app, {"ip": VM, "password": new_password(), "token": token}, caller=OTHER_VM)
    assert resp.status_code == 403
    assert not paths.passwords.exists()


def test_save_with_a_wrong_token_is_forbidden_and_changes_nothing(
    app: PasswordApp, paths: Paths
) -> None:
    ensure_token(paths)
    resp = post(app, {"ip": VM, "password": new_password(), "token": "f" * 32})
    assert resp.status_code == 403
    assert resp.get_data() == b"forbidden: wrong token"
    assert not paths.passwords.exists()


def test_save_without_a_token_file_is_forbidden(app: PasswordApp, paths: Paths) -> None:
    resp = post(app, {"ip": VM, "password": new_password(), "token": ""})
    assert resp.status_code == 403
    assert not paths.passwords.exists()


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"ip": VM, "password": "pw"}, "missing form fields ['token']"),
        ({"password": "pw", "token": "T"}, "missing form fields ['ip']"),
        ({"ip": "10.1.1", "password": "pw", "token": "T"}, "ip_address='10.1.1'"),
        ({"ip": "127.0.0.1", "password": "pw", "token": "T"}, "a unicast guest address"),
        ({"ip": VM, "password": "", "token": "T"}, "password=<redacted>"),
        ({"ip": VM, "password": "a\nb", "token": "T"}, "printable characters"),
    ],
)
def test_malformed_saves_answer_400_naming_the_problem(
    app: PasswordApp, paths: Paths, fields: dict[str, str], expected: str
) -> None:
    token = ensure_token(paths)
    resp = post(app, {k: token if v == "T" else v for k, v in fields.items()})
    assert resp.status_code == 400
    assert expected in resp.get_data(as_text=True)
    assert not paths.passwords.exists()


def test_save_needs_the_save_password_request_header(app: PasswordApp, paths: Paths) -> None:
    token = ensure_token(paths)
    resp = post(app, {"ip": VM, "password": "pw", "token": token}, request="send_my_password")
    assert resp.status_code == 400
    assert not paths.passwords.exists()


def test_oversized_or_unknown_bodies_answer_400(app: PasswordApp, paths: Paths) -> None:
    ensure_token(paths)
    env = {"REMOTE_ADDR": "127.0.0.1"}
    headers = {"DomU_Request": "save_password"}
    big = Client(app).post(
        "/",
        data=b"a=" + b"x" * MAX_BODY,
        content_type="application/x-www-form-urlencoded",
        headers=headers,
        environ_base=env,
    )
    json_body = Client(app).post("/", json={"ip": VM}, headers=headers, environ_base=env)
    assert (big.status_code, json_body.status_code) == (400, 400)
    assert "expected application/x-www-form-urlencoded" in json_body.get_data(as_text=True)


def test_parse_form_reads_urlencoded_escapes() -> None:
    fields = parse_form(
        "application/x-www-form-urlencoded", b"ip=10.1.1.10&password=a%26b+c%C3%A9&token=t"
    )
    assert fields == {"ip": "10.1.1.10", "password": "a&b cé", "token": "t"}


def test_parse_form_reads_a_multipart_body_as_curl_sends_it() -> None:
    body = (
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="ip"\r\n\r\n10.1.1.10\r\n'
        b"--XyZ\r\n"
        b'Content-Disposition: form-data; name="password"\r\n\r\nline one two\r\n'
        b"--XyZ--\r\n"
    )
    fields = parse_form("multipart/form-data; boundary=XyZ", body)
    assert fields == {"ip": "10.1.1.10", "password": "line one two"}


@pytest.mark.parametrize(
    ("ctype", "body"),
    [
        ("application/x-www-form-urlencoded", b"ip=1&ip=2"),
        ("application/x-www-form-urlencoded", b"ip=\xff"),
        ("application/x-www-form-urlencoded", b"&".join(b"f%d=1" % i for i in range(40))),
        ("multipart/form-data", b"no boundary here"),
        ("text/plain", b"ip=1"),
    ],
)
def test_parse_form_refuses_what_it_cannot_read_unambiguously(ctype: str, body: bytes) -> None:
    with pytest.raises(FormError):
        parse_form(ctype, body)


# --- token, own addresses, cache ------------------------------------------------------


def test_token_is_created_once_with_mode_0600(paths: Paths) -> None:
    token = ensure_token(paths)
    mode = stat.S_IMODE(paths.password_token.stat().st_mode)
    assert (len(token), mode) == (32, 0o600)
    assert int(token, 16) >= 0
    again = ensure_token(paths)
    assert fp(again) == fp(token)


def test_token_file_with_loose_mode_is_tightened(paths: Paths) -> None:
    token = ensure_token(paths)
    os.chmod(paths.password_token, 0o644)
    again = ensure_token(paths)
    assert fp(again) == fp(token)
    assert stat.S_IMODE(paths.password_token.stat().st_mode) == 0o600


def test_token_file_without_a_token_is_replaced(paths: Paths) -> None:
    paths.password_token.write_text("")
    token = ensure_token(paths)
    assert read_token(paths) is not None
    assert fp(read_token(paths) or "") == fp(token)
    assert stat.S_IMODE(paths.password_token.stat().st_mode) == 0o600


def test_loopback_is_own_and_an_unconfigured_address_is_not() -> None:
    assert is_own_address(IPv4Address("127.0.0.1"))
    assert is_own_address(IPv4Address("127.9.9.9"))
    assert not is_own_address(IPv4Address("192.0.2.77"))  # TEST-NET-1, never configured
    assert not is_own_address(IPv4Address("224.0.0.1"))


def test_cache_sees_a_file_rewritten_in_place_with_the_same_size_and_mtime(
    paths: Paths,
) -> None:
    push(paths, VM, "aaaaaaaa")
    cache = PasswordCache(paths.passwords)
    first = cache.get(IPv4Address(VM))
    assert first is not None and fp(first.password) == fp("aaaaaaaa")
    st = os.stat(paths.passwords)
    data = paths.passwords.read_bytes().replace(b"aaaaaaaa", b"bbbbbbbb")
    with open(paths.passwords, "r+b") as f:
        f.write(data)
    os.utime(paths.passwords, ns=(st.st_atime_ns, st.st_mtime_ns))
    second = cache.get(IPv4Address(VM))
    assert second is not None and fp(second.password) == fp("bbbbbbbb")


HOUR_NS = 3600 * 10**9


def age(path: Path, ns: int = HOUR_NS) -> int:
    """Set ``path``'s mtime ``ns`` into the past (well beyond the racy window); the mtime."""
    old = time.time_ns() - ns
    os.utime(path, ns=(old, old))
    return old


def ctime_passes(path: Path, scratch: Path) -> None:
    """Return once the file system clock has moved past ``path``'s ctime, so the next
    change to ``path`` gets another ctime (timestamps advance in coarse ticks)."""
    ctime = os.stat(path).st_ctime_ns
    scratch.touch()
    deadline = time.monotonic() + 10
    while os.stat(scratch).st_ctime_ns <= ctime:
        assert time.monotonic() < deadline, "the ctime clock did not move in 10 s"
        os.utime(scratch)


def cached_password(cache: PasswordCache) -> str:
    entry = cache.get(IPv4Address(VM))
    assert entry is not None
    return fp(entry.password)


def test_cache_sees_a_push_over_a_file_it_read_when_old(paths: Paths) -> None:
    push(paths, VM, "aaaaaaaa")
    age(paths.passwords)
    cache = PasswordCache(paths.passwords)
    assert cached_password(cache) == fp("aaaaaaaa")
    push(paths, VM, "bbbbbbbb")
    assert cached_password(cache) == fp("bbbbbbbb")
    # ... and a push whose file is made old at once (a clock set back) too.
    push(paths, VM, "cccccccc")
    age(paths.passwords, 2 * HOUR_NS)
    assert cached_password(cache) == fp("cccccccc")


@pytest.mark.parametrize("new_size", [False, True], ids=["same-size", "other-size"])
def test_cache_sees_an_old_file_rewritten_in_place_with_its_mtime_kept(
    paths: Paths, tmp_path: Path, new_size: bool
) -> None:
    push(paths, VM, "aaaaaaaa")
    old = age(paths.passwords)
    cache = PasswordCache(paths.passwords)
    assert cached_password(cache) == fp("aaaaaaaa")
    ctime_passes(paths.passwords, tmp_path / "clock")
    replacement = "bbbbbbbbbb" if new_size else "bbbbbbbb"
    data = paths.passwords.read_bytes().replace(b"aaaaaaaa", replacement.encode())
    with open(paths.passwords, "r+b") as f:
        f.write(data)
    os.utime(paths.passwords, ns=(old, old))
    assert cached_password(cache) == fp(replacement)


def test_cache_reads_an_unchanged_old_file_once(
    paths: Paths, monkeypatch: pytest.MonkeyPatch
) -> None:
    push(paths, VM, "aaaaaaaa")
    age(paths.passwords)
    parsed: list[Path] = []
    real = passwd_cache._parse_passwords

    def counting(data: bytes, path: Path) -> dict[str, PasswordEntry]:
        parsed.append(path)
        return real(data, path)

    monkeypatch.setattr(passwd_cache, "_parse_passwords", counting)
    cache = PasswordCache(paths.passwords)
    for _ in range(3):
        assert cached_password(cache) == fp("aaaaaaaa")
    assert parsed == [paths.passwords]


def test_cache_forgets_everything_when_the_file_goes_away(paths: Paths) -> None:
    push(paths, VM, new_password())
    cache = PasswordCache(paths.passwords)
    assert cache.get(IPv4Address(VM)) is not None
    paths.passwords.unlink()
    assert cache.get(IPv4Address(VM)) is None


# --- forwarded requests ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "method"),
    [
        ("X-Forwarded-For", "GET"),
        ("Forwarded", "GET"),
        ("X_Forwarded_For", "GET"),
        ("X-Forwarded-For", "POST"),
    ],
)
def test_a_forwarded_request_is_refused_with_403_and_counted(
    app: PasswordApp, paths: Paths, header: str, method: str
) -> None:

    password = new_password()
    push(paths, VM, password)
    resp = Client(app).open(
        "/",
        method=method,
        headers={"DomU_Request": "send_my_password", header: "10.9.9.9"},
        environ_base={"REMOTE_ADDR": VM},
    )
    assert resp.status_code == 403
    assert resp.get_data() == b"forwarded requests are refused"
    assert read_passwords(paths)[VM]["served"] is False
    registry = app.counters.metrics.registry
    assert registry.get_sample_value("vr_refused_total", {"reason": "forwarded_password"}) == 1
    assert body_fp(get(app, "send_my_password")) == fp(password)  # unforwarded: served


def test_a_guest_asking_in_a_loop_writes_one_audit_line_a_minute_for_what_changes_nothing(
    app: PasswordApp, paths: Paths, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="vr.passwords.app")
    push(paths, VM, new_password())
    for _ in range(300):
        get(app, "send_my_password")
        get(app, "send_my_password", caller=OTHER_VM)  # none stored for it
    audit = [r.getMessage() for r in caplog.records if getattr(r, "audit", False)]
    assert audit == [
        f"password fetch by VM {VM}: served generation 1",
        f"password fetch by VM {OTHER_VM}: none stored, answered saved_password",
        f"password fetch by VM {VM}: served generation 1",  # again: once a minute
    ]
    get(app, "saved_password")  # what changes something always has its line
    assert caplog.records[-1].getMessage() == f"password ack by VM {VM}: cleared"
