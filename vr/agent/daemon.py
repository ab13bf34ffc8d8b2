"""The agent process: listening socket, one thread per connection, clean stop on SIGTERM.

As in gunicorn's arbiter, signal handlers only record the signal; the accept loop
notices it within :data:`POLL` seconds, stops accepting, lets running applies
finish (bounded by ``stop_grace``) and returns.
"""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from dataclasses import dataclass
from types import FrameType

from vr import atomic
from vr.agent.keys import AuthorizedKeys, load_host_keys
from vr.agent.limits import AgentLimits, AuthThrottle, PreAuthSlot, PreAuthSlots
from vr.agent.server import AgentContext, serve_connection
from vr.paths import Paths

LOG = logging.getLogger(__name__)

POLL = 0.25


@dataclass(frozen=True)
class Listen:
    address: str
    port: int


def open_listener(listen: Listen) -> socket.socket:
    """A listening TCP socket on ``listen`` (IPv4 or IPv6 literal or name)."""
    family = socket.getaddrinfo(listen.address, listen.port, type=socket.SOCK_STREAM)[0][0]
    sock = socket.create_server(
        (listen.address, listen.port), family=family, backlog=128, reuse_port=False
    )
    sock.settimeout(POLL)
    return sock


class Agent:
    def __init__(self, ctx: AgentContext, listen: Listen) -> None:
        self.ctx = ctx
        self.listen = listen
        self._signal: int | None = None
        self._threads: set[threading.Thread] = set()
        self._lock = threading.Lock()
        self._preauth = PreAuthSlots(ctx.limits.max_unauthenticated_per_address)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)

    def serve(self, sock: socket.socket) -> None:
        """Accept connections until a signal is recorded, then stop cleanly."""
        LOG.info("push agent listening on %s port %d", self.listen.address, self.listen.port)
        try:
            while self._signal is None:
                try:
                    conn, addr = sock.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    LOG.error("accept on port %d failed: %s", self.listen.port, exc)
                    time.sleep(POLL)
                    continue
                self._admit(conn, addr[0], f"{addr[0]}:{addr[1]}")
        finally:
            sock.close()
        LOG.info("push agent stopping (signal %s)", self._signal)
        self.stop()

    def _admit(self, conn: socket.socket, address: str, peer: str) -> None:
        with self._lock:
            self._threads = {t for t in self._threads if t.is_alive()}
            if len(self._threads) >= self.ctx.limits.max_sessions:
                LOG.warning(
                    "refused connection from %s: %d sessions already open",
                    peer,
                    len(self._threads),
                )
                conn.close()
                return
            slot = self._preauth.take(address)
            if slot is None:
                LOG.warning(
                    "refused connection from %s: %d connections from %s not logged in yet",
                    peer,
                    self._preauth.per_address,
                    address,
                )
                conn.close()
                return
            conn.settimeout(None)
            # SSH exchanges many small packets; Nagle + delayed ACK would add ~40 ms each
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(
                target=self._connection, args=(conn, peer, slot), name=f"ssh-{peer}", daemon=True
            )
            self._threads.add(t)
        t.start()

    def _connection(self, conn: socket.socket, peer: str, slot: PreAuthSlot) -> None:
        try:
            serve_connection(conn, peer, self.ctx, on_login=slot.release)
        except Exception:
            LOG.exception("connection from %s failed", peer)
        finally:
            slot.release()
            conn.close()

    def stop(self) -> None:
        """Close every connection once its running command finished (bounded)."""
        self.ctx.stopping.set()
        deadline = time.monotonic() + self.ctx.limits.stop_grace + 2
        with self._lock:
            threads = list(self._threads)
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        left = sum(t.is_alive() for t in threads)
        if left:
            LOG.warning("push agent stopped with %d connections still closing", left)
        else:
            LOG.info("push agent stopped")


def build_context(
    paths: Paths, limits: AgentLimits, legacy_algorithms: bool = True
) -> AgentContext:
    """Everything connections share: host keys (created on first start), keys, applier.

    ``legacy_algorithms`` offers the SHA-1 algorithms CloudStack's Trilead client needs.
    """
    from vr.applier import make_applier

    paths.ensure()
    for leftover in atomic.sweep_temps(paths.cache):
        LOG.info("removed %s left by an interrupted upload", leftover)
    return AgentContext(
        paths=paths,
        limits=limits,
        host_keys=load_host_keys(paths.host_keys),
        authorized=AuthorizedKeys(paths.authorized_keys),
        throttle=AuthThrottle(),
        make_applier=make_applier,
        legacy_algorithms=legacy_algorithms,
    )
