"""CloudStack's entry points: ``update_config.py <file> [false]`` and ``vr_cfg.sh -c <cfg>``.

Shared by the command line, ``scripts/update_config.py`` and the SSH push agent,
which runs them in-process with the channel's streams. Exit status is the contract
with the management server: 0 applied (or already applied), 1 anything else.

Output: exactly one line on ``err`` per run: what was applied (VM, keys changed,
duration) or why nothing was; the same line goes to the log. Nothing on ``out``
except "already applied" for a retry. A password never appears in either.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import json
import logging
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vr import atomic, cloudstack, config
from vr.config import Config
from vr.errors import ConfigError, PayloadError, VRError
from vr.logs import AUDIT
from vr.paths import Paths
from vr.payloads import DEFAULT_LIMITS, Payload, PayloadLimits, parse_payload
from vr.store import ApplyResult, Store

LOG = logging.getLogger(__name__)

OK = 0
FAILED = 1

Archive = tuple[str, Path | None, bytes, bool]
"""(name, source file to remove or None, bytes to archive, archive or just delete)."""

Parsed = tuple[list[Payload], list[Archive]]
"""The payloads of one push and what to archive once they are applied."""


class PushHooks(Protocol):
    """What runs around the store commit of a push (the firewall).

    Both are called with the store lock held and the appliance config the push read
    once, so a push takes one lock and reads ``vr.json`` once, whatever it changes.
    """

    def before_commit(self, cfg: Config, payloads: Sequence[Payload]) -> None:
        """Raise :class:`PayloadError` to reject the push (quarantined, nothing stored)."""

    def after_commit(self, cfg: Config, result: ApplyResult) -> None:
        """Called after the commit (re-apply the firewall when networks changed); an
        exception fails the push, the data stays stored and a retry re-runs it."""


class TextOut(Protocol):
    """Where a push's lines go: ``sys.stdout``/``sys.stderr``, or an SSH channel."""

    def write(self, s: str, /) -> int: ...


class Pusher(Protocol):
    """What the SSH agent runs for ``update_config.py`` and ``vr_cfg.sh``: an
    :class:`Applier`, or a test's stand-in."""

    def update_config(self, args: list[str], out: TextOut, err: TextOut) -> int: ...

    def apply_cfg(self, args: list[str], out: TextOut, err: TextOut) -> int: ...


@dataclass(frozen=True)
class _Push:
    """One run of ``update_config.py`` or ``vr_cfg.sh``: what differs between them."""

    name: str
    bound: Callable[[PayloadLimits], int]
    parse: Callable[[bytes, PayloadLimits], Parsed]
    rejected: str
    """How a refusal starts: ``rejected`` or ``rejected, nothing applied``."""


