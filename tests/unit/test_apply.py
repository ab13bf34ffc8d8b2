"""CloudStack's update_config.py / vr_cfg.sh contract, through the Applier in-process."""

from __future__ import annotations

import gzip
from io import StringIO

from tests.helpers.store import (
    apply_cfg,
    cfg_text,
    drop,
    ip,
    served_tree,
    snapshot,
    update_config,
    vm_metadata,
)
from vr.applier import SUMMARY_ITEMS, Applier, summarize
from vr.paths import Paths
from vr.store import read_vm

HEADER = "#Apache CloudStack Virtual Router Config File\n<version>\n1.0\n</version>\n"


def test_applied_file_is_archived_gzipped_in_processed(paths: Paths) -> None:
    payload = vm_metadata("10.1.1.5", ["metadata", "vm-id", "x"])
    src = drop(paths, "vm_metadata.json.1", payload)
    data = src.read_bytes()
    run = update_config(paths, "vm_metadata.json.1")
    assert run.code == 0
    assert not src.exists()
    archived = paths.processed / "vm_metadata.json.1.gz"
    assert gzip.decompress(archived.read_bytes()) == data
    assert archived.stat().st_mode & 0o077 == 0


def test_second_argument_false_deletes_instead_of_archiving(paths: Paths) -> None:
    drop(paths, "vm_metadata.json.2", vm_metadata("10.1.1.5", ["metadata", "vm-id", "x"]))
    assert update_config(paths, "vm_metadata.json.2", "false").code == 0
    assert not (paths.cache / "vm_metadata.json.2").exists()
    assert not (paths.processed / "vm_metadata.json.2.gz").exists()
    assert read_vm(paths, ip("10.1.1.5")) is not None


def test_retry_of_an_archived_push_exits_zero_and_changes_nothing(paths: Paths) -> None:
    drop(paths, "vm_metadata.json.3", vm_metadata("10.1.1.5", ["metadata", "vm-id", "x"]))
    assert update_config(paths, "vm_metadata.json.3").code == 0
    before = snapshot(paths.root)
    run = update_config(paths, "/var/cache/cloud/vm_metadata.json.3")
    assert run.code == 0
    assert "already applied" in run.out
    assert snapshot(paths.root) == before


def test_missing_file_exits_one_with_a_message(paths: Paths) -> None:
    run = update_config(paths, "vm_metadata.json.nope")
    assert run.code == 1
    assert run.err.splitlines() == [
        f"vm_metadata.json.nope: no such file in {paths.cache}",
    ]


def test_wrong_arguments_exit_one_with_usage(paths: Paths) -> None:
    for args in ([], ["a", "b", "c"], ["../../etc/shadow"]):
        run = update_config(paths, *args)
        assert run.code == 1
        assert run.err.startswith("usage: update_config.py <file> [false]")


def test_successful_push_prints_one_line_naming_vm_keys_and_duration(paths: Paths) -> None:
    drop(paths, "vm_metadata.json.4", vm_metadata("10.1.1.5", ["metadata", "vm-id", "x"]))
    run = update_config(paths, "vm_metadata.json.4")
    [line] = run.err.splitlines()
    assert line.startswith("vm_metadata.json.4: applied: VM 10.1.1.5: changed vm-id deleted -")
    assert line.endswith(" ms)")
    assert run.out == ""


def test_processed_keeps_only_the_newest_archives(paths: Paths) -> None:
    applier = Applier(paths, keep_processed=4)
    for i in range(7):
        drop(paths, f"vm_metadata.json.{i}", vm_metadata("10.1.1.5", ["metadata", "n", str(i)]))
        assert applier.update_config([f"vm_metadata.json.{i}"], StringIO(), StringIO()) == 0
    kept = {p.name for p in paths.processed.iterdir()}
    assert len(kept) == 4
    assert "vm_metadata.json.6.gz" in kept


def test_cfg_batch_applies_every_item_and_archives_the_cfg(paths: Paths) -> None:
    files = {
        f"vm_metadata.json.{i}": vm_metadata(f"10.1.1.{i}", ["metadata", "vm-id", f"id{i}"])
        for i in (11, 12, 13)
    }
    (paths.cache / "VR-1.cfg").write_text(cfg_text(files))
    run = apply_cfg(paths, "-c", "/var/cache/cloud/VR-1.cfg")
    assert run.code == 0, run.err
    [line] = run.err.splitlines()
    assert all(f"VM 10.1.1.{i}" in line for i in (11, 12, 13))
    for i in (11, 12, 13):
        assert served_tree(paths)[f"metadata/10.1.1.{i}/vm-id"] == f"id{i}".encode()
    assert (paths.processed / "VR-1.cfg.gz").exists()
    assert not (paths.cache / "VR-1.cfg").exists()
    assert apply_cfg(paths, "VR-1.cfg").code == 0  # retry


