"""A hand-written stand-in for the kernel's iptables tables (no root, no iptc).

Committed state is a dict ``table -> chain -> [LiveRule]``; :meth:`begin` copies it
to a staging area that only :meth:`commit` publishes, like libiptc's handle.
Failures can be injected per rule (``refuse_rule``) or per table commit.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from ipaddress import IPv4Address, IPv4Network

from vr.errors import FirewallError
from vr.firewall.ipsets import BITMAP, IpSet, SetDef
from vr.firewall.model import RuleSpec
from vr.firewall.sync import Elsewhere, LiveRule, PacketCounts

BUILTINS = {
    "filter": ["INPUT", "FORWARD", "OUTPUT"],
    "nat": ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
    "filter6": ["INPUT", "FORWARD", "OUTPUT"],
    "nat6": ["PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"],
}

Tables = dict[str, dict[str, list[LiveRule]]]


class FakeSets:
    """The kernel's sets as a dict, driven by the ``ipset restore`` lines vr sends.

    Like the kernel it refuses to destroy a set a live rule references (``in_use``)
    and stops at the first refused line.
    """

    def __init__(self, in_use: Callable[[str], bool] = lambda name: False) -> None:
        self.sets: dict[str, IpSet] = {}
        self.runs: list[list[str]] = []
        self.in_use = in_use

    def live(self) -> dict[str, IpSet]:
        return dict(self.sets)

    def members(self, name: str) -> set[str]:
        return set(self.sets[name].members)

    def run(self, lines: Sequence[str]) -> None:
        if lines:
            self.runs.append(list(lines))
        for line in lines:
            self._one(line.split())

    def _one(self, w: list[str]) -> None:
        verb = w[0]
        if verb == "create":
            name, kind = w[1], w[2]
            if name in self.sets:
                raise FirewallError(f"ipset: set {name} already exists")
            rng = IPv4Network(w[4]) if kind == BITMAP else None
            self.sets[name] = IpSet(SetDef(name, kind, rng), frozenset())
            return
        if verb in ("add", "del"):
            name, elem = w[2], w[3]
            s = self.sets.get(name)
            if s is None:
                raise FirewallError(f"ipset: {verb} to missing set {name}")
            ip = IPv4Address(elem.split(",")[0])
            if s.definition.range is not None and ip not in s.definition.range:
                raise FirewallError(f"ipset: {elem} is outside the range of {name}")
            kept = {m for m in s.members if m.split(",")[0] != str(ip)}
            if verb == "add":
                kept.add(elem)
            self.sets[name] = IpSet(s.definition, frozenset(kept))
            return
        if verb == "swap":
            a, b = self.sets[w[1]], self.sets[w[2]]
            self.sets[w[1]] = IpSet(SetDef(w[1], b.definition.kind, b.definition.range), b.members)
            self.sets[w[2]] = IpSet(SetDef(w[2], a.definition.kind, a.definition.range), a.members)
            return
        if verb == "destroy":
            if self.in_use(w[1]):
                raise FirewallError(f"ipset: set {w[1]} is in use by a kernel component")
            del self.sets[w[1]]
            return
        raise AssertionError(f"unexpected ipset command {w!r}")


class FakeTables:
    def __init__(self) -> None:
        self.fake_sets = FakeSets(self._set_in_use)
        self.live: Tables = {t: {c: [] for c in cs} for t, cs in BUILTINS.items()}
        self.staged: Tables = {}
        self.commits: list[str] = []
        self.refuse_rule: Callable[[RuleSpec], bool] = lambda spec: False
        self.refuse_commit: set[str] = set()
        self.lock_held = False
        self.ipv6: Elsewhere | None = None

    # --- test helpers ---------------------------------------------------------------

    def add_live(
        self, table: str, chain: str, spec: RuleSpec, counters: PacketCounts = (0, 0)
    ) -> None:
        self.live[table].setdefault(chain, []).append(LiveRule(spec, counters))

    def count(self, table: str, chain: str, comment_part: str, packets: int) -> None:
        """Pretend ``packets`` matched the live rule whose comment contains ``comment_part``."""
        rules = self.live[table][chain]
        for i, r in enumerate(rules):
            if comment_part in r.spec.comment:
                rules[i] = LiveRule(r.spec, (r.counters[0] + packets, r.counters[1] + 60 * packets))
                return
        raise AssertionError(f"no rule with {comment_part!r} in {table}/{chain}")

    def snapshot(self) -> Tables:
        return copy.deepcopy(self.live)

    # --- Tables protocol --------------------------------------------------------------

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        assert not self.lock_held, "xtables lock taken twice"
        self.lock_held = True
        try:
            yield
        finally:
            self.lock_held = False

    def _t(self, table: str) -> dict[str, list[LiveRule]]:
        assert self.lock_held, "table used without the xtables lock"
        return self.staged[table]

    def begin(self, table: str) -> None:
        assert self.lock_held
        self.staged[table] = copy.deepcopy(self.live[table])

    def commit(self, table: str) -> None:
        if table in self.refuse_commit:
            raise FirewallError(f"table {table}: can't commit: Invalid argument")
        self.live[table] = self._t(table)
        self.commits.append(table)
        self.staged.pop(table)

    def discard(self, table: str) -> None:
        self.staged.pop(table, None)

    def chains(self, table: str) -> list[str]:
        return list(self._t(table))

    def builtin_chains(self, table: str) -> list[str]:
        return list(BUILTINS[table])

    def rules(self, table: str, chain: str) -> list[LiveRule]:
        return list(self._t(table)[chain])

    def create_chain(self, table: str, chain: str) -> None:
        assert chain not in self._t(table)
        self._t(table)[chain] = []

    def delete_chain(self, table: str, chain: str) -> None:
        t = self._t(table)
        assert not t[chain], "deleting a chain that still has rules"
        for rules in t.values():
            assert all(r.spec.target != chain for r in rules), f"{chain} still referenced"
        del t[chain]

    def flush(self, table: str, chain: str) -> None:
        self._t(table)[chain] = []

    def _check(self, table: str, spec: RuleSpec) -> None:
        if self.refuse_rule(spec):
            raise FirewallError(f"rule [{spec.render()}]: can't find match 'bogus'")
        for name in _set_names(spec):
            if name not in self.fake_sets.sets:
                raise FirewallError(f"rule [{spec.render()}]: Set {name} doesn't exist")
        t = self._t(table)
        builtin = spec.target in ("ACCEPT", "DROP", "RETURN", "DNAT")
        assert builtin or spec.target in t, f"jump to unknown chain {spec.target}"

    def append(self, table: str, chain: str, spec: RuleSpec, counters: PacketCounts) -> None:
        self._check(table, spec)
        self._t(table)[chain].append(LiveRule(spec, counters))

    def insert(self, table: str, chain: str, spec: RuleSpec, position: int) -> None:
        self._check(table, spec)
        self._t(table)[chain].insert(position, LiveRule(spec))

    def delete_at(self, table: str, chain: str, index: int) -> None:
        del self._t(table)[chain][index]

    def canonical(self, table: str, spec: RuleSpec) -> RuleSpec:
        if self.refuse_rule(spec):
            raise FirewallError(f"rule [{spec.render()}]: can't find match 'bogus'")
        return spec

    def sets(self) -> FakeSets:
        return self.fake_sets

    def _set_in_use(self, name: str) -> bool:
        return any(
            name in _set_names(r.spec) for t in self.live.values() for rs in t.values() for r in rs
        )


def _set_names(spec: RuleSpec) -> list[str]:
    return [
        values[-2]
        for m in spec.matches
        if m.name == "set"
        for key, values in m.params
        if key == "match-set"
    ]
