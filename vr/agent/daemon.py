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
from vr.agent.limits import Admission, AgentLimits, AuthThrottle, Decisions, Ticket
from vr.agent.server import AgentContext, serve_connection
from vr.paths import Paths

LOG = logging.getLogger(__name__)

POLL = 0.25


@dataclass(frozen=True)
class Accepted:
    conn: socket.socket
    peer: str


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
        self._admission: Admission[Accepted] = Admission(ctx.limits)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum

    def install_signals(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self.on_signal)

    def serve(self, sock: socket.socket) -> None:
        """Accept connections until a signal is recorded, then stop cleanly."""
        port = sock.getsockname()[1]  # the one picked if the configured port is 0
        LOG.info("push agent listening on %s port %d", self.listen.address, port)
        try:
            while self._signal is None:
                self._act(self._admission.expire())
                try:
                    conn, addr = sock.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    LOG.error("accept on port %d failed: %s", port, exc)
                    time.sleep(POLL)
                    continue
                self._admit(conn, addr[0], f"{addr[0]}:{addr[1]}")
        finally:
            sock.close()
        LOG.info("push agent stopping (signal %s)", self._signal)
        self.stop()

    def _admit(self, conn: socket.socket, address: str, peer: str) -> None:
        conn.settimeout(None)
        # SSH exchanges many small packets; Nagle + delayed ACK would add ~40 ms each
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._act(self._admission.arrive(Accepted(conn, peer), address))

    def _act(self, decisions: Decisions[Accepted]) -> None:
        """Do what the admission decided: log waits, close the refused, start the rest."""
        for item, reason in decisions.waiting:
            LOG.info("connection from %s waits for a free place: %s", item.peer, reason)
        for item, reason in decisions.close:
            LOG.warning("refused connection from %s: %s", item.peer, reason)
            item.conn.close()
        for item, ticket in decisions.start:
            t = threading.Thread(
                target=self._connection,
                args=(item, ticket),
                name=f"ssh-{item.peer}",
                daemon=True,
            )
            with self._lock:
                self._threads = {t for t in self._threads if t.is_alive()}
                self._threads.add(t)
            t.start()

    def _connection(self, item: Accepted, ticket: Ticket) -> None:
        def on_login() -> None:
            self._act(self._admission.login(ticket))

        try:
            serve_connection(item.conn, item.peer, self.ctx, on_login=on_login)
        except Exception:
            LOG.exception("connection from %s failed", item.peer)
        finally:
            item.conn.close()
            self._act(self._admission.done(ticket))

    def stop(self) -> None:
        """Close every connection once its running command finished (bounded)."""
        self.ctx.stopping.set()
        for item in self._admission.drain():
            item.conn.close()
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
