"""A tiny HTTP server that answers with the address it saw: ``<peer> <local ip>:<port>``.

Run in a namespace: ``python -m tests.helpers.echo_server 80 8080 3922``. It binds
0.0.0.0 on every port given, prints ``ready`` once all listen, and lets the tests
check which packets arrive and with which source address (after any DNAT).
"""

from __future__ import annotations

import socketserver
import sys
import threading


class Handler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(5)
        data = b""
        try:
            while b"\r\n\r\n" not in data and len(data) < 8192:
                chunk = self.request.recv(4096)
                if not chunk:
                    break
                data += chunk
        except OSError:
            return
        peer = self.client_address[0]
        local_ip, local_port = self.request.getsockname()[:2]
        body = f"{peer} {local_ip}:{local_port}\n".encode()
        head = f"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {len(body)}\r\n\r\n"
        self.request.sendall(head.encode() + body)


class Server(socketserver.ThreadingTCPServer):
    allow_reuse_address = True
    daemon_threads = True


def main(ports: list[int]) -> None:
    servers = [Server(("0.0.0.0", p), Handler) for p in ports]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    print("ready", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main([int(p) for p in sys.argv[1:]])
