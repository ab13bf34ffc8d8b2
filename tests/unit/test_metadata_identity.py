"""The instance identity document: built from pushed data only, signed, key kept."""

from __future__ import annotations

import base64
import json
import stat

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from vr.errors import ConfigError
from vr.metadata.identity import CERT_FILE, KEY_FILE, document, identity_reply, load_or_create
from vr.metadata.views import build_view
from vr.paths import Paths

FULL = {
    "instance-id": b"i-1",
    "availability-zone": b"zone-a",
    "local-ipv4": b"10.1.1.5",
    "service-offering": b"Small",
    "local-hostname": b"vm-a",
}


def test_the_document_carries_ec2_names_for_what_cloudstack_pushed() -> None:
    doc = json.loads(document(build_view(1, FULL, {})))
    assert doc == {
        "instanceId": "i-1",
        "availabilityZone": "zone-a",
        "privateIp": "10.1.1.5",
        "instanceType": "Small",
        "hostname": "vm-a",
        "version": "2017-09-30",
    }


def test_a_value_cloudstack_did_not_push_is_left_out_never_invented() -> None:
    doc = json.loads(document(build_view(1, {"instance-id": b"i-1"}, {})))
    assert doc == {"instanceId": "i-1", "version": "2017-09-30"}


def test_the_signature_verifies_with_the_persisted_public_key(paths: Paths) -> None:
    signer = load_or_create(paths)
    view = build_view(3, FULL, {})
    reply = identity_reply(signer, "10.1.1.5", view, "/latest/dynamic/instance-identity/signature")
    assert reply is not None and reply.status == 200
    key = load_or_create(paths)._cert.public_key()  # the same key, read back from disk
    assert isinstance(key, rsa.RSAPublicKey)
    key.verify(base64.b64decode(reply.body), document(view), padding.PKCS1v15(), hashes.SHA256())


def test_the_key_is_private_to_root_and_kept_across_restarts(paths: Paths) -> None:
    first = load_or_create(paths).cert_pem
    assert stat.S_IMODE((paths.etc / KEY_FILE).stat().st_mode) == 0o600
    assert load_or_create(paths).cert_pem == first


def test_a_damaged_key_file_is_refused_naming_it(paths: Paths) -> None:
    load_or_create(paths)
    (paths.etc / KEY_FILE).write_bytes(b"not a key")
    with pytest.raises(ConfigError, match=KEY_FILE):
        load_or_create(paths)
    assert (paths.etc / CERT_FILE).exists()  # nothing was replaced


@pytest.mark.parametrize(
    ("path", "status", "body"),
    [
        ("/latest/dynamic", 200, b"instance-identity/"),
        ("/2021-03-23/dynamic/instance-identity/", 200, b"document\npkcs7\nsignature"),
        ("/latest/dynamic/instance-identity/rsa2048", 404, None),
        ("/latest/dynamic/other", 404, None),
    ],
)
def test_the_dynamic_tree(paths: Paths, path: str, status: int, body: bytes | None) -> None:
    reply = identity_reply(load_or_create(paths), "10.1.1.5", build_view(1, FULL, {}), path)
    assert reply is not None and reply.status == status
    if body is not None:
        assert reply.body == body


def test_other_paths_are_left_to_the_views_and_unknown_vms_get_404(paths: Paths) -> None:
    signer = load_or_create(paths)
    assert identity_reply(signer, "10.1.1.5", None, "/latest/meta-data/dynamic") is None
    unknown = identity_reply(signer, "10.1.1.9", None, "/latest/dynamic/instance-identity/")
    assert unknown is not None and unknown.status == 404


def test_vr_identity_cert_prints_the_certificate_or_the_public_key(
    paths: Paths, capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    from vr.cli import main

    assert main(["identity-cert", "--root", str(paths.root)]) == 0
    cert = capsysbinary.readouterr().out
    assert cert.startswith(b"-----BEGIN CERTIFICATE-----")
    assert cert == (paths.etc / CERT_FILE).read_bytes()
    assert main(["identity-cert", "--root", str(paths.root), "--public-key"]) == 0
    assert capsysbinary.readouterr().out.startswith(b"-----BEGIN PUBLIC KEY-----")
    assert b"PRIVATE" not in cert
