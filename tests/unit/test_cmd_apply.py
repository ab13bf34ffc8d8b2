"""The ``vr update-config`` / ``apply-cfg`` / ``show`` commands and the CloudStack-named
scripts, run as the management server runs them: exit status, streams, log file."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.store import drop, kept_logging, snapshot, vm_metadata
from vr.cli import main
from vr.paths import Paths

REPO = Path(__file__).resolve().parents[2]
SECRET = "Sup3r-Secret-Pw!"


def cli(*argv: str) -> int:
    with kept_logging():
        return main(list(argv))


def script(paths: Paths, name: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "VR_ROOT": str(paths.root)}
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_cli_push_logs_one_line_with_vm_keys_and_duration_to_cloud_log(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    drop(paths, "vm_metadata.json.1", vm_metadata("10.1.1.5", ["metadata", "vm-id", "x"]))
    assert cli("update-config", "--root", str(paths.root), "vm_metadata.json.1") == 0
    err = capsys.readouterr().err.splitlines()
    logged = [line for line in paths.log_file.read_text().splitlines() if "applied" in line]
    assert len(err) == 1 and len(logged) == 1
    for text in (err[0], logged[0]):
        assert "vm_metadata.json.1: applied: VM 10.1.1.5: changed vm-id" in text
        assert text.endswith(" ms)")


def test_password_push_never_writes_the_password_to_log_or_streams(
    paths: Paths, capfd: pytest.CaptureFixture[str]
) -> None:
    body = {"ip_address": "10.1.1.5", "password": SECRET, "type": "vmpassword"}
    drop(paths, "vm_password.json.1", body)
    assert cli("update-config", "--root", str(paths.root), "-v", "vm_password.json.1") == 0
    drop(paths, "vm_password.json.2", body | {"ip_address": "10.1.1.300"})
    assert cli("update-config", "--root", str(paths.root), "-v", "vm_password.json.2") == 1
    assert cli("show", "--root", str(paths.root)) == 0
    assert cli("show", "--root", str(paths.root), "--json") == 0
    out, err = capfd.readouterr()
    log = paths.log_file.read_text()
    assert "VM 10.1.1.5: password saved" in log
    assert "pending" in out
    for text in (out, err, log, paths.last_push.read_text()):
        assert SECRET not in text


def test_update_config_script_archives_and_retries_succeed(paths: Paths) -> None:
    drop(paths, "vm_metadata.json.a", vm_metadata("10.1.1.6", ["metadata", "vm-id", "a"]))
    first = script(paths, "update_config.py", "vm_metadata.json.a")
    assert first.returncode == 0, first.stderr
    assert (paths.metadata_root / "10.1.1.6" / "vm-id").read_bytes() == b"a"
    assert gzip.decompress((paths.processed / "vm_metadata.json.a.gz").read_bytes())
    again = script(paths, "update_config.py", "/var/cache/cloud/vm_metadata.json.a")
    assert again.returncode == 0
    assert "already applied" in again.stdout


def test_update_config_script_with_false_deletes_the_file(paths: Paths) -> None:
    drop(paths, "vm_metadata.json.b", vm_metadata("10.1.1.6", ["metadata", "vm-id", "b"]))
    run = script(paths, "update_config.py", "vm_metadata.json.b", "false")
    assert run.returncode == 0, run.stderr
    assert not (paths.cache / "vm_metadata.json.b").exists()
    assert not (paths.processed / "vm_metadata.json.b.gz").exists()


def test_update_config_script_missing_file_exits_one_with_a_message(paths: Paths) -> None:
    run = script(paths, "update_config.py", "vm_metadata.json.missing")
    assert run.returncode == 1
    assert run.stderr.strip() == f"vm_metadata.json.missing: no such file in {paths.cache}"


@pytest.mark.parametrize("args", [(), ("a.json", "false", "extra")])
def test_update_config_script_with_a_wrong_argument_count_exits_one(
    paths: Paths, args: tuple[str, ...]
) -> None:
    run = script(paths, "update_config.py", *args)
    assert run.returncode == 1
    assert run.stderr.strip() == "usage: update_config.py <file> [false]"


def test_update_config_script_invalid_payload_one_line_store_unchanged(paths: Paths) -> None:
    drop(paths, "vm_metadata.json.c", vm_metadata("10.1.1.6", ["metadata", "vm-id", "c"]))
    assert script(paths, "update_config.py", "vm_metadata.json.c").returncode == 0
    before = snapshot(paths.root)
    bad = vm_metadata("10.1.1.6", ["userdata", "user-data", "aGk-_w"])
    drop(paths, "vm_metadata.json.d", bad)
    run = script(paths, "update_config.py", "vm_metadata.json.d")
    assert run.returncode != 0
    [line] = run.stderr.splitlines()
    assert "VM 10.1.1.6" in line and "userdata/user-data='aGk-_w'" in line
    assert "standard base64" in line
    assert run.stdout == ""
    assert snapshot(paths.root) == before
    assert (paths.failed / "vm_metadata.json.d").exists()


def test_vr_cfg_script_applies_a_batch(paths: Paths) -> None:
    body = json.dumps(vm_metadata("10.1.1.7", ["metadata", "vm-id", "seven"]))
    (paths.cache / "VR-9.cfg").write_text(
        "#Apache CloudStack Virtual Router Config File\n<version>\n1.0\n</version>\n"
        f"<file>\n/var/cache/cloud/vm_metadata.json.z\n{body}\n</file>\n"
        "<script>\n/opt/cloud/bin/update_config.py vm_metadata.json.z\n</script>\n"
    )
    env = {**os.environ, "VR_ROOT": str(paths.root), "PYTHON": sys.executable}
    env["PATH"] = "/usr/bin:/bin"  # no `vr` on PATH: the checkout fallback is used
    run = subprocess.run(
        [str(REPO / "scripts" / "vr_cfg.sh"), "-c", "/var/cache/cloud/VR-9.cfg"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stderr
    assert (paths.metadata_root / "10.1.1.7" / "vm-id").read_bytes() == b"seven"


def test_show_prints_values_user_data_and_state_without_secrets(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    drop(
        paths,
        "vm_metadata.json.1",
        vm_metadata(
            "10.1.1.5",
            ["metadata", "vm-id", "abc\n"],
            ["metadata", "service-offering", "Caf\\u00E9"],
            ["metadata", "hypervisor-host-name", None],
            ["userdata", "user-data", "H4sIAAAAAAAAA0vOzylNSQUAqw0yJgUAAAA="],
        ),
    )
    drop(paths, "guest_network.json.1", {"device": "eth0", "router_guest_ip": "10.1.1.1",
                                         "cidr": "10.1.1.0/24"})  # fmt: skip
    for name in ("vm_metadata.json.1", "guest_network.json.1"):
        assert cli("update-config", "--root", str(paths.root), name) == 0
    capsys.readouterr()
    assert cli("show", "--root", str(paths.root)) == 0
    out = capsys.readouterr().out
    assert "VM 10.1.1.5 (generation" in out
    assert "'abc\\n'" in out
    assert "'Caf\\\\u00E9'" in out
    assert "user-data: 26 bytes, gzip" in out
    assert "guest network eth0: 10.1.1.1/24" in out
    assert "last push: guest_network.json.1 ok" in out

    assert cli("show", "--root", str(paths.root), "--json", "10.1.1.5", "10.1.1.9") == 0
    report = json.loads(capsys.readouterr().out)
    vm = report["vms"]["10.1.1.5"]
    assert vm["meta-data"]["vm-id"] == {"text": "abc\n"}
    assert vm["meta-data"]["hypervisor-host-name"] == {"text": ""}
    assert vm["user-data"]["user-data"]["kind"] == "gzip"
    assert report["vms"]["10.1.1.9"] is None


def test_show_rejects_a_bad_address(paths: Paths, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli("show", "--root", str(paths.root), "10.1.1") == 2
    assert "expected IPv4 addresses" in capsys.readouterr().err


def _userdata_push(paths: Paths, name: str, size: int) -> None:
    import base64

    blob = base64.b64encode(os.urandom(size)).decode()
    drop(paths, name, vm_metadata("10.1.1.5", ["userdata", "user-data", blob]))


def test_userdata_limit_comes_from_the_appliance_config(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    paths.config.write_text(json.dumps({"userdata_max_bytes": 2048}))
    _userdata_push(paths, "vm_metadata.json.small", 2048)
    assert cli("update-config", "--root", str(paths.root), "vm_metadata.json.small") == 0
    _userdata_push(paths, "vm_metadata.json.big", 2049)
    before = snapshot(paths.root)
    assert cli("update-config", "--root", str(paths.root), "vm_metadata.json.big") == 1
    err = capsys.readouterr().err
    assert "at most 2048 bytes once decoded" in err and "10.1.1.5" in err
    assert snapshot(paths.root) == before
    assert (paths.failed / "vm_metadata.json.big").exists()


def test_raised_userdata_limit_admits_user_data_beyond_the_default(paths: Paths) -> None:
    size = 3 * 1024 * 1024  # over the 1 MiB default and over the default payload bound
    _userdata_push(paths, "vm_metadata.json.1", size)
    assert cli("update-config", "--root", str(paths.root), "vm_metadata.json.1") == 1
    paths.config.write_text(json.dumps({"userdata_max_bytes": 4 * 1024 * 1024}))
    _userdata_push(paths, "vm_metadata.json.2", size)
    assert cli("update-config", "--root", str(paths.root), "vm_metadata.json.2") == 0
    user_data = paths.root / "var/www/html/latest/userdata/10.1.1.5/user-data"
    assert user_data.stat().st_size == size


def test_unreadable_config_fails_every_push_and_keeps_the_file(
    paths: Paths, capsys: pytest.CaptureFixture[str]
) -> None:
    paths.config.write_text("{not json")
    drop(paths, "vm_metadata.json.1", vm_metadata("10.1.1.5", ["metadata", "vm-id", "x"]))
    before = snapshot(paths.root)
    assert cli("update-config", "--root", str(paths.root), "vm_metadata.json.1") == 1
    assert cli("apply-cfg", "--root", str(paths.root), "-c", "VR-1.cfg") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("update_config.py: not applied: ") and "vr.json" in err[0]
    assert err[1].startswith("vr_cfg.sh: not applied: ") and "not readable JSON" in err[1]
    assert snapshot(paths.root) == before
