"""The I/O edge of ``vr boot``: wait for the boot arguments, then carry out the plan.

Every subprocess goes through :mod:`vr.subp`, every file through :mod:`vr.atomic`.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vr import atomic, subp
from vr.boot import cmdline
from vr.boot.plan import Plan, make_plan
from vr.errors import BootError
from vr.paths import Paths

LOG = logging.getLogger(__name__)

POLL = 0.5
"""Seconds between looks at the cmdline file (CloudStack's bootstrap.sh: 1 s)."""


@dataclass(frozen=True)
class Clock:
    """Time for the waits (tests pass a fake one)."""

    monotonic: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep


def boot_time(proc_stat: Path = Path("/proc/stat")) -> float:
    """When this boot began (``btime``, seconds since the epoch)."""
    for line in proc_stat.read_text().splitlines():
        if line.startswith("btime "):
            return float(line.split()[1])
    raise BootError("btime", None, f"a btime line in {proc_stat}")


def _read_fresh(path: Path, since: float) -> str | None:
    """The file's text if it was written during this boot and is complete."""
    try:
        st = path.stat()
        if st.st_mtime < since or st.st_size == 0:
            return None
        text = path.read_text("utf-8", "replace")
    except FileNotFoundError:
        return None
    # The guest agent writes then closes: CloudStack's payload is `echo <args>`, one line
    # ending in a newline, so a file without one may still be in the middle of its write.
    return text if text.endswith("\n") else None


def wait_for_cmdline(
    path: Path, since: float, timeout: float | None, clock: Clock = Clock()
) -> str | None:
    """Wait until ``path`` holds arguments written after ``since`` (this boot); None
    after ``timeout`` seconds (never, when ``timeout`` is None). A file written but
    never ended with a newline is taken once it stayed the same for one poll."""
    start = clock.monotonic()
    next_note = start + 60
    last: tuple[float, int] | None = None
    while True:
        text = _read_fresh(path, since)
        if text is not None:
            return text
        try:
            st = path.stat()
            seen = (st.st_mtime, st.st_size) if st.st_mtime >= since and st.st_size else None
        except FileNotFoundError:
            seen = None
        if seen is not None and seen == last:
            return path.read_text("utf-8", "replace")
        last = seen
        now = clock.monotonic()
        if timeout is not None and now - start >= timeout:
            return None
        if now >= next_note:
            LOG.info("still waiting for the boot arguments in %s", path)
            next_note = now + 60
        clock.sleep(POLL)


def read_arguments(
    paths: Paths, kernel_cmdline: str, since: float, wait: float, clock: Clock = Clock()
) -> tuple[dict[str, str], str]:
    """The boot arguments and where they came from: the kernel command line when it
    carries them (Xen, VMware), else ``/var/cache/cloud/cmdline`` written during this
    boot. Waits ``wait`` seconds for a fresh file when one from an earlier boot is there
    to fall back on (a plain reboot), and as long as it takes when there is none."""
    args = cmdline.parse(kernel_cmdline)
    if cmdline.is_cloudstack(args):
        return args, "the kernel command line"
    previous = paths.boot_cmdline.exists()
    LOG.info("waiting for the boot arguments in %s", paths.boot_cmdline)
    text = wait_for_cmdline(paths.boot_cmdline, since, wait if previous else None, clock)
    if text is None:
        LOG.warning("no new boot arguments after %ss: using those of the previous boot", wait)
        text = paths.boot_cmdline.read_text("utf-8", "replace")
    return cmdline.parse(text), str(paths.boot_cmdline)


def _load_vr_json(paths: Paths) -> dict[str, Any]:
    try:
        raw = json.loads(paths.config.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise BootError("vr.json", str(paths.config), f"readable JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise BootError("vr.json", str(paths.config), "a JSON object")
    return raw


def dropped_keys(paths: Paths) -> str | None:
    try:
        return paths.boot_authorized_keys.read_text("utf-8", "replace")
    except FileNotFoundError:
        return None


def plan_for(paths: Paths, args: dict[str, str]) -> Plan:
    """Parse and decide; raises :class:`BootError` before anything is changed."""
    cfg = cmdline.from_args(args)
    return make_plan(cfg, _load_vr_json(paths), dropped_keys(paths))


def wait_for_devices(devices: list[str], timeout: float, clock: Clock = Clock()) -> None:
    """NICs appear when udev has seen them; the arguments usually arrive later anyway."""
    deadline = clock.monotonic() + timeout
    missing = [d for d in devices if not Path("/sys/class/net", d).exists()]
    while missing:
        if clock.monotonic() >= deadline:
            raise BootError("interfaces", missing, f"these NICs to exist within {timeout}s")
        clock.sleep(POLL)
        missing = [d for d in missing if not Path("/sys/class/net", d).exists()]


def install_key(paths: Paths, keys: bytes) -> None:
    ssh = paths.authorized_keys.parent
    ssh.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(ssh, 0o700)
    atomic.atomic_write(paths.authorized_keys, keys, 0o600)
    LOG.info("management server key installed in %s", paths.authorized_keys)


def carry_out(paths: Paths, plan: Plan, network: bool = True) -> None:
    """Write vr.json, the key and /etc files, then configure the interfaces."""
    for warning in plan.warnings:
        LOG.warning("%s", warning)
    paths.etc.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic.atomic_write(paths.config, (json.dumps(plan.vr_json, indent=2) + "\n").encode(), 0o644)
    LOG.info("wrote %s", paths.config)
    if plan.authorized_keys is not None:
        install_key(paths, plan.authorized_keys)
    else:
        LOG.warning("no management server key (authorized_key= or %s)", paths.boot_authorized_keys)
    for name, data in plan.etc_files.items():
        target = paths.etc_file(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        atomic.atomic_write(target, data, 0o644)
    if network:
        for cmd in plan.commands:
            subp.run(cmd, timeout=30)
        LOG.info("interfaces, routes and hostname set (%d commands)", len(plan.commands))
