"""Live reconfiguration: what an edit of ``vr.json`` changes, and noticing edits.

:func:`plan` is pure: from the running and the edited :class:`Config` it decides
which services restart (only those whose own settings changed) and whether the
firewall is re-applied (when the rules it computes from the config differ).
:class:`Watcher` is the I/O edge: a watchdog observer thread that only records
that a watched file changed; ``vr up``'s loop acts on it (as on a signal), after
the file has been quiet for :data:`SETTLE` seconds so an editor's half-written
file is not read.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from vr.config import Config

LOG = logging.getLogger(__name__)

SERVICE_KEYS: dict[str, frozenset[str]] = {
    "agent": frozenset({"ssh_listen", "ssh_port", "ssh_legacy_algorithms"}),
    "metadata": frozenset(
        {"metadata_port", "metadata_workers", "imds_hop_limit", "imds_tokens_required"}
        | {"imds_tokens_required_vms", "imds_rate_per_second", "imds_rate_burst"}
        | {"imds_waiters_per_vm"}
    ),
    "passwords": frozenset({"password_port", "password_workers"}),
    "ops": frozenset({"metrics_port"}),
    # dnsmasq's main configuration: which devices it serves (rendered at its start)
    "dhcp": frozenset({"dnsmasq", "guest_networks", "control_device", "public_devices"}),
    # a redundant pair: keepalived's config (rendered at its start) and the peer to sync
    "keepalived": frozenset({"pair_peer", "pair_priority", "pair_advert_ms", "pair_vrid"}),
    "pair-sync": frozenset({"pair_peer"}),
}
"""The settings each service reads when it starts (a change restarts it)."""

NO_RESTART_KEYS = frozenset(
    {"control_device", "public_devices", "require_mac_binding", "guest_networks"}
    | {"userdata_max_bytes"}
)
"""Settings no running service holds: the firewall's inputs (re-applied when the rules
change) and ``userdata_max_bytes``, read by every push."""

SETTLE = 0.3
"""Seconds without a further event before an edited file is read."""


@dataclass(frozen=True)
class Plan:
    changed: tuple[str, ...]
    restart: tuple[str, ...]
    firewall: bool

    def describe(self) -> str:
        what = [f"restart {', '.join(self.restart)}"] if self.restart else []
        if self.firewall:
            what.append("re-apply the firewall")
        return "; ".join(what) or "nothing to restart"


def changed_keys(old: Config, new: Config) -> tuple[str, ...]:
    return tuple(f.name for f in fields(Config) if getattr(old, f.name) != getattr(new, f.name))


def plan(old: Config, new: Config, services: Iterable[str]) -> Plan:
    """What to do so the running appliance follows ``new``. A setting that no table
    above knows (added later and not classified) restarts every service."""
    from vr.firewall import model

    changed = changed_keys(old, new)
    names = list(services)
    known = set(NO_RESTART_KEYS).union(*SERVICE_KEYS.values())
    if any(k not in known for k in changed):
        restart = names
    else:
        restart = [n for n in names if SERVICE_KEYS.get(n, frozenset()) & set(changed)]
    firewall = model.desired(old, (), ()) != model.desired(new, (), ())
    return Plan(changed, tuple(restart), firewall)


class Watcher:
    """Records changes of ``files`` (by path) from a watchdog observer thread.

    Watches each file's folder (an editor replaces the file by a rename, which a
    watch on the file itself would lose). :meth:`due` returns the files changed and
    quiet for :data:`SETTLE` seconds, each once per burst of events.
    """

    def __init__(self, files: Iterable[Path], clock: Callable[[], float] = time.monotonic) -> None:
        self.files = {Path(f) for f in files}
        self._clock = clock
        self._lock = threading.Lock()
        self._last: dict[Path, float] = {}
        self._observer: Any = None

    def record(self, *event_paths: str | bytes) -> None:
        """Called from the observer thread for each event (also by tests)."""
        now = self._clock()
        with self._lock:
            for p in event_paths:
                if not p:
                    continue
                path = Path(p.decode() if isinstance(p, bytes) else p)
                if path in self.files:
                    self._last[path] = now

    def due(self) -> list[Path]:
        now = self._clock()
        with self._lock:
            ready = sorted(p for p, t in self._last.items() if now - t >= SETTLE)
            for p in ready:
                del self._last[p]
        return ready

    def start(self) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        watcher = self

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                watcher.record(event.src_path, getattr(event, "dest_path", "") or "")

        observer = Observer()
        for folder in sorted({f.parent for f in self.files}):
            folder.mkdir(parents=True, exist_ok=True, mode=0o700)
            observer.schedule(Handler(), str(folder), recursive=False)
        observer.daemon = True
        observer.start()
        self._observer = observer
        LOG.info("watching %s for edits", ", ".join(str(f) for f in sorted(self.files)))

    def stop(self) -> None:
        if self._observer is not None:
            self._observer.stop()
            self._observer.join(5)
            self._observer = None
