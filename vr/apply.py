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
import gzip
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from vr import atomic
from vr.errors import PayloadError, VRError
from vr.logs import AUDIT
from vr.paths import Paths
from vr.payloads import (
    DEFAULT_LIMITS,
    BatchItem,
    Limits,
    Payload,
    check_name,
    parse_cfg,
    parse_payload,
    parse_update_config_args,
)
from vr.store import ApplyResult, Store

LOG = logging.getLogger(__name__)

AfterCommit = Callable[[ApplyResult], None]
"""Called after a commit (e.g. re-apply the firewall when networks changed)."""

BeforeCommit = Callable[[Sequence[Payload]], None]
"""Called with the parsed payloads before the store commits; raising
:class:`PayloadError` rejects the push (quarantined, nothing stored)."""

OK = 0
FAILED = 1
CACHE_PREFIX = "/var/cache/cloud/"

Archive = tuple[str, Path | None, bytes, bool]
"""(name, source file to remove or None, bytes to archive, archive or just delete)."""


@dataclass
class Applier:
    """``keep_processed`` / ``keep_failed``: how many archived / rejected files to keep."""

    paths: Paths
    limits: Limits = DEFAULT_LIMITS
    after_commit: AfterCommit | None = None
    keep_processed: int = 500
    keep_failed: int = 100
    before_commit: BeforeCommit | None = None
    config_error: str | None = None
    """Set when the appliance config could not be read: every push then fails with
    it (exit 1, file kept for a retry) instead of running with guessed limits."""

    @property
    def store(self) -> Store:
        return Store(self.paths)

    # --- update_config.py ---------------------------------------------------------

    def update_config(self, args: list[str], out: TextIO, err: TextIO) -> int:
        """Apply one pushed file from the cache folder; see the module docstring."""
        start = time.monotonic()
        if self.config_error is not None:
            return self._fail(err, f"update_config.py: not applied: {self.config_error}")
        try:
            name, archive = parse_update_config_args(args)
        except PayloadError as exc:
            return self._fail(err, f"usage: update_config.py <file> [false]: {exc}")
        src = self.paths.cache / name
        try:
            data = _read_bounded(src, self.limits.payload_bytes)
        except FileNotFoundError:
            return self._missing(name, out, err)
        except PayloadError as exc:
            return self._reject(src, err, f"{name}: rejected: {exc}")
        except OSError as exc:
            return self._fail(err, f"{name}: cannot read {src}: {exc.strerror}")
        try:
            payload = parse_payload(name, data, self.limits)
        except PayloadError as exc:
            return self._reject(src, err, f"{name}: rejected: {exc}")
        return self._apply(name, [payload], [(name, src, data, archive)], start, err)

    # --- vr_cfg.sh -c ---------------------------------------------------------------

    def apply_cfg(self, args: list[str], out: TextIO, err: TextIO) -> int:
        """Apply a ``VR-<uuid>.cfg`` batch as one unit: all items or none."""
        start = time.monotonic()
        if self.config_error is not None:
            return self._fail(err, f"vr_cfg.sh: not applied: {self.config_error}")
        if len(args) == 2 and args[0] == "-c":
            args = args[1:]
        if len(args) != 1:
            return self._fail(err, "usage: vr_cfg.sh -c <cfg file>")
        raw = args[0]
        if raw.startswith(CACHE_PREFIX):
            raw = raw[len(CACHE_PREFIX) :]
        try:
            name = check_name(raw, "cfg file")
        except PayloadError as exc:
            return self._fail(err, f"usage: vr_cfg.sh -c <cfg file>: {exc}")
        src = self.paths.cache / name
        try:
            data = _read_bounded(src, self.limits.cfg_bytes)
        except FileNotFoundError:
            return self._missing(name, out, err)
        except PayloadError as exc:
            return self._reject(src, err, f"{name}: rejected, nothing applied: {exc}")
        except OSError as exc:
            return self._fail(err, f"{name}: cannot read {src}: {exc.strerror}")
        try:
            payloads, items = self._parse_batch(name, data)
        except PayloadError as exc:
            return self._reject(src, err, f"{name}: rejected, nothing applied: {exc}")
        archives: list[Archive] = [(i.name, None, i.data, i.archive) for i in items]
        archives.append((name, src, data, True))
        return self._apply(name, payloads, archives, start, err)

    def _parse_batch(self, name: str, data: bytes) -> tuple[list[Payload], list[BatchItem]]:
        """Parse the cfg and every item in it; the error names the failing item."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadError(
                "encoding", f"<byte {exc.start}>", "UTF-8 text", subject=f"file {name}"
            ) from None
        batch = parse_cfg(text)
        payloads = []
        for n, item in enumerate(batch.items, 1):
            try:
                payloads.append(parse_payload(item.name, item.data, self.limits))
            except PayloadError as exc:
                raise PayloadError(
                    f"item {n} ({item.name}): {exc.field}",
                    exc.value,
                    exc.expected,
                    exc.vm,
                    subject=exc.subject,
                ) from None
        return payloads, list(batch.items)

    # --- shared ---------------------------------------------------------------------

    def _apply(
        self,
        name: str,
        payloads: list[Payload],
        archives: list[Archive],
        start: float,
        err: TextIO,
    ) -> int:
        if self.before_commit is not None:
            try:
                self.before_commit(payloads)
            except PayloadError as exc:
                for _, src, _, _ in archives:
                    if src is not None:
                        self._quarantine(src)
                return self._fail(err, f"{name}: rejected, nothing applied: {exc}", record=name)
            except VRError as exc:
                return self._fail(err, f"{name}: not applied: {exc}", record=name)
            except Exception:
                LOG.exception("%s: unexpected error while validating", name)
                return self._fail(
                    err, f"{name}: internal error, see /var/log/cloud.log", record=name
                )
        try:
            result = self.store.apply(payloads)
        except VRError as exc:
            # Not the payload's fault (disk full, lock): the file stays for a retry.
            return self._fail(err, f"{name}: not applied: {exc}", record=name)
        except Exception:
            LOG.exception("%s: unexpected error while applying", name)
            return self._fail(err, f"{name}: internal error, see cloud.log", record=name)
        if self.after_commit is not None:
            try:
                self.after_commit(result)
            except Exception as exc:
                # The data is stored; a retry of the same file re-runs the hook.
                reason = str(exc)
                if not isinstance(exc, VRError):
                    LOG.exception("%s: unexpected error after the store commit", name)
                    reason = "internal error, see cloud.log"
                return self._fail(
                    err,
                    f"{name}: stored, but follow-up failed (retry is safe): {reason}",
                    record=name,
                )
        for item_name, src, data, archive in archives:
            self._archive(item_name, src, data, archive)
        _prune(self.paths.processed, self.keep_processed, {f"{a[0]}.gz" for a in archives})
        ms = (time.monotonic() - start) * 1000
        summary = summarize(result.describe())
        line = f"{name}: applied: {summary} ({ms:.1f} ms)"
        LOG.info("%s", line, extra=AUDIT)
        print(line, file=err)
        self._record(name, True, summary)
        return OK

    def _missing(self, name: str, out: TextIO, err: TextIO) -> int:
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

    def _reject(self, src: Path, err: TextIO, message: str) -> int:
        """Invalid input: keep it in failed/ for inspection, out of the way of retries."""
        self._quarantine(src)
        return self._fail(err, message, record=src.name)

    def _quarantine(self, src: Path) -> None:
        try:
            self.paths.failed.mkdir(parents=True, exist_ok=True, mode=0o700)
            dest = self.paths.failed / src.name
            os.replace(src, dest)
            os.chmod(dest, 0o600)
            _prune(self.paths.failed, self.keep_failed, {src.name})
        except OSError as exc:
            LOG.warning("%s: could not move to failed/: %s", src.name, exc)

    def _fail(self, err: TextIO, message: str, record: str | None = None) -> int:
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
    """Read ``path`` unless it is larger than ``limit`` (PayloadError naming its size)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > limit:
            raise PayloadError(
                "size", f"<{size} bytes>", f"at most {limit} bytes", subject=f"file {path.name}"
            )
        return f.read(limit + 1)


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