@dataclass
class Applier:
    """``keep_processed`` / ``keep_failed``: how many archived / rejected files to keep.

    ``limits``: fixed payload bounds (tests); None derives them from the config's
    ``userdata_max_bytes``. A config that cannot be read makes every push fail with
    its reason (exit 1, file kept for a retry) instead of running with guessed limits.
    """

    paths: Paths
    hooks: PushHooks | None = None
    limits: PayloadLimits | None = None
    keep_processed: int = 500
    keep_failed: int = 100
    load_config: Callable[[Paths], Config] = config.load

    @property
    def store(self) -> Store:
        return Store(self.paths)

    # --- update_config.py ---------------------------------------------------------

    def update_config(self, args: list[str], out: TextOut, err: TextOut) -> int:
        """Apply one pushed file from the cache folder; see the module docstring."""
        start = time.monotonic()
        try:
            name, archive = cloudstack.parse_update_config_args(args)
        except PayloadError as exc:
            return self._fail(err, f"usage: update_config.py <file> [false]: {exc}")
        src = self.paths.cache / name

        def parse(data: bytes, limits: PayloadLimits) -> Parsed:
            return [parse_payload(name, data, limits)], [(name, src, data, archive)]

        push = _Push(name, lambda lim: lim.payload_bytes, parse, "rejected")
        return self._run(push, "update_config.py", start, out, err)

    # --- vr_cfg.sh -c ---------------------------------------------------------------

    def apply_cfg(self, args: list[str], out: TextOut, err: TextOut) -> int:
        """Apply a ``VR-<uuid>.cfg`` batch as one unit: all items or none."""
        start = time.monotonic()
        try:
            name = cloudstack.parse_vr_cfg_args(args)
        except PayloadError as exc:
            return self._fail(err, f"usage: vr_cfg.sh -c <cfg file>: {exc}")
        src = self.paths.cache / name

        def parse(data: bytes, limits: PayloadLimits) -> Parsed:
            payloads, items = _parse_batch(name, data, limits)
            archives: list[Archive] = [(i.name, None, i.data, i.archive) for i in items]
            return payloads, [*archives, (name, src, data, True)]

        push = _Push(name, lambda lim: lim.cfg_bytes, parse, "rejected, nothing applied")
        return self._run(push, "vr_cfg.sh", start, out, err)

    # --- shared ---------------------------------------------------------------------

    def _run(self, push: _Push, program: str, start: float, out: TextOut, err: TextOut) -> int:
        """The one path of every push: under one store lock, with one config read."""
        try:
            with self.store.locked():
                return self._run_locked(push, program, start, out, err)
        except VRError as exc:
            # The lock was not had (timeout): not the payload's fault, kept for a retry.
            return self._fail(err, f"{push.name}: not applied: {exc}", record=push.name)

    def _run_locked(
        self, push: _Push, program: str, start: float, out: TextOut, err: TextOut
    ) -> int:
        name = push.name
        src = self.paths.cache / name
        try:
            cfg = self.load_config(self.paths)
        except ConfigError as exc:
            return self._fail(err, f"{program}: not applied: {exc}")
        limits = self.limits or DEFAULT_LIMITS.with_userdata(cfg.userdata_max_bytes)
        try:
            data = _read_bounded(src, push.bound(limits))
        except FileNotFoundError:
            return self._missing(name, out, err)
        except PayloadError as exc:
            return self._reject([src], err, f"{name}: {push.rejected}: {exc}")
        except OSError as exc:
            return self._fail(err, f"{name}: cannot read {src}: {exc.strerror}")
        try:
            payloads, archives = push.parse(data, limits)
        except PayloadError as exc:
            return self._reject([src], err, f"{name}: {push.rejected}: {exc}")
        sources = [a[1] for a in archives if a[1] is not None]
        try:
            if self.hooks is not None:
                self.hooks.before_commit(cfg, payloads)
        except PayloadError as exc:
            return self._reject(sources, err, f"{name}: rejected, nothing applied: {exc}")
        except VRError as exc:
            return self._fail(err, f"{name}: not applied: {exc}", record=name)
        except Exception:
            LOG.exception("%s: unexpected error while validating", name)
            return self._fail(err, f"{name}: internal error, see /var/log/cloud.log", record=name)
        try:
            result = self.store.apply_locked(payloads)
        except VRError as exc:
            # Not the payload's fault (disk full): the file stays for a retry.
            return self._fail(err, f"{name}: not applied: {exc}", record=name)
        except Exception:
            LOG.exception("%s: unexpected error while applying", name)
            return self._fail(err, f"{name}: internal error, see cloud.log", record=name)
        try:
            if self.hooks is not None:
                self.hooks.after_commit(cfg, result)
        except Exception as exc:
            # The data is stored; a retry of the same file re-runs the hook.
            reason = str(exc)
            if not isinstance(exc, VRError):
                LOG.exception("%s: unexpected error after the store commit", name)
                reason = "internal error, see cloud.log"
            return self._fail(
                err, f"{name}: stored, but follow-up failed (retry is safe): {reason}", record=name
            )
        for item_name, item_src, item_data, archive in archives:
            self._archive(item_name, item_src, item_data, archive)
        _prune(self.paths.processed, self.keep_processed, {f"{a[0]}.gz" for a in archives})
        ms = (time.monotonic() - start) * 1000
        summary = summarize(result.describe())
        line = f"{name}: applied: {summary} ({ms:.1f} ms)"
        LOG.info("%s", line, extra=AUDIT)
        print(line, file=err)
        self._record(name, True, summary)
        return OK

    def _missing(self, name: str, out: TextOut, err: TextOut) -> int:
        """A retry of a file already archived is a success (CloudStack's contract)."""
        if (self.paths.processed / f"{name}.gz").exists():
            LOG.info("%s: already applied", name, extra=AUDIT)
            print(f"{name}: already applied", file=out)
            return OK
        return self._fail(err, f"{name}: no such file in {self.paths.cache}")

    def _archive(self, name: str, src: Path | None, data: bytes, archive: bool) -> None:
        try:
            if archive:
                # 0600: a vm_password push is archived too
                atomic.atomic_write(
                    self.paths.processed / f"{name}.gz", gzip.compress(data, mtime=0), 0o600
                )
            if src is not None:
                src.unlink(missing_ok=True)
        except (OSError, VRError) as exc:
            LOG.warning("%s: applied but not archived: %s", name, exc)

    def _reject(self, sources: Sequence[Path], err: TextOut, message: str) -> int:
        """Invalid input: keep it in failed/ for inspection, out of the way of retries."""
        for src in sources:
            self._quarantine(src)
        return self._fail(err, message, record=sources[0].name if sources else None)

    def _quarantine(self, src: Path) -> None:
        try:
            self.paths.failed.mkdir(parents=True, exist_ok=True, mode=0o700)
            dest = self.paths.failed / src.name
            os.replace(src, dest)  # moves a symbolic link itself, not its target
            _chmod_if_regular(dest, 0o600)
            _prune(self.paths.failed, self.keep_failed, {src.name})
        except OSError as exc:
            LOG.warning("%s: could not move to failed/: %s", src.name, exc)

    def _fail(self, err: TextOut, message: str, record: str | None = None) -> int:
        LOG.error("%s", message, extra=AUDIT)
        print(message, file=err)
        if record is not None:
            self._record(record, False, message)
        return FAILED

    def _record(self, name: str, ok: bool, summary: str) -> None:
        entry = {"file": name, "ok": ok, "summary": summary[:500], "time": time.time()}
        try:
            self.paths.state.mkdir(parents=True, exist_ok=True, mode=0o700)
            atomic.atomic_write(self.paths.last_push, (json.dumps(entry) + "\n").encode(), 0o600)
        except (OSError, VRError) as exc:
            LOG.warning("cannot record last push: %s", exc)


