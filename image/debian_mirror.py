#!/usr/bin/env python3
"""Print the Debian mirror this machine's apt uses, for debootstrap.

Reads what apt reads: ``/etc/apt/sources.list`` and ``sources.list.d/*.list`` (one-line
format) and ``sources.list.d/*.sources`` (deb822), skipping files with any other suffix
and stanzas with ``Enabled: no``, exactly as apt does. Never falls back to a built-in
host: a machine without a configured mirror gets an error naming the files it read.

    debian_mirror.py [--etc DIR] [--suite bookworm] mirror|security

``mirror``: the first ``deb`` source carrying SUITE. ``security``: the first carrying
SUITE-security (empty output when there is none). Standard library only: it runs on
the build host before any virtualenv exists.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class MirrorError(Exception):
    pass


@dataclass(frozen=True)
class Source:
    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    where: str


USABLE_SCHEMES = ("http://", "https://", "ftp://", "file:/")


def parse_one_line(text: str, where: str) -> list[Source]:
    """``deb [opts] URI SUITE COMPONENT...`` lines; comments and blank lines skipped."""
    out = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.startswith("["):
            _, close, rest = rest.partition("]")
            if not close:
                raise MirrorError(f"{where}:{n}: unterminated [options] in {raw!r}")
        words = rest.split()
        if len(words) < 2:
            raise MirrorError(f"{where}:{n}: expected 'deb URI SUITE ...', got {raw!r}")
        out.append(Source((kind,), (words[0],), (words[1],), f"{where}:{n}"))
    return out


def parse_deb822(text: str, where: str) -> list[Source]:
    """deb822 stanzas separated by blank lines; field names are case-insensitive."""
    out = []
    for i, stanza in enumerate(_stanzas(text), 1):
        fields: dict[str, str] = {}
        key = ""
        for line in stanza:
            if line[:1] in (" ", "\t") and key:
                fields[key] += " " + line.strip()
                continue
            name, colon, value = line.partition(":")
            if not colon:
                raise MirrorError(f"{where}: stanza {i}: expected 'Field: value', got {line!r}")
            key = name.strip().lower()
            fields[key] = value.strip()
        if fields.get("enabled", "yes").lower() == "no":
            continue
        out.append(
            Source(
                tuple(fields.get("types", "").split()),
                tuple(fields.get("uris", "").split()),
                tuple(fields.get("suites", "").split()),
                f"{where}: stanza {i}",
            )
        )
    return out


def _stanzas(text: str) -> Iterable[list[str]]:
    current: list[str] = []
    for raw in text.splitlines():
        if raw.lstrip().startswith("#"):
            continue
        if not raw.strip():
            if current:
                yield current
            current = []
            continue
        current.append(raw.rstrip())
    if current:
        yield current


def read_sources(etc_apt: Path) -> list[Source]:
    """Every source apt would use, in apt's order (sources.list, then sorted parts)."""
    out: list[Source] = []
    main = etc_apt / "sources.list"
    if main.is_file():
        out += parse_one_line(main.read_text(), str(main))
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        for f in sorted(parts.iterdir()):
            if f.suffix == ".list":
                out += parse_one_line(f.read_text(), str(f))
            elif f.suffix == ".sources":
                out += parse_deb822(f.read_text(), str(f))
    return out


def pick(sources: Iterable[Source], suite: str) -> str | None:
    """The first usable ``deb`` URI that carries ``suite`` (no trailing slash)."""
    for s in sources:
        if "deb" not in s.types or suite not in s.suites:
            continue
        for uri in s.uris:
            if uri.startswith(USABLE_SCHEMES):
                return uri.rstrip("/")
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--etc", default="/etc/apt", help="apt configuration directory")
    ap.add_argument("--suite", default="bookworm")
    ap.add_argument("what", choices=["mirror", "security"])
    args = ap.parse_args(argv)
    etc = Path(args.etc)
    try:
        sources = read_sources(etc)
    except (MirrorError, OSError, UnicodeDecodeError) as exc:
        print(f"debian_mirror: {exc}", file=sys.stderr)
        return 1
    if args.what == "security":
        print(pick(sources, f"{args.suite}-security") or "")
        return 0
    uri = pick(sources, args.suite)
    if uri is None:
        print(
            f"debian_mirror: no 'deb' source for suite {args.suite!r} in {etc}/sources.list "
            f"or {etc}/sources.list.d/*.list|*.sources; configure apt's Debian mirror first",
            file=sys.stderr,
        )
        return 1
    print(uri)
    return 0


if __name__ == "__main__":
    sys.exit(main())
