"""Subcommand ``identity-cert``: print the certificate guests' identity documents
are signed with, for the management side to distribute."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from vr.cmd.args import add_root, open_root


def register(sub: Any) -> None:
    p = sub.add_parser(
        "identity-cert",
        help="print the certificate of the instance identity signing key (PEM)",
        description="Print the router's instance identity certificate (PEM), made with "
        "its RSA key on first use and kept in <root>/etc/vr/. Guests verify "
        "/latest/dynamic/instance-identity/signature and /pkcs7 against it. "
        "--public-key prints the public key alone.",
    )
    add_root(p)
    p.add_argument("--public-key", action="store_true", help="print the public key instead")
    p.set_defaults(func=_print)


def _print(args: argparse.Namespace) -> int:
    from vr.metadata.identity import load_or_create

    signer = load_or_create(open_root(args, log_file=False))
    sys.stdout.buffer.write(signer.public_key_pem if args.public_key else signer.cert_pem)
    return 0
