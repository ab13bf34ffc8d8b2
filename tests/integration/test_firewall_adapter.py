"""python-iptables through our adapter, in a namespace of its own: atomic, legacy backend."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tests.helpers.netns import Namespace, lab

pytestmark = pytest.mark.root

SCRIPT = textwrap.dedent(
    """
    import sys
    from ipaddress import IPv4Address, IPv4Network
    from vr.config import Config
    from vr.errors import FirewallError
    from vr.firewall.iptc_adapter import IptcTables
    from vr.firewall.model import NAT_CHAIN, Chain, Rule, RuleSet, desired
    from vr.firewall.sync import sync
    from vr.payloads import GuestNetwork

    net = GuestNetwork("eth0", IPv4Address("10.1.1.1"), IPv4Network("10.1.1.0/24"), True)
    # chains only: the binding sets are created by vr.firewall.state
    good = desired(Config(), [net], [], binding_sets=False)
    if sys.argv[1] == "good":
        print(sync(IptcTables(), good).changed)
    else:
        # A second guest network plus one DNAT the kernel's parser refuses.
        net2 = GuestNetwork("eth3", IPv4Address("10.2.0.1"), IPv4Network("10.2.0.0/16"), True)
        bad = desired(Config(), [net, net2], [], binding_sets=False)
        nat = bad.chain(NAT_CHAIN)
        broken = Rule("DNAT", "vr: broken", in_interface="eth3", dports=(80,),
                      to_destination="not-an-address")
        bad = RuleSet((Chain(nat.table, nat.name, nat.hooks, (*nat.rules, broken)),
                       *[c for c in bad.chains if c.name != NAT_CHAIN]))
        try:
            sync(IptcTables(), bad)
        except FirewallError as exc:
            print(exc)
            sys.exit(3)
    """
)


@pytest.fixture
def ns() -> Iterator[Namespace]:
    with lab() as lb:
        yield lb.host("ipt")


def run(ns: Namespace, which: str) -> subprocess.CompletedProcess[str]:
    return ns.run(sys.executable, "-c", SCRIPT, which, check=False)


def save(ns: Namespace) -> str:
    dump = ns.run("iptables-legacy-save", "-c").stdout
    return "\n".join(line for line in dump.splitlines() if not line.startswith("#"))


def test_rules_land_in_the_legacy_backend_of_the_namespace(ns: Namespace) -> None:
    res = run(ns, "good")
    assert res.returncode == 0, res.stderr
    assert "-A PREROUTING -j VR-PREROUTING" in ns.run("iptables-legacy", "-t", "nat", "-S").stdout
    assert "-A INPUT -j VR-INPUT" in ns.run("iptables-legacy", "-S").stdout


def test_a_rule_the_library_refuses_is_named_and_no_table_changes(ns: Namespace) -> None:
    assert run(ns, "good").returncode == 0
    ns.run("iptables-legacy", "-A", "INPUT", "-p", "udp", "--dport", "53", "-j", "ACCEPT")
    before = save(ns)
    res = run(ns, "bad")
    assert res.returncode == 3, res.stdout + res.stderr
    assert "chain VR-PREROUTING rule 5" in res.stdout
    assert "to-destination not-an-address" in res.stdout
    assert "tables left as they were" in res.stdout
    assert save(ns) == before


def test_applying_the_same_rules_again_changes_nothing(ns: Namespace) -> None:
    assert run(ns, "good").returncode == 0
    before = save(ns)
    res = run(ns, "good")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "{'nat': [], 'filter': [], 'nat6': [], 'filter6': []}"
    assert save(ns) == before


MASK_SCRIPT = textwrap.dedent(
    """
    import sys
    from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
    from vr.config import Config
    from vr.firewall import iptc_adapter
    from vr.firewall.model import IPV6_TABLES, desired
    from vr.firewall.sync import sync
    from vr.payloads import GuestNetwork

    net = GuestNetwork("eth0", IPv4Address("10.1.1.1"), IPv4Network("10.1.1.0/24"), True,
                       router_guest_ip6=IPv6Address("fd00:1::1"),
                       cidr6=IPv6Network("fd00:1::/64"))
    _, six = desired(Config(), [net], []).split(IPV6_TABLES)
    if sys.argv[1] == "old":
        # what python-iptables 1.2.0 does by itself: a 0x01 byte per character
        iptc_adapter._iface_mask = lambda name: b"\\x01" * (len(name) + 1)
    print(sync(iptc_adapter.IptcTables(), six).changed)
    """
)


def save6(ns: Namespace) -> list[str]:
    return [line for line in ns.run("ip6tables-legacy-save").stdout.splitlines() if line[:1] != "#"]


def test_ipv6_rules_with_python_iptables_interface_mask_are_rewritten(ns: Namespace) -> None:
    def apply(which: str) -> str:
        res = ns.run(sys.executable, "-c", MASK_SCRIPT, which, check=False)
        assert res.returncode == 0, res.stderr
        return res.stdout.strip()

    assert "rewrote VR-PREROUTING" in apply("old")
    before = save6(ns)
    # the same rules as ip6tables-save prints them, but with the mask fixed
    assert apply("new") == (
        "{'nat6': ['rewrote VR-PREROUTING (4 rules)'], 'filter6': ['rewrote VR-INPUT (5 rules)']}"
    )
    assert save6(ns) == before
    assert apply("new") == "{'nat6': [], 'filter6': []}"
