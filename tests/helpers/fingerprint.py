"""Compare secrets in tests without ever printing them.

pytest shows both sides of a failed ``==`` and the arguments of calls inside an
``assert``; comparing fingerprints computed *before* the assert keeps passwords and
tokens out of test output even when a test fails.
"""

from __future__ import annotations

import hashlib


def fp(value: str | bytes) -> str:
    """A short stable digest of ``value`` (str is taken as UTF-8)."""
    data = value.encode() if isinstance(value, str) else value
    return hashlib.sha256(data).hexdigest()[:16]
