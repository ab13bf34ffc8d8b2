"""The one door through which vr runs other programs.

argv lists only (never a shell), a timeout on every call, allowed exit codes, and
secrets kept out of logs and errors: pass them in ``data`` (stdin), never in argv,
or list argv positions in ``secret_args``. Tests replace :data:`runner` hooks via
the ``allow_subp`` fixture; by default tests may not run anything.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

from vr.errors import REDACTED, CommandError

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Result:
    cmd: list[str]
    code: int
    stdout: str
    stderr: str


def _shown(cmd: Sequence[str], secret_args: Iterable[int]) -> list[str]:
    hidden = set(secret_args)
    return [REDACTED if i in hidden else a for i, a in enumerate(cmd)]


def run(
    cmd: Sequence[str],
    *,
    timeout: float = 60.0,
    ok_codes: Iterable[int] = (0,),
    data: bytes | None = None,
    env: Mapping[str, str] | None = None,
    secret_args: Iterable[int] = (),
    cwd: str | None = None,
) -> Result:
    """Run ``cmd`` and return its result; raise :class:`CommandError` otherwise."""
    shown = _shown(cmd, secret_args)
    LOG.debug("running %s", shown)
    full_env = None if env is None else {**os.environ, **env}
    try:
        proc = subprocess.run(
            list(cmd),
            input=data,
            capture_output=True,
            timeout=timeout,
            env=full_env,
            cwd=cwd,
            check=False,
        )
    except FileNotFoundError as exc:
        raise CommandError(shown, None, reason=f"not found: {exc.filename}") from None
    except subprocess.TimeoutExpired as exc:
        raise CommandError(shown, None, reason=f"timed out after {timeout}s") from exc
    out = proc.stdout.decode("utf-8", "replace")
    err = proc.stderr.decode("utf-8", "replace")
    if proc.returncode not in set(ok_codes):
        raise CommandError(shown, proc.returncode, out, err)
    return Result(shown, proc.returncode, out, err)


PR_SET_PDEATHSIG = 1


def _die_with(parent: int) -> Callable[[], None]:
    def set_up() -> None:  # runs in the child between fork and exec
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:
            # the parent died before the request took effect: no signal will come
            os._exit(1)

    return set_up


def spawn(
    cmd: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    stdout: int | None = None,
    stderr: int | None = None,
    new_session: bool = True,
    die_with_parent: bool = False,
) -> subprocess.Popen[bytes]:
    """Start a long-running child (a supervised service); the caller owns the PID.

    ``die_with_parent``: the child gets SIGTERM when this process dies, even by
    SIGKILL (Linux parent-death signal; kept across exec), so no orphan is left.
    """
    LOG.debug("spawning %s", list(cmd))
    full_env = None if env is None else {**os.environ, **env}
    return subprocess.Popen(
        list(cmd),
        env=full_env,
        stdout=stdout,
        stderr=stderr,
        start_new_session=new_session,
        preexec_fn=_die_with(os.getpid()) if die_with_parent else None,
    )


STOP_GRACE = 1.0
"""Seconds a stopped command gets between SIGTERM and SIGKILL."""


def run_stoppable(
    cmd: Sequence[str],
    *,
    stop: Callable[[], bool],
    timeout: float = 60.0,
    ok_codes: Iterable[int] = (0,),
    poll: float = 0.05,
) -> Result | None:
    """Like :func:`run`, but ends the command as soon as ``stop()`` turns true: None then.

    For work a daemon does before its main loop (``vr up``'s firewall step) that a
    SIGTERM must be able to cut short. The command runs in its own process group and
    gets SIGTERM if this process dies; when stopped (or timed out) the group gets
    SIGTERM, then SIGKILL after :data:`STOP_GRACE`. Output goes to temporary files,
    so a chatty command never blocks on a full pipe while this process polls.
    """
    shown = list(cmd)
    LOG.debug("running %s (stoppable)", shown)
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        try:
            proc = spawn(cmd, stdout=out.fileno(), stderr=err.fileno(), die_with_parent=True)
        except FileNotFoundError as exc:
            raise CommandError(shown, None, reason=f"not found: {exc.filename}") from None
        deadline = time.monotonic() + timeout
        while proc.poll() is None:
            if stop():
                _end_group(proc)
                return None
            if time.monotonic() > deadline:
                _end_group(proc)
                raise CommandError(shown, None, reason=f"timed out after {timeout}s")
            time.sleep(poll)
        _end_group(proc)  # anything the command left running in its group
        out.seek(0)
        err.seek(0)
        stdout = out.read().decode("utf-8", "replace")
        stderr = err.read().decode("utf-8", "replace")
    if proc.returncode not in set(ok_codes):
        raise CommandError(shown, proc.returncode, stdout, stderr)
    return Result(shown, proc.returncode, stdout, stderr)


def _end_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group led by ``proc``, SIGKILL it after a grace; reap ``proc``."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(STOP_GRACE)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
