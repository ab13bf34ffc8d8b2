"""The metadata and password applications of ``vr hypervisor``: the router's own, fed
by the port-based identity (:mod:`vr.http.port_identity`) instead of the source IP.

Everything a guest sees is the router's code: the same views (CloudStack ``/latest``,
EC2, DigitalOcean ``/metadata/v1``), the same IMDSv2 tokens, the same ``DomU_Request``
password protocol and store; only the question "which VM is this?" differs, and each
tenant network is its own store root.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from ipaddress import IPv4Address
from typing import Any

from vr.http.port_identity import Network, PortResolver
from vr.http.wsgi import StartResponse
from vr.hypervisor.ports import PortTable
from vr.metadata.views import VmView
from vr.metadata.vmcache import VmCache
from vr.passwords.app import STORE_LOCK_TIMEOUT, PasswordApp
from vr.paths import Paths
from vr.store import Store

LOG = logging.getLogger(__name__)


def resolver_for(hv: Paths, networks: Sequence[Network]) -> PortResolver:
    from vr.hypervisor.controller import ports_file

    return PortResolver(PortTable(ports_file(hv)), networks)


class HypervisorVms:
    """The metadata application's VM lookup on a hypervisor: one VM cache per network."""

    def __init__(self, resolver: PortResolver) -> None:
        self.resolver = resolver
        self.caches = {n.name: VmCache(n.paths) for n in resolver.networks}

    def view_for_address(self, remote_addr: str) -> VmView | None:
        caller = self.resolver.resolve(remote_addr)
        if caller is None:
            return None
        return self.caches[caller.network.name].view(caller.ip)

    def warm(self) -> int:
        return sum(c.warm() for c in self.caches.values())


class HypervisorPasswords:
    """``DomU_Request`` on a hypervisor: each network's :class:`PasswordApp`, chosen by
    the caller's port. Saves (POST) are refused: on a hypervisor passwords arrive only
    by push (``vm_password``), and no VM address is the hypervisor's own."""

    def __init__(self, resolver: PortResolver) -> None:
        self.resolver = resolver
        self.apps = {
            n.name: PasswordApp(
                n.paths,
                Store(n.paths, lock_timeout=STORE_LOCK_TIMEOUT),
                is_own=lambda ip: False,
                identify=self._identify_in(n.name),
            )
            for n in resolver.networks
        }
        # answers a caller of no known VM as the router does (saved_password)
        self.nobody = next(iter(self.apps.values()))

    def _identify_in(self, name: str) -> Callable[[str], IPv4Address | None]:
        def identify(caller: str) -> IPv4Address | None:
            found = self.resolver.resolve(caller)
            return found.ip if found is not None and found.network.name == name else None

        return identify

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        caller = environ.get("REMOTE_ADDR", "")
        try:
            found = self.resolver.resolve(caller)
        except Exception:
            LOG.exception("password request from %s: identity lookup failed", caller)
            body = b"internal_error"
            start_response(
                "503 Service Unavailable",
                [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))],
            )
            return [body]
        app = self.apps[found.network.name] if found is not None else self.nobody
        return app(environ, start_response)


def networks_from(specs: Sequence[tuple[str, Paths]], hv: Paths) -> list[Network]:
    """The tenant networks: the ``--network NAME=ROOT`` given, else the hypervisor's own
    root as the one network ``default``."""
    return [Network(n, p) for n, p in specs] if specs else [Network("default", hv)]
