"""The subprocess guard itself: it must reach the test through vr's own boundaries."""

from __future__ import annotations

import pytest

from tests.conftest import SubpNotAllowed
from vr import subp


def test_the_guard_is_not_swallowed_by_an_except_exception_boundary() -> None:
    def boundary() -> str:
        try:
            subp.run(["true"])
        except Exception:
            return "swallowed"
        return "ran"

    with pytest.raises(SubpNotAllowed):
        boundary()
