"""The IPv6 tables, applied by a child process of their own.

python-iptables cannot build an IPv6 target extension (DNAT) in a process that
already built the IPv4 one (ldx/python-iptables#112: libxtables registers a
family's variants of an extension only when it first loads it). So the parent
applies the IPv4 tables itself and hands the IPv6 part of the same rule set, as
JSON on stdin, to ``vr firewall sync6``, which runs the same engine
(:func:`vr.firewall.sync.sync`) over python-iptables' IPv6 tables only and prints
its report. The parent holds the xtables lock for the child's whole run, so the
child does not take it; the child applies its tables all or nothing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from vr import subp
from vr.errors import CommandError, FirewallError
from vr.firewall.model import IPV6_TABLES, RuleSet
from vr.firewall.sync import RuleCounter, SyncReport, sync

TIMEOUT = 60.0


class ChildIpv6:
    """:class:`vr.firewall.sync.Elsewhere`: the IPv6 tables through ``vr firewall``
    child processes (same interpreter, same network namespace)."""

    def sync(self, ruleset: RuleSet) -> SyncReport:
        """Apply ``ruleset`` in ``vr firewall sync6``; the caller holds the xtables
        lock. Raises :class:`FirewallError` with the child's reason."""
        return report_from_json(_run(["sync6", "--xtables-lock-held"], ruleset.to_json()))

    def counters(self, table_names: Sequence[str]) -> list[RuleCounter]:
        out = _run(["counters", "--json", "--family", "6"], None)
        try:
            rows = [RuleCounter(**json.loads(line)) for line in out.splitlines() if line]
        except (ValueError, TypeError) as exc:
            raise FirewallError(f"IPv6 counters: child's answer: {exc}") from None
        return [r for r in rows if r.table in table_names]


def _run(args: list[str], data: bytes | None) -> str:
    argv = [sys.executable, "-m", "vr", "firewall", *args]
    try:
        return subp.run(argv, data=data, timeout=TIMEOUT).stdout
    except CommandError as exc:
        reason = (exc.stderr or "").strip().splitlines()
        raise FirewallError(
            f"IPv6 tables (vr firewall {' '.join(args)}): {reason[-1] if reason else exc}"
        ) from exc


def apply_here(data: bytes, lock_held: bool) -> SyncReport:
    """The child's side: the IPv6 rule set in ``data`` onto this process's tables."""
    from vr.firewall.iptc_adapter import IptcTables

    ruleset = RuleSet.from_json(data, "IPv6 rule set on stdin")
    wrong = sorted({c.table for c in ruleset.chains} - IPV6_TABLES)
    if wrong:
        raise FirewallError(
            f"IPv6 rule set on stdin: tables {wrong}: expected only {sorted(IPV6_TABLES)}"
        )
    return sync(IptcTables(lock_held=lock_held), ruleset)


def report_to_json(report: SyncReport) -> str:
    return json.dumps({"changed": report.changed}, sort_keys=True)


def report_from_json(text: str) -> SyncReport:
    try:
        changed = json.loads(text)["changed"]
        return SyncReport({str(t): [str(c) for c in cs] for t, cs in changed.items()})
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise FirewallError(f"IPv6 tables: child's report {text[:200]!r}: {exc}") from None
