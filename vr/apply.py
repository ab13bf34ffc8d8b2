"""CloudStack's entry points: ``update_config.py <file> [false]`` and ``vr_cfg.sh -c <cfg>``.

Shared by the command line, ``scripts/update_config.py`` and the SSH push agent,
which runs them in-process with the channel's streams. Exit status is the contract
with the management server: 0 applied (or already applied), 1 anything else.
"""

from __future__ import annotations

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
from vr.paths import Paths
from vr.payloads import (
    DEFAULT_LIMITS,
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


@dataclass
class Applier:
    paths: Paths
    limits: Limits = DEFAULT_LIMITS
    after_commit: AfterCommit | None = None
    before_commit: BeforeCommit | None = None

    @property
    def store(self) -> Store:
        return Store(self.paths)

    # --- update_config.py ---------------------------------------------------------

    def update_config(self, args: list[str], out: TextIO, err: TextIO) -> int:
        """Apply one pushed file from the cache folder; see the module docstring."""
        start = time.monotonic()
        try:
            name, archive = parse_update_config_args(args)
        except PayloadError as exc:
            return self._fail(err, f"usage: update_config.py <file> [false]: {exc}")
        src = self.paths.cache / name
        try:
            data = src.read_bytes()
        except FileNotFoundError:
            if (self.paths.processed / f"{name}.gz").exists():
                print(f"{name}: already applied", file=out)
                return OK
            return self._fail(err, f"{name}: no such file in /var/cache/cloud")
        except OSError as exc:
            return self._fail(err, f"{name}: cannot read: {exc.strerror}")
        try:
            payload = parse_payload(name, data, self.limits)
        except PayloadError as exc:
            self._quarantine(src)
            return self._fail(err, f"{name}: rejected: {exc}", record=name)
        return self._apply(name, [payload], [(name, src, data, archive)], start, out, err)

    # --- vr_cfg.sh -c ---------------------------------------------------------------

    def apply_cfg(self, args: list[str], out: TextIO, err: TextIO) -> int:
        """Apply a ``VR-<uuid>.cfg`` batch as one unit: all items or none."""
        start = time.monotonic()
        if len(args) == 2 and args[0] == "-c":
            args = args[1:]
        if len(args) != 1:
            return self._fail(err, "usage: vr_cfg.sh -c <cfg file>")
        raw = args[0]
        if raw.startswith("/var/cache/cloud/"):
            raw = raw[len("/var/cache/cloud/") :]
        try:
            name = check_name(raw, "cfg file")
        except PayloadError as exc:
            return self._fail(err, str(exc))
        src = self.paths.cache / name
        try:
            text = src.read_bytes().decode("utf-8")
        except FileNotFoundError:
            if (self.paths.processed / f"{name}.gz").exists():
                print(f"{name}: already applied", file=out)
                return OK
            return self._fail(err, f"{name}: no such file in /var/cache/cloud")
        except (OSError, UnicodeDecodeError) as exc:
            return self._fail(err, f"{name}: cannot read: {exc}")
        try:
            batch = parse_cfg(text)
            payloads = []
            for n, item in enumerate(batch.items, 1):
                try:
                    payloads.append(parse_payload(item.name, item.data, self.limits))
                except PayloadError as exc:
                    raise PayloadError(
                        f"item {n} ({item.name})", exc.value, exc.expected, exc.vm
                    ) from None
        except PayloadError as exc:
            self._quarantine(src)
            return self._fail(err, f"{name}: rejected, nothing applied: {exc}", record=name)
        archives: list[tuple[str, Path | None, bytes, bool]] = [
            (i.name, None, i.data, i.archive) for i in batch.items
        ]
        archives.append((name, src, text.encode(), True))
        return self._apply(name, payloads, archives, start, out, err)

    # --- shared ---------------------------------------------------------------------

    def _apply(
        self,
        name: str,
        payloads: list[Payload],
        archives: list[tuple[str, Path | None, bytes, bool]],
        start: float,
        out: TextIO,
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
            if self.after_commit is not None:
                self.after_commit(result)
        except VRError as exc:
            return self._fail(err, f"{name}: not applied: {exc}", record=name)
        except Exception:
            LOG.exception("%s: unexpected error while applying", name)
            return self._fail(err, f"{name}: internal error, see /var/log/cloud.log", record=name)
        for item_name, src, data, archive in archives:
            self._archive(item_name, src, data, archive)
        ms = (time.monotonic() - start) * 1000
        summary = "; ".join(result.describe()) or "no change"
        LOG.info("applied %s: %s (%.1f ms)", name, summary, ms)
        print(f"{name}: applied: {summary}", file=out)
        self._record(name, True, summary)
        return OK

    def _archive(self, name: str, src: Path | None, data: bytes, archive: bool) -> None:
        try:
            if archive:
                atomic.atomic_write(self.paths.processed / f"{name}.gz", gzip.compress(data))
            if src is not None:
                src.unlink(missing_ok=True)
        except (OSError, VRError) as exc:
            LOG.warning("%s: applied but not archived: %s", name, exc)

    def _quarantine(self, src: Path) -> None:
        try:
            self.paths.failed.mkdir(parents=True, exist_ok=True)
            os.replace(src, self.paths.failed / src.name)
        except OSError as exc:
            LOG.warning("%s: could not move to failed/: %s", src.name, exc)

    def _fail(self, err: TextIO, message: str, record: str | None = None) -> int:
        LOG.error("%s", message)
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
