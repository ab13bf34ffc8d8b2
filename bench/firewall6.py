"""What applying the IPv6 tables from a child process costs, beside references
measured in the same run, with 100 guest VMs (IPv4 and IPv6) on one network.

In a network namespace of its own, per round:

- ``vr firewall apply`` as operators and pushes run it: IPv4 tables in-process,
  IPv6 tables (nat6 redirects, filter6 bindings) in the ``vr firewall sync6`` child;
  a first apply (everything written) and a re-apply (nothing changes);
- reference: the IPv4 tables alone in-process, and all but nat6 in-process (what
  the previous version applied, without the IPv6 redirect);
- reference: ``ip6tables-legacy-restore --noflush`` of the same IPv6 rules (the
  alternative considered: no counters kept, no comparison, blind rewrite).

Run as root: ``.venv/bin/python bench/firewall6.py [--vms 100] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network
from pathlib import Path

from vr.config import Config
from vr.firewall.model import IPV6_TABLES, desired
from vr.payloads import DhcpEntry, GuestNetwork

NET = GuestNetwork(
    "eth0",
    IPv4Address("10.9.0.1"),
    IPv4Network("10.9.0.0/16"),
    True,
    router_guest_ip6=IPv6Address("fd00:9::1"),
    cidr6=IPv6Network("fd00:9::/64"),
)

# Runs inside the namespace: "split" as vr firewall apply does, "four" IPv4 only,
# "before" as the previous version did (filter6 in-process, no nat6).
SCRIPT = textwrap.dedent(
    """
    import json, sys, time
    from vr.firewall.model import IPV6_TABLES, RuleSet
    from vr.firewall.state import real_tables
    from vr.firewall.iptc_adapter import IptcTables
    from vr.firewall.sync import sync
    rs = RuleSet.from_json(open(sys.argv[2], "rb").read())
    if sys.argv[1] == "four":
        rs, tables = rs.split(IPV6_TABLES)[0], IptcTables()
    elif sys.argv[1] == "before":
        rs, tables = rs.split(frozenset({"nat6"}))[0], IptcTables()
    else:
        tables = real_tables()
    out = []
    for _ in range(2):
        t = time.perf_counter()
        sync(tables, rs)
        out.append(time.perf_counter() - t)
    print(json.dumps(out))
    """
)


def sh(*cmd: str, data: str | None = None) -> str:
    res = subprocess.run(cmd, input=data, capture_output=True, text=True, timeout=120)
    if res.returncode != 0:
        raise SystemExit(f"{cmd}: {res.stderr}")
    return res.stdout


def restore_text(text: str) -> str:
    """Our IPv6 chains as ip6tables-restore input (tables named as the kernel does)."""
    return text.replace("*nat6", "*nat").replace("*filter6", "*filter")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vms", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    vms = [
        DhcpEntry(
            f"02:00:00:00:{i // 256:02x}:{i % 256:02x}",
            IPv4Address(f"10.9.{i // 250}.{10 + i % 250}"),
            f"vm-{i}",
            ipv6_address=IPv6Address(f"fd00:9::{i + 10:x}"),
        )
        for i in range(args.vms)
    ]
    rs = desired(Config(metadata_port=8000), [NET], vms)
    four, six = rs.split(IPV6_TABLES)
    rules6 = sum(len(c.rules) for c in six.chains)
    rules4 = sum(len(c.rules) for c in four.chains)
    with tempfile.TemporaryDirectory() as d:
        state = Path(d) / "rules.json"
        state.write_bytes(rs.to_json())
        text6 = restore_text(six.render())
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
        modes = ("split", "split again", "four", "before", "restore")
        got: dict[str, list[float]] = {k: [] for k in modes}
        for r in range(args.rounds):
            ns = f"vrbfw{os.getpid() % 10000}r{r}"
            sh("ip", "netns", "add", ns)
            try:
                sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")
                for mode in ("four", "before", "split"):
                    res = subprocess.run(
                        ["ip", "netns", "exec", ns, sys.executable, "-c", SCRIPT, mode, str(state)],
                        capture_output=True, text=True, timeout=120, env=env, check=True,
                    )  # fmt: skip
                    first, again = (float(x) for x in res.stdout.strip().strip("[]").split(","))
                    if mode != "split":
                        got[mode].append(first)
                        for table in ("filter", "nat"):
                            for cmd in ("iptables-legacy", "ip6tables-legacy"):
                                sh("ip", "netns", "exec", ns, cmd, "-t", table, "-F")
                                sh("ip", "netns", "exec", ns, cmd, "-t", table, "-X")
                    else:
                        got["split"].append(first)
                        got["split again"].append(again)
                t = time.perf_counter()
                sh("ip", "netns", "exec", ns, "ip6tables-legacy-restore", "--noflush", data=text6)
                got["restore"].append(time.perf_counter() - t)
            finally:
                sh("ip", "netns", "del", ns)
    med = {k: statistics.median(v) * 1000 for k, v in got.items()}
    print(f"{args.vms} VMs: {rules4} IPv4 rules, {rules6} IPv6 rules; median of {args.rounds}")
    print(f"  vr firewall apply, IPv6 in the child   first {med['split']:7.1f} ms")
    print(f"  the same again (no change)            again {med['split again']:7.1f} ms")
    print(f"  ref: IPv4 tables alone, in-process    first {med['four']:7.1f} ms")
    print(f"  ref: previous (no nat6), in-process   first {med['before']:7.1f} ms")
    print(f"  ref: ip6tables-legacy-restore IPv6    first {med['restore']:7.1f} ms")


if __name__ == "__main__":
    main()
