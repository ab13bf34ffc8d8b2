"""Password state across the router pair: the ledger exchange and its daemon.

One exchange: this router observes its passwords file into the ledger
(:func:`vr.pair.ledger.observe`), sends the ledger with its pending passwords to the
peer's SSH agent (port 3922, the pair's key, command :data:`SYNC_COMMAND` with the
ledger on stdin), the peer merges it in-process under its passwords lock, makes its
passwords file follow and answers with its merged ledger, which this router merges
in turn. Both then hold the same ledger (the merge is commutative).

``vr pair run`` (supervised by ``vr up``) runs an exchange whenever the passwords
file changes (a fetch, an ack, a push; checked every 50 ms) and every
:data:`RESYNC_S` seconds, so an ack reaches the peer well within a second and a
router that was down or cut off catches up as soon as it answers again. It also
keeps keepalived's configuration in step with the pushed guest networks.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import paramiko

from vr import atomic, config
from vr.agent.client import Connection, Target
from vr.agent.requests import PAIR_SYNC
from vr.errors import VRError
from vr.pair import ledger as lg
from vr.pair import manager
from vr.paths import Paths
from vr.store import Store

LOG = logging.getLogger(__name__)

SYNC_COMMAND = PAIR_SYNC
POLL_S = 0.05
RESYNC_S = 2.0
RETRY_S = 1.0
CONF_CHECK_S = 1.0
CALL_TIMEOUT = 5.0
MAX_MESSAGE = 32 * 1024 * 1024


def load_ledger(paths: Paths) -> lg.Ledger:
    try:
        data = paths.pair_state.read_bytes()
    except FileNotFoundError:
        return {}
    return lg.decode(data, str(paths.pair_state), with_passwords=False)


def exchange(paths: Paths, peer: lg.Ledger | None) -> lg.Ledger:
    """Observe, merge ``peer`` (if any) and apply, all under the passwords lock.

    The passwords file is written before the ledger file: killed in between, the
    next observation reads the file's change again (a removal as an ack, a new
    password as new), which is what the merge decided.
    """
    out: dict[str, lg.Ledger] = {}

    def change(pw: dict[str, dict[str, Any]], claim_gen: Any) -> bool:
        saved = load_ledger(paths)
        led = lg.observe(saved, pw)
        if peer is not None:
            led = lg.merge(led, peer)
        changed = lg.reconcile(pw, led, claim_gen)
        out["saved"], out["led"] = saved, led
        return changed

    def then() -> None:
        new = lg.encode(out["led"], with_passwords=False)
        if new != lg.encode(out["saved"], with_passwords=False) or not paths.pair_state.exists():
            # (its presence also tells the store to record acks in it)
            atomic.atomic_write(paths.pair_state, new, 0o600)

    Store(paths).update_passwords(change, then)
    return out["led"]


def serve_request(paths: Paths, data: bytes, peer: str) -> bytes:
    """The agent's side of :data:`SYNC_COMMAND`: merge the peer's ledger, answer ours."""
    theirs = lg.decode(data, f"pair sync from {peer}", with_passwords=True)
    merged = exchange(paths, theirs)
    LOG.info("pair sync from %s: %d VMs, ledger %s", peer, len(merged), lg.fingerprint(merged))
    return lg.encode(merged, with_passwords=True)


class PeerLink:
    """A kept-open SSH connection to the peer's agent; reopened after any failure."""

    def __init__(self, target: Target) -> None:
        self.target = target
        self._conn: Connection | None = None

    def call(self, data: bytes) -> bytes:
        if self._conn is None:
            self._conn = Connection(self.target)
        try:
            return self._call(self._conn, data)
        except BaseException:
            self.close()
            raise

    def _call(self, conn: Connection, data: bytes) -> bytes:
        transport = conn.client.get_transport()
        if transport is None or not transport.is_active():
            raise VRError(f"connection to peer {self.target.host} closed")
        chan = transport.open_session(timeout=self.target.timeout)
        try:
            chan.settimeout(self.target.command_timeout)
            chan.exec_command(SYNC_COMMAND)
            chan.sendall(data)
            chan.shutdown_write()
            out = chan.makefile("rb").read(MAX_MESSAGE + 1)
            err = chan.makefile_stderr("rb").read(4096)
            code = chan.recv_exit_status()
        finally:
            chan.close()
        if code != 0:
            raise VRError(
                f"peer {self.target.host} refused the pair sync (exit {code}): "
                f"{err.decode('utf-8', 'replace').strip()[:300]}"
            )
        if len(out) > MAX_MESSAGE:
            raise VRError(f"peer {self.target.host} answered more than {MAX_MESSAGE} bytes")
        return bytes(out)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def peer_target(paths: Paths, cfg: config.Config) -> Target:
    return Target(
        host=cfg.pair_peer,
        port=cfg.ssh_port,
        key=paths.pair_key,
        known_hosts=paths.pair_known_hosts,
        accept_new=True,
        timeout=1.0,
        command_timeout=CALL_TIMEOUT,
    )


