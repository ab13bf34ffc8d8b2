"""What an SSH request asks for, decided without touching the system (pure).

CloudStack names everything by its absolute path inside the VR
(``/var/cache/cloud/<file>``, ``/opt/cloud/bin/<script>``); :mod:`vr.cloudstack`
maps such strings onto a validated file name in the cache folder or refuses them.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

from vr import cloudstack
from vr.cloudstack import CACHE_DIR, OutsideCache, cache_name
from vr.errors import shorten
from vr.ops.diagnostics import Diagnostic as Diagnostic
from vr.ops.diagnostics import NotAllowed, parse_diagnostic

PAIR_SYNC = "vr-pair-sync"
"""A router pair's password sync (:mod:`vr.pair.sync`): the peer's ledger on stdin.
Between routers only, so not listed in :data:`ALLOWED` (what operators are told)."""
ALLOWED = (
    f"allowed: {cloudstack.UPDATE_CONFIG} <file> [false], "
    f"{cloudstack.VR_CFG} -c <cfg>, scp -t {CACHE_DIR}, sftp, read-only diagnostics "
    "(vr status, vr show, vr firewall show|counters, tail -n N /var/log/cloud.log...)"
)
NOT_FOUND = 127
MAX_COMMAND = 4096


@dataclass(frozen=True)
class UpdateConfig:
    args: tuple[str, ...]


@dataclass(frozen=True)
class ApplyCfg:
    args: tuple[str, ...]


@dataclass(frozen=True)
class PairSync:
    """The peer router sends its password ledger on stdin and reads ours back."""


@dataclass(frozen=True)
class ScpTarget:
    """``scp -t <target>``: ``name`` is a fixed file name, or None for the folder itself.

    ``error`` is set when the target is refused; the sink then answers with an SCP
    protocol error instead of receiving anything.
    """

    name: str | None
    error: str | None = None


@dataclass(frozen=True)
class ExecRefused:
    reason: str
    code: int = NOT_FOUND


ExecRequest = UpdateConfig | ApplyCfg | ScpTarget | Diagnostic | PairSync | ExecRefused
"""A :class:`~vr.ops.diagnostics.Diagnostic` is a read-only command an operator
types after ``ssh -p 3922 root@<router>`` (the fixed allowlist of vr.ops.diagnostics)."""

SHELL = ExecRefused(f"no interactive shell on this appliance; {ALLOWED}")


def parse_exec(command: bytes) -> ExecRequest:
    """Decide what an ``exec`` request means; anything unknown is :class:`ExecRefused`."""
    if len(command) > MAX_COMMAND:
        return ExecRefused(f"command of {len(command)} bytes is too long; {ALLOWED}")
    try:
        diagnostic = parse_diagnostic(command.decode("utf-8"))
    except UnicodeDecodeError:
        diagnostic = None
    if isinstance(diagnostic, NotAllowed):
        return ExecRefused(diagnostic.reason)
    if diagnostic is not None:
        return diagnostic
    try:
        argv = shlex.split(command.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return ExecRefused(f"cannot parse command {shorten(command)}: {exc}; {ALLOWED}")
    if not argv:
        return ExecRefused(f"empty command; {ALLOWED}")
    prog, args = argv[0], tuple(argv[1:])
    which = cloudstack.program(prog)
    if which == "update_config":
        return UpdateConfig(args)
    if which == "vr_cfg":
        return ApplyCfg(args)
    if prog == "scp":
        return parse_scp(args)
    if prog == PAIR_SYNC:
        if args:
            return ExecRefused(f"{PAIR_SYNC} takes no arguments; got {shorten(' '.join(args))}")
        return PairSync()
    return ExecRefused(f"command not available on this appliance: {shorten(prog)}; {ALLOWED}")


def parse_scp(args: tuple[str, ...]) -> ExecRequest:
    """``scp [-v] [-p] [-d] [-q] -t [--] <target>`` as sent by ``scp -O`` and Java clients."""
    flags: set[str] = set()
    rest = list(args)
    while rest and rest[0].startswith("-") and rest[0] != "-":
        opt = rest.pop(0)
        if opt == "--":
            break
        flags.update(opt[1:])
    if "f" in flags:
        return ExecRefused("downloads (scp -f) are not offered; uploads go to " + CACHE_DIR)
    if "r" in flags:
        return ExecRefused("directories (scp -r) are not accepted; send files")
    unknown = flags - set("tdpvq")
    if "t" not in flags or unknown or len(rest) != 1:
        return ExecRefused(f"unsupported scp request {shorten(' '.join(args))}; {ALLOWED}")
    try:
        name = cache_name(rest[0])
    except OutsideCache as exc:
        return ScpTarget(None, str(exc))
    if name is not None and "d" in flags:
        return ScpTarget(None, f"{shorten(rest[0])}: not a directory")
    return ScpTarget(name)
