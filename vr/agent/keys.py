"""Host keys (generated once, reused) and the management server's authorized keys."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import paramiko
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from vr import atomic

LOG = logging.getLogger(__name__)

HOST_KEY_FILES = {"ed25519": "ssh_host_ed25519_key", "rsa": "ssh_host_rsa_key"}
RSA_BITS = 3072
KEY_TYPES = frozenset(
    {
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
    }
)


class LegacyRSAKey(paramiko.RSAKey):
    """An RSA key that also speaks the legacy ``ssh-rsa`` (SHA-1) signature algorithm.

    paramiko 5 dropped SHA-1 RSA signatures; CloudStack's Java SSH library (Trilead)
    still signs its login with them and accepts only ``ssh-rsa`` (or ``ssh-dss``)
    host-key signatures. The agent's transport maps client ``ssh-rsa`` keys here and
    loads its RSA host key as this class; SHA-1 is used only when the transport
    negotiated ``ssh-rsa``, which a client that offers ``rsa-sha2-*`` never does.
    """

    HASHES = {**paramiko.RSAKey.HASHES, "ssh-rsa": hashes.SHA1}  # type: ignore[misc]

    def verify_ssh_sig(self, data: bytes, msg: paramiko.Message) -> bool:
        ok: bool = super().verify_ssh_sig(data, msg)
        if ok:
            msg.rewind()
            if msg.get_text() == "ssh-rsa":
                LOG.info("accepted legacy ssh-rsa (SHA-1) signature from key %s", self.fingerprint)
        return ok


# --- host keys ------------------------------------------------------------------------


def _generate(kind: str) -> bytes:
    key: ed25519.Ed25519PrivateKey | rsa.RSAPrivateKey
    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=RSA_BITS)
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def _load(kind: str, path: Path) -> paramiko.PKey:
    if kind == "ed25519":
        return paramiko.Ed25519Key(filename=str(path))
    # can also sign the key exchange with ssh-rsa, for clients that know nothing newer
    return LegacyRSAKey(filename=str(path))


def load_host_keys(folder: Path) -> list[paramiko.PKey]:
    """Load the ed25519 and RSA host keys from ``folder``, creating missing ones (0600).

    Keys are reused across restarts so management servers keep trusting the VR.
    A ``.pub`` file beside each key lets operators fill known_hosts.
    """
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    keys = []
    for kind, name in HOST_KEY_FILES.items():
        path = folder / name
        if not path.exists():
            LOG.info("generating %s host key %s", kind, path)
            atomic.atomic_write(path, _generate(kind), 0o600)
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            LOG.warning("host key %s had mode %o; setting 0600", path, mode)
            os.chmod(path, 0o600)
        key = _load(kind, path)
        pub = f"{key.get_name()} {key.get_base64()} vr-agent\n".encode()
        pub_path = path.with_name(name + ".pub")
        if not pub_path.exists() or pub_path.read_bytes() != pub:
            atomic.atomic_write(pub_path, pub, 0o644)
        LOG.info("host key %s: %s %s", path, key.get_name(), key.fingerprint)
        keys.append(key)
    return keys


# --- authorized keys ------------------------------------------------------------------


@dataclass(frozen=True)
class AuthorizedKeyFile:
    blobs: frozenset[bytes]
    problems: tuple[str, ...]


def _blob_type(blob: bytes) -> str | None:
    if len(blob) < 4:
        return None
    (n,) = struct.unpack(">I", blob[:4])
    try:
        return blob[4 : 4 + n].decode("ascii")
    except UnicodeDecodeError:
        return None


def parse_authorized_keys(text: str) -> AuthorizedKeyFile:
    """Public key blobs from an ``authorized_keys`` text; odd lines are reported, not used.

    Lines with options (``from=``, ``command=`` ...) are skipped: honouring only
    part of a restriction would grant more than the operator meant.
    """
    blobs: set[bytes] = set()
    problems: list[str] = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if fields[0] not in KEY_TYPES:
            problems.append(f"line {n}: key options or key type {fields[0][:40]!r} not supported")
            continue
        if len(fields) < 2:
            problems.append(f"line {n}: no key after {fields[0]!r}")
            continue
        try:
            blob = base64.b64decode(fields[1], validate=True)
        except (binascii.Error, ValueError):
            problems.append(f"line {n}: key is not valid base64")
            continue
        if _blob_type(blob) != fields[0]:
            problems.append(f"line {n}: key data does not match its type {fields[0]!r}")
            continue
        blobs.add(blob)
    return AuthorizedKeyFile(frozenset(blobs), tuple(problems))


RACY_NS = 2_000_000_000
"""A file modified this recently is read again at every check: file times tick
coarsely (a kernel clock tick), so an edit of the same size within the same tick
would leave the stat signature unchanged (git's "racily clean" index entries)."""


class AuthorizedKeys:
    """The keys in ``path``, re-read whenever the file changes (one stat per check,
    so a removed key is refused at the next login; see :data:`RACY_NS`)."""

    def __init__(self, path: Path, clock_ns: Callable[[], int] = time.time_ns) -> None:
        self.path = path
        self._clock_ns = clock_ns
        self._lock = threading.Lock()
        self._signature: tuple[int, int, int, int] | None = None
        self._blobs: frozenset[bytes] = frozenset()

    def allows(self, key: paramiko.PKey) -> bool:
        return key.asbytes() in self._current()

    def _current(self) -> frozenset[bytes]:
        with self._lock:
            try:
                st = os.stat(self.path)
            except FileNotFoundError:
                if self._signature != (0, 0, 0, 0):
                    LOG.warning("%s is missing: no client key is accepted", self.path)
                self._signature = (0, 0, 0, 0)
                self._blobs = frozenset()
                return self._blobs
            sig = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
            racy = self._clock_ns() - st.st_mtime_ns < RACY_NS
            changed = sig != self._signature
            if changed or racy:
                self._signature = sig
                self._blobs = self._read(log=changed)
            return self._blobs

    def _read(self, log: bool = True) -> frozenset[bytes]:
        try:
            text = self.path.read_text("utf-8", "replace")
        except OSError as exc:
            LOG.error("cannot read %s: %s", self.path, exc.strerror)
            return frozenset()
        parsed = parse_authorized_keys(text)
        if parsed.blobs == self._blobs and not log:
            return parsed.blobs  # read again only because it is recent: nothing new
        for problem in parsed.problems:
            LOG.warning("%s: %s; line ignored", self.path, problem)
        LOG.info("loaded %d authorized keys from %s", len(parsed.blobs), self.path)
        return parsed.blobs
