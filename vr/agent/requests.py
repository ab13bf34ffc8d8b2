"""What an SSH request asks for, decided without touching the system (pure).

CloudStack names everything by its absolute path inside the VR
(``/var/cache/cloud/<file>``, ``/opt/cloud/bin/<script>``); these functions map
such strings onto a validated file name in the cache folder or refuse them.
Relative paths are taken relative to ``/var/cache/cloud``, the session's only
directory.
"""

from __future__ import annotations

import posixpath
import shlex
from dataclasses import dataclass

from vr.errors import PayloadError, shorten
from vr.payloads import check_name

CACHE_DIR = "/var/cache/cloud"
BIN_DIR = "/opt/cloud/bin"
UPDATE_CONFIG = ("update_config.py", f"{BIN_DIR}/update_config.py")
VR_CFG = ("vr_cfg.sh", f"{BIN_DIR}/vr_cfg.sh")
ALLOWED = (
    "allowed: /opt/cloud/bin/update_config.py <file> [false], "
    "/opt/cloud/bin/vr_cfg.sh -c <cfg>, scp -t /var/cache/cloud, sftp"
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
class ScpSink:
    """``scp -t <target>``: ``name`` is a fixed file name, or None for the folder itself.

    ``error`` is set when the target is refused; the sink then answers with an SCP
    protocol error instead of receiving anything.
    """

    name: str | None
    error: str | None = None


@dataclass(frozen=True)
class Refused:
    reason: str
    code: int = NOT_FOUND


Request = UpdateConfig | ApplyCfg | ScpSink | Refused

SHELL = Refused(f"no interactive shell on this appliance; {ALLOWED}")


class OutsideCache(ValueError):
    """A path that does not name the cache folder or a valid file in it."""


def cache_target(path: str) -> str | None:
    """Map a request path to a file name in the cache folder, or None for the folder.

    Raises :class:`OutsideCache` with a one-line reason for anything else.
    """
    if not path or "\0" in path:
        raise OutsideCache(f"{shorten(path)}: expected a path under {CACHE_DIR}")
    if ".." in path.split("/"):
        raise OutsideCache(f"{shorten(path)}: '..' is not allowed in paths")
    full = posixpath.normpath(posixpath.join(CACHE_DIR, path))
    if full == CACHE_DIR:
        return None
    parent, name = posixpath.split(full)
    if parent != CACHE_DIR:
        raise OutsideCache(f"{shorten(path)}: uploads go only to {CACHE_DIR}/")
    try:
        return check_name(name, "file name")
    except PayloadError as exc:
        raise OutsideCache(str(exc)) from None


def parse_exec(command: bytes) -> Request:
    """Decide what an ``exec`` request means; anything unknown is :class:`Refused`."""
    if len(command) > MAX_COMMAND:
        return Refused(f"command of {len(command)} bytes is too long; {ALLOWED}")
    try:
        argv = shlex.split(command.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        return Refused(f"cannot parse command {shorten(command)}: {exc}; {ALLOWED}")
    if not argv:
        return Refused(f"empty command; {ALLOWED}")
    prog, args = argv[0], tuple(argv[1:])
    if prog in UPDATE_CONFIG:
        return UpdateConfig(args)
    if prog in VR_CFG:
        return ApplyCfg(args)
    if prog == "scp":
        return parse_scp(args)
    return Refused(f"command not available on this appliance: {shorten(prog)}; {ALLOWED}")


def parse_scp(args: tuple[str, ...]) -> Request:
    """``scp [-v] [-p] [-d] [-q] -t [--] <target>`` as sent by ``scp -O`` and Java clients."""
    flags: set[str] = set()
    rest = list(args)
    while rest and rest[0].startswith("-") and rest[0] != "-":
        opt = rest.pop(0)
        if opt == "--":
            break
        flags.update(opt[1:])
    if "f" in flags:
        return Refused("downloads (scp -f) are not offered; uploads go to /var/cache/cloud")
    if "r" in flags:
        return Refused("directories (scp -r) are not accepted; send files")
    unknown = flags - set("tdpvq")
    if "t" not in flags or unknown or len(rest) != 1:
        return Refused(f"unsupported scp request {shorten(' '.join(args))}; {ALLOWED}")
    try:
        name = cache_target(rest[0])
    except OutsideCache as exc:
        return ScpSink(None, str(exc))
    if name is not None and "d" in flags:
        return ScpSink(None, f"{shorten(rest[0])}: not a directory")
    return ScpSink(name)
