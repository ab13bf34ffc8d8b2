"""``vr firewall show`` and the subcommand wiring (no root: show never reads iptables)."""

from __future__ import annotations

import json

import pytest

from tests.helpers.fake_tables import FakeTables
from vr.cli import build_parser, main
from vr.firewall import state as fw
from vr.firewall.model import RuleSet
from vr.paths import Paths

NET = {"device": "eth0", "router_guest_ip": "10.1.1.1", "cidr": "10.1.1.0/24"}


def test_every_firewall_action_has_a_description() -> None:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    fw_parser = sub.choices["firewall"]  # type: ignore[attr-defined]
    actions = next(a for a in fw_parser._actions if a.dest == "action")
    assert set(actions.choices) == {"apply", "restore", "show", "counters", "sync6"}
    for name, p in actions.choices.items():
        assert p.description, f"vr firewall {name} has no description"


def test_show_before_any_apply_prints_what_apply_would_install(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    paths.config.write_text(json.dumps({"guest_networks": [NET]}))
    assert main(["firewall", "show", "--root", str(paths.root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# nothing saved yet")
    assert "--to-destination 10.1.1.1:80" in out


def test_show_prints_the_saved_rule_set_as_json(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    paths.config.write_text(json.dumps({"guest_networks": [NET]}))
    fw.apply(paths, FakeTables())
    paths.config.write_text("{}")  # later config edits do not change what was applied
    assert main(["firewall", "show", "--json", "--root", str(paths.root)]) == 0
    shown = RuleSet.from_json(capsys.readouterr().out.encode())
    assert shown == fw.load_saved(paths)
    assert len(shown.chain("VR-PREROUTING").rules) == 2


def test_show_with_a_broken_config_says_why(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    paths.config.write_text(json.dumps({"guest_network": []}))
    assert main(["firewall", "show", "--root", str(paths.root)]) == 1
    assert "unknown keys ['guest_network']" in capsys.readouterr().err
