"""The store: the one place that writes the appliance's state.

Layout under the document root (``Paths.latest``)::

    .vms/<ip>@<gen>/metadata/<key>, metadata/meta-data   immutable VM generation
    .vms/<ip>@<gen>/userdata/user-data
    .vms/<ip> -> <ip>@<gen>                               the VM's pointer: one rename
    metadata/<ip> -> ../.vms/<ip>/metadata                fixed, made on first push
    userdata/<ip> -> ../.vms/<ip>/userdata
    .stamp                                                replaced on every commit

A VM's generation directory is written completely and fsynced before its one
pointer is swapped, so metadata and user-data change together: a reader resolving
a path (or :func:`read_vm`) sees the whole old or the whole new VM. Superseded
generations are renamed away before they are deleted (see
:func:`vr.atomic.discard_tree`), and the one before the current is kept so a reader
that resolved it just before a swap can finish. Private state (passwords, guest
networks, DHCP entries) lives in JSON files under ``Paths.state``, replaced in the
same transaction.

Every change happens under one ``flock`` on ``Paths.lock`` (across processes and
threads) and through :class:`vr.atomic.Transaction` with a journal: all writes are
staged first (where a full disk fails), only renames make them visible, and the
next writer finishes the renames of a writer killed half-way; so does
:func:`recover`, which every reader-side start-up (the metadata and password
servers, the agent, ``vr up``, ``vr show``) runs before it reads. The exception is the
password server's life cycle (fetch marks, acks, saves): it rewrites the passwords
file under that file's own lock (``Paths.passwords_lock``), which an apply takes
after the store lock, so guests never wait behind a batch.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path
from typing import Any, TypeVar

from vr import atomic, locking
from vr.errors import LockTimeout, StoreError
from vr.paths import Paths
from vr.payloads import (
    DELETE,
    INDEX_NAME,
    DhcpEntry,
    GuestNetwork,
    Payload,
    VmMetadata,
    VmPassword,
)

LOG = logging.getLogger(__name__)
_T = TypeVar("_T")


# --- pure model ----------------------------------------------------------------------


@dataclass(frozen=True)
class VmRecord:
    """One VM as stored: metadata keys in index order, user-data folder files."""

    ip: IPv4Address
    gen: int
    metadata: dict[str, bytes]
    userdata: dict[str, bytes]

    @property
    def index(self) -> bytes:
        return "".join(k + "\n" for k in self.metadata).encode()


@dataclass
class VmChange:
    ip: IPv4Address
    changed: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)


def merge_vm(
    old: VmRecord | None, push: VmMetadata
) -> tuple[dict[str, bytes], dict[str, bytes], VmChange]:
    """The VM's files after ``push``: carried keys replaced, ``""`` deleted, rest kept.

    Key order is the order of first creation (CloudStack's index order).
    """
    metadata = dict(old.metadata) if old else {}
    userdata = dict(old.userdata) if old else {}
    change = VmChange(push.ip)
    for entry in push.entries:
        target = metadata if entry.folder == "metadata" else userdata
        label = entry.name if entry.folder == "metadata" else f"userdata/{entry.name}"
        if entry.content is DELETE:
            if entry.name in target:
                del target[entry.name]
                change.deleted.append(label)
        else:
            assert isinstance(entry.content, bytes)
            if target.get(entry.name) != entry.content:
                change.changed.append(label)
            target[entry.name] = entry.content
    return metadata, userdata, change


# --- reading -------------------------------------------------------------------------


READ_ATTEMPTS = 50
STALE_ARCHIVE_TEMP = 600.0
"""Seconds after which a temporary file written outside the lock is a leftover."""


def _older_than(path: Path, seconds: float) -> bool:
    if seconds <= 0:
        return True
    try:
        return time.time() - path.lstat().st_mtime > seconds
    except FileNotFoundError:
        return False


def _gen_of(target: str) -> int | None:
    """``10.1.1.2@17`` -> 17."""
    _, at, gen = target.rpartition("@")
    if not at or not gen.isdigit():
        return None
    return int(gen)


def current_gen(paths: Paths, ip: IPv4Address) -> int | None:
    """The VM's committed generation (one ``readlink``), or None if unknown."""
    try:
        return _gen_of(os.readlink(paths.vm_pointer(ip)))
    except OSError:
        return None


def gen_dir(paths: Paths, ip: IPv4Address, gen: int) -> Path:
    return paths.generations / f"{ip}@{gen}"


PREV_LINK = "prev"
"""In each generation: a symlink to the generation it replaced (:data:`NO_PREV` for
none), so a push finds the one to drop without listing ``.vms``."""


def _read_prev(paths: Paths, ip: IPv4Address, gen: int) -> tuple[bool, int | None]:
    """(known, generation) that ``gen`` replaced; unknown in an older store."""
    try:
        target = os.readlink(gen_dir(paths, ip, gen) / PREV_LINK)
    except OSError:
        return False, None
    return True, _gen_of(target)


def _read_folder(d: Path) -> dict[str, bytes]:
    out: dict[str, bytes] = {}
    with os.scandir(d) as it:
        for e in it:
            if e.is_file(follow_symlinks=False):
                out[e.name] = Path(e.path).read_bytes()
    return out


def _read_generation(ip: IPv4Address, gen: int, base: Path) -> VmRecord:
    """Read one generation directory; FileNotFoundError if any part is missing."""
    files = _read_folder(base / "metadata")
    index = files.pop(INDEX_NAME)
    order = index.decode("utf-8").split("\n")[:-1]
    metadata = {k: files[k] for k in order}  # KeyError: not the tree we wrote
    userdata = _read_folder(base / "userdata")
    return VmRecord(ip, gen, metadata, userdata)


def read_vm(paths: Paths, ip: IPv4Address) -> VmRecord | None:
    """Load one VM's committed generation, or None if the VM is unknown.

    Lock-free. If a concurrent apply discarded the generation while it was being
    read (it is renamed away before any file in it is deleted, so a directory still
    found by name after the read was read whole), the read starts again.
    """
    for _ in range(READ_ATTEMPTS):
        gen = current_gen(paths, ip)
        if gen is None:
            return None
        base = gen_dir(paths, ip, gen)
        try:
            record = _read_generation(ip, gen, base)
            os.stat(base)
        except (FileNotFoundError, KeyError):
            continue
        return record
    raise StoreError(f"VM {ip}: generation kept changing while reading")


def list_vms(paths: Paths) -> list[IPv4Address]:
    out = []
    try:
        names = os.listdir(paths.metadata_root)
    except FileNotFoundError:
        return []
    for n in names:
        if n.startswith("."):
            continue
        with contextlib.suppress(ValueError):
            out.append(IPv4Address(n))
    return sorted(out)


def stamp_token(paths: Paths) -> tuple[int, int] | None:
    """Changes whenever a transaction commits; cheap enough for every request."""
    try:
        st = os.stat(paths.stamp)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_mtime_ns)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        return {}
    if not isinstance(data, dict):
        raise StoreError(f"{path} does not hold a JSON object")
    return data


