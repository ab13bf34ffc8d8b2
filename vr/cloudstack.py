"""CloudStack's wire names and formats, in one place. Pure: no I/O.

What the management server spells out when it talks to a router: the folder it
uploads into (``/var/cache/cloud``), the programs it runs (``update_config.py``,
``vr_cfg.sh``), the file names of its payloads (``vm_metadata.json.<uuid>``...)
and the ``VR-<uuid>.cfg`` batch format (cloudstack-vr.md §1.5). The agent, the
applier, the push client and the tests all take these from here.
"""

from __future__ import annotations

import posixpath
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from vr.errors import PayloadError, VRError, shorten

CACHE_DIR = "/var/cache/cloud"
"""Where pushed files land inside the router (``Paths.cache`` under a root)."""
BIN_DIR = "/opt/cloud/bin"
UPDATE_CONFIG = f"{BIN_DIR}/update_config.py"
VR_CFG = f"{BIN_DIR}/vr_cfg.sh"

CFG_HEADER = "#Apache CloudStack Virtual Router Config File"
CFG_VERSION = "1.0"

# file-name stem -> JSON "type"
FILE_TYPES = {
    "vm_metadata": "vmdata",
    "vm_password": "vmpassword",
    "guest_network": "guestnetwork",
    "vm_dhcp_entry": "dhcpentry",
}

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
"""Pushed file names and metadata keys: no ``/``, no control characters, bounded."""

Program = Literal["update_config", "vr_cfg"]
_PROGRAMS: dict[str, Program] = {
    "update_config.py": "update_config",
    UPDATE_CONFIG: "update_config",
    "vr_cfg.sh": "vr_cfg",
    VR_CFG: "vr_cfg",
}


def check_name(name: object, field_name: str, vm: str | None = None) -> str:
    """``name`` if it is a safe file or key name, else :class:`PayloadError`."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or ".." in name:
        raise PayloadError(
            field_name,
            name,
            "a name of 1-128 letters, digits, '.', '_' or '-', not starting with "
            "'.', '_' or '-', without '..'",
            vm,
        )
    return name


def file_stem(name: str) -> str:
    """``vm_metadata.json.3f1c`` -> ``vm_metadata`` (CloudStack: text before ``.json``)."""
    return name.split(".json", 1)[0]


def program(word: str) -> Program | None:
    """Which CloudStack program a command's first word names: exactly the bare name or
    its path in ``/opt/cloud/bin``; anything else (another folder, another program) is
    None."""
    return _PROGRAMS.get(word)


class OutsideCache(VRError):
    """A path that does not name the cache folder or a valid file in it.

    The message (``'<path>': <reason>``) is what an SCP or SFTP client is told;
    ``expected`` says the same as a :class:`PayloadError` does.
    """

    def __init__(self, path: str, reason: str, expected: str) -> None:
        self.path = path
        self.expected = expected
        super().__init__(f"{shorten(path)}: {reason}")


def cache_name(path: str) -> str | None:
    """The one mapping of a CloudStack path onto a file name in the cache folder.

    ``path`` is absolute (``/var/cache/cloud/<name>``) or relative to the cache folder;
    returns the validated name, or None when it names the folder itself. Anything
    else (another folder, ``..``, NUL, an invalid name) raises :class:`OutsideCache`.
    """
    if not path or "\0" in path:
        where = f"a path under {CACHE_DIR}"
        raise OutsideCache(path, f"expected {where}", where)
    if ".." in path.split("/"):
        raise OutsideCache(path, "'..' is not allowed in paths", "a path without '..'")
    full = posixpath.normpath(posixpath.join(CACHE_DIR, path))
    if full == CACHE_DIR:
        return None
    parent, name = posixpath.split(full)
    if parent != CACHE_DIR:
        raise OutsideCache(
            path, f"uploads go only to {CACHE_DIR}/", f"a file name or a path in {CACHE_DIR}/"
        )
    try:
        return check_name(name, "file name")
    except PayloadError as exc:
        raise OutsideCache(path, exc.expected, exc.expected) from None


def cache_file(path: str, field_name: str = "file") -> str:
    """:func:`cache_name` for arguments that must name a file: a :class:`PayloadError`
    naming ``field_name`` otherwise."""
    try:
        name = cache_name(path)
    except OutsideCache as exc:
        # named as CloudStack's scripts see it: the part after the cache folder
        shown = path.removeprefix(CACHE_DIR + "/")
        raise PayloadError(field_name, shown, exc.expected) from None
    if name is None:
        raise PayloadError(field_name, path, f"a file in {CACHE_DIR}, not the folder")
    return name


def parse_update_config_args(args: Sequence[str]) -> tuple[str, bool]:
    """``<file> [true|false]`` -> (name, archive)."""
    if len(args) not in (1, 2) or (len(args) == 2 and args[1] not in ("true", "false")):
        raise PayloadError("arguments", " ".join(args), "<file> [true|false]")
    return cache_file(args[0]), len(args) == 1 or args[1] == "true"


def parse_vr_cfg_args(args: Sequence[str]) -> str:
    """``-c <cfg>`` (or just ``<cfg>``) -> the cfg's name in the cache folder."""
    if len(args) == 2 and args[0] == "-c":
        args = args[1:]
    if len(args) != 1:
        raise PayloadError("arguments", " ".join(args), "-c <cfg file>")
    return cache_file(args[0], "cfg file")


