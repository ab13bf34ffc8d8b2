"""Compute the firewall from config + store, apply it, save it; the push hooks.

The rules are computed and applied under the store lock, so two pushes can never
apply an older view after a newer one. The applied rule set is saved to
``Paths.firewall_state`` (what ``vr firewall restore`` re-applies at boot). While
an apply is in flight, or after one failed, ``Paths.firewall_pending`` exists: the
next push (or ``restore``) then recomputes instead of trusting the saved state.

The firewall is *managed* on a root once ``vr firewall apply`` or ``restore`` ran
there (state or pending file present). Before that, pushes only update the store;
this keeps a bare data root (tests, a build chroot) from programming the host.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vr import atomic, config, store
from vr.config import Config
from vr.errors import FirewallError, PayloadError
from vr.firewall import ipsets, model
from vr.firewall.sync import RuleCounter, SyncReport, Tables, counters, sync
from vr.paths import Paths
from vr.payloads import GuestNetwork, Payload
from vr.store import ApplyResult, Store

LOG = logging.getLogger(__name__)

TablesFactory = Callable[[], Tables]
DeviceExists = Callable[[str], bool]


def device_exists(name: str) -> bool:
    """Whether interface ``name`` exists in this process's network namespace."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


def real_tables() -> Tables:
    from vr.firewall.child6 import ChildIpv6
    from vr.firewall.iptc_adapter import IptcTables

    return IptcTables(ipv6=ChildIpv6())


def compute(paths: Paths, cfg: Config) -> model.RuleSet:
    """The rule set for ``cfg`` and the store (read with the lock held)."""
    return model.desired(cfg, store.read_networks(paths, removals=True), store.read_dhcp(paths))


def compute_sets(paths: Paths, cfg: Config) -> tuple[ipsets.IpSet, ...]:
    """The binding sets for ``cfg`` and the store (read with the lock held)."""
    nets = model.merge_networks(cfg.guest_networks, store.read_networks(paths, removals=True))
    return ipsets.desired(nets, model.bindings(store.read_dhcp(paths)))


def managed(paths: Paths) -> bool:
    return paths.firewall_state.exists() or paths.firewall_pending.exists()


def load_saved(paths: Paths) -> model.RuleSet | None:
    try:
        data = paths.firewall_state.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise FirewallError(f"{paths.firewall_state}: cannot read: {exc.strerror}") from None
    return model.RuleSet.from_json(data, str(paths.firewall_state))


def apply(paths: Paths, tables: Tables, exists: DeviceExists = device_exists) -> SyncReport:
    """Compute from config + store and apply (``vr firewall apply``, the push hook)."""
    with Store(paths).locked():
        cfg = config.load(paths)
        return apply_locked(paths, tables, compute(paths, cfg), exists, compute_sets(paths, cfg))


def restore(paths: Paths, tables: Tables, exists: DeviceExists = device_exists) -> SyncReport:
    """Re-apply the saved rule set (boot); recompute when none is saved or it is stale."""
    with Store(paths).locked():
        saved = load_saved(paths)
        cfg = config.load(paths)
        # The sets' members are not saved: the kernel lost them with the reboot and the
        # store holds every binding.
        sets = compute_sets(paths, cfg)
        if saved is None or paths.firewall_pending.exists():
            LOG.info(
                "firewall: %s; computing from %s and the store",
                "no saved state" if saved is None else "saved state may be stale",
                paths.config,
            )
            return apply_locked(paths, tables, compute(paths, cfg), exists, sets)
        return apply_locked(paths, tables, saved, exists, sets)


def apply_locked(
    paths: Paths,
    tables: Tables,
    ruleset: model.RuleSet,
    exists: DeviceExists = device_exists,
    sets: Sequence[ipsets.IpSet] = (),
) -> SyncReport:
    """Apply ``sets`` and ``ruleset`` and save the rules; the caller holds the store lock.

    Sets are created and filled before the rules that reference them are committed,
    and sets no rule needs any more are destroyed after.
    """
    for device in _devices(ruleset):
        if not exists(device):
            # Rules on an absent interface match nothing until it appears; refusing
            # the whole set would leave every other guest and port unprotected.
            LOG.warning("firewall: interface %s does not exist (yet); rules kept", device)
    atomic.atomic_write(paths.firewall_pending, b"", 0o600)
    driver = tables.sets()
    set_plan = ipsets.plan(driver.live(), sets)
    driver.run(set_plan.before)
    report = sync(tables, ruleset)
    driver.run(set_plan.after)
    if not set_plan.empty:
        report.changed.setdefault("ipset", []).extend(set_plan.describe())
    atomic.atomic_write(paths.firewall_state, ruleset.to_json(), 0o600)
    paths.firewall_pending.unlink(missing_ok=True)
    return report