def _version(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns, st.st_size)


@dataclass
class SyncStatus:
    peer: str
    reachable: bool = False
    in_sync: bool = False
    ledger: str = ""
    peer_ledger: str = ""
    last_ok: float | None = None
    error: str | None = None
    exchanges: int = 0

    def doc(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class SyncDaemon:
    paths: Paths
    cfg: config.Config
    link: PeerLink
    status: SyncStatus = field(init=False)
    _signal: int | None = None
    _written: tuple[Any, ...] | None = None
    _written_at: float = 0.0

    def __post_init__(self) -> None:
        self.status = SyncStatus(self.cfg.pair_peer)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signal = signum

    def run(self) -> int:
        for s in (signal.SIGTERM, signal.SIGINT):
            signal.signal(s, self._on_signal)
        LOG.info("pair sync with peer %s started", self.cfg.pair_peer)
        seen: tuple[Any, ...] | None = None
        next_sync = next_conf = 0.0
        try:
            while self._signal is None:
                now = time.monotonic()
                if now >= next_conf:
                    self.check_keepalived()
                    next_conf = now + CONF_CHECK_S
                current = (_version(self.paths.passwords), _version(self.paths.pair_state))
                if current != seen or now >= next_sync:
                    ok = self.sync_once()
                    seen = (_version(self.paths.passwords), _version(self.paths.pair_state))
                    next_sync = time.monotonic() + (RESYNC_S if ok else RETRY_S)
                time.sleep(POLL_S)
        finally:
            self.link.close()
        LOG.info("pair sync stopped (signal %s)", self._signal)
        return 0

    def sync_once(self) -> bool:
        """One exchange with the peer; whether the peer answered."""
        st = self.status
        try:
            local = exchange(self.paths, None)
            reply = self.link.call(lg.encode(local, with_passwords=True))
            theirs = lg.decode(reply, f"peer {self.cfg.pair_peer}", with_passwords=True)
            merged = exchange(self.paths, theirs)
        except (OSError, EOFError, paramiko.SSHException, VRError) as exc:
            if st.reachable or st.error is None:
                LOG.warning("pair peer %s not reachable: %s", self.cfg.pair_peer, _reason(exc))
            st.reachable, st.in_sync = False, False
            st.error = _reason(exc)
            self._save_status()
            return False
        if not st.reachable:
            LOG.info("pair peer %s reachable", self.cfg.pair_peer)
        st.reachable, st.error = True, None
        st.ledger, st.peer_ledger = lg.fingerprint(merged), lg.fingerprint(theirs)
        st.in_sync = st.ledger == st.peer_ledger
        st.last_ok = time.time()
        st.exchanges += 1
        self._save_status()
        return True

    def _save_status(self) -> None:
        st = self.status
        key = (st.reachable, st.in_sync, st.ledger, st.peer_ledger, st.error)
        now = time.monotonic()
        if key == self._written and now - self._written_at < 5.0:
            return
        self.paths.pair_run.mkdir(parents=True, exist_ok=True)
        doc = {**st.doc(), "time": time.time(), "pid": os.getpid()}
        atomic.atomic_write(manager.PairFiles(self.paths).sync_status, json.dumps(doc).encode())
        self._written, self._written_at = key, now

    def check_keepalived(self) -> None:
        """Rewrite keepalived's config after a push changed the guest networks; reload."""
        try:
            cfg = config.load(self.paths)
            conf = manager.desired_conf(self.paths, cfg)
            if manager.write_conf(self.paths, conf):
                manager.reload(self.paths)
        except (VRError, ValueError, OSError) as exc:
            LOG.error("keepalived configuration not updated: %s", exc)


def _reason(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def read_status(paths: Paths) -> dict[str, Any] | None:
    try:
        doc: dict[str, Any] = json.loads(manager.PairFiles(paths).sync_status.read_text())
    except (OSError, ValueError):
        return None
    return doc
