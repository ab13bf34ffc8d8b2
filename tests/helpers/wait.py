"""Waiting for an event in tests: poll a condition until it holds, with a deadline.

A test that waits for something (a daemon ready, a lease written, a counter moved)
polls for it here rather than sleeping for a guessed time; the deadline is generous
because a loaded CI machine is slow, and it only costs time when the test fails.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

DEADLINE = 60.0
"""Seconds to wait when the caller names no deadline."""


def wait_for(cond: Callable[[], T], what: str, timeout: float = DEADLINE, poll: float = 0.05) -> T:
    """Poll ``cond()`` until it returns something true, and return that.

    At the deadline, fail naming ``what`` and the last (false) value ``cond()`` gave;
    a false value carries no secret. An exception from ``cond()`` propagates at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(
                f"timed out after {timeout}s waiting for {what}; last value seen: {value!r}"
            )
        time.sleep(poll)