def read_passwords(paths: Paths) -> dict[str, dict[str, Any]]:
    """``{ip: {"password": str, "gen": int, "served": bool}}``. Never log the result."""
    return _read_json(paths.passwords)


def read_networks(paths: Paths, *, removals: bool = False) -> list[GuestNetwork]:
    """The guest networks pushed and active; with ``removals`` also the pushed
    removals (``add`` false), which take away a network the config file names."""
    out = []
    for dev, rec in sorted(_read_json(paths.networks).items()):
        removed = bool(rec.get("removed"))
        if removed and not removals:
            continue
        out.append(
            GuestNetwork(
                dev,
                IPv4Address(rec["router_guest_ip"]),
                IPv4Network(rec["cidr"]),
                not removed,
                rec.get("mac_address"),
                IPv4Address(rec["router_guest_gateway"])
                if rec.get("router_guest_gateway")
                else None,
                _opt(IPv6Address, rec.get("router_guest_ip6")),
                _opt(IPv6Network, rec.get("cidr6")),
                _opt(IPv6Address, rec.get("router_guest_ip6_gateway")),
                tuple(IPv4Address(d) for d in rec.get("dns", ())),
                rec.get("domain_name"),
            )
        )
    return out


def _opt(kind: Callable[[str], _T], text: str | None) -> _T | None:
    return kind(text) if text else None