# --- VR-<uuid>.cfg batches ---------------------------------------------------------


@dataclass(frozen=True)
class BatchItem:
    """One script line of a batch: apply ``name``; ``archive`` False = delete it."""

    name: str
    data: bytes
    archive: bool


@dataclass(frozen=True)
class Batch:
    items: tuple[BatchItem, ...]


def parse_cfg(text: str) -> Batch:
    """Parse a ``VR-<uuid>.cfg`` aggregate (cloudstack-vr.md §1.5) into apply items."""
    lines = text.split("\n")
    files: dict[str, bytes] = {}
    items: list[BatchItem] = []
    i = 0
    saw_version = False
    while i < len(lines):
        line = lines[i]
        if line.startswith("#") or line.strip() == "":
            i += 1
            continue
        if line == "<version>":
            if i + 2 >= len(lines) or lines[i + 2] != "</version>":
                raise PayloadError(f"cfg line {i + 1}", line, "<version> / 1.0 / </version>")
            if lines[i + 1].strip() != CFG_VERSION:
                raise PayloadError("cfg version", lines[i + 1], CFG_VERSION)
            saw_version = True
            i += 3
        elif line == "<file>":
            try:
                end = lines.index("</file>", i + 2)
            except ValueError:
                raise PayloadError(f"cfg line {i + 1}", line, "a closing </file>") from None
            path = lines[i + 1]
            if not path.startswith(CACHE_DIR + "/"):
                raise PayloadError(f"cfg line {i + 2}", path, f"a path under {CACHE_DIR}/")
            name = cache_file(path, f"cfg line {i + 2}")
            # vr_cfg.sh writes each content line with echo, i.e. adds a newline per line
            content = "".join(s + "\n" for s in lines[i + 2 : end])
            try:
                files[name] = content.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise PayloadError(
                    f"cfg file {name}", f"<character {exc.start}>", "UTF-8 text"
                ) from None
            i = end + 1
        elif line == "<script>":
            if i + 2 >= len(lines) or lines[i + 2] != "</script>":
                raise PayloadError(f"cfg line {i + 1}", line, "<script> / command / </script>")
            argv = lines[i + 1].split()
            if not argv or program(argv[0]) != "update_config":
                raise PayloadError(f"cfg line {i + 2}", lines[i + 1], f"{UPDATE_CONFIG} <file>")
            name, archive = parse_update_config_args(argv[1:])
            if name not in files:
                raise PayloadError(f"cfg line {i + 2}", name, "a file defined earlier in the cfg")
            items.append(BatchItem(name, files[name], archive))
            i += 3
        else:
            raise PayloadError(f"cfg line {i + 1}", line, "<version>, <file> or <script>")
    if not saw_version:
        raise PayloadError("cfg", shorten(text[:40]), "a <version> block")
    return Batch(tuple(items))


def build_cfg(items: Sequence[tuple[str, bytes]]) -> str:
    """One ``VR-<uuid>.cfg`` text carrying ``(name, payload)`` items, each then applied."""
    lines = [CFG_HEADER, "<version>", CFG_VERSION, "</version>"]
    for name, data in items:
        content = data.decode("utf-8").rstrip("\n").split("\n")
        if "</file>" in content:
            raise PayloadError("file", name, "content without a line '</file>'")
        lines += ["<file>", f"{CACHE_DIR}/{name}", *content, "</file>"]
        lines += ["<script>", f"{UPDATE_CONFIG} {name}", "</script>"]
    return "\n".join(lines) + "\n"