def _devices(ruleset: model.RuleSet) -> list[str]:
    return sorted(
        {
            r.in_interface
            for c in ruleset.chains
            for r in c.rules
            if r.in_interface and r.in_interface != "lo"
        }
    )


def live_counters(tables: Tables, ruleset: model.RuleSet | None = None) -> list[RuleCounter]:
    names = ruleset.tables() if ruleset else list(model.TABLE_ORDER)
    return counters(tables, names)


# --- the push path ------------------------------------------------------------------


def validate_push(
    paths: Paths, cfg: Config, payloads: Sequence[Payload], exists: DeviceExists = device_exists
) -> None:
    """Refuse guest networks the VR cannot firewall, before anything is stored.

    Raises :class:`PayloadError` naming the device and what was expected.
    """
    for n in payloads:
        if not isinstance(n, GuestNetwork) or not n.add:
            continue
        if n.device == cfg.control_device or n.device in cfg.public_devices:
            raise PayloadError(
                "device",
                n.device,
                f"a guest interface, not the control ({cfg.control_device}) or public "
                f"({', '.join(cfg.public_devices)}) interface",
            )
        if managed(paths) and not exists(n.device):
            raise PayloadError("device", n.device, "an interface that exists on this router")


@dataclass(frozen=True)
class FirewallHooks:
    """The firewall's part of a push (:class:`vr.applier.PushHooks`), run under the
    push's store lock with the config it read."""

    paths: Paths
    tables_factory: TablesFactory = real_tables
    exists: DeviceExists = device_exists

    def before_commit(self, cfg: Config, payloads: Sequence[Payload]) -> None:
        validate_push(self.paths, cfg, payloads, self.exists)

    def after_commit(self, cfg: Config, result: ApplyResult) -> None:
        changed = result.networks_changed or result.dhcp_changed
        if not managed(self.paths):
            if changed:
                LOG.info("firewall not set up on %s yet; 'vr firewall apply' will", self.paths.root)
            return
        if changed and self._change_bindings(cfg, result):
            return
        if changed:
            report = self._apply(cfg)
            LOG.info("firewall re-applied after push: %s", summary(report))
        elif self.paths.firewall_pending.exists():
            # An earlier apply failed: retry, but do not fail an unrelated push.
            try:
                self._apply(cfg)
            except FirewallError as exc:
                LOG.error("firewall still not applied (retry after push failed): %s", exc)

    def _apply(self, cfg: Config) -> SyncReport:
        ruleset = compute(self.paths, cfg)
        sets = compute_sets(self.paths, cfg)
        return apply_locked(self.paths, self.tables_factory(), ruleset, self.exists, sets)

    def _change_bindings(self, cfg: Config, result: ApplyResult) -> bool:
        """Apply a push that only changed DHCP entries as set changes, without reading
        every entry or touching a rule. False when it needs the full apply: networks
        changed, an earlier apply did not finish, or a binding lives in rules (outside
        every set-capable network, or IPv6 bindings on an IPv6 guest network)."""
        if result.networks_changed or self.paths.firewall_pending.exists():
            return False
        pushed = store.read_networks(self.paths, removals=True)
        nets = model.merge_networks(cfg.guest_networks, pushed)
        if any(n.cidr6 is not None for n in nets):
            return False
        if not all(ipsets.in_sets(nets, e.ipv4_address) for _, e in result.dhcp_ops):
            return False
        lines = [
            op.line() for add, e in result.dhcp_ops for op in ipsets.entry_ops(nets, e, add=add)
        ]
        # Not durable on purpose: the kernel's sets do not outlive a crash either, and
        # boot recomputes them. A killed push leaves the marker: the next one recomputes.
        self.paths.firewall_pending.touch(mode=0o600)
        self.tables_factory().sets().run(lines)
        self.paths.firewall_pending.unlink()
        LOG.info("firewall: %d binding set changes after push, no rule changed", len(lines))
        return True


def summary(report: SyncReport) -> str:
    parts = [f"{t}: {', '.join(c)}" for t, c in report.changed.items() if c]
    return "; ".join(parts) or "no change"
