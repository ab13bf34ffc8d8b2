"""Health of the appliance for the management server's router checks (pure).

From what ``vr status`` collects (the supervisor's status file with every port
probed again): ``ready`` when ``vr up`` runs and every service answers,
``degraded`` when some do not (which, since when), ``down`` when ``vr up`` does not
run or no service answers. The same verdict is the JSON of ``GET /health`` on the
metrics port and the exit status of ``vr status`` (0, 1, 2: Nagios' OK, WARNING,
CRITICAL, which monitoring systems read as they are).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

READY, DEGRADED, DOWN = "ready", "degraded", "down"
EXIT = {READY: 0, DEGRADED: 1, DOWN: 2}
HTTP = {READY: 200, DEGRADED: 503, DOWN: 503}


@dataclass(frozen=True)
class ServiceDown:
    name: str
    since: float | None
    """Wall-clock time the service stopped answering (None: not known)."""
    restarts: int


@dataclass(frozen=True)
class Health:
    state: str
    reason: str
    down: tuple[ServiceDown, ...] = ()

    @property
    def exit_code(self) -> int:
        return EXIT[self.state]

    @property
    def http_status(self) -> int:
        return HTTP[self.state]

    def to_dict(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "reason": self.reason,
            "degraded": [
                {"service": d.name, "since": d.since, "restarts": d.restarts} for d in self.down
            ],
        }

    def line(self) -> str:
        """One line for ``vr status``."""
        return f"health: {self.state}: {self.reason}"


def _when(t: float | None) -> str:
    return "?" if t is None else time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def assess(supervisor: dict[str, Any]) -> Health:
    """The verdict on a ``collect_status()["supervisor"]`` dict (``up`` re-probed)."""
    if supervisor.get("died"):
        return Health(DOWN, f"vr up (pid {supervisor.get('pid')}) ended without stopping")
    if supervisor.get("stopped"):
        return Health(DOWN, "vr up is not running")
    services: dict[str, dict[str, Any]] = supervisor.get("services", {})
    if not services:
        return Health(DOWN, "vr up runs no service yet")
    down = tuple(
        ServiceDown(
            name,
            svc.get("down_since", supervisor.get("started")),
            int(svc.get("restarts", 0)),
        )
        for name, svc in sorted(services.items())
        if not svc.get("up")
    )
    if not down:
        return Health(READY, f"{len(services)} services answer")
    listed = ", ".join(f"{d.name} down since {_when(d.since)}" for d in down)
    if len(down) == len(services):
        return Health(DOWN, f"no service answers ({listed})", down)
    return Health(DEGRADED, listed, down)
