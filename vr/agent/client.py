"""The management side of a push: what CloudStack's management server does, as a client.

Each payload is uploaded (SFTP) into ``/var/cache/cloud`` under CloudStack's name
(``vm_metadata.json.<uuid4>``; the stem comes from the payload's JSON ``type`` or
the file's own name) and applied with ``/opt/cloud/bin/update_config.py <name>``.
With ``batch``, all payloads travel in one ``VR-<uuid>.cfg`` (cloudstack-vr.md
§1.5) applied by ``/opt/cloud/bin/vr_cfg.sh -c``. The VR's host key is checked
against a known-hosts file; unknown hosts are refused unless ``accept_new``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import paramiko

from vr.cloudstack import CACHE_DIR, FILE_TYPES, UPDATE_CONFIG, VR_CFG, build_cfg, file_stem
from vr.errors import PayloadError, VRError

LOG = logging.getLogger(__name__)

STEM_OF_TYPE = {t: s for s, t in FILE_TYPES.items()}


# --- pure helpers -----------------------------------------------------------------------


def payload_stem(filename: str, data: bytes) -> str:
    """CloudStack's destination stem for a payload: from its JSON ``type``, else its name."""
    try:
        obj = json.loads(data)
    except ValueError:
        obj = None
    if isinstance(obj, dict) and obj.get("type") in STEM_OF_TYPE:
        return STEM_OF_TYPE[obj["type"]]
    stem = file_stem(os.path.basename(filename))
    if stem in FILE_TYPES:
        return stem
    raise PayloadError(
        "file",
        filename,
        "a JSON payload whose 'type' is one of "
        + ", ".join(sorted(STEM_OF_TYPE))
        + ", or a file named like vm_metadata.json",
    )


def remote_name(stem: str) -> str:
    """``vm_metadata`` -> ``vm_metadata.json.<uuid4>``, as the management server names it."""
    return f"{stem}.json.{uuid.uuid4()}"


@dataclass(frozen=True)
class Target:
    host: str
    port: int = 3922
    key: Path | None = None
    known_hosts: Path | None = None
    accept_new: bool = False
    timeout: float = 60.0
    command_timeout: float = 600.0
    """CloudStack's VR_SCRIPT_EXEC_TIMEOUT is 10 minutes."""

    @property
    def known_hosts_file(self) -> Path:
        return self.known_hosts or Path.home() / ".ssh" / "known_hosts"


@dataclass(frozen=True)
class Outcome:
    source: str
    remote: str
    ok: bool
    message: str

    def line(self) -> str:
        state = "ok  " if self.ok else "FAIL"
        remote = f" -> {self.remote}" if self.remote else ""
        return f"{state} {self.source}{remote}: {self.message}"


class HostKeyError(VRError):
    """The VR's host key is unknown (and not accepted) or does not match."""


# --- SSH --------------------------------------------------------------------------------


