"""A VR namespace running one vr service for a guest namespace on one link.

Shared by the metadata and password server tests: the lab, the service started
with ``python -m vr`` and awaited on its port, and where it logs.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import netns
from vr.paths import Paths


@dataclass
class ServiceLab:
    lab: netns.Lab
    vr: netns.Namespace
    guest: netns.Namespace
    paths: Paths
    log: Path
    server: subprocess.Popen[bytes]


def start_service(
    lab: netns.Lab,
    vr: netns.Namespace,
    paths: Paths,
    log: Path,
    argv: Sequence[str],
    listen: tuple[str, int],
) -> subprocess.Popen[bytes]:
    """``python -m vr <argv> --root <root>`` in ``vr``, logging to ``log`` (appended),
    once it accepts connections on ``listen`` (host, port)."""
    cmd = [sys.executable, "-m", "vr", *argv, "--root", str(paths.root)]
    with open(log, "ab") as out:
        proc = lab.spawn(vr, cmd, stdout=out, stderr=subprocess.STDOUT)
    host, port = listen
    wait = f"from tests.helpers.procs import wait_port; wait_port({host!r}, {port})"
    vr.run(sys.executable, "-c", wait, timeout=30)
    return proc


@contextlib.contextmanager
def guest_link(
    vr_ip: str, guest_ips: Sequence[str]
) -> Iterator[tuple[netns.Lab, netns.Namespace, netns.Namespace]]:
    """A VR and a guest joined on eth0 (a /24); the guest holds every address of
    ``guest_ips`` and routes through the VR."""
    with netns.lab() as lab:
        vr = lab.host("vr")
        guest = lab.host("guest")
        lab.link(vr, "eth0", f"{vr_ip}/24", guest, "eth0", f"{guest_ips[0]}/24")
        for ip in guest_ips[1:]:
            guest.run("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
        guest.run("ip", "route", "add", "default", "via", vr_ip)
        yield lab, vr, guest
