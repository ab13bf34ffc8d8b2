"""The signed instance identity document, as EC2 serves it (GCE and Azure have theirs).

``/<version>/dynamic/instance-identity/`` (``latest`` or a dated version) lists
``document``, ``signature`` and ``pkcs7``:

* ``document``: JSON with EC2's field names, built only from what CloudStack pushed
  for the VM (``instanceId``, ``availabilityZone``, ``privateIp``, ``instanceType``)
  plus ``hostname`` and ``version``; a value CloudStack did not push is left out;
* ``signature``: base64 RSA-SHA256 (PKCS#1 v1.5) of the document bytes;
* ``pkcs7``: base64 DER PKCS#7 detached signature of the document (EC2's form: what
  ``openssl smime -verify -inform PEM -content document -certfile cert`` checks once
  wrapped in ``-----BEGIN PKCS7-----`` lines).

The router's key (RSA 2048) and a self-signed certificate for it persist in
``<root>/etc/vr/identity-key.pem`` (0600) and ``identity-cert.pem``; ``vr
identity-cert`` prints the certificate for the management side to distribute. The key
is loaded before the workers fork; each worker signs a VM's document once per VM
generation (signing costs about a millisecond) and keeps the result.
"""

from __future__ import annotations

import base64
import datetime
import json
import logging
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.hazmat.primitives.serialization import pkcs7
from cryptography.x509.oid import NameOID

from vr import atomic
from vr.errors import ConfigError
from vr.metadata.views import CLOUDSTACK_VERSION, EC2_VERSIONS, JSON, NOT_FOUND, Reply, VmView
from vr.paths import Paths

LOG = logging.getLogger(__name__)

KEY_FILE = "identity-key.pem"
CERT_FILE = "identity-cert.pem"
DOCUMENT_VERSION = "2017-09-30"  # the "version" EC2's documents carry
FIELDS = (
    ("instanceId", "instance-id"),
    ("availabilityZone", "availability-zone"),
    ("privateIp", "local-ipv4"),
    ("instanceType", "service-offering"),
    ("hostname", "local-hostname"),
)
"""Document field -> the CloudStack metadata key it comes from."""
_VERSIONS = frozenset((*EC2_VERSIONS, CLOUDSTACK_VERSION))
MAX_SIGNED = 4096
"""Signed documents a worker keeps (cleared wholesale when reached)."""


@dataclass(frozen=True)
class Signed:
    document: bytes
    signature: bytes
    pkcs7: bytes


class Signer:
    """Signs documents with the router's key; ``cert`` is its certificate (PEM)."""

    def __init__(self, key: rsa.RSAPrivateKey, cert: x509.Certificate) -> None:
        self._key = key
        self._cert = cert
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self.public_key_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self._signed: dict[tuple[str, int], Signed] = {}

    def sign(self, document: bytes) -> Signed:
        signature = self._key.sign(document, padding.PKCS1v15(), hashes.SHA256())
        der = (
            pkcs7.PKCS7SignatureBuilder()
            .set_data(document)
            .add_signer(self._cert, self._key, hashes.SHA256())
            .sign(
                serialization.Encoding.DER,
                [
                    pkcs7.PKCS7Options.DetachedSignature,
                    pkcs7.PKCS7Options.NoCapabilities,
                    pkcs7.PKCS7Options.Binary,
                ],
            )
        )
        return Signed(document, base64.b64encode(signature), _wrap(base64.b64encode(der)))

    def for_view(self, caller: str, view: VmView) -> Signed:
        """The signed document of one VM generation, signed once per worker."""
        key = (caller, view.gen)
        got = self._signed.get(key)
        if got is None:
            if len(self._signed) >= MAX_SIGNED:
                self._signed = {}
            got = self._signed[key] = self.sign(document(view))
        return got


def _wrap(b64: bytes) -> bytes:
    """64 characters a line, as EC2 serves its pkcs7."""
    return b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))


def document(view: VmView) -> bytes:
    """The identity document of a VM: JSON on one line, so S/MIME's text
    canonicalisation (LF -> CRLF, which ``openssl smime -verify`` applies unless
    given ``-binary``) changes nothing and both ways of verifying agree."""
    doc: dict[str, str] = {}
    for name, key in FIELDS:
        value = view.metadata.get(key)
        if value:
            doc[name] = value.decode("utf-8", "replace")
    doc["version"] = DOCUMENT_VERSION
    return json.dumps(doc).encode()


def identity_reply(
    signer: Signer | None, caller: str, view: VmView | None, path: str
) -> Reply | None:
    """The reply for a ``/<version>/dynamic/...`` path; None for every other path."""
    segs = path.split("/")
    if len(segs) < 3 or segs[0] != "" or segs[1].lower() not in _VERSIONS:
        return None
    if segs[2] != "dynamic":  # case-sensitive as on EC2 (and cheap to rule out)
        return None
    if signer is None or view is None:
        return NOT_FOUND
    rest = [s.lower() for s in segs[3:]]
    if rest and rest[-1] == "":
        rest.pop()
    if not rest:
        return Reply(200, b"instance-identity/")
    if rest[0] != "instance-identity" or len(rest) > 2:
        return NOT_FOUND
    if len(rest) == 1:
        return Reply(200, b"document\npkcs7\nsignature")
    signed = signer.for_view(caller, view)
    if rest[1] == "document":
        return Reply(200, signed.document, JSON)
    if rest[1] == "signature":
        return Reply(200, signed.signature)
    if rest[1] == "pkcs7":
        return Reply(200, signed.pkcs7)
    return NOT_FOUND


# --- the key on disk -----------------------------------------------------------------


def load_or_create(paths: Paths) -> Signer:
    """The router's identity key and certificate, made on first use and kept."""
    key_file, cert_file = paths.etc / KEY_FILE, paths.etc / CERT_FILE
    try:
        key_pem = key_file.read_bytes()
        cert_pem = cert_file.read_bytes()
    except FileNotFoundError:
        return _create(paths)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise ConfigError(
            f"{key_file}, {cert_file}: not a PEM RSA key and certificate ({exc}): "
            "expected the files vr made; remove both to make new ones"
        ) from None
    if not isinstance(key, rsa.RSAPrivateKey) or cert.public_key() != key.public_key():
        raise ConfigError(f"{key_file}, {cert_file}: expected an RSA key and its own certificate")
    return Signer(key, cert)


def _create(paths: Paths) -> Signer:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vr instance identity")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    paths.etc.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    # the certificate last: a key without its certificate is made anew next time
    atomic.atomic_write(paths.etc / KEY_FILE, key_pem, 0o600)
    atomic.atomic_write(paths.etc / CERT_FILE, cert.public_bytes(serialization.Encoding.PEM))
    LOG.info("made the instance identity key %s", paths.etc / KEY_FILE)
    return Signer(key, cert)