class _AcceptNew(paramiko.MissingHostKeyPolicy):
    """Trust a host seen for the first time and remember it (``--accept-new``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write(f"{hostname} {key.get_name()} {key.get_base64()}\n")
        client.get_host_keys().add(hostname, key.get_name(), key)
        LOG.warning(
            "added host key of %s (%s %s) to %s",
            hostname,
            key.get_name(),
            key.fingerprint,
            self.path,
        )


class _Reject(paramiko.MissingHostKeyPolicy):
    def __init__(self, path: Path) -> None:
        self.path = path

    def missing_host_key(self, client: paramiko.SSHClient, hostname: str, key: Any) -> None:
        raise HostKeyError(
            f"host key of {hostname} ({key.get_name()} {key.fingerprint}) is not in "
            f"{self.path}; use --accept-new on first contact"
        )


class Connection:
    """One SSH connection to a VR; reused for every file of a push."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self.client = paramiko.SSHClient()
        kh = target.known_hosts_file
        if kh.exists():
            self.client.load_host_keys(str(kh))
        policy = _AcceptNew(kh) if target.accept_new else _Reject(kh)
        self.client.set_missing_host_key_policy(policy)
        try:
            sock = socket.create_connection((target.host, target.port), target.timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            self.client.close()
            raise
        try:
            self.client.connect(
                target.host,
                sock=sock,
                port=target.port,
                username="root",
                key_filename=str(target.key) if target.key else None,
                look_for_keys=target.key is None,
                allow_agent=target.key is None,
                timeout=target.timeout,
                banner_timeout=target.timeout,
                auth_timeout=target.timeout,
            )
        except paramiko.BadHostKeyException as exc:
            self.client.close()
            raise HostKeyError(
                f"host key of {exc.hostname} ({exc.key.get_name()} {exc.key.fingerprint}) "
                f"does not match {kh}: expected {exc.expected_key.fingerprint}; "
                "if the VR was rebuilt, remove its old entry"
            ) from None
        except BaseException:
            self.client.close()
            raise
        self._sftp: paramiko.SFTPClient | None = None

    def upload(self, name: str, data: bytes) -> None:
        if self._sftp is None:
            self._sftp = self.client.open_sftp()
            self._sftp.get_channel().settimeout(self.target.timeout)  # type: ignore[union-attr]
        self._sftp.putfo(
            io.BytesIO(data), f"{CACHE_DIR}/{name}", file_size=len(data), confirm=False
        )

    def run(self, command: str) -> tuple[int, str, str]:
        """Run ``command``; its exit status, stdout and stderr (each read to the end).

        Both streams are read at once: a remote that fills one stream's window (a big
        batch's summary on stderr) while we wait on the other would block forever.
        """
        transport = self.client.get_transport()
        assert transport is not None
        chan = transport.open_session(timeout=self.target.timeout)
        chan.settimeout(self.target.command_timeout)
        chan.exec_command(command)
        err_parts: list[bytes] = []
        err_problem: list[BaseException] = []

        def read_stderr() -> None:
            try:
                err_parts.append(chan.makefile_stderr("rb").read())
            except (OSError, EOFError, paramiko.SSHException) as exc:
                err_problem.append(exc)

        reader = threading.Thread(target=read_stderr, name="push-stderr", daemon=True)
        reader.start()
        try:
            out = chan.makefile("rb").read()
        except BaseException:
            chan.close()  # ends the stderr reader too
            reader.join(5)
            raise
        # EOF is for the whole channel: stderr ends with stdout
        reader.join(self.target.command_timeout)
        if err_problem:
            raise err_problem[0]
        code = chan.recv_exit_status()
        chan.close()
        err = b"".join(err_parts)
        return code, out.decode("utf-8", "replace"), err.decode("utf-8", "replace")

    def close(self) -> None:
        if self._sftp is not None:
            self._sftp.close()
        self.client.close()

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _summary(name: str, code: int, out: str, err: str, limit: int = 300) -> str:
    """The remote's last line, without the repeated file name, bounded in length."""
    text = (err.strip() if code else out.strip()) or out.strip() or err.strip()
    last = text.splitlines()[-1] if text else ""
    last = last.removeprefix(f"{name}: ")
    if len(last) > limit:
        last = last[:limit] + "..."
    return last if code == 0 else f"exit {code}: {last or 'no message'}"


# --- pushes -----------------------------------------------------------------------------


def _read(path: Path) -> tuple[str, bytes]:
    data = path.read_bytes()
    return remote_name(payload_stem(path.name, data)), data


class Progress:
    """A one-line progress indication on ``stream`` when pushing many files."""

    def __init__(self, total: int, stream: TextIO, every: int = 20) -> None:
        self.total = total
        self.stream = stream
        self.step = max(1, total // every) if total >= every else 0
        self.done = 0
        self.failed = 0

    def advance(self, ok: bool) -> None:
        self.done += 1
        self.failed += not ok
        if self.step and (self.done % self.step == 0 or self.done == self.total):
            pct = 100 * self.done // self.total
            bar = "#" * (pct // 5) + "." * (20 - pct // 5)
            print(f"[{bar}] {self.done}/{self.total} ({self.failed} failed)", file=self.stream)


def push_files(target: Target, files: Sequence[Path], out: TextIO, err: TextIO) -> list[Outcome]:
    """Upload and apply each file in turn over one connection; one line per file on ``out``."""
    outcomes: list[Outcome] = []
    progress = Progress(len(files), err)

    def report(o: Outcome) -> None:
        outcomes.append(o)
        print(o.line(), file=out, flush=True)
        progress.advance(o.ok)

    try:
        conn = Connection(target)
    except (OSError, paramiko.SSHException, VRError) as exc:
        for f in files:
            report(Outcome(str(f), "", False, f"cannot connect to {target.host}: {exc}"))
        return outcomes
    with conn:
        for f in files:
            try:
                name, data = _read(f)
            except (OSError, VRError) as exc:
                report(Outcome(str(f), "", False, str(exc)))
                continue
            try:
                conn.upload(name, data)
                code, o, e = conn.run(f"{UPDATE_CONFIG} {name}")
            except (OSError, paramiko.SSHException, EOFError) as exc:
                report(Outcome(str(f), name, False, f"push failed: {exc or type(exc).__name__}"))
                continue
            report(Outcome(str(f), name, code == 0, _summary(name, code, o, e)))
    return outcomes


def push_batch(target: Target, files: Sequence[Path], out: TextIO, err: TextIO) -> list[Outcome]:
    """Send every file in one ``VR-<uuid>.cfg`` and apply it with one command (all or none)."""
    items: list[tuple[str, bytes]] = []
    sources: list[tuple[str, str]] = []
    problems: list[Outcome] = []
    for f in files:
        try:
            name, data = _read(f)
        except (OSError, VRError) as exc:
            problems.append(Outcome(str(f), "", False, str(exc)))
            continue
        items.append((name, data))
        sources.append((str(f), name))
    if problems:
        outcomes = problems + [
            Outcome(s, n, False, "not sent: other files of the batch are unreadable")
            for s, n in sources
        ]
    else:
        outcomes = _send_batch(target, items, sources)
    for o in outcomes:
        print(o.line(), file=out, flush=True)
    return outcomes


def _send_batch(
    target: Target, items: list[tuple[str, bytes]], sources: list[tuple[str, str]]
) -> list[Outcome]:
    cfg_name = f"VR-{uuid.uuid4()}.cfg"
    try:
        cfg = build_cfg(items).encode("utf-8")
    except (UnicodeDecodeError, VRError) as exc:
        return [Outcome(s, n, False, f"not sent: {exc}") for s, n in sources]
    try:
        with Connection(target) as conn:
            conn.upload(cfg_name, cfg)
            code, o, e = conn.run(f"{VR_CFG} -c {CACHE_DIR}/{cfg_name}")
    except (OSError, paramiko.SSHException, EOFError, VRError) as exc:
        code, o, e = 255, "", f"cannot push to {target.host}: {exc or type(exc).__name__}"
    if code == 0:
        message = f"applied with {cfg_name}"
    else:
        message = f"not applied: {cfg_name}: " + _summary(cfg_name, code, o, e)
    return [Outcome(s, n, code == 0, message) for s, n in sources]


def push(target: Target, files: Sequence[Path], batch: bool, out: TextIO, err: TextIO) -> int:
    """Push ``files``; 0 if every one was applied, 1 otherwise."""
    send = push_batch if batch else push_files
    outcomes = send(target, files, out, err)
    failed = sum(not o.ok for o in outcomes)
    if failed:
        print(f"vr push: {failed} of {len(outcomes)} files failed", file=err)
        return 1
    return 0


__all__ = ["Outcome", "Target", "payload_stem", "push", "remote_name"]
