"""cloud.log rotation when several processes (gunicorn workers) write the same file."""

from __future__ import annotations

import logging
from pathlib import Path

from vr.logs import SharedRotatingFileHandler


def record(msg: str) -> logging.LogRecord:
    return logging.LogRecord("vr.test", logging.INFO, __file__, 1, msg, None, None)


def all_lines(log: Path) -> list[str]:
    files = sorted(log.parent.glob(log.name + "*"))
    return [line for f in files if not f.name.endswith(".lock") for line in f.read_text().split()]


def test_every_worker_writes_to_the_current_file_after_another_one_rotated(
    tmp_path: Path,
) -> None:
    log = tmp_path / "cloud.log"
    workers = [SharedRotatingFileHandler(log, maxBytes=300, backupCount=100) for _ in range(2)]
    try:
        for i in range(200):
            workers[i % 2].emit(record(f"line-{i:04d}"))
            assert log.read_text().split()[-1] == f"line-{i:04d}"
    finally:
        for h in workers:
            h.close()
    lines = all_lines(log)
    assert sorted(lines) == [f"line-{i:04d}" for i in range(200)]
    sizes = [f.stat().st_size for f in tmp_path.glob("cloud.log.*") if f.suffix != ".lock"]
    assert max(sizes) <= 300


def test_a_single_writer_rotates_like_the_stock_handler(tmp_path: Path) -> None:
    log = tmp_path / "cloud.log"
    h = SharedRotatingFileHandler(log, maxBytes=100, backupCount=2)
    try:
        for i in range(50):
            h.emit(record(f"line-{i:04d}"))
    finally:
        h.close()
    names = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert names == ["cloud.log", "cloud.log.1", "cloud.log.2"]
    assert log.read_text().split()[-1] == "line-0049"
