"""Bring the live tables to a :class:`RuleSet`, one commit per table, all or nothing.

The engine speaks to the tables through :class:`Tables` (python-iptables in
:mod:`vr.firewall.iptc_adapter`, a dict in the unit tests). It only ever touches
chains named with :data:`PREFIX` and the jump rules into them; every other rule and
chain is left alone. A chain whose rules already match is not rewritten (so its
counters keep counting); a rewritten chain keeps the counters of rules that stay.

Every table is staged before any is committed, so a rule that cannot be built
leaves all tables as they were. If a later table's commit fails, the tables
already committed are put back from a snapshot taken before staging.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Protocol

from vr.errors import FirewallError
from vr.firewall.ipsets import Sets
from vr.firewall.model import IPV6_TABLES, PREFIX, Chain, RuleSet, RuleSpec

LOG = logging.getLogger(__name__)

PacketCounts = tuple[int, int]


@dataclass(frozen=True)
class LiveRule:
    spec: RuleSpec
    counters: PacketCounts = (0, 0)


class Tables(Protocol):
    """The few table operations the engine needs. Changes are staged until commit."""

    ipv6: Elsewhere | None
    """When set, the IPv6 tables are applied and read through it, in another process
    (python-iptables cannot handle both families' NAT targets in one process), and
    never through these tables."""

    def locked(self) -> AbstractContextManager[None]:
        """Hold the host-wide iptables lock (other iptables users wait)."""

    def begin(self, table: str) -> None:
        """Start from the live state of ``table``, dropping anything staged."""

    def commit(self, table: str) -> None: ...

    def discard(self, table: str) -> None: ...

    def chains(self, table: str) -> list[str]: ...

    def builtin_chains(self, table: str) -> list[str]: ...

    def rules(self, table: str, chain: str) -> list[LiveRule]: ...

    def create_chain(self, table: str, chain: str) -> None: ...

    def delete_chain(self, table: str, chain: str) -> None: ...

    def flush(self, table: str, chain: str) -> None: ...

    def append(self, table: str, chain: str, spec: RuleSpec, counters: PacketCounts) -> None: ...

    def insert(self, table: str, chain: str, spec: RuleSpec, position: int) -> None: ...

    def delete_at(self, table: str, chain: str, index: int) -> None: ...

    def canonical(self, table: str, spec: RuleSpec) -> RuleSpec:
        """``spec`` as the table would read it back (addresses, case, defaults)."""

    def sets(self) -> Sets:
        """The netfilter sets the rules reference (:mod:`vr.firewall.ipsets`)."""


class Elsewhere(Protocol):
    """Tables of the other family, handled by another process."""

    def sync(self, ruleset: RuleSet) -> SyncReport:
        """Apply ``ruleset`` (those tables only) all or nothing; the caller holds
        the xtables lock for the whole call."""

    def counters(self, table_names: Sequence[str]) -> list[RuleCounter]:
        """The counters of our rules in those tables (the caller holds no lock)."""


@dataclass
class Snapshot:
    """Our part of one table before we touched it."""

    chains: dict[str, list[LiveRule]] = field(default_factory=dict)
    jumps: dict[str, list[tuple[int, str]]] = field(default_factory=dict)
    """Built-in chain -> [(index, our chain it jumps to)]."""


@dataclass
class SyncReport:
    changed: dict[str, list[str]] = field(default_factory=dict)
    """Table -> what changed there (empty when the table was left alone)."""

    @property
    def any_change(self) -> bool:
        return any(self.changed.values())


def is_ours(chain: str) -> bool:
    return chain.startswith(PREFIX)


def sync(tables: Tables, ruleset: RuleSet) -> SyncReport:
    """Make our chains and hooks in every table of ``ruleset`` exactly as described.

    When ``tables.ipv6`` is set, the IPv6 tables go through it (another
    process, which applies them all or nothing) while the IPv4 ones are staged here:
    a rule that cannot be built on either side changes nothing. A refused IPv4
    commit after the IPv6 tables were applied is rolled back on IPv4 only; the
    caller's pending marker then makes the next apply recompute.
    """
    here, away = ruleset, RuleSet(())
    if tables.ipv6 is not None:
        here, away = ruleset.split(IPV6_TABLES)
    report = SyncReport()
    done: dict[str, list[str]] = {}
    with tables.locked():
        staged: list[tuple[str, Snapshot]] = []
        try:
            for table in here.tables():
                tables.begin(table)
                snap = _snapshot(tables, table)
                staged.append((table, snap))
                report.changed[table] = _stage(tables, table, here.in_table(table))
            if away.chains and tables.ipv6 is not None:
                done = tables.ipv6.sync(away).changed
                report.changed.update(done)
                for table, what in done.items():
                    if what:
                        LOG.info("table %s (child process): %s", table, "; ".join(what))
        except Exception:
            for table, _ in staged:
                tables.discard(table)
            raise
        try:
            _commit(tables, staged, report)
        except FirewallError as exc:
            if any(done.values()):
                applied = ", ".join(t for t, what in done.items() if what)
                raise FirewallError(f"{exc} (IPv4 only: {applied} already applied)") from exc
            raise
    return report


def _commit(tables: Tables, staged: list[tuple[str, Snapshot]], report: SyncReport) -> None:
    committed: list[tuple[str, Snapshot]] = []
    for i, (table, snap) in enumerate(staged):
        if not report.changed[table]:
            tables.discard(table)
            continue
        try:
            tables.commit(table)
        except Exception as exc:
            for later, _ in staged[i + 1 :]:
                tables.discard(later)
            _roll_back(tables, committed)
            raise FirewallError(
                f"table {table}: commit of {', '.join(report.changed[table])} "
                f"refused: {exc}; tables left as they were"
            ) from exc
        committed.append((table, snap))
        LOG.info("table %s: %s", table, "; ".join(report.changed[table]))


def _snapshot(tables: Tables, table: str) -> Snapshot:
    snap = Snapshot()
    for chain in tables.chains(table):
        if is_ours(chain):
            snap.chains[chain] = tables.rules(table, chain)
    for builtin in tables.builtin_chains(table):
        snap.jumps[builtin] = [
            (i, r.spec.target)
            for i, r in enumerate(tables.rules(table, builtin))
            if _is_plain_jump(r.spec) and r.spec.target in snap.chains
        ]
    return snap


def _is_plain_jump(spec: RuleSpec) -> bool:
    return is_ours(spec.target) and spec == RuleSpec(target=spec.target)


def _stage(tables: Tables, table: str, chains: Sequence[Chain]) -> list[str]:
    """Stage ``chains`` into ``table``; returns what changed (nothing when equal)."""
    changes: list[str] = []
    existing = set(tables.chains(table))
    wanted = {c.name for c in chains}
    for chain in chains:
        if not is_ours(chain.name):
            raise FirewallError(f"chain {table}/{chain.name}: expected a {PREFIX}* name")
        if chain.name not in existing:
            tables.create_chain(table, chain.name)
            changes.append(f"created {chain.name}")
        if _stage_rules(tables, table, chain):
            changes.append(f"rewrote {chain.name} ({len(chain.rules)} rules)")
    for chain in chains:
        for hook in chain.hooks:
            changes += _stage_hook(tables, table, hook, chain.name)
    for stale in sorted(c for c in existing if is_ours(c) and c not in wanted):
        _remove_chain(tables, table, stale)
        changes.append(f"removed {stale}")
    return changes


def _stage_rules(tables: Tables, table: str, chain: Chain) -> bool:
    want: list[RuleSpec] = []
    for n, rule in enumerate(chain.rules, 1):
        spec = rule.spec()
        try:
            want.append(tables.canonical(table, spec))
        except Exception as exc:
            raise _rule_error(table, chain.name, n, spec, exc) from exc
    have = tables.rules(table, chain.name)
    if [r.spec for r in have] == want:
        return False
    tables.flush(table, chain.name)
    pool = list(have)
    for n, spec in enumerate(want, 1):
        counters: PacketCounts = (0, 0)
        for i, old in enumerate(pool):
            if old.spec == spec:
                counters = pool.pop(i).counters
                break
        try:
            tables.append(table, chain.name, spec, counters)
        except Exception as exc:
            raise _rule_error(table, chain.name, n, spec, exc) from exc
    return True


def _rule_error(table: str, chain: str, n: int, spec: RuleSpec, exc: Exception) -> FirewallError:
    return FirewallError(
        f"table {table} chain {chain} rule {n} [{spec.render()}]: {exc}; tables left as they were"
    )


def _stage_hook(tables: Tables, table: str, hook: str, chain: str) -> list[str]:
    if hook not in tables.builtin_chains(table):
        raise FirewallError(f"table {table}: hook {hook!r}: expected a built-in chain")
    jumps = _jump_indexes(tables, table, hook, chain)
    if not jumps:
        try:
            tables.insert(table, hook, RuleSpec(target=chain), 0)
        except Exception as exc:
            raise FirewallError(f"table {table}: cannot hook {chain} into {hook}: {exc}") from exc
        return [f"hooked {chain} into {hook}"]
    # Hooked exactly once: extra jumps (e.g. a manual copy) would run our rules twice.
    for index in reversed(jumps[1:]):
        tables.delete_at(table, hook, index)
    return [f"removed {len(jumps) - 1} extra jumps {hook} -> {chain}"] if len(jumps) > 1 else []


def _jump_indexes(tables: Tables, table: str, chain: str, target: str) -> list[int]:
    return [
        i
        for i, r in enumerate(tables.rules(table, chain))
        if _is_plain_jump(r.spec) and r.spec.target == target
    ]


def _remove_chain(tables: Tables, table: str, chain: str) -> None:
    for builtin in tables.builtin_chains(table):
        for index in reversed(_jump_indexes(tables, table, builtin, chain)):
            tables.delete_at(table, builtin, index)
    tables.flush(table, chain)
    tables.delete_chain(table, chain)


def _roll_back(tables: Tables, committed: list[tuple[str, Snapshot]]) -> None:
    for table, snap in reversed(committed):
        try:
            tables.begin(table)
            _restore(tables, table, snap)
            tables.commit(table)
            LOG.warning("table %s: rolled back to its state before this apply", table)
        except Exception:
            tables.discard(table)
            LOG.exception("table %s: roll back failed; run 'vr firewall restore'", table)


def _restore(tables: Tables, table: str, snap: Snapshot) -> None:
    ours = [c for c in tables.chains(table) if is_ours(c)]
    for builtin in tables.builtin_chains(table):
        for i in reversed(
            [
                i
                for i, r in enumerate(tables.rules(table, builtin))
                if _is_plain_jump(r.spec) and r.spec.target in ours
            ]
        ):
            tables.delete_at(table, builtin, i)
    for chain in ours:
        tables.flush(table, chain)
    for chain, rules in snap.chains.items():
        if chain not in ours:
            tables.create_chain(table, chain)
        for r in rules:
            tables.append(table, chain, r.spec, r.counters)
    for chain in ours:
        if chain not in snap.chains:
            tables.delete_chain(table, chain)
    for builtin, jumps in snap.jumps.items():
        for index, target in jumps:
            tables.insert(table, builtin, RuleSpec(target=target), index)


@dataclass(frozen=True)
class RuleCounter:
    table: str
    chain: str
    index: int
    comment: str
    packets: int
    bytes: int
    rule: str


def counters(tables: Tables, table_names: Sequence[str]) -> list[RuleCounter]:
    """Packet and byte counters of every rule in our chains (read-only)."""
    here = list(table_names)
    away: list[RuleCounter] = []
    if tables.ipv6 is not None:
        here = [t for t in table_names if t not in IPV6_TABLES]
        wanted = [t for t in table_names if t in IPV6_TABLES]
        if wanted:
            away = tables.ipv6.counters(wanted)
    out: list[RuleCounter] = []
    with tables.locked():
        for table in here:
            tables.begin(table)
            try:
                for chain in sorted(c for c in tables.chains(table) if is_ours(c)):
                    for i, r in enumerate(tables.rules(table, chain), 1):
                        out.append(
                            RuleCounter(
                                table, chain, i, r.spec.comment, *r.counters, r.spec.render()
                            )
                        )
            finally:
                tables.discard(table)
    return out + away
