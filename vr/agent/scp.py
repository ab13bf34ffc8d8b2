"""The receiving side of the legacy SCP protocol (``scp -t``), confined to the cache folder.

Protocol (as spoken by OpenSSH ``scp -O`` and Java SCP clients): the sink sends
``\\0`` when ready; the source sends ``C<mode> <size> <name>\\n``, the sink answers
``\\0`` (go) or ``\\x01scp: <reason>\\n`` (skip this file), then ``size`` bytes
follow plus one status byte, and the sink acknowledges. ``T`` (times) lines are
acknowledged and ignored; directories (``D``) are refused. Trilead's SCPClient
(CloudStack's) sends ``scp -t -d <dir>``, one file, then ``E`` and closes at once.

Each file is written under a temp name and renamed only once complete, so a
transfer that breaks off leaves nothing under the real name.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vr import atomic
from vr.cloudstack import check_name
from vr.errors import PayloadError, VRError, shorten

LOG = logging.getLogger(__name__)

MAX_LINE = 1024
CHUNK = 64 * 1024
C_LINE = re.compile(rb"C([0-7]{4}) ([0-9]{1,19}) ([^\n]+)")
OK, ERROR, FATAL = b"\0", b"\x01", b"\x02"
UPLOAD_MODE = 0o600
"""Whatever mode the client sends: a vm_password.json.* must not be readable by others."""


class Stream(Protocol):
    """What the sink needs from an SSH channel."""

    def recv(self, nbytes: int) -> bytes: ...

    def sendall(self, data: bytes) -> None: ...


class ProtocolBroken(Exception):
    """The peer went away or spoke something else; the session ends."""


@dataclass
class SinkResult:
    received: list[str]
    refused: list[str]

    @property
    def exit_code(self) -> int:
        return 0 if not self.refused else 1


class _Reader:
    def __init__(self, stream: Stream, on_data: Callable[[], None]) -> None:
        self.stream = stream
        self.buf = b""
        self.on_data = on_data

    def _fill(self) -> bool:
        chunk = self.stream.recv(CHUNK)
        if not chunk:
            return False
        self.on_data()
        self.buf += chunk
        return True

    def line(self) -> bytes | None:
        """One line without its newline; None at a clean end of input."""
        while b"\n" not in self.buf:
            if len(self.buf) > MAX_LINE:
                raise ProtocolBroken(f"control line longer than {MAX_LINE} bytes")
            if not self._fill():
                if self.buf:
                    raise ProtocolBroken("input ended inside a control line")
                return None
        line, _, self.buf = self.buf.partition(b"\n")
        return line

    def status(self) -> str | None:
        """The source's status byte after a file: None for ``\\0``, else its error line."""
        if not self.buf and not self._fill():
            raise ProtocolBroken("input ended before the status byte")
        if self.buf[:1] == OK:
            self.buf = self.buf[1:]
            return None
        line = self.line()
        return (line or b"").decode("utf-8", "replace")[1:].strip()

    def exact(self, n: int, sink: Callable[[bytes], None]) -> None:
        while n > 0:
            if not self.buf and not self._fill():
                raise ProtocolBroken(f"input ended with {n} bytes of the file still to come")
            piece, self.buf = self.buf[:n], self.buf[n:]
            sink(piece)
            n -= len(piece)


class ScpSink:
    """Receive files into ``cache``; ``name`` fixes the file name (``scp f host:/dir/name``)."""

    def __init__(
        self,
        stream: Stream,
        cache: Path,
        name: str | None,
        max_bytes: int,
        peer: str = "?",
        on_data: Callable[[], None] = lambda: None,
    ) -> None:
        self.stream = stream
        self.cache = cache
        self.name = name
        self.max_bytes = max_bytes
        self.peer = peer
        self.reader = _Reader(stream, on_data)
        self.result = SinkResult([], [])

    def refuse_target(self, reason: str) -> SinkResult:
        """Answer the first handshake with an error: the source gives up, nothing is written."""
        LOG.warning("scp from %s refused: %s", self.peer, reason)
        self.stream.sendall(ERROR + f"scp: {reason}\n".encode())
        self.result.refused.append(reason)
        return self.result

    def run(self) -> SinkResult:
        self.stream.sendall(OK)
        while True:
            line = self.reader.line()
            if line is None:
                return self.result
            kind = line[:1]
            if kind == b"C":
                self._receive(line)
            elif kind == b"T":
                self.stream.sendall(OK)
            elif kind == b"E":
                try:
                    self.stream.sendall(OK)
                except (OSError, EOFError):
                    # Trilead's SCPClient (CloudStack) sends E and closes without waiting
                    # for the reply; every file before it is complete and committed.
                    return self.result
            elif kind == b"D":
                self._refuse("directories are not accepted; send files", fatal=True)
                return self.result
            elif kind in (ERROR, FATAL):
                reason = line[1:].decode("utf-8", "replace").strip()
                LOG.warning("scp source at %s reported: %s", self.peer, reason)
                self.result.refused.append(reason)
                if kind == FATAL:
                    return self.result
            else:
                self._refuse(f"unexpected protocol line {shorten(line)}", fatal=True)
                return self.result

    def _refuse(self, reason: str, fatal: bool = False) -> None:
        LOG.warning("scp from %s: refused: %s", self.peer, reason)
        self.result.refused.append(reason)
        self.stream.sendall((FATAL if fatal else ERROR) + f"scp: {reason}\n".encode())

    def _receive(self, line: bytes) -> None:
        m = C_LINE.fullmatch(line)
        if m is None:
            self._refuse(f"malformed file line {shorten(line)}", fatal=True)
            raise ProtocolBroken("malformed C line")
        size = int(m.group(2))
        sent_name = m.group(3).decode("utf-8", "replace")
        try:
            name = self.name or check_name(sent_name, "file name")
        except PayloadError as exc:
            self._refuse(str(exc))
            return
        if size > self.max_bytes:
            self._refuse(f"{name}: {size} bytes is too large; at most {self.max_bytes} bytes")
            return
        try:
            staged = atomic.StagedFile(self.cache / name, UPLOAD_MODE)
        except VRError as exc:
            self._refuse(f"{name}: {exc}")
            return
        try:
            self.stream.sendall(OK)
            self.reader.exact(size, staged.write)
            trouble = self.reader.status()
            if trouble is not None:
                staged.abort()
                LOG.warning("scp source at %s failed sending %s: %s", self.peer, name, trouble)
                self.result.refused.append(f"{name}: {trouble}")
                self.stream.sendall(OK)
                return
            staged.commit()
        except VRError as exc:
            staged.abort()
            self._refuse(f"{name}: {exc}")
            return
        except BaseException:
            staged.abort()
            raise
        LOG.info("received %s (%d bytes) by scp from %s", name, size, self.peer)
        self.result.received.append(name)
        self.stream.sendall(OK)
