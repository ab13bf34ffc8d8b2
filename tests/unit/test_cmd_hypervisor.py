"""``vr hypervisor``'s arguments: bad values are refused naming them, nothing created."""

from __future__ import annotations

from pathlib import Path

import pytest

from vr.cli import main
from vr.cmd.hypervisor import parse_networks


def test_networks_are_name_equals_root(tmp_path: Path) -> None:
    got = parse_networks([f"a={tmp_path}/a", f"b-2={tmp_path}/b"])
    assert [(n, p.root) for n, p in got] == [("a", tmp_path / "a"), ("b-2", tmp_path / "b")]


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["a"], "'a': expected NAME=ROOT"),
        (["=/x"], "expected NAME=ROOT"),
        (["A=/x"], "'A=/x': expected NAME=ROOT"),
        (["a="], "expected NAME=ROOT"),
        (["a=/x", "a=/y"], "network 'a' given twice"),
        (["a=/x", "b=/x"], "two networks share a root"),
    ],
)
def test_bad_networks_are_refused_naming_them(specs: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_networks(specs)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--network", "bad name=/x"], "--network 'bad name=/x': expected NAME=ROOT"),
        (["--return-table", "0"], "--return-table 0: expected 1 to 254"),
        (["--resync", "0"], "--resync 0.0: expected 0.05 to 3600 seconds"),
        (["--meta-port", "a/b"], "--meta-port 'a/b': expected an interface name"),
    ],
)
def test_bad_arguments_exit_2_with_a_message_and_create_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    root = tmp_path / "root"
    assert main(["hypervisor", "--root", str(root), "--bridge", "br0", *args]) == 2
    assert message in capsys.readouterr().err
    assert not root.exists()
