"""Benchmark: failover gap of the redundant router pair, and ack propagation.

Run as root from the repository::

    .venv/bin/python bench/pair.py [--failovers 20] [--acks 20]

Inside namespaces it creates and always removes (tests/helpers/pair_lab.py: two
routers running ``vr up`` with real keepalived, two guests, a management host):

* **failover gap**: a guest asks ``169.254.169.254/latest/instance-id`` in a loop
  (new connection each time, 0.5 s timeout, 50 ms apart) while the MASTER's every
  process (``vr up``, keepalived, services) is stopped and SIGKILLed at once; the gap
  is the time between the last answer before the kill and the first after it. The
  killed router is started again (it comes back as BACKUP) before the next round.
  Measured with our VRRP interval (``pair_advert_ms`` 500, VRRP version 3) and, as
  the reference, with CloudStack's ``advert_int`` 1 s. The issue's bound is 3 s.
* **ack propagation**: a password pushed to both routers is fetched and
  acknowledged through the MASTER; the time from the guest's acknowledgement to the
  BACKUP's passwords file no longer holding it (polled every 2 ms). CloudStack has
  no reference: its BACKUP never holds a password (it drops it, vr §4.6).

Also prints wrong answers (any HTTP answer other than the guest's own instance-id).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.helpers.pair_lab import (  # noqa: E402
    GUESTS,
    PairLab,
    answers_after,
    first_answers,
    gap_around,
    pair_lab,
    stop_loop,
)
from tests.helpers.wait import wait_for  # noqa: E402
from vr.paths import Paths  # noqa: E402
from vr.store import read_passwords  # noqa: E402

G1 = GUESTS["g1"]


def setup(pl: PairLab) -> None:
    for name in pl.routers:
        pl.start(name)
    for name in pl.routers:
        res = pl.push(name, pl.network_payload(name))
        if res.returncode:
            raise SystemExit(f"push to {name} failed: {res.stderr}")
    pl.push_both(
        {
            "vm_ip_address": G1["ip"],
            "vm_metadata": [["metadata", "instance-id", G1["id"]]],
            "type": "vmdata",
        }
    )
    wait_for(pl.master, "one MASTER", 30)
    wait_for(lambda: pl.in_sync("ra", "rb"), "in sync", 30)


def failovers(pl: PairLab, n: int) -> tuple[list[float], int]:
    gaps: list[float] = []
    wrong = 0
    for i in range(n):
        master = wait_for(pl.master, "one MASTER", 30)
        survivor = "rb" if master == "ra" else "ra"
        loop = pl.loop("g1")
        recs = first_answers(loop)
        killed = pl.kill(master)
        try:
            recs += answers_after(loop, killed)
            wait_for(lambda s=survivor: pl.master() == s, f"{survivor} MASTER", 30)  # type: ignore[misc]
        finally:
            recs += stop_loop(loop)
        wrong += sum(1 for r in recs if r[1] is not None and (r[1], r[2]) != (200, G1["id"]))
        gaps.append(gap_around(recs, killed, lambda r: r[1] == 200))
        print(f"  failover {i + 1}/{n}: {master} killed, gap {gaps[-1]:.2f}s", flush=True)
        pl.start(master)
        wait_for(lambda m=master: pl.vrrp(m) == "BACKUP", f"{master} BACKUP", 30)  # type: ignore[misc]
        wait_for(lambda: pl.in_sync("ra", "rb"), "in sync", 30)
    return gaps, wrong


def acks(pl: PairLab, n: int) -> list[float]:
    out: list[float] = []
    for _ in range(n):
        master = wait_for(pl.master, "one MASTER", 30)
        backup = "rb" if master == "ra" else "ra"
        pl.push_both({"ip_address": G1["ip"], "password": secrets.token_urlsafe(12),
                      "type": "vmpassword"})  # fmt: skip
        wait_for(lambda: pl.in_sync("ra", "rb"), "in sync", 10)
        if pl.ask_password("g1") in ("", "saved_password", "bad_request"):
            raise SystemExit("the guest got no password")
        pl.ask_password("g1", request="saved_password")
        acked = time.monotonic()
        root = Paths(pl.routers[backup].root)
        wait_for(lambda r=root: G1["ip"] not in read_passwords(r), "ack on the BACKUP", 10,  # type: ignore[misc]
                 poll=0.002)  # fmt: skip
        out.append(time.monotonic() - acked)
    return out


def line(name: str, xs: list[float]) -> str:
    return (
        f"{name:<34} min {min(xs):6.2f}  median {statistics.median(xs):6.2f}  "
        f"max {max(xs):6.2f}  (n={len(xs)})"
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--failovers", type=int, default=20)
    ap.add_argument("--acks", type=int, default=20)
    ap.add_argument(
        "--reference-failovers", type=int, default=20, help="rounds at CloudStack's 1 s"
    )
    args = ap.parse_args()
    results: dict[str, tuple[list[float], int]] = {}
    ack_times: list[float] = []
    for label, advert, rounds in (
        ("vr (advert 500 ms, VRRPv3)", 500, args.failovers),
        ("reference (advert 1 s, CloudStack)", 1000, args.reference_failovers),
    ):
        if rounds <= 0:
            continue
        print(f"{label}: {rounds} failovers", flush=True)
        with pair_lab(advert_ms=advert) as pl:
            setup(pl)
            results[label] = failovers(pl, rounds)
            if advert == 500 and args.acks > 0:
                ack_times = acks(pl, args.acks)
    print()
    print("failover gap, seconds without an answer (issue's bound: 3 s)")
    for label, (gaps, wrong) in results.items():
        print("  " + line(label, gaps) + f"  wrong answers {wrong}")
    if ack_times:
        print("ack propagation to the BACKUP, ms")
        ms = [t * 1000 for t in ack_times]
        print("  " + line("vr (sync over SSH, 50 ms poll)", ms) + "  (CloudStack: none)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
