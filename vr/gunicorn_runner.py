"""Run a WSGI application under gunicorn's arbiter, configured from code.

Used by the metadata server (port 80) and the password server (port 8080). The
application is built per worker by ``app_factory`` after fork, so nothing opened
before fork (files, sockets, caches) is shared between workers by accident.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gunicorn.app.base import BaseApplication

WSGIApp = Callable[..., Any]


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
