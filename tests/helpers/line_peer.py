"""Both ends of one long-lived TCP connection whose every line the tests can follow.

``python -m tests.helpers.line_peer server PORT`` listens on 0.0.0.0:PORT, prints
``ready``, then prints ``<peer> <line>`` for each line any connection delivers
(no read timeout: a connection stays open as long as the client keeps it).

``python -m tests.helpers.line_peer client HOST PORT`` connects, prints
``connected``, then sends each line it reads on stdin over that one connection.

Run each in a namespace; a test learns from the server's output which segments
of an established connection arrived, whatever happened to the path in between.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import threading
import time

WAIT = 30.0
"""Generous bound for anything that should happen "soon" (TCP retransmits back off)."""


class Lines:
    """A child's stdout, line by line, read without ever blocking past a deadline."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        assert proc.stdout is not None
        self.proc = proc
        self.fd = proc.stdout.fileno()
        self.seen: list[str] = []
        self._buf = b""

    def poll(self, wait: float) -> list[str]:
        """Take in what the child printed within ``wait`` seconds; all lines so far."""
        if select.select([self.fd], [], [], wait)[0]:
            chunk = os.read(self.fd, 65536)
            if not chunk:
                raise AssertionError(f"child exited ({self.proc.wait()}) after {self.seen}")
            self._buf += chunk
            *done, self._buf = self._buf.split(b"\n")
            self.seen += [d.decode(errors="replace") for d in done]
        return self.seen

    def wait_for(self, line: str, timeout: float = WAIT) -> None:
        deadline = time.monotonic() + timeout
        while line not in self.seen:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"no line {line!r} within {timeout}s: {self.seen}")
            self.poll(min(left, 0.5))

    def send(self, line: str) -> None:
        """Give the child one line on its stdin."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()


def _serve_one(conn: socket.socket, peer: str) -> None:
    with conn, conn.makefile("rb") as lines:
        for line in lines:
            print(peer, line.decode(errors="replace").rstrip("\n"), flush=True)


def server(port: int) -> None:
    listener = socket.create_server(("0.0.0.0", port), reuse_port=False)
    print("ready", flush=True)
    while True:
        conn, addr = listener.accept()
        threading.Thread(target=_serve_one, args=(conn, addr[0]), daemon=True).start()


def client(host: str, port: int) -> None:
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.settimeout(None)
        print("connected", flush=True)
        for line in iter(sys.stdin.buffer.readline, b""):
            sock.sendall(line)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        server(int(sys.argv[2]))
    else:
        client(sys.argv[2], int(sys.argv[3]))
