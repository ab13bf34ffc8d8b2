"""Every filesystem location of the appliance, derived from one root prefix.

Nothing else in vr joins paths from configuration or payload strings: callers ask
this object, and IP addresses arrive already parsed (``ipaddress.IPv4Address``) so a
pushed string can never become a path component.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from ipaddress import IPv4Address
from pathlib import Path

ROOT_ENV = "VR_ROOT"


def root_from_env(explicit: str | None = None) -> Path:
    """The root prefix: ``explicit`` (``--root``), else ``$VR_ROOT``, else ``/``."""
    return Path(explicit or os.environ.get(ROOT_ENV) or "/")


@dataclass(frozen=True)
class Paths:
    root: Path

    def _p(self, rel: str) -> Path:
        return self.root / rel

    # --- document root (served data) -------------------------------------------------
    @cached_property
    def html(self) -> Path:
        return self._p("var/www/html")

    @cached_property
    def latest(self) -> Path:
        return self.html / "latest"

    @property
    def metadata_root(self) -> Path:
        return self.latest / "metadata"

    @property
    def userdata_root(self) -> Path:
        return self.latest / "userdata"

    @cached_property
    def generations(self) -> Path:
        """Hidden folder holding one immutable directory per VM generation."""
        return self.latest / ".vms"

    @cached_property
    def stamp(self) -> Path:
        """Replaced on every committed change; readers compare its inode and mtime."""
        return self.latest / ".stamp"

    def vm_pointer(self, ip: IPv4Address) -> Path:
        """Symlink ``.vms/<ip> -> <ip>@<gen>``: the VM's committed generation."""
        return self.generations / str(ip)

    def metadata_dir(self, ip: IPv4Address) -> Path:
        return self.metadata_root / str(ip)

    def userdata_dir(self, ip: IPv4Address) -> Path:
        return self.userdata_root / str(ip)

    # --- push path -------------------------------------------------------------------
    @property
    def cache(self) -> Path:
        """Where the management server drops pushed files (``/var/cache/cloud``)."""
        return self._p("var/cache/cloud")

    @property
    def processed(self) -> Path:
        return self.cache / "processed"

    @property
    def failed(self) -> Path:
        return self.cache / "failed"

    @property
    def cloudstack_bin(self) -> Path:
        return self._p("opt/cloud/bin")

    # --- private state ---------------------------------------------------------------
    @property
    def state(self) -> Path:
        return self._p("var/lib/vr")

    @property
    def lock(self) -> Path:
        return self.state / "store.lock"

    @property
    def passwords(self) -> Path:
        return self.state / "passwords.json"

    @property
    def passwords_lock(self) -> Path:
        """Guards ``passwords`` alone, so guests' fetches and acks never wait for a batch."""
        return self.state / "passwords.lock"

    @property
    def password_gen(self) -> Path:
        """The highest password generation ever handed out (guarded by ``passwords_lock``).

        Saves through the password server happen outside the store lock, so they cannot
        take the store's generation; this counter keeps every new password's generation
        above every earlier one, also of passwords already acknowledged and removed.
        """
        return self.state / "passwords.gen"

    @property
    def password_token(self) -> Path:
        return self.state / "passwd_token"

    @property
    def networks(self) -> Path:
        return self.state / "guestnetwork.json"

    @property
    def dhcp(self) -> Path:
        return self.state / "dhcpentry.json"

    @property
    def journal(self) -> Path:
        """Renames of a store commit in progress (finished by the next writer)."""
        return self.state / "store.journal"

    @property
    def last_push(self) -> Path:
        return self.state / "last_push.json"

    @property
    def firewall_state(self) -> Path:
        return self.state / "firewall.json"

    @property
    def firewall_pending(self) -> Path:
        """Present while the saved firewall state may not be what the tables hold."""
        return self.state / "firewall.pending"

    @property
    def pair_state(self) -> Path:
        """The router pair's password ledger (:mod:`vr.pair.ledger`), under the passwords lock."""
        return self.state / "pair-passwords.json"

    @property
    def run(self) -> Path:
        return self._p("run/vr")

    @property
    def up_lock(self) -> Path:
        """Held by the one ``vr up`` of this root for its whole life (holds its pid)."""
        return self.run / "up.lock"

    @property
    def metrics(self) -> Path:
        """prometheus-client's multiprocess files (``PROMETHEUS_MULTIPROC_DIR``) of
        every service of this root; ``vr up`` empties it when it starts."""
        return self.run / "metrics"

    @property
    def pair_run(self) -> Path:
        """keepalived's generated config and pid files, VRRP states, the sync's status."""
        return self.run / "pair"

    # --- configuration ---------------------------------------------------------------
    @property
    def etc(self) -> Path:
        return self._p("etc/vr")

    @property
    def config(self) -> Path:
        return self.etc / "vr.json"

    @property
    def host_keys(self) -> Path:
        return self.etc / "ssh"

    @property
    def pair_key(self) -> Path:
        """The pair's private SSH key (its public half is in both routers' authorized_keys)."""
        return self.etc / "pair" / "id_key"

    @property
    def pair_known_hosts(self) -> Path:
        """The peer's host key, learnt on first contact."""
        return self.etc / "pair" / "known_hosts"

    @property
    def authorized_keys(self) -> Path:
        return self._p("root/.ssh/authorized_keys")

    # --- SystemVM boot (vr boot) ------------------------------------------------------
    @property
    def boot_cmdline(self) -> Path:
        """CloudStack's boot arguments, written by its KVM agent through the guest agent."""
        return self.cache / "cmdline"

    @property
    def boot_authorized_keys(self) -> Path:
        """The management server's key as CloudStack drops it (patch ISO, guest agent)."""
        return self.cache / "authorized_keys"

    def etc_file(self, name: str) -> Path:
        """``/etc/<name>`` for the system files ``vr boot`` writes (hostname, hosts,
        resolv.conf); ``name`` is a constant of vr.boot, never pushed data."""
        return self._p("etc") / name

    # --- logs ------------------------------------------------------------------------
    @property
    def log_file(self) -> Path:
        return self._p("var/log/cloud.log")

    @property
    def audit_log(self) -> Path:
        """Audit lines only (:data:`vr.logs.AUDIT`): guest traffic never reaches it."""
        return self._p("var/log/audit.log")

    def ensure(self) -> None:
        """Create the directories the appliance writes to (idempotent).

        The push folders hold ``vm_password.json.*`` files: they are made (and, when
        an older install left them open, set) 0700 whatever the umask.
        """
        for d in (
            self.metadata_root,
            self.userdata_root,
            self.generations,
            self.log_file.parent,
            self.run,
        ):
            d.mkdir(parents=True, exist_ok=True)
        for d in (self.state, self.etc):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        for d in (self.cache, self.processed, self.failed):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
            if d.stat().st_mode & 0o077:
                os.chmod(d, 0o700)
