"""Start our own servers for tests and wait until they answer."""

from __future__ import annotations

import socket
import time


def wait_port(host: str, port: int, timeout: float = 15.0) -> None:
    """Return once ``host:port`` accepts TCP connections (in the caller's namespace)."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError as exc:
            last = exc
            time.sleep(0.05)
    raise TimeoutError(f"{host}:{port} did not answer within {timeout}s: {last}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
