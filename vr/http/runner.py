"""Run a WSGI application under gunicorn's arbiter, configured from code.

Used by the metadata server (port 80) and the password server (port 8080). The
application is built per worker by ``app_factory`` after fork, so nothing opened
before fork (files, sockets, caches) is shared between workers by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from gunicorn.app.base import BaseApplication

# Registers the worker's own gunicorn setting before any config is built.
from vr.http.worker import ConnectionsPerAddress
from vr.http.wsgi import WSGIApp

WORKER_CLASSES = {
    # vr's single-threaded keep-alive worker (vr/http/worker.py): one selectors
    # loop per process, so hundreds of guests asking at once wait in no backlog.
    "event": "vr.http.worker.EventWorker",
    "gthread": "gthread",
    "sync": "sync",
}


Service = Literal["metadata", "passwords"]

SERVICE_OPTIONS: dict[Service, dict[str, Any]] = {
    "metadata": {},
    "passwords": {
        # The protocol's header name has an underscore; gunicorn's own parser (sync
        # worker) drops such headers by default. DomU-Request then means the same.
        "header_map": "dangerous",
        "limit_request_line": 4094,
        "limit_request_fields": 50,
        "limit_request_field_size": 8190,
    },
}
PROC_NAMES: dict[Service, str] = {"metadata": "vr-metadata", "passwords": "vr-passwd"}


def gunicorn_options(
    service: Service,
    binds: list[str],
    workers: int,
    worker_class: str,
    root: Path,
    per_address: int | None = None,
    threads: int = 1,
) -> dict[str, Any]:
    """gunicorn settings for one of vr's services (pure).

    ``per_address``: the most connections one client address (one VM) may hold in
    one event worker; None keeps the worker's default
    (:data:`vr.http.worker.PER_ADDRESS`). ``threads`` matters to gthread only.
    """
    return {
        "bind": binds,
        "workers": workers,
        "worker_class": WORKER_CLASSES[worker_class],
        # Guests fetch a dozen URLs in a row at boot: keep their connection open.
        "keepalive": 5,
        # Enough for a boot storm of a few hundred guests (the kernel caps it at somaxconn).
        "backlog": 2048,
        "worker_connections": 1000,
        "timeout": 30,
        "graceful_timeout": 5,
        "proc_name": f"{PROC_NAMES[service]}[{root}]",
        "threads": threads,
        "accesslog": None,
        "errorlog": "-",
        "loglevel": "info",
        "preload_app": False,
        # gunicorn's control socket defaults to one path per user ($HOME/.gunicorn):
        # several appliances and both services would fight over it.
        "control_socket_disable": True,
        ConnectionsPerAddress.name: per_address,
        **SERVICE_OPTIONS[service],
    }


class _App(BaseApplication):  # type: ignore[misc]
    def __init__(self, app_factory: Callable[[], WSGIApp], options: dict[str, Any]) -> None:
        self._factory = app_factory
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            if value is not None:
                self.cfg.set(key, value)

    def load(self) -> WSGIApp:
        return self._factory()


def run(app_factory: Callable[[], WSGIApp], options: dict[str, Any]) -> None:
    """Start gunicorn in the foreground; returns when the arbiter stops (SIGTERM/SIGINT).

    ``options`` are gunicorn settings (``bind`` list, ``workers``, ``worker_class``,
    ``keepalive``, ``timeout``, ``backlog``, ``proc_name``...). ``preload_app`` stays
    off so ``app_factory`` runs in each worker.
    """
    _App(app_factory, options).run()