def make_applier(paths: Paths) -> Applier:
    """The Applier with the appliance's hooks wired in: the firewall validates guest
    networks before the store commits (unknown or control/public device -> rejected,
    nothing stored) and re-applies the rules after a commit that changed guest
    networks or DHCP entries (python-iptables is imported only then)."""
    from vr.dhcp.state import DhcpHooks
    from vr.firewall.state import FirewallHooks

    return Applier(paths, hooks=ComposedHooks((FirewallHooks(paths), DhcpHooks(paths))))


@dataclass(frozen=True)
class ComposedHooks:
    """Several :class:`PushHooks` in order: every ``before_commit`` may reject the
    push; every ``after_commit`` runs even when an earlier one failed (the first
    error then fails the push)."""

    hooks: tuple[PushHooks, ...]

    def before_commit(self, cfg: Config, payloads: Sequence[Payload]) -> None:
        for h in self.hooks:
            h.before_commit(cfg, payloads)

    def after_commit(self, cfg: Config, result: ApplyResult) -> None:
        first: Exception | None = None
        for h in self.hooks:
            try:
                h.after_commit(cfg, result)
            except Exception as exc:
                LOG.error("push follow-up %s failed: %s", type(h).__name__, exc)
                first = first or exc
        if first is not None:
            raise first


def _parse_batch(
    name: str, data: bytes, limits: PayloadLimits
) -> tuple[list[Payload], list[cloudstack.BatchItem]]:
    """Parse the cfg and every item in it; the error names the failing item."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadError(
            "encoding", f"<byte {exc.start}>", "UTF-8 text", subject=f"file {name}"
        ) from None
    batch = cloudstack.parse_cfg(text)
    payloads = []
    for n, item in enumerate(batch.items, 1):
        try:
            payloads.append(parse_payload(item.name, item.data, limits))
        except PayloadError as exc:
            raise PayloadError(
                f"item {n} ({item.name}): {exc.field}",
                exc.value,
                exc.expected,
                exc.vm,
                subject=exc.subject,
            ) from None
    return payloads, list(batch.items)


SUMMARY_ITEMS = 10


def summarize(changes: Sequence[str], limit: int = SUMMARY_ITEMS) -> str:
    """One bounded line for the changes of an apply: a 5,000-VM batch names the first
    ``limit`` and counts the rest, so the log line and the management server's
    stderr stay short."""
    if not changes:
        return "no change"
    if len(changes) <= limit:
        return "; ".join(changes)
    shown = "; ".join(changes[:limit])
    return f"{len(changes)} changes: {shown}; … and {len(changes) - limit} more"


def _read_bounded(path: Path, limit: int) -> bytes:
    """Read ``path`` unless it is larger than ``limit`` (PayloadError naming its size).

    Only a regular file is read: a symbolic link (never followed), a FIFO (opened
    without blocking), a directory or a device is a :class:`PayloadError`.
    """
    where = f"file {path.name}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PayloadError(
                "type", "<symbolic link>", "a regular file pushed into the cache", subject=where
            ) from None
        raise
    try:
        st = os.fstat(fd)
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise PayloadError(
            "type", f"<{_kind(st.st_mode)}>", "a regular file pushed into the cache", subject=where
        )
    with os.fdopen(fd, "rb") as f:
        if st.st_size > limit:
            raise PayloadError(
                "size", f"<{st.st_size} bytes>", f"at most {limit} bytes", subject=where
            )
        return f.read(limit + 1)


def _kind(mode: int) -> str:
    for test, name in (
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
    ):
        if test(mode):
            return name
    return "special file"


def _chmod_if_regular(path: Path, mode: int) -> None:
    """chmod ``path`` itself, never what a symbolic link there points to."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return
        raise
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _prune(folder: Path, keep: int, protect: set[str]) -> None:
    """Keep the ``keep`` newest files of ``folder`` (and ``protect``) so it stays bounded."""
    try:
        entries = [
            e for e in os.scandir(folder) if not e.name.startswith(".") and e.name not in protect
        ]
        keep = max(0, keep - len(protect))
        if len(entries) <= keep:
            return
        entries.sort(key=lambda e: e.stat(follow_symlinks=False).st_mtime_ns, reverse=True)
    except OSError as exc:
        LOG.warning("cannot prune %s: %s", folder, exc)
        return
    for e in entries[keep:]:
        with contextlib.suppress(OSError):
            os.unlink(e.path)
    LOG.info("pruned %d old files from %s", len(entries) - keep, folder)
