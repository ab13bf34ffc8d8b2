"""Run the push agent as a real process (``python -m vr agent``) for tests and benchmarks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paramiko

from tests.helpers.procs import free_port, wait_port

REPO = Path(__file__).resolve().parents[2]


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
        self.port = self.port or free_port()
        env = {**os.environ, "PYTHONPATH": str(REPO)}
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
            wait_port("127.0.0.1", self.port, timeout=30)
        except TimeoutError:
            self.stop()
            raise
        return self

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
