"""Run the push agent as a real process (``python -m vr agent``) for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from tests.helpers.procs import wait_port

REPO = Path(__file__).resolve().parents[2]
LISTENING = "push agent listening on 127.0.0.1 port "


def keygen(path: Path, kind: str, pem: bool = False) -> Path:
    """A fresh client key pair (``kind``: ed25519, rsa, ecdsa) without passphrase.

    ``pem`` writes the private key in the old PEM format (``BEGIN RSA PRIVATE KEY``),
    the only one CloudStack's Java SSH library reads.
    """
    extra = ["-b", "2048"] if kind == "rsa" else []
    if pem:
        extra += ["-m", "PEM"]
    subprocess.run(
        ["ssh-keygen", "-q", "-t", kind, *extra, "-N", "", "-C", path.name, "-f", str(path)],
        check=True,
        timeout=30,
    )
    return path


@dataclass
class AgentProcess:
    root: Path
    port: int = 0
    extra: Sequence[str] = ()
    proc: subprocess.Popen[bytes] | None = None
    log: Path = field(init=False)

    def __post_init__(self) -> None:
        self.log = self.root / "agent.stderr"

    def start(self) -> AgentProcess:
        """Start the agent; on the first start it picks a free port itself (``--port 0``)
        and the port is read from its log: a port chosen here and bound later by the
        agent could be taken by any other socket in between."""
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        started = self.cloud_log().count(LISTENING)
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "vr",
                    "agent",
                    "--root",
                    str(self.root),
                    "--listen",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    *self.extra,
                ],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=env,
                start_new_session=True,
            )
        try:
            self.port = self._listening_port(started)
            wait_port("127.0.0.1", self.port, timeout=30)
        except (TimeoutError, RuntimeError):
            self.stop()
            raise
        return self

    def _listening_port(self, seen: int, timeout: float = 30) -> int:
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        while True:
            lines = [line for line in self.cloud_log().splitlines() if LISTENING in line]
            if len(lines) > seen:
                return int(lines[-1].rsplit(" port ", 1)[1])
            if self.proc.poll() is not None:
                raise RuntimeError(f"vr agent exited with {self.proc.returncode}: "
                                   f"{self.log.read_text()[-500:]}")  # fmt: skip
            if time.monotonic() > deadline:
                raise TimeoutError(f"vr agent logged no {LISTENING!r} in {timeout}s")
            time.sleep(0.05)

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM and wait; returns the exit code (kills on timeout)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        return self.proc.returncode

    def cloud_log(self) -> str:
        path = self.root / "var/log/cloud.log"
        return path.read_text() if path.exists() else ""


class KexRecorder(paramiko.Transport):
    """A paramiko client transport that remembers which key exchange it agreed on."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.kex_names: list[str] = []

    def _parse_kex_init(self, m: paramiko.Message) -> None:
        super()._parse_kex_init(m)  # type: ignore[misc]
        self.kex_names.append(self.kex_engine.name)  # type: ignore[attr-defined]
