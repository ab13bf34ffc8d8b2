"""The one module that imports python-iptables (``iptc``), and only when first used.

Why so careful: importing ``iptc`` runs ``modprobe`` and patches ``socket``;
``iptc.Table`` is a process-wide singleton per table name whose default is to
commit after every call; ``iptc.easy`` silently drops fields it cannot apply. So:
object API only, ``autocommit`` off, an explicit ``refresh()`` before reading
(drops anything staged), one ``commit()`` per table. libiptc programs the legacy
backend (what ``iptables-legacy`` shows), in the network namespace of the process.

Like the ``iptables`` command, every read-modify-commit holds the host-wide xtables
lock, so a concurrent ``iptables-legacy`` call cannot lose our update or we its.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from ipaddress import ip_network
from pathlib import Path
from typing import Any

from vr import locking
from vr.errors import FirewallError, LockTimeout
from vr.firewall.ipsets import IpsetCommand
from vr.firewall.model import IPV6_TABLES, MatchSpec, Params, RuleSpec
from vr.firewall.sync import Elsewhere, LiveRule, PacketCounts

LOG = logging.getLogger(__name__)

XT_LOCK_ENV = "XT_LOCK_NAME"
XT_LOCK_DEFAULT = "/run/xtables.lock"
IFNAMSIZ = 16
PLAIN_TARGETS = frozenset({"ACCEPT", "DROP", "RETURN", "QUEUE", ""})


def _net(text: str | None) -> str | None:
    if not text or text.startswith("0.0.0.0/0") or text.startswith("::/0"):
        return None
    try:
        return ip_network(text).with_prefixlen
    except ValueError:
        return text  # e.g. an inverted address of someone else's rule: keep as read


def _iface_mask(name: str) -> bytes:
    """The interface mask ip6tables sets for ``-i name`` (``+`` a prefix match).

    python-iptables 1.2.0's ``Rule6.in_interface`` fills the mask with 0x01 bytes,
    so the kernel compares only the lowest bit of each character and ``-i eth0``
    also matches eth2: we always set the mask ourselves.
    """
    negated = name.startswith("!")
    plain = name[1:] if negated else name
    length = len(plain) - 1 if plain.endswith("+") else len(plain) + 1
    return b"\xff" * length + bytes(IFNAMSIZ - length)


def _params(raw: dict[str, Any]) -> Params:
    return tuple((str(k), tuple(str(v) for v in vals)) for k, vals in raw.items())


class IptcTables:
    """:class:`vr.firewall.sync.Tables` over python-iptables."""

    def __init__(
        self,
        lock_timeout: float = 30.0,
        ipv6: Elsewhere | None = None,
        lock_held: bool = False,
    ) -> None:
        """``ipv6``: the IPv6 tables are handled through it (:mod:`vr.firewall.child6`);
        ``lock_held``: the parent process holds the xtables lock for our whole life."""
        self.lock_timeout = lock_timeout
        self.ipv6 = ipv6
        self.lock_held = lock_held
        self._lib: Any = None

    def sets(self) -> IpsetCommand:
        return IpsetCommand()

    # --- plumbing -------------------------------------------------------------------

    @property
    def iptc(self) -> Any:
        if self._lib is None:
            try:
                self._lib = importlib.import_module("iptc")
            except Exception as exc:
                raise FirewallError(f"python-iptables cannot load libiptc: {exc}") from exc
        return self._lib

    def _table(self, name: str) -> Any:
        if name in IPV6_TABLES:
            # "nat6" -> ip6tables' nat (python-iptables Table6)
            table = self.iptc.Table6(name[:-1], autocommit=False)
        else:
            table = self.iptc.Table(name, autocommit=False)
        table.autocommit = False
        return table

    def _chain(self, table: str, chain: str) -> Any:
        return self.iptc.Chain(self._table(table), chain)

    @contextlib.contextmanager
    def _errors(self, what: str) -> Iterator[None]:
        try:
            yield
        except FirewallError:
            raise
        except Exception as exc:
            raise FirewallError(f"{what}: {exc}") from exc

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        if self.lock_held:
            yield
            return
        path = Path(os.environ.get(XT_LOCK_ENV, XT_LOCK_DEFAULT))
        stack = contextlib.ExitStack()
        try:
            stack.enter_context(locking.exclusive(path, self.lock_timeout, "xtables lock", 0.01))
        except (LockTimeout, OSError) as exc:
            raise FirewallError(f"xtables lock {path}: {exc}") from None
        with stack:
            yield

    # --- the Tables protocol --------------------------------------------------------

    def begin(self, table: str) -> None:
        with self._errors(f"table {table}: cannot read"):
            self._table(table).refresh()

    def commit(self, table: str) -> None:
        t = self._table(table)
        with self._errors(f"table {table}"):
            t.commit()
        self.discard(table)

    def discard(self, table: str) -> None:
        with self._errors(f"table {table}: cannot re-read"):
            # autocommit is off, so refresh() frees the staged handle without committing.
            self._table(table).refresh()

    def chains(self, table: str) -> list[str]:
        return [c.name for c in self._table(table).chains]

    def builtin_chains(self, table: str) -> list[str]:
        t = self._table(table)
        return [c.name for c in t.chains if t.builtin_chain(c.name)]

    def rules(self, table: str, chain: str) -> list[LiveRule]:
        with self._errors(f"table {table} chain {chain}: cannot read rules"):
            return [
                LiveRule(self._read(r), (int(r.counters[0]), int(r.counters[1])))
                for r in self._chain(table, chain).rules
            ]

    def create_chain(self, table: str, chain: str) -> None:
        with self._errors(f"table {table}: cannot create chain {chain}"):
            self._table(table).create_chain(chain)

    def delete_chain(self, table: str, chain: str) -> None:
        with self._errors(f"table {table}: cannot delete chain {chain}"):
            self._table(table).delete_chain(chain)

    def flush(self, table: str, chain: str) -> None:
        with self._errors(f"table {table}: cannot flush chain {chain}"):
            self._table(table).flush_entries(chain)

    def append(self, table: str, chain: str, spec: RuleSpec, counters: PacketCounts) -> None:
        rule = self._build(spec, table)
        rule.counters = counters
        with self._errors(f"table {table} chain {chain}"):
            self._chain(table, chain).append_rule(rule)

    def insert(self, table: str, chain: str, spec: RuleSpec, position: int) -> None:
        rule = self._build(spec, table)
        with self._errors(f"table {table} chain {chain}"):
            self._chain(table, chain).insert_rule(rule, position)

    def delete_at(self, table: str, chain: str, index: int) -> None:
        with self._errors(f"table {table} chain {chain}: cannot delete rule {index + 1}"):
            c = self._chain(table, chain)
            # delete_rule removes the first rule equal to this one; callers delete
            # identical jump rules, so which copy goes makes no difference.
            c.delete_rule(c.rules[index])

    def canonical(self, table: str, spec: RuleSpec) -> RuleSpec:
        return self._read(self._build(spec, table))

    # --- translation ----------------------------------------------------------------

    def _build(self, spec: RuleSpec, table: str = "filter") -> Any:
        with self._errors("cannot build rule"):
            rule = self.iptc.Rule6() if table in IPV6_TABLES else self.iptc.Rule()
            if spec.protocol:
                rule.protocol = spec.protocol
            if spec.src:
                rule.src = spec.src
            if spec.dst:
                rule.dst = spec.dst
            if spec.in_interface:
                rule.in_interface = spec.in_interface
                if table in IPV6_TABLES:
                    rule.entry.ipv6.iniface_mask = _iface_mask(spec.in_interface)
            for m in spec.matches:
                match = rule.create_match(m.name)
                for key, values in m.params:
                    match.parse(key, list(values))
            target = rule.create_target(spec.target)
            for key, values in spec.target_params:
                target.parse(key, list(values))
            return rule

    def _read(self, rule: Any) -> RuleSpec:
        target = rule.target
        name = target.name if target is not None else ""
        params: Params = ()
        if name not in PLAIN_TARGETS:
            try:
                params = _params(target.get_all_parameters())
            except Exception:  # a jump, or someone else's exotic target: name only
                params = ()
        protocol = rule.protocol
        in_interface = rule.in_interface or None
        entry = getattr(rule.entry, "ipv6", None)
        if in_interface and entry is not None:
            # ctypes reads a char array up to its first NUL: compare without the tail
            mask = bytes(entry.iniface_mask).rstrip(bytes(1))
            if mask != _iface_mask(in_interface).rstrip(bytes(1)):
                # e.g. a rule from an older vr: shown so, it differs and is rewritten
                in_interface = f"{in_interface} (mask {mask.hex()})"
        return RuleSpec(
            target=name,
            target_params=params,
            protocol=None if protocol in (None, "ip", "all") else str(protocol),
            src=_net(rule.src),
            dst=_net(rule.dst),
            in_interface=in_interface,
            matches=tuple(MatchSpec(m.name, _params(m.get_all_parameters())) for m in rule.matches),
        )
