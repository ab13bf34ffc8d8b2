"""Errors a guest can cause: answered with a status, logged compactly, never rotating
the audit lines away.

The real metadata and password applications run behind the event loop in-process on
loopback (tests/helpers/loop_server.py); logging is set up as a vr service sets it up
(:func:`vr.logs.setup`), with a small rotation size so a flood would show.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers.loop_server import Reader, limits, request, serving
from tests.helpers.vmdata import store_vm
from vr import logs
from vr.logs import AUDIT, GuestErrors
from vr.metadata.app import create_app
from vr.metadata.tokens import TOKEN_PATH, TTL_HEADER
from vr.paths import Paths

HOST = "127.0.0.1"
VM = "10.1.1.5"
KEYS = "ssh-ed25519 AAAAC3A alice@lab\nssh-rsa AAAAB3B bob@lab"
SMALL_LOG = 20_000  # bytes before a rotation; 3 old files are kept


@pytest.fixture
def vr_logging(paths: Paths, monkeypatch: pytest.MonkeyPatch) -> Iterator[Paths]:
    """vr's logging to files under ``paths`` (no stderr); the test's logging after."""
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    monkeypatch.setattr(logs, "MAX_BYTES", SMALL_LOG)
    logs.setup(paths, stderr=False)
    try:
        yield paths
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
            h.close()
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


def as_vm(app: Any) -> Any:
    """The application as the guest VM sees it: loopback cannot be a VM's address,
    so the connection's source (REMOTE_ADDR) is given the VM's."""

    def wsgi(environ: dict[str, Any], start_response: Any) -> Any:
        environ["REMOTE_ADDR"] = VM
        return app(environ, start_response)

    return wsgi


def every_line(log: Path) -> str:
    return "".join(
        f.read_text(errors="replace")
        for f in sorted(log.parent.glob(log.name + "*"))
        if not f.name.endswith(".lock")
    )


BAD_KEY_PATHS = [
    "/latest/meta-data/public-keys/%B2",  # "²": str.isdigit() says yes, int() no
    "/latest/meta-data/public-keys/%B9/openssh-key",
    "/latest/meta-data/public-keys/" + "1" * 5000,  # int() refuses > 4300 digits
]


@pytest.mark.parametrize("path", BAD_KEY_PATHS, ids=["sup2", "sup1-key", "5000-digits"])
def test_public_key_index_int_cannot_read_is_404_not_500(paths: Paths, path: str) -> None:
    store_vm(paths, VM, keys=KEYS)
    with serving(limits(), app=as_vm(create_app(paths))) as srv, srv.connect() as c:
        c.sendall(request(path))
        reader = Reader(c)
        assert reader.response()[0] == 404
        c.sendall(request("/latest/meta-data/public-keys/1/openssh-key"))
        assert reader.response()[2] == b"ssh-rsa AAAAB3B bob@lab"


@pytest.mark.parametrize("ttl", ["9" * 5000, "²", "1" + "0" * 20, "60 60"])
def test_token_ttl_int_cannot_read_is_400_not_500(paths: Paths, ttl: str) -> None:
    head = f"PUT {TOKEN_PATH} HTTP/1.1\r\nHost: vr\r\n{TTL_HEADER}: {ttl}\r\n\r\n"
    with serving(limits(), app=as_vm(create_app(paths))) as srv, srv.connect() as c:
        c.sendall(head.encode("latin-1"))
        status, _, body = Reader(c).response()
        assert status == 400 and TTL_HEADER.encode() in body


def test_a_flood_of_bad_guest_requests_logs_one_line_and_leaves_the_audit_lines(
    vr_logging: Paths,
) -> None:
    paths = vr_logging
    store_vm(paths, VM, keys=KEYS)
    logging.getLogger("vr.applier").info("vm_metadata.json.1: applied: push-before", extra=AUDIT)
    bad = [
        request("/latest/meta-data/public-keys/%B2"),
        f"PUT {TOKEN_PATH} HTTP/1.1\r\n{TTL_HEADER}: {'9' * 5000}\r\n\r\n".encode(),
    ]
    with serving(limits(), app=as_vm(create_app(paths))) as srv, srv.connect() as c:
        reader = Reader(c)
        for i in range(600):
            c.sendall(bad[i % 2])
            assert reader.response()[0] in (400, 404)
    logging.getLogger("vr.applier").info("vm_metadata.json.2: applied: push-after", extra=AUDIT)
    audit = paths.audit_log.read_text()
    assert "push-before" in audit and "push-after" in audit
    assert "failed" not in audit  # no guest line reaches the audit log
    cloud = every_line(paths.log_file)
    assert "push-before" in cloud and "Traceback" not in cloud


def test_a_flood_that_does_fail_logs_one_line_per_address_per_minute(
    vr_logging: Paths,
) -> None:
    paths = vr_logging

    def broken(environ: object, start_response: object) -> list[bytes]:
        raise RuntimeError("the application failed")

    with serving(limits(), app=broken) as srv, srv.connect() as c:
        for _ in range(200):
            c.sendall(request("/x", "Connection: keep-alive"))
            assert Reader(c).response()[0] == 500
            c.close()
            c = srv.connect()
        c.close()
    cloud = every_line(paths.log_file)
    failures = [line for line in cloud.splitlines() if f"from {HOST} failed" in line]
    assert len(failures) == 1, failures
    assert "(RuntimeError)" in failures[0] and "Traceback" not in cloud


def test_guest_errors_count_what_they_held_back_and_forget_quiet_addresses() -> None:
    now = [0.0]
    seen: list[str] = []

    class Sink(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.Logger("guest-test")
    logger.addHandler(Sink())
    errors = GuestErrors(logger, interval=60.0, clock=lambda: now[0], addresses=2)
    for _ in range(5):
        errors.error("10.0.0.1", "request", ValueError("x"))
    now[0] = 61.0
    errors.error("10.0.0.1", "request")
    errors.error("10.0.0.2", "request")
    errors.error("10.0.0.3", "request")  # over 2 addresses: quiet ones are forgotten
    assert seen == [
        "request from 10.0.0.1 failed (ValueError)",
        "request from 10.0.0.1 failed; 4 more in the last 60 s not logged",
        "request from 10.0.0.2 failed",
        "request from 10.0.0.3 failed",
    ]
    assert len(errors.throttle._seen) <= 2
