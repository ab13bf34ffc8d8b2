"""What an SSH request means: pure decisions, no server."""

from __future__ import annotations

import pytest

from vr.agent.requests import (
    NOT_FOUND,
    ApplyCfg,
    ExecRefused,
    ScpTarget,
    UpdateConfig,
    parse_exec,
)
from vr.cloudstack import OutsideCache, cache_name


@pytest.mark.parametrize(
    "command",
    [
        b"/opt/cloud/bin/update_config.py vm_metadata.json.1f2e",
        b"update_config.py vm_metadata.json.1f2e",
    ],
)
def test_update_config_by_full_path_or_bare_name(command: bytes) -> None:
    assert parse_exec(command) == UpdateConfig(("vm_metadata.json.1f2e",))


def test_update_config_keeps_the_archive_argument() -> None:
    assert parse_exec(b"/opt/cloud/bin/update_config.py f.json false") == UpdateConfig(
        ("f.json", "false")
    )


def test_vr_cfg_sh_is_an_apply_of_the_batch() -> None:
    req = parse_exec(b"/opt/cloud/bin/vr_cfg.sh -c /var/cache/cloud/VR-1.cfg")
    assert req == ApplyCfg(("-c", "/var/cache/cloud/VR-1.cfg"))


@pytest.mark.parametrize(
    ("command", "name"),
    [
        (b"scp -t /var/cache/cloud/", None),
        (b"scp -t /var/cache/cloud", None),
        (b"scp -v -d -t /var/cache/cloud/", None),
        (b'scp -t -d "/var/cache/cloud/"', None),
        (b"scp -t -d /var/cache/cloud/", None),  # Trilead SCPClient.put, as CloudStack calls it
        (b"scp -t -- /var/cache/cloud/f.json", "f.json"),
        (b"scp -p -t /var/cache/cloud/vm_metadata.json.9", "vm_metadata.json.9"),
        (b"scp -t .", None),
    ],
)
def test_scp_sink_into_the_cache_folder(command: bytes, name: str | None) -> None:
    assert parse_exec(command) == ScpTarget(name)


@pytest.mark.parametrize(
    ("command", "reason"),
    [
        (b"scp -t /etc", "uploads go only to /var/cache/cloud/"),
        (b"scp -t /etc/passwd", "uploads go only to /var/cache/cloud/"),
        (b"scp -t /var/cache/cloud/../../../etc", "'..' is not allowed"),
        (b"scp -t /var/cache/cloud/.hidden", "not starting with '.'"),
        (b"scp -d -t /var/cache/cloud/f", "not a directory"),
    ],
)
def test_scp_sink_elsewhere_is_refused_with_a_reason(command: bytes, reason: str) -> None:
    req = parse_exec(command)
    assert isinstance(req, ScpTarget)
    assert req.error is not None and reason in req.error


@pytest.mark.parametrize(
    ("command", "words"),
    [
        (b"ls /", "not an allowed command: 'ls /'"),
        (b"/bin/sh -c id", "'/bin/sh'"),
        (b"python3 /opt/cloud/bin/update_config.py f", "'python3'"),
        (b"scp -f /var/cache/cloud/f", "downloads"),
        (b"scp -r -t /var/cache/cloud", "directories"),
        (b"scp -x -t /var/cache/cloud", "unsupported scp"),
        (b"update_config.py 'unclosed", "cannot parse"),
        (b"", "empty command"),
        (b"\xff\xfe", "cannot parse"),
    ],
)
def test_anything_else_is_refused_with_127_and_one_line(command: bytes, words: str) -> None:
    req = parse_exec(command)
    assert isinstance(req, ExecRefused)
    assert req.code == NOT_FOUND
    assert words in req.reason
    assert "\n" not in req.reason


@pytest.mark.parametrize(
    "command",
    [
        # the same program name in another folder is not CloudStack's script
        b"/tmp/update_config.py vm_metadata.json.1",
        b"/opt/cloud/bin/../x/update_config.py vm_metadata.json.1",
        b"/opt/cloud/bin/x/update_config.py vm_metadata.json.1",
        b"./update_config.py vm_metadata.json.1",
        b"/update_config.py vm_metadata.json.1",
        b"/tmp/vr_cfg.sh -c /var/cache/cloud/VR-1.cfg",
        b"/opt/cloud/bin/../../../tmp/vr_cfg.sh -c VR-1.cfg",
        b"xupdate_config.py vm_metadata.json.1",
        b"update_config.pyc vm_metadata.json.1",
        # other programs in /opt/cloud/bin are not an apply
        b"/opt/cloud/bin/router_proxy.sh vm_metadata.json.1",
        b"/opt/cloud/bin/configure.py vm_metadata.json.1",
        b"/opt/cloud/bin/ vm_metadata.json.1",
        b"/opt/cloud/bin vm_metadata.json.1",
        b"router_proxy.sh update_config.py vm_metadata.json.1",
    ],
)
def test_only_the_two_cloudstack_scripts_are_an_apply(command: bytes) -> None:
    req = parse_exec(command)
    assert isinstance(req, ExecRefused), req
    assert req.code == NOT_FOUND
    prog = command.split()[0].decode()
    assert f"command not available on this appliance: {prog!r}" in req.reason


def test_a_very_long_command_is_refused_without_echoing_it() -> None:
    req = parse_exec(b"x" * 10000)
    assert isinstance(req, ExecRefused) and len(req.reason) < 300


@pytest.mark.parametrize(
    ("path", "name"),
    [
        ("/var/cache/cloud", None),
        ("/var/cache/cloud/", None),
        ("/var/cache/cloud/./f.json", "f.json"),
        ("f.json", "f.json"),
        (".", None),
    ],
)
def test_cache_name_maps_cloudstack_paths(path: str, name: str | None) -> None:
    assert cache_name(path) == name


@pytest.mark.parametrize(
    "path",
    [
        "/etc/passwd",
        "/var/cache/cloud/../x",
        "../x",
        "/var/cache/cloud/processed/f",
        "/var/cache/cloud/.tmp-f",
        "/var/cache/cloud/a b",
        "",
        "/var/cache/cloud/f\0",
    ],
)
def test_cache_name_refuses_everything_else(path: str) -> None:
    with pytest.raises(OutsideCache):
        cache_name(path)
