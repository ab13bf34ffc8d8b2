"""Subcommand ``demo``: a whole VR in network namespaces, pushed to and read by guests."""

from __future__ import annotations

import argparse
import base64
import json
import logging
import signal
import sys
import time
from typing import Any

from vr import logs
from vr.errors import VRError

LOG = logging.getLogger(__name__)


def register(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="run a VR with two guests and a management host in network namespaces",
        description="Build network namespaces (VR with guest, control and public "
        "interfaces; two guests; a management host; an outsider), start 'vr up' in the "
        "VR, push guest network, DHCP entries, metadata, user-data and passwords over SSH "
        "with 'vr push', then show what each guest gets: curl of 169.254.169.254, the "
        "index, user-data, the password via wget as cloud-set-guest-password fetches it, "
        "and what cloud-init's CloudStack data source reads. Needs root. Everything is "
        "removed on exit unless --keep.",
    )
    p.add_argument("--keep", action="store_true", help="keep it running until Ctrl-C")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=_demo)


def _say(title: str) -> None:
    print(f"\n=== {title}", flush=True)


def _show(label: str, text: str) -> None:
    body = text if text.endswith("\n") or not text else text + "\n"
    print(f"$ {label}\n{body}", end="", flush=True)


def _demo(args: argparse.Namespace) -> int:
    from vr.demo.sandbox import METADATA_IP, VR_GUEST_IP, VR_PUBLIC_IP, sandbox

    logs.setup(None, args.verbose)

    def unwind(signum: int, frame: object) -> None:
        # A closed terminal (SIGHUP) or kill (SIGTERM) must still tear the sandbox down.
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, unwind)
    signal.signal(signal.SIGHUP, unwind)
    try:
        with sandbox() as sb:
            _say(f"network namespaces: {', '.join(sorted(sb.namespaces.values()))}")
            print(f"VR root: {sb.vr_root}")
            _say("starting 'vr up' in the VR namespace")
            sb.start_vr()
            print(sb.run("vr", sb.vr_cmd("status", "--root", str(sb.vr_root))).stdout, end="")
            _say("management host pushes over SSH (vr push, port 3922)")
            res = sb.push(sb.write_payloads(sb.initial_payloads()))
            print(res.stdout, end="")
            for g in sb.guests:
                _say(f"guest {g.name} ({g.ip}) in namespace {sb.ns(g.role)}")
                got = sb.dhcp(g.role)
                bound = [line for line in got.stderr.splitlines() if "bound to" in line]
                _show("dhclient eth0 (lease from the VR's dnsmasq)", "\n".join(bound) or got.stderr)
                answer = sb.run(g.role, ["getent", "ahostsv4", "data-server"], ok_codes=range(256))
                _show("getent ahostsv4 data-server (the VR's DNS)", answer.stdout.split("\n")[0])
                base = f"http://{METADATA_IP}/latest"
                for url in (f"{base}/instance-id", f"{base}/meta-data/", f"{base}/user-data"):
                    _show(f"curl {url}", sb.curl(g.role, url).stdout)
                pw = sb.wget_password(g.role).stdout
                _show(
                    f'wget -q -t 3 -T 20 -O - --header "DomU_Request: send_my_password" '
                    f"http://{VR_GUEST_IP}:8080",
                    pw,
                )
                seen = sb.cloud_init(g.role)
                user_data = base64.b64decode(str(seen.pop("user_data_b64")))
                seen["user_data"] = user_data.decode("utf-8", "replace")
                _show(
                    "cloud-init DataSourceCloudStack (reads, then acknowledges the password)",
                    json.dumps(seen, indent=1),
                )
                _show(
                    "wget ... send_my_password   (after cloud-init's acknowledgement)",
                    sb.wget_password(g.role).stdout,
                )
            _say("an outsider on the public side")
            url = f"http://{VR_PUBLIC_IP}/latest/instance-id"
            res = sb.run("out", ["curl", "-sS", "--max-time", "3", url], ok_codes=range(256))
            _show(f"curl --max-time 3 {url}", res.stderr or res.stdout)
            _say("vr status")
            print(sb.run("vr", sb.vr_cmd("status", "--root", str(sb.vr_root))).stdout, end="")
            if args.keep:
                _say("kept running; enter a namespace with:")
                for role, name in sorted(sb.namespaces.items()):
                    print(f"  ip netns exec {name} bash    # {role}")
                print(f"logs: {sb.vr_log} and {sb.vr_root}/var/log/cloud.log; Ctrl-C to remove")
                try:
                    while True:
                        time.sleep(3600)
                except KeyboardInterrupt:
                    pass
            _say("removing the sandbox")
    except (VRError, RuntimeError) as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print("done: nothing left behind")
    return 0
