"""The push agent's connection handling in-process, on a loopback listener.

Each accepted connection runs :func:`vr.agent.server.serve_connection` in a thread,
exactly as the daemon runs it, but the applier is a hand-written fake so a test
decides what a command prints and returns. Every wait is bounded; leaving the
context stops the listener and closes every connection.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import paramiko

from vr.agent.keys import AuthorizedKeys, LegacyRSAKey
from vr.agent.limits import AgentLimits, AuthThrottle
from vr.agent.server import AgentContext, serve_connection
from vr.paths import Paths

HOST = "127.0.0.1"
WAIT = 20.0

Script = Callable[[list[str], TextIO, TextIO], int]
"""What the fake applier does for one command: (args, stdout, stderr) -> exit status."""


@dataclass
class FakeApplier:
    """Stands in for :class:`vr.applier.Applier`; records every command it was given."""

    script: Script
    calls: list[tuple[str, list[str]]] = field(default_factory=list)

    def update_config(self, args: list[str], out: TextIO, err: TextIO) -> int:
        self.calls.append(("update_config", args))
        return self.script(args, out, err)

    def apply_cfg(self, args: list[str], out: TextIO, err: TextIO) -> int:
        self.calls.append(("apply_cfg", args))
        return self.script(args, out, err)


def applied(args: list[str], out: TextIO, err: TextIO) -> int:
    err.write(f"{args[-1]}: applied: no change (0.1 ms)\n")
    return 0


@dataclass
class LoopAgent:
    port: int
    ctx: AgentContext
    host_key: paramiko.PKey
    client_key: Path
    """An authorized RSA private key file for clients."""
    applier: FakeApplier


def write_client_key(path: Path) -> paramiko.RSAKey:
    key = paramiko.RSAKey.generate(2048)
    key.write_private_key_file(str(path))
    return key


@contextlib.contextmanager
def loop_agent(
    paths: Paths, script: Script = applied, limits: AgentLimits | None = None
) -> Iterator[LoopAgent]:
    client_key = paths.root / "client_rsa"
    key = write_client_key(client_key)
    paths.authorized_keys.parent.mkdir(parents=True, exist_ok=True)
    paths.authorized_keys.write_text(f"ssh-rsa {key.get_base64()} mgmt\n")
    host_key = LegacyRSAKey(key=paramiko.RSAKey.generate(2048).key)  # type: ignore[attr-defined]
    applier = FakeApplier(script)
    ctx = AgentContext(
        paths=paths,
        limits=limits or AgentLimits(),
        host_keys=[host_key],
        authorized=AuthorizedKeys(paths.authorized_keys),
        throttle=AuthThrottle(base=0.01, cap=0.01),
        make_applier=lambda p: applier,
    )
    listener = socket.create_server((HOST, 0))
    listener.settimeout(0.2)
    stop = threading.Event()
    threads: list[threading.Thread] = []

    def accept_loop() -> None:
        while not stop.is_set():
            try:
                conn, addr = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            conn.settimeout(None)
            t = threading.Thread(
                target=serve_connection, args=(conn, f"{addr[0]}:{addr[1]}", ctx), daemon=True
            )
            t.start()
            threads.append(t)

    acceptor = threading.Thread(target=accept_loop, daemon=True)
    acceptor.start()
    try:
        yield LoopAgent(listener.getsockname()[1], ctx, host_key, client_key, applier)
    finally:
        stop.set()
        ctx.stopping.set()
        acceptor.join(WAIT)
        listener.close()
        for t in threads:
            t.join(WAIT)
    assert not any(t.is_alive() for t in [acceptor, *threads])
