"""Read-only diagnostics over SSH: the fixed allowlist, decided without I/O (pure).

An operator's troubleshooting starts with ``ssh -p 3922 root@<router> <command>``.
The agent has no shell: a command is allowed only when its words are exactly one
of :data:`ALLOWED` (CloudStack's usual steps typed verbatim, and vr's own views),
and it then runs with a fixed argv (:mod:`vr.ops.diagrun`), its paths mapped under
the appliance's root. Anything with a character a shell would interpret (quotes,
``;``, ``|``, ``$``, redirections, globs...) is refused before its words are even
compared, as is any extra or different argument.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from ipaddress import IPv4Address
from typing import Literal

Kind = Literal[
    "vr_status",
    "vr_show",
    "firewall_show",
    "firewall_counters",
    "iptables_nat",
    "ls_metadata",
    "netstat",
    "ss",
    "tail",
    "tail_follow",
]

LOG_FILE = "/var/log/cloud.log"
METADATA_DIR = "/var/www/html/latest/metadata"
MAX_LINES = 10000
DEFAULT_LINES = 10

PROGRAMS = frozenset({"vr", "iptables", "ls", "netstat", "ss", "tail"})
"""First words that make a command a diagnostic (allowed or refused here)."""

PLAIN = re.compile(r"[A-Za-z0-9 ._/-]*")
"""Every character a diagnostic may hold: no quoting, no expansion, no operators."""

ALLOWED = (
    "vr status [--json]",
    "vr show [--json] [IP...]",
    "vr firewall show [--json]",
    "vr firewall counters [--json]",
    "iptables -t nat -L PREROUTING -n -v",
    f"ls -al {METADATA_DIR}/",
    "netstat -tulpn",
    "ss -tulpn",
    f"tail [-n N] {LOG_FILE}",
    f"tail -f {LOG_FILE}",
)

FIXED: dict[tuple[str, ...], Kind] = {
    ("iptables", "-t", "nat", "-L", "PREROUTING", "-n", "-v"): "iptables_nat",
    ("ls", "-al", METADATA_DIR + "/"): "ls_metadata",
    ("ls", "-al", METADATA_DIR): "ls_metadata",
    ("netstat", "-tulpn"): "netstat",
    ("ss", "-tulpn"): "ss",
    ("tail", "-f", LOG_FILE): "tail_follow",
    ("tail", LOG_FILE): "tail",
}


@dataclass(frozen=True)
class Diagnostic:
    """An allowed read-only command. ``json``: machine-readable output; ``ips``: the
    VMs ``vr show`` is limited to; ``lines``: how many lines ``tail`` prints."""

    kind: Kind
    json: bool = False
    ips: tuple[IPv4Address, ...] = ()
    lines: int = DEFAULT_LINES


@dataclass(frozen=True)
class NotAllowed:
    reason: str


def allowed_text() -> str:
    return "read-only diagnostics: " + "; ".join(ALLOWED)


def parse_diagnostic(command: str) -> Diagnostic | NotAllowed | None:
    """``command`` as the client sent it -> the diagnostic, a refusal, or None when
    its first word is no diagnostic program (the agent's other requests)."""
    words = command.split()
    if not words or words[0] not in PROGRAMS:
        return None
    if not PLAIN.fullmatch(command):
        bad = sorted({c for c in command if not PLAIN.fullmatch(c)})
        shown = "".join(bad)[:20]
        return NotAllowed(
            f"{shown!r} in {words[0]!r}: no shell on this appliance, nothing is quoted "
            f"or expanded; {allowed_text()}"
        )
    key = tuple(words)
    if key in FIXED:
        return Diagnostic(FIXED[key])
    if words[0] == "vr":
        found = _vr(words[1:])
        if found is not None:
            return found
    if words[0] == "tail" and len(words) == 4 and words[1] == "-n" and words[3] == LOG_FILE:
        n = words[2]
        if n.isdigit() and 1 <= int(n) <= MAX_LINES:
            return Diagnostic("tail", lines=int(n))
        return NotAllowed(f"tail -n {n[:20]!r}: expected a number of lines from 1 to {MAX_LINES}")
    return NotAllowed(f"not an allowed command: {command[:80]!r}; {allowed_text()}")


def _vr(args: list[str]) -> Diagnostic | NotAllowed | None:
    as_json = bool(args) and args[-1] == "--json"
    if args in (["status"], ["status", "--json"]):
        return Diagnostic("vr_status", json=as_json)
    if args[:2] == ["firewall", "show"] and args[2:] in ([], ["--json"]):
        return Diagnostic("firewall_show", json=as_json)
    if args[:2] == ["firewall", "counters"] and args[2:] in ([], ["--json"]):
        return Diagnostic("firewall_counters", json=as_json)
    if args[:1] == ["show"]:
        rest = args[1:]
        show_json = bool(rest) and rest[0] == "--json"
        ips = []
        for word in rest[1:] if show_json else rest:
            try:
                ips.append(IPv4Address(word))
            except ValueError:
                return NotAllowed(f"vr show {word[:40]!r}: expected [--json] and IPv4 addresses")
        return Diagnostic("vr_show", json=show_json, ips=tuple(ips))
    return None