def _ipv6_fields(n: GuestNetwork) -> dict[str, object]:
    """A network's optional fields, stored only when set (older records stay equal)."""
    out: dict[str, object] = {}
    if n.router_guest_ip6 is not None and n.cidr6 is not None:
        out["router_guest_ip6"] = str(n.router_guest_ip6)
        out["cidr6"] = str(n.cidr6)
        if n.router_guest_ip6_gateway is not None:
            out["router_guest_ip6_gateway"] = str(n.router_guest_ip6_gateway)
    if n.dns:
        out["dns"] = [str(d) for d in n.dns]
    if n.domain_name:
        out["domain_name"] = n.domain_name
    return out


def _dhcp_ipv6_fields(e: DhcpEntry) -> dict[str, object]:
    out: dict[str, object] = {}
    if e.ipv6_address is not None:
        out["ipv6_address"] = str(e.ipv6_address)
    if e.ipv6_duid is not None:
        out["ipv6_duid"] = e.ipv6_duid
    if e.lease_time is not None:
        out["lease_time"] = e.lease_time
    return out


def _dhcp_entry(ip: str, rec: dict[str, Any]) -> DhcpEntry:
    return DhcpEntry(
        rec["mac_address"],
        IPv4Address(ip),
        rec["host_name"],
        False,
        rec["default"],
        _opt(IPv6Address, rec.get("ipv6_address")),
        rec.get("ipv6_duid"),
        rec.get("lease_time"),
    )


def read_dhcp(paths: Paths) -> list[DhcpEntry]:
    return [
        _dhcp_entry(ip, rec)
        for ip, rec in sorted(_read_json(paths.dhcp).items(), key=lambda kv: IPv4Address(kv[0]))
    ]


def recover(paths: Paths, timeout: float = 120.0, poll: float = 0.005) -> bool:
    """Finish a commit a ``kill -9`` interrupted, before this process reads the store.

    A batch's renames are one decision across VMs (see :mod:`vr.atomic`): until its
    journal is rolled forward, readers see some VMs new and others old. Costs one
    ``stat`` when there is nothing to do. While a journal exists and the store lock
    is busy, its holder is finishing that journal (:meth:`Store.locked` does so
    first) or committing its own, both only renames: this waits for the journal to
    go, not for the lock, so a long batch still staging does not delay a start-up.
    Never raises: a store it cannot repair (lock file not writable, ``timeout``
    passed) is left for the next writer, with a warning. Returns whether an
    interrupted commit was finished here.
    """
    deadline = time.monotonic() + timeout
    while paths.journal.exists():
        try:
            with Store(paths, lock_timeout=0).locked():
                return True
        except LockTimeout:
            if time.monotonic() > deadline:
                LOG.warning(
                    "%s still there after %ss; left for the next writer", paths.journal, timeout
                )
                return False
            time.sleep(poll)
        except (OSError, StoreError) as exc:
            LOG.warning("cannot finish the interrupted commit of %s: %s", paths.journal, exc)
            return False
    return False


# --- writing -------------------------------------------------------------------------


@dataclass
class ApplyResult:
    vms: list[VmChange] = field(default_factory=list)
    passwords: list[IPv4Address] = field(default_factory=list)
    networks_changed: bool = False
    dhcp_changed: bool = False
    dhcp_ops: list[tuple[bool, DhcpEntry]] = field(default_factory=list)
    """The DHCP entries this push added (True) or took away (False), in order: what
    the hooks need to change one binding without reading every entry."""

    def describe(self) -> list[str]:
        lines = []
        for c in self.vms:
            lines.append(
                f"VM {c.ip}: changed {','.join(c.changed) or '-'}"
                f" deleted {','.join(c.deleted) or '-'}"
            )
        lines.extend(f"VM {ip}: password saved" for ip in self.passwords)
        if self.networks_changed:
            lines.append("guest networks changed")
        if self.dhcp_changed:
            lines.append("dhcp entries changed")
        return lines


def password_stamp() -> int:
    """When a password was stored, in ms of wall-clock time: orders the passwords of
    one VM across a router pair (both routers receive every push)."""
    return time.time_ns() // 1_000_000


WRITING_MARKER = "store.writing"
"""In ``state``: present while a writer holds the store lock (left if it was killed)."""
FEW_VMS = 16
"""Up to this many VMs, a push fsyncs each file and finds old generations by their
links; above, it is group-committed and lists ``.vms`` once."""
NO_PREV = "none"


