"""Network namespaces for root tests: build hosts and links, always tear them down.

Names are unique per test run (pid + counter) so concurrent runs never collide;
interface names stay within Linux's 15 characters.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

_counter = itertools.count()


def unique(prefix: str) -> str:
    """A short name unique to this process, e.g. ``vrg41c3``."""
    return f"{prefix}{os.getpid() % 10000:x}{next(_counter):x}"[:15]


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(cmd), check=check, capture_output=True, text=True, timeout=timeout)


@dataclass
class Namespace:
    name: str

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
        )

    def run_bytes(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd], capture_output=True, timeout=timeout
        )

    def popen(self, cmd: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], **kw)  # type: ignore[call-overload]


@dataclass
class Lab:
    """A set of namespaces joined by veth pairs; :meth:`close` removes everything."""

    namespaces: list[Namespace] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def host(self, role: str) -> Namespace:
        ns = Namespace(unique(f"vr{role[:3]}"))
        sh("ip", "netns", "add", ns.name)
        self.namespaces.append(ns)
        ns.run("ip", "link", "set", "lo", "up")
        return ns

    def link(
        self,
        a: Namespace,
        a_dev: str,
        a_addr: str | None,
        b: Namespace,
        b_dev: str,
        b_addr: str | None,
        a_mac: str | None = None,
        b_mac: str | None = None,
    ) -> None:
        """Connect ``a`` and ``b`` with a veth pair; addresses as ``10.1.1.1/24``."""
        ta, tb = unique("va"), unique("vb")
        sh("ip", "link", "add", ta, "type", "veth", "peer", "name", tb)
        sh("ip", "link", "set", ta, "netns", a.name)
        sh("ip", "link", "set", tb, "netns", b.name)
        for ns, tmp, dev, addr, mac in (
            (a, ta, a_dev, a_addr, a_mac),
            (b, tb, b_dev, b_addr, b_mac),
        ):
            ns.run("ip", "link", "set", tmp, "name", dev)
            if mac:
                ns.run("ip", "link", "set", dev, "address", mac)
            if addr:
                ns.run("ip", "addr", "add", addr, "dev", dev)
            ns.run("ip", "link", "set", dev, "up")

    def spawn(self, ns: Namespace, cmd: Sequence[str], **kw: object) -> subprocess.Popen[bytes]:
        p = ns.popen(cmd, start_new_session=True, **kw)
        self.procs.append(p)
        return p

    def close(self) -> None:
        for p in self.procs:
            stop(p)
        for ns in reversed(self.namespaces):
            # kill anything still inside (only our own namespaces)
            pids = sh("ip", "netns", "pids", ns.name, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), 9)
            sh("ip", "netns", "del", ns.name, check=False)
        self.namespaces.clear()


def stop(p: subprocess.Popen[bytes], timeout: float = 5) -> None:
    """Stop a process we started (SIGTERM to its group, then SIGKILL)."""
    if p.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(p.pid, 15)
    try:
        p.wait(timeout)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, 9)
        p.wait(timeout)


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    lb = Lab()
    try:
        yield lb
    finally:
        lb.close()
