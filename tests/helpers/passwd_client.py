"""A guest-side password client driven line by line; run it inside a guest namespace.

``python -m tests.helpers.passwd_client SERVER_IP PORT`` reads one JSON command per
line on stdin and answers one JSON line on stdout:

- ``{"op": "get", "source": IP, "request": VALUE|null, "method": "GET"}`` -> one
  request through ``http.client`` (as cloudbase-init does) on a new connection from
  ``source``: ``{"status", "content_type", "fp", "length"}``;
- ``{"op": "raw", "source": IP, "data": BASE64}`` -> sends those bytes as they are
  and reads until the server closes: ``{"status_line", "fp", "length"}``.

A body is never printed, only its fingerprint (:func:`tests.helpers.fingerprint.fp`),
so passwords stay out of test output.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import sys
from typing import Any

from tests.helpers.fingerprint import fp


def get(server: str, port: int, cmd: dict[str, Any]) -> dict[str, Any]:
    conn = http.client.HTTPConnection(server, port, timeout=20, source_address=(cmd["source"], 0))
    try:
        headers = {} if cmd.get("request") is None else {"DomU_Request": cmd["request"]}
        conn.request(cmd.get("method", "GET"), cmd.get("path", "/"), headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return {
            "status": resp.status,
            "content_type": resp.getheader("Content-Type"),
            "fp": fp(body),
            "length": len(body),
        }
    finally:
        conn.close()


def raw(server: str, port: int, cmd: dict[str, Any]) -> dict[str, Any]:
    with socket.create_connection(
        (server, port), timeout=20, source_address=(cmd["source"], 0)
    ) as s:
        s.sendall(base64.b64decode(cmd["data"]))
        s.shutdown(socket.SHUT_WR)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    reply = b"".join(chunks)
    head, _, body = reply.partition(b"\r\n\r\n")
    return {
        "status_line": head.split(b"\r\n", 1)[0].decode("latin-1"),
        "fp": fp(body),
        "length": len(body),
    }


def main() -> None:
    server, port = sys.argv[1], int(sys.argv[2])
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            out = raw(server, port, cmd) if cmd["op"] == "raw" else get(server, port, cmd)
        except OSError as exc:
            out = {"error": type(exc).__name__}
        sys.stdout.write(json.dumps(out) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