def _read_int(path: Path) -> int:
    """The number in a counter file; 0 if missing or not a number."""
    try:
        return int(path.read_text().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _dumps(obj: object) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


class Store:
    """Apply payloads to the files guests read. Safe across processes and threads."""

    def __init__(self, paths: Paths, lock_timeout: float = 120.0) -> None:
        self.paths = paths
        self.lock_timeout = lock_timeout

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the store's exclusive lock; repairs after killed writers first.

        Not re-entrant: inside, call :meth:`apply_locked`, never :meth:`apply`.
        """
        self.paths.ensure()
        with locking.exclusive(self.paths.lock, self.lock_timeout, "store lock"):
            if self.paths.journal.exists():
                # A killed commit may hold a passwords file; the password server writes
                # that file under the passwords lock alone, so finish under it too.
                with self.passwords_locked():
                    atomic.roll_forward(self.paths.journal)
            # Listing the VM folders costs O(VMs): only when a writer may have left
            # temporaries, that is when it died holding the lock (or raised): its
            # marker is still there. Made durable before any temporary is written,
            # so that a power cut cannot keep temporaries and lose the marker.
            writing = self.paths.state / WRITING_MARKER
            if writing.exists():
                self._sweep_temps()
            else:
                try:
                    writing.touch(mode=0o600)
                    atomic.fsync_dir(self.paths.state)
                except OSError as exc:
                    raise atomic.space_error(exc, writing) from exc
            yield
            # Not on an exception: whatever it left is swept by the next writer.
            writing.unlink()

    def _sweep_temps(self) -> None:
        """Remove temporary names of killed writers: only names this store writes.

        Other services write their own files in ``state`` (without this lock), so
        there only temporaries of the store's files are touched.
        """
        p = self.paths
        owned_in_state = tuple(
            f"{atomic.TMP_PREFIX}{f.name}." for f in (p.networks, p.dhcp, p.journal)
        )
        anything = (atomic.TMP_PREFIX,)
        # Archives, the last-push record and the password server's writes happen
        # without this lock:
        # only old temporaries of those.
        for d, prefixes, min_age in (
            (p.generations, anything, 0.0),
            (p.metadata_root, anything, 0.0),
            (p.userdata_root, anything, 0.0),
            (p.latest, (f"{atomic.TMP_PREFIX}{p.stamp.name}.",), 0.0),
            (p.state, owned_in_state, 0.0),
            (p.state, (f"{atomic.TMP_PREFIX}{p.last_push.name}.",), STALE_ARCHIVE_TEMP),
            # The password server writes passwords.json under the passwords lock only.
            (p.state, (f"{atomic.TMP_PREFIX}{p.passwords.name}.",), STALE_ARCHIVE_TEMP),
            (p.state, (f"{atomic.TMP_PREFIX}{p.password_gen.name}.",), STALE_ARCHIVE_TEMP),
            (p.processed, anything, STALE_ARCHIVE_TEMP),
            (p.failed, anything, STALE_ARCHIVE_TEMP),
        ):
            try:
                names = os.listdir(d)
            except FileNotFoundError:
                continue
            for n in names:
                if n.startswith(prefixes) and _older_than(d / n, min_age):
                    LOG.info("removing leftover %s of an interrupted apply", d / n)
                    atomic.remove_tree(d / n)

    def _stamp_time(self) -> int:
        """A modification time later than the current stamp's, even within one clock tick.

        Readers compare (inode, mtime): file systems reuse freed inodes and kernel
        file times are coarse, so only a strictly increasing mtime makes two
        commits always look different.
        """
        now = time.time_ns()
        try:
            return max(now, os.stat(self.paths.stamp).st_mtime_ns + 1)
        except FileNotFoundError:
            return now

    def _next_gen(self) -> int:
        return _read_int(self.paths.stamp) + 1

    def apply(self, payloads: Sequence[Payload]) -> ApplyResult:
        """Apply all ``payloads`` as one unit under the lock."""
        with self.locked():
            return self.apply_locked(payloads)

    def apply_locked(self, payloads: Sequence[Payload]) -> ApplyResult:
        """Apply with the lock already held (see :meth:`locked`)."""
        result = ApplyResult()
        # Above the stamp and above every pushed VM's current generation, so a stamp
        # left behind by an interrupted commit can never make a generation name clash.
        gen = max(
            [self._next_gen()]
            + [
                (current_gen(self.paths, p.ip) or 0) + 1
                for p in payloads
                if isinstance(p, VmMetadata)
            ]
        )
        vms: dict[IPv4Address, VmRecord] = {}
        superseded: list[tuple[IPv4Address, int]] = []
        replaced: dict[IPv4Address, int | None] = {}
        prior: dict[IPv4Address, int | None] = {}
        new_passwords: dict[str, str] = {}
        networks = _read_json(self.paths.networks)
        dhcp = _read_json(self.paths.dhcp)
        for p in payloads:
            if isinstance(p, VmMetadata):
                old = vms.get(p.ip) or read_vm(self.paths, p.ip)
                metadata, userdata, change = merge_vm(old, p)
                vms[p.ip] = VmRecord(p.ip, gen, metadata, userdata)
                if p.ip not in replaced:
                    replaced[p.ip] = old.gen if old is not None else None
                    if old is None:
                        prior[p.ip] = None
                    else:
                        known, prev_gen = _read_prev(self.paths, p.ip, old.gen)
                        if known:
                            prior[p.ip] = prev_gen
                if old is not None and old.gen != gen:
                    superseded.append((p.ip, old.gen))
                result.vms.append(change)
            elif isinstance(p, VmPassword):
                new_passwords[str(p.ip)] = p.password
                result.passwords.append(p.ip)
            elif isinstance(p, GuestNetwork):
                before = dict(networks)
                if p.add:
                    networks[p.device] = {
                        "router_guest_ip": str(p.router_guest_ip),
                        "cidr": str(p.cidr),
                        "mac_address": p.mac_address,
                        "router_guest_gateway": str(p.router_guest_gateway)
                        if p.router_guest_gateway
                        else None,
                        **_ipv6_fields(p),
                    }
                else:
                    # Kept as a removal, not forgotten: a network from the config
                    # file stays removed until a push adds it again.
                    networks[p.device] = {
                        "router_guest_ip": str(p.router_guest_ip),
                        "cidr": str(p.cidr),
                        "removed": True,
                    }
                result.networks_changed |= before != networks
            elif isinstance(p, DhcpEntry):
                key = str(p.ipv4_address)
                if p.remove:
                    gone = dhcp.pop(key, None)
                    if gone is not None:
                        result.dhcp_ops.append((False, _dhcp_entry(key, gone)))
                else:
                    entry = {
                        "mac_address": p.mac_address,
                        "host_name": p.host_name,
                        "default": p.default_entry,
                        **_dhcp_ipv6_fields(p),
                    }
                    if dhcp.get(key) != entry:
                        # One entry per NIC: a MAC that moved to another address leaves
                        # no stale host behind (dnsmasq would see the MAC twice).
                        stale = [k for k, r in dhcp.items() if r["mac_address"] == p.mac_address]
                        for other in sorted({*stale, key} & dhcp.keys()):
                            result.dhcp_ops.append((False, _dhcp_entry(other, dhcp.pop(other))))
                        dhcp[key] = entry
                        result.dhcp_ops.append((True, _dhcp_entry(key, entry)))
                result.dhcp_changed |= bool(result.dhcp_ops)
        # A batch is group-committed: one file system flush instead of ~9 fsyncs per VM.
        with atomic.Transaction(self.paths.journal, group=len(vms) > FEW_VMS) as tx:
            for rec in vms.values():
                old_gen = replaced[rec.ip]
                prev = gen_dir(self.paths, rec.ip, old_gen).name if old_gen is not None else NO_PREV
                self._stage_vm(tx, rec, prev)
            if result.networks_changed:
                tx.stage_file(self.paths.networks, _dumps(networks), 0o600)
            if result.dhcp_changed:
                tx.stage_file(self.paths.dhcp, _dumps(dhcp), 0o600)
            # The passwords lock is held only from reading the file to the renames, so
            # the password server's fetches and acks never wait for the VM trees above.
            with self.passwords_locked() if new_passwords else contextlib.nullcontext():
                if new_passwords:
                    passwords = read_passwords(self.paths)
                    pw_gen = self._claim_password_gen(passwords, at_least=gen)
                    stamp = password_stamp()
                    for ip, password in new_passwords.items():
                        passwords[ip] = {
                            "password": password,
                            "gen": pw_gen,
                            "served": False,
                            "stamp": stamp,
                        }
                    tx.stage_file(self.paths.passwords, _dumps(passwords), 0o600)
                tx.stage_file(self.paths.stamp, f"{gen}\n".encode(), mtime_ns=self._stamp_time())
                tx.commit()
        self._drop_old_generations(superseded, gen, prior)
        return result

    def _stage_vm(self, tx: atomic.Transaction, rec: VmRecord, prev: str) -> None:
        """Stage the VM's new generation, its pointer and (first time) its two links."""
        p = self.paths
        gen_name = gen_dir(p, rec.ip, rec.gen).name
        if (p.generations / gen_name).exists():
            # Left by a commit that never switched the pointer to it (see apply_locked).
            atomic.discard_tree(p.generations / gen_name)
        tx.stage_tree(
            p.generations / gen_name,
            {"metadata": {**rec.metadata, INDEX_NAME: rec.index}, "userdata": rec.userdata},
            {PREV_LINK: prev},
        )
        tx.stage_symlink(p.vm_pointer(rec.ip), gen_name)
        for link, sub in (
            (p.metadata_dir(rec.ip), "metadata"),
            (p.userdata_dir(rec.ip), "userdata"),
        ):
            target = os.path.relpath(p.vm_pointer(rec.ip) / sub, link.parent)
            if link.is_symlink() and os.readlink(link) == target:
                continue
            if link.exists() and not link.is_symlink():
                raise StoreError(f"VM {rec.ip}: {link} is not a link made by vr; not replacing it")
            tx.stage_symlink(link, target)

    def _drop_old_generations(
        self,
        superseded: list[tuple[IPv4Address, int]],
        keep: int,
        prior: dict[IPv4Address, int | None],
    ) -> None:
        """Remove generations older than the one just replaced (readers may still hold it).

        A few VMs: the generation each replaced one had replaced is in ``prior`` (read
        from its :data:`PREV_LINK`), so nothing is listed. A batch, or a VM whose
        predecessor is unknown (a store from before the links): ``.vms`` is listed
        once, which also removes what an interrupted drop left.
        """
        if not superseded:
            return
        if len(superseded) <= FEW_VMS and all(ip in prior for ip, _ in superseded):
            for ip, old_gen in superseded:
                g = prior[ip]
                if g is not None and g not in (keep, old_gen):
                    d = gen_dir(self.paths, ip, g)
                    if d.exists():
                        atomic.discard_tree(d)
            return
        kept = {f"{ip}": old_gen for ip, old_gen in superseded}
        for n in os.listdir(self.paths.generations):
            ip_text, sep, _ = n.rpartition("@")
            if not sep or ip_text not in kept:
                continue
            g = _gen_of(n)
            if g is not None and g not in (keep, kept[ip_text]):
                atomic.discard_tree(self.paths.generations / n)

    # --- password life cycle (used by the password server) ------------------------

    @contextlib.contextmanager
    def passwords_locked(self) -> Iterator[None]:
        """Hold the passwords file's own lock (taken after the store lock, never before).

        Fetches, acks and saves take only this lock: a batch holding the store lock,
        or a firewall apply behind it, does not stall the password server's event loop.
        """
        self.paths.state.mkdir(parents=True, exist_ok=True, mode=0o700)
        with locking.exclusive(self.paths.passwords_lock, self.lock_timeout, "passwords lock"):
            self._finish_passwords_commit()
            yield

    def _finish_passwords_commit(self) -> None:
        """Make visible the passwords file of a commit killed before renaming it.

        An apply commits under the passwords lock, so with the lock held a journal
        naming the passwords file belongs to a dead writer. Its rename is decided (see
        :mod:`vr.atomic`); done later by :func:`vr.atomic.roll_forward` it would replace
        whatever fetches, acks and saves wrote meanwhile, so it is done first, here.
        """
        try:
            pairs = json.loads(self.paths.journal.read_bytes())
            pending = [tmp for tmp, final in pairs if final == str(self.paths.passwords)]
        except FileNotFoundError:
            return
        except (ValueError, TypeError):
            return  # unreadable: roll_forward drops it under the store lock
        for tmp in pending:
            if os.path.lexists(tmp):
                os.replace(tmp, self.paths.passwords)
                atomic.fsync_dir(self.paths.state)
                LOG.warning(
                    "finished the rename of %s of an interrupted commit (journal %s)",
                    self.paths.passwords,
                    self.paths.journal,
                )

    def _claim_password_gen(self, passwords: dict[str, dict[str, Any]], at_least: int = 0) -> int:
        """A generation above every one handed out before, recorded before it is used.

        Call with the passwords lock held. A fetch that read an older generation
        (even of a password acknowledged and removed since) can then never mark the
        new one served. The store's stamp counts too: before ``Paths.password_gen``
        existed, passwords took the store's generation.
        """
        highest = max(
            [at_least - 1, self._next_gen() - 1, _read_int(self.paths.password_gen)]
            + [int(rec["gen"]) for rec in passwords.values()]
        )
        gen = highest + 1
        # a number claimed and then not used (a failed commit) is only a gap
        atomic.atomic_write(self.paths.password_gen, f"{gen}\n".encode(), 0o600)
        return gen

    def save_password(self, ip: IPv4Address, password: str) -> int:
        """Store a new, unserved password for ``ip``; returns its generation.

        Takes the passwords lock alone, never the store lock, so the password server
        can save while a batch or a firewall apply holds the store. Like a pushed
        password, it replaces the stored one, and an ack of an older one keeps it.
        """
        with self.passwords_locked():
            pw = read_passwords(self.paths)
            gen = self._claim_password_gen(pw)
            pw[str(ip)] = {
                "password": password,
                "gen": gen,
                "served": False,
                "stamp": password_stamp(),
            }
            self._write_passwords(pw)
            return gen

    def mark_password_served(self, ip: IPv4Address, gen: int) -> None:
        """Record that generation ``gen`` of ``ip``'s password reached the guest."""
        with self.passwords_locked():
            pw = read_passwords(self.paths)
            rec = pw.get(str(ip))
            if rec is None or rec["gen"] != gen or rec["served"]:
                return
            rec["served"] = True
            self._write_passwords(pw)

    def ack_password(self, ip: IPv4Address) -> bool:
        """The guest saved its password: clear it if the one stored was served.

        A password pushed after the guest's last fetch survives the ack of the old one.
        Returns whether an entry was removed.
        """
        with self.passwords_locked():
            pw = read_passwords(self.paths)
            rec = pw.get(str(ip))
            if rec is None or not rec["served"]:
                return False
            self._record_ack(str(ip), rec)
            del pw[str(ip)]
            self._write_passwords(pw)
            return True

    def _record_ack(self, ip: str, rec: dict[str, Any]) -> None:
        """On a router of a pair, note the ack in the pair's ledger before the password
        goes: the peer must learn it even if the password is pushed again or the sync
        was not looking (:mod:`vr.pair.ledger`). Written first, so a kill between the
        two writes leaves the ack recorded and the next sync removes the password."""
        if not self.paths.pair_state.exists():
            return
        from vr.pair import ledger

        led = ledger.decode(self.paths.pair_state.read_bytes(), str(self.paths.pair_state), False)
        led[ip] = ledger.Entry(
            ledger.digest(ip, str(rec["password"])),
            int(rec.get("stamp", 0)),
            served=True,
            acked=True,
        )
        atomic.atomic_write(self.paths.pair_state, ledger.encode(led, False), 0o600)

    def update_passwords(
        self,
        change: Callable[[dict[str, dict[str, Any]], Callable[[], int]], bool],
        then: Callable[[], None] = lambda: None,
    ) -> None:
        """Run ``change(passwords, claim_gen)`` under the passwords lock, write the
        file if it returned True, then call ``then()`` still under the lock.

        For the router pair's sync (:mod:`vr.pair.sync`), which merges a peer's state
        into this file: ``claim_gen()`` hands out a new generation as a save does.
        """
        with self.passwords_locked():
            pw = read_passwords(self.paths)
            if change(pw, lambda: self._claim_password_gen(pw)):
                self._write_passwords(pw)
            then()

    def _write_passwords(self, pw: dict[str, dict[str, Any]]) -> None:
        with atomic.Transaction() as tx:
            tx.stage_file(self.paths.passwords, _dumps(pw), 0o600)
            tx.commit()