def test_cfg_batch_with_one_bad_item_applies_nothing_and_names_the_item(paths: Paths) -> None:
    drop(paths, "vm_metadata.json.0", vm_metadata("10.1.1.11", ["metadata", "vm-id", "old"]))
    assert update_config(paths, "vm_metadata.json.0").code == 0
    before = snapshot(paths.root)
    files = {
        "vm_metadata.json.a": vm_metadata("10.1.1.11", ["metadata", "vm-id", "new"]),
        "vm_metadata.json.b": vm_metadata("10.1.1.12", ["metadata", "a/b", "x"]),
        "vm_metadata.json.c": vm_metadata("10.1.1.13", ["metadata", "vm-id", "c"]),
    }
    (paths.cache / "VR-2.cfg").write_text(cfg_text(files))
    run = apply_cfg(paths, "VR-2.cfg")
    assert run.code == 1
    [line] = run.err.splitlines()
    assert "nothing applied" in line
    assert "item 2 (vm_metadata.json.b)" in line
    assert "VM 10.1.1.12" in line and "'a/b'" in line
    assert snapshot(paths.root) == before
    assert (paths.failed / "VR-2.cfg").exists()


def test_cfg_that_is_not_utf8_is_rejected_and_kept_in_failed(paths: Paths) -> None:
    (paths.cache / "VR-3.cfg").write_bytes(HEADER.encode() + b"\xff\n")
    run = apply_cfg(paths, "VR-3.cfg")
    assert run.code == 1
    assert "encoding" in run.err and "UTF-8" in run.err
    assert (paths.failed / "VR-3.cfg").exists()


def test_cfg_over_its_size_bound_is_rejected_and_applies_nothing(paths: Paths) -> None:
    from vr.payloads import PayloadLimits

    files = {"vm_metadata.json.a": vm_metadata("10.1.1.11", ["metadata", "vm-id", "x" * 500])}
    (paths.cache / "VR-4.cfg").write_text(cfg_text(files))
    before = snapshot(paths.root)
    err = StringIO()
    code = Applier(paths, limits=PayloadLimits(cfg_bytes=400)).apply_cfg(
        ["VR-4.cfg"], StringIO(), err
    )
    assert code == 1
    [line] = err.getvalue().splitlines()
    assert "VR-4.cfg: rejected, nothing applied" in line and "at most 400 bytes" in line
    assert snapshot(paths.root) == before
    assert (paths.failed / "VR-4.cfg").exists()


def test_missing_cfg_exits_one(paths: Paths) -> None:
    run = apply_cfg(paths, "-c", "VR-none.cfg")
    assert run.code == 1
    assert "VR-none.cfg: no such file" in run.err


def test_after_commit_hook_sees_the_result_and_its_failure_fails_the_push(paths: Paths) -> None:
    seen = []

    class Hooks:
        def before_commit(self, cfg: object, payloads: object) -> None:
            pass

        def after_commit(self, cfg: object, result: object) -> None:
            seen.append(result)
            raise RuntimeError("firewall exploded")

    net = {"device": "eth1", "router_guest_ip": "10.1.1.1", "cidr": "10.1.1.0/24"}
    drop(paths, "guest_network.json.1", net)
    err = StringIO()
    code = Applier(paths, hooks=Hooks()).update_config(["guest_network.json.1"], StringIO(), err)
    assert code == 1
    assert seen and seen[0].networks_changed is True
    assert "internal error" in err.getvalue()
    # the file stays for the management server's retry
    assert (paths.cache / "guest_network.json.1").exists()


def test_the_summary_of_a_big_batch_counts_and_names_only_the_first_vms() -> None:
    changes = [f"VM 10.1.{i // 250}.{i % 250 + 1}: changed vm-id deleted -" for i in range(5000)]
    line = summarize(changes)
    assert line.startswith("5000 changes: VM 10.1.0.1: changed vm-id deleted -; VM 10.1.0.2:")
    assert line.endswith("; … and 4990 more")
    assert line.count("VM ") == SUMMARY_ITEMS
    assert len(line) < 1000


def test_a_small_apply_lists_every_change_or_says_none() -> None:
    assert summarize(["VM 10.1.1.5: password saved"]) == "VM 10.1.1.5: password saved"
    assert summarize([]) == "no change"


def test_a_batch_of_many_vms_reports_one_bounded_line(paths: Paths) -> None:
    files = {
        f"vm_metadata.json.{i}": vm_metadata(f"10.1.2.{i}", ["metadata", "vm-id", f"id{i}"])
        for i in range(1, 41)
    }
    (paths.cache / "VR-many.cfg").write_text(cfg_text(files))
    run = apply_cfg(paths, "VR-many.cfg")
    assert run.code == 0, run.err
    [line] = run.err.splitlines()
    assert "applied: 40 changes: VM 10.1.2.1: changed vm-id" in line
    assert f"… and {40 - SUMMARY_ITEMS} more (" in line
    assert "VM 10.1.2.40" not in line
    assert served_tree(paths)["metadata/10.1.2.40/vm-id"] == b"id40"
