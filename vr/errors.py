"""The one exception hierarchy of vr.

Every error keeps the offending value and says what was expected, so the message
alone is enough to act on. Values are shown with ``%r`` and truncated; callers must
never pass a secret as ``value`` (use ``value=REDACTED``).
"""

from __future__ import annotations

from collections.abc import Sequence

MAX_SHOWN = 80
REDACTED = "<redacted>"


def shorten(value: object, limit: int = MAX_SHOWN) -> str:
    """Return ``repr(value)`` cut to ``limit`` characters with a marker."""
    text = value if value is REDACTED else repr(value)
    assert isinstance(text, str)
    if len(text) > limit:
        return text[:limit] + f"...({len(text)} chars)"
    return text


class VRError(Exception):
    """Base class: anything vr raises on purpose."""


class PayloadError(VRError):
    """A pushed payload is not what the management server may send."""

    def __init__(
        self,
        field: str,
        value: object,
        expected: str,
        vm: str | None = None,
        *,
        subject: str | None = None,
    ) -> None:
        self.vm = vm
        self.field = field
        self.value = value
        self.expected = expected
        # ``subject`` names what the payload is about when it is not a VM (a network).
        self.subject = f"VM {vm}" if vm else subject
        where = f"{self.subject}: " if self.subject else ""
        super().__init__(f"{where}{field}={shorten(value)}: expected {expected}")


class StoreError(VRError):
    """The store could not apply a change; nothing visible was changed."""


class DiskFullError(StoreError):
    """No space left while preparing a change; nothing visible was changed.

    The message always starts with ``disk full:`` so operators can grep for it.
    """


class LockTimeout(StoreError):
    """The store lock was not obtained in time."""


class CommandError(VRError):
    """A subprocess failed: carries the command, exit code and output."""

    def __init__(
        self,
        cmd: Sequence[str],
        code: int | None,
        stdout: str = "",
        stderr: str = "",
        reason: str = "",
    ) -> None:
        self.cmd = list(cmd)
        self.code = code
        self.stdout = stdout
        self.stderr = stderr
        self.reason = reason
        what = reason or f"exit code {code}"
        tail = stderr.strip().splitlines()[-1:] if stderr else []
        super().__init__(
            f"command {self.cmd[0]!r} failed: {what}" + (f": {tail[0]}" if tail else "")
        )


class FirewallError(VRError):
    """A rule could not be built or applied; the tables are as they were."""


class ConfigError(VRError):
    """The appliance's own configuration is wrong."""


class BootError(VRError):
    """CloudStack's boot arguments (``/var/cache/cloud/cmdline``) cannot configure the
    router: names the key, its value and what was expected; nothing was changed."""

    def __init__(self, key: str, value: object, expected: str) -> None:
        self.key = key
        self.value = value
        self.expected = expected
        super().__init__(f"boot argument {key}={shorten(value)}: expected {expected}")
