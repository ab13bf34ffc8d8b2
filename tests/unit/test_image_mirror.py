"""image/debian_mirror.py: the Debian mirror image/build hands to debootstrap comes from apt's
own configuration, read the way apt reads it, and never from a built-in host."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "image" / "debian_mirror.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("debian_mirror", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["debian_mirror"] = module
    spec.loader.exec_module(module)
    return module


dm = _load()

DEB822 = """\
Types: deb deb-src
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: http://mirror.example.org/debian/
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://security.example.org/debian-security
Suites: bookworm-security
Components: main
"""


def etc_with(tmp_path: Path, main: str | None = None, **parts: str) -> Path:
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    if main is not None:
        (etc / "sources.list").write_text(main)
    for name, text in parts.items():
        (etc / "sources.list.d" / name.replace("__", ".")).write_text(text)
    return etc


def run(etc: Path, what: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = dm.main(["--etc", str(etc), what])
    out, err = capsys.readouterr()
    return code, out.strip(), err


def test_deb822_sources_give_the_mirror_and_the_security_mirror(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = etc_with(tmp_path, debian__sources=DEB822)
    assert run(etc, "mirror", capsys)[:2] == (0, "http://mirror.example.org/debian")
    assert run(etc, "security", capsys)[:2] == (0, "http://security.example.org/debian-security")


def test_one_line_sources_list_with_options_is_read(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    main = (
        "# deb http://commented.example.org/debian bookworm main\n"
        "deb-src http://src.example.org/debian bookworm main\n"
        "deb [arch=amd64 signed-by=/usr/share/keyrings/k.gpg] "
        "https://mirror.example.net/debian bookworm main contrib\n"
    )
    assert run(etc_with(tmp_path, main), "mirror", capsys)[:2] == (
        0,
        "https://mirror.example.net/debian",
    )


def test_files_apt_ignores_are_ignored_and_disabled_stanzas_skipped(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = etc_with(
        tmp_path,
        a__list__disabled="deb http://wrong.example.org/debian bookworm main\n",
        b__sources="Types: deb\nURIs: http://off.example.org/debian\nSuites: bookworm\n"
        "Enabled: no\n",
        c__list="deb http://right.example.org/debian bookworm main\n",
    )
    assert run(etc, "mirror", capsys)[:2] == (0, "http://right.example.org/debian")


def test_sources_list_comes_before_the_parts_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = etc_with(
        tmp_path,
        "deb http://first.example.org/debian bookworm main\n",
        z__sources=DEB822,
    )
    assert run(etc, "mirror", capsys)[:2] == (0, "http://first.example.org/debian")


def test_a_source_for_another_suite_is_not_taken_for_bookworm(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = etc_with(tmp_path, "deb http://mirror.example.org/debian trixie main\n")
    code, out, err = run(etc, "mirror", capsys)
    assert (code, out) == (1, "")
    assert "no 'deb' source for suite 'bookworm'" in err
    assert str(etc) in err


def test_no_configuration_at_all_is_an_error_not_a_default_host(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(etc_with(tmp_path), "mirror", capsys)
    assert (code, out) == (1, "")
    assert "configure apt's Debian mirror" in err


def test_missing_security_source_prints_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = etc_with(tmp_path, "deb http://mirror.example.org/debian bookworm main\n")
    assert run(etc, "security", capsys)[:2] == (0, "")


def test_a_malformed_line_is_reported_with_its_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    etc = etc_with(tmp_path, "deb http://mirror.example.org/debian bookworm main\ndeb oops\n")
    code, _, err = run(etc, "mirror", capsys)
    assert code == 1
    assert f"{etc}/sources.list:2" in err
    assert "'deb oops'" in err


def test_cdrom_sources_are_not_used_as_a_mirror() -> None:
    sources = dm.parse_one_line(
        "deb cdrom:[Debian 12]/ bookworm main\ndeb http://m.example.org/debian bookworm main\n",
        "sources.list",
    )
    assert dm.pick(sources, "bookworm") == "http://m.example.org/debian"
