"""Run ``vr ARGS...`` in this process, held just before its K-th rename.

    python -m tests.helpers.held_rename K FD ARGS...

Counts ``os.replace`` and ``os.rename`` calls (every step that makes a change
visible: a commit's journal, then each of its renames). Before the K-th, writes
``held`` to file descriptor FD and waits for a signal, so a test can SIGKILL it at
an exact point inside an apply. A run that ends without reaching K writes
``done <renames>``. K = 0 never holds (counts the renames of a whole run). No hook
in the product code: only ``os`` is patched, in this child process.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from typing import Any


def main(argv: list[str]) -> int:
    step, fd = int(argv[0]), int(argv[1])
    count = 0

    def held(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            nonlocal count
            count += 1
            if count == step:
                os.write(fd, b"held\n")
                while True:
                    signal.pause()
            return real(*args, **kwargs)

        return call

    os.replace = held(os.replace)  # type: ignore[assignment]
    os.rename = held(os.rename)  # type: ignore[assignment]
    from vr.cli import main as vr_main

    code = vr_main(argv[2:])
    os.write(fd, f"done {count}\n".encode())
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
