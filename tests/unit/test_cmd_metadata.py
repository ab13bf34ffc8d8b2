"""The serve-metadata command line and its gunicorn settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from vr.cli import build_parser
from vr.http.runner import gunicorn_options


def test_bind_is_repeatable_and_defaults_are_for_a_small_vr() -> None:
    args = build_parser().parse_args(
        ["serve-metadata", "--root", "/x", "--bind", "10.0.0.1:80", "--bind", "10.0.1.1:80"]
    )
    assert args.bind == ["10.0.0.1:80", "10.0.1.1:80"]
    assert args.workers is None and args.worker_class == "event"
    assert build_parser().parse_args(["serve-metadata"]).bind is None


def test_gunicorn_options_keep_connections_alive_and_build_the_app_per_worker() -> None:
    opts = gunicorn_options("metadata", ["0.0.0.0:80"], 2, "gthread", Path("/r"), threads=2)
    assert opts["bind"] == ["0.0.0.0:80"]
    assert opts["keepalive"] > 0
    assert opts["preload_app"] is False
    assert opts["workers"] == 2 and opts["threads"] == 2


def test_connections_per_address_reaches_the_gunicorn_settings() -> None:
    args = build_parser().parse_args(["serve-metadata", "--connections-per-address", "8"])
    opts = gunicorn_options("metadata", ["0.0.0.0:80"], 2, "event", Path("/r"), 8)
    assert args.connections_per_address == 8
    assert opts["vr_connections_per_address"] == 8
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve-metadata", "--connections-per-address", "0"])
