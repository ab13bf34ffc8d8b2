"""Guards for every test: no subprocess through vr's door unless a test opts in.

Root tests (``tests/integration``) build their own network namespaces with
:mod:`tests.helpers.netns` and always remove them, also when they fail.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from vr import subp
from vr.paths import Paths

REPO = Path(__file__).resolve().parent.parent
# Subprocesses started by tests (``python -m vr ...``) import this checkout.
os.environ["PYTHONPATH"] = os.pathsep.join(
    p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
)


class SubpNotAllowed(BaseException):
    """Raised by the guard; a BaseException, as cloud-init's is, so that no
    ``except Exception`` boundary in vr (a push, an HTTP handler) can swallow it
    and let a test pass that ran a command on the host."""


@pytest.fixture(autouse=True)
def disable_subp(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make vr.subp raise unless the test uses the ``allow_subp`` fixture."""
    if "allow_subp" in request.fixturenames:
        return

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise SubpNotAllowed(f"test ran a subprocess through vr.subp: {args!r}")

    monkeypatch.setattr(subp, "run", refuse)
    monkeypatch.setattr(subp, "spawn", refuse)
    monkeypatch.setattr(subp, "run_stoppable", refuse)


@pytest.fixture
def allow_subp() -> None:
    """Opt in to real subprocesses through vr.subp."""


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    p = Paths(tmp_path / "root")
    p.ensure()
    return p


STRICT_ENV = "VR_NO_SKIPS"
"""Set by CI (``.ci/run``): a skipped test is a failing promise, so any skip fails."""


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if os.environ.get(STRICT_ENV) and report.skipped:
        report.outcome = "failed"
        report.longrepr = f"skipped under {STRICT_ENV}=1 (CI must run every test): " + str(
            report.longrepr
        )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (network namespaces, iptables)")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def root_paths(tmp_path: Path) -> Iterator[Paths]:
    p = Paths(tmp_path / "vrroot")
    p.ensure()
    yield p
