"""The router pair's password ledger and its merge rule (pure: no I/O).

Both routers of a pair receive every push, but each numbers its passwords with its
own counter, so generations cannot be compared across the pair. The ledger names a
VM's password by what both routers agree on:

* ``digest``: SHA-256 of the VM address and the password (the same push gives the
  same digest on both routers);
* ``stamp``: when it was stored, in ms of wall-clock time (the store records it), so
  of two different passwords of one VM the later push wins;
* ``served`` and ``acked``: the password reached the guest / the guest acknowledged
  it. An acknowledged entry stays as a tombstone (without the password), so a peer
  that still holds the password can never hand it back.

**Merge rule** (commutative and idempotent, so two routers that exchanged their
ledgers hold the same one): for each VM, two entries with the same digest are one
password: ``served`` and ``acked`` are OR-ed, the stamp is the later one. Entries
with different digests: the later stamp wins (ties: the larger digest), the other
is dropped whether pending or acknowledged. A password whose digest was acknowledged
is therefore never served again by either router, and a password pushed while one
router was down reaches it from its peer unless a later push superseded it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from ipaddress import IPv4Address
from typing import Any

from vr.errors import VRError

WIRE_VERSION = 1


class LedgerError(VRError):
    """A ledger (file or peer message) that is not what :func:`decode` expects."""


@dataclass(frozen=True)
class Entry:
    digest: str
    stamp: int
    served: bool = False
    acked: bool = False
    password: str | None = field(default=None, repr=False)
    """Present while pending (never in an acknowledged entry)."""

    def key(self) -> tuple[str, int, bool, bool]:
        """What two routers must agree on to be in sync (no secret in it)."""
        return (self.digest, self.stamp, self.served, self.acked)


Ledger = dict[str, Entry]


def digest(ip: str, password: str) -> str:
    return hashlib.sha256(f"{ip}\0{password}".encode()).hexdigest()


def merge_entry(a: Entry, b: Entry) -> Entry:
    if a.digest == b.digest:
        acked = a.acked or b.acked
        return Entry(
            a.digest,
            max(a.stamp, b.stamp),
            served=a.served or b.served or acked,
            acked=acked,
            password=None if acked else (a.password or b.password),
        )
    return max(a, b, key=lambda e: (e.stamp, e.digest))


def merge(a: Mapping[str, Entry], b: Mapping[str, Entry]) -> Ledger:
    out: Ledger = dict(a)
    for ip, e in b.items():
        out[ip] = merge_entry(out[ip], e) if ip in out else e
    return out


def observe(ledger: Mapping[str, Entry], passwords: Mapping[str, Mapping[str, Any]]) -> Ledger:
    """The ledger after looking at the store's passwords file.

    A password in the file that the ledger does not know (another digest, or the
    digest of an acknowledged one pushed again) is a new entry; a pending entry whose
    password left the file was acknowledged (only an ack removes a password).
    """
    out: Ledger = {}
    for ip in sorted(set(ledger) | set(passwords)):
        led = ledger.get(ip)
        rec = passwords.get(ip)
        if rec is None:
            assert led is not None
            out[ip] = led if led.acked else replace(led, acked=True, served=True, password=None)
            continue
        d = digest(ip, str(rec["password"]))
        stamp = int(rec.get("stamp", 0))
        if led is None or led.digest != d or (led.acked and stamp > led.stamp):
            out[ip] = Entry(d, stamp, bool(rec["served"]), False, str(rec["password"]))
        else:
            out[ip] = replace(
                led,
                served=led.served or bool(rec["served"]),
                password=None if led.acked else str(rec["password"]),
            )
    return out


def reconcile(
    passwords: dict[str, dict[str, Any]], ledger: Mapping[str, Entry], claim_gen: Callable[[], int]
) -> bool:
    """Make the store's ``passwords`` say what ``ledger`` says; whether anything changed.

    Call with a ledger that already :func:`observe`-d ``passwords``: every password in
    the file then has its entry, and the file only has to follow the merge.
    """
    changed = False
    for ip, e in ledger.items():
        rec = passwords.get(ip)
        same = rec is not None and digest(ip, str(rec["password"])) == e.digest
        if e.acked:
            if rec is not None:
                del passwords[ip]  # acknowledged, or superseded by a later acknowledged one
                changed = True
        elif not same:
            assert e.password is not None, "a pending entry carries its password"
            passwords[ip] = {
                "password": e.password,
                "gen": claim_gen(),
                "served": e.served,
                "stamp": e.stamp,
            }
            changed = True
        elif rec is not None and e.served and not rec["served"]:
            rec["served"] = True
            changed = True
    return changed


def fingerprint(ledger: Mapping[str, Entry]) -> str:
    """Equal on both routers exactly when their ledgers agree (no secret in it)."""
    doc = sorted((ip, e.key()) for ip, e in ledger.items())
    return hashlib.sha256(json.dumps(doc).encode()).hexdigest()[:16]


# --- file and wire format --------------------------------------------------------------


def encode(ledger: Mapping[str, Entry], with_passwords: bool) -> bytes:
    """JSON for the ledger file (``with_passwords`` False) or for the peer (True)."""
    vms = {}
    for ip, e in sorted(ledger.items()):
        rec: dict[str, Any] = {
            "digest": e.digest,
            "stamp": e.stamp,
            "served": e.served,
            "acked": e.acked,
        }
        if with_passwords and e.password is not None and not e.acked:
            rec["password"] = e.password
        vms[ip] = rec
    return (json.dumps({"version": WIRE_VERSION, "vms": vms}, sort_keys=True) + "\n").encode()


def decode(data: bytes, where: str, with_passwords: bool) -> Ledger:
    """Parse :func:`encode`'s output; anything else raises :class:`LedgerError`
    naming ``where`` and the problem (never a password)."""
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LedgerError(f"{where}: not JSON ({type(exc).__name__})") from None
    if not isinstance(doc, dict) or doc.get("version") != WIRE_VERSION:
        raise LedgerError(f"{where}: expected a ledger of version {WIRE_VERSION}")
    vms = doc.get("vms")
    if not isinstance(vms, dict):
        raise LedgerError(f"{where}: 'vms': expected an object")
    out: Ledger = {}
    for ip, rec in vms.items():
        try:
            IPv4Address(ip)
        except ValueError:
            raise LedgerError(f"{where}: VM {ip!r}: expected an IPv4 address") from None
        if not isinstance(rec, dict):
            raise LedgerError(f"{where}: VM {ip}: expected an object")
        d, stamp = rec.get("digest"), rec.get("stamp")
        served, acked = rec.get("served"), rec.get("acked")
        password = rec.get("password") if with_passwords else None
        if not (isinstance(d, str) and len(d) == 64 and all(c in "0123456789abcdef" for c in d)):
            raise LedgerError(f"{where}: VM {ip}: 'digest': expected 64 hex digits")
        if type(stamp) is not int or stamp < 0:
            raise LedgerError(f"{where}: VM {ip}: 'stamp'={stamp!r}: expected ms since 1970")
        if type(served) is not bool or type(acked) is not bool:
            raise LedgerError(f"{where}: VM {ip}: 'served' and 'acked': expected booleans")
        if (
            with_passwords
            and not acked
            and (not isinstance(password, str) or digest(ip, password) != d)
        ):
            raise LedgerError(
                f"{where}: VM {ip}: a pending entry needs the password its digest names"
            )
        out[ip] = Entry(d, stamp, served, acked, None if acked else password)
    return out
