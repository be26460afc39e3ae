"""Lookup-hash JSONL log: record format, file naming, rotation by size and time, retention."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from kvhive.observability.events import LookupHashes
from kvhive.observability.lookup_log import LookupHashLogger, record_line
from support.traffic import MODEL, C, Traffic, running_server, shm_kv

NAME = re.compile(r"^lookup_hashes_\d{8}_\d{6}_\d{6}\.jsonl$")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def event(i: int = 0, n: int = 2, ts: float = 1711929600.123) -> LookupHashes:
    return LookupHashes(
        session_id=f"req-{i}",
        timestamp=ts,
        request_id=f"req-{i}",
        model_name="m",
        chunk_size=256,
        seq_len=1024,
        chunk_hashes=[bytes([i]) * 4] * n,
        dtypes=["float16"],
        shapes=[[2, 32, 256, 1024]],
    )


def files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


def test_record_format_matches_the_reference() -> None:
    line = record_line(event(1))
    assert line == (
        '{"timestamp": 1711929600.123, "request_id": "req-1", "model_name": "m", '
        '"chunk_size": 256, "seq_len": 1024, "dtypes": ["torch.float16"], '
        '"shapes": [[2, 32, 256, 1024]], "chunk_hashes": ["0x01010101", "0x01010101"]}\n'
    )


def test_file_naming_and_rotation_by_size(tmp_path: Path) -> None:
    size = len(record_line(event()).encode())
    log = LookupHashLogger(
        tmp_path, rotation_interval=3600, rotation_max_size=2 * size, max_files=10
    )
    assert files(tmp_path) == []  # the first file appears with the first lookup
    for i in range(5):
        log.write(event(i % 10))
    log.shutdown()
    names = files(tmp_path)
    assert len(names) == 3 and all(NAME.match(n) for n in names)
    assert names[0] == "lookup_hashes_20240401_000000_000000.jsonl"  # UTC of the event
    assert [n[-12:-6] for n in names] == ["000000", "000001", "000002"]
    for n in names:  # never past the limit
        assert (tmp_path / n).stat().st_size <= 2 * size
    lines = [json.loads(x) for n in names for x in (tmp_path / n).read_text().splitlines()]
    assert [r["request_id"] for r in lines] == [f"req-{i}" for i in range(5)]


def test_rotation_by_time_uses_a_monotonic_clock(tmp_path: Path) -> None:
    clock = Clock()
    log = LookupHashLogger(
        tmp_path, rotation_interval=60, rotation_max_size=1 << 20, max_files=10, clock=clock
    )
    log.write(event(0))
    clock.now += 59
    log.write(event(1, ts=1711929600.123 - 86400))  # a wall-clock jump back does not matter
    assert len(files(tmp_path)) == 1
    clock.now += 1
    log.write(event(2))
    log.shutdown()
    assert len(files(tmp_path)) == 2


def test_retention_counts_existing_files(tmp_path: Path) -> None:
    for i in range(3):
        old = tmp_path / f"lookup_hashes_20200101_000000_{i:06d}.jsonl"
        old.write_text("{}\n")
        os.utime(old, (1000 + i, 1000 + i))
    (tmp_path / "unrelated.txt").write_text("keep me")
    size = len(record_line(event()).encode())
    log = LookupHashLogger(tmp_path, rotation_interval=3600, rotation_max_size=size, max_files=3)
    for i in range(3):
        log.write(event(i))
    log.shutdown()
    names = files(tmp_path)
    assert "unrelated.txt" in names
    logs = [n for n in names if n.startswith("lookup_hashes_")]
    assert len(logs) == 3 and not any(n.startswith("lookup_hashes_2020") for n in logs)
    assert sorted(n[-12:-6] for n in logs) == ["000003", "000004", "000005"]  # counter seeded


def test_server_logs_every_lookup(tmp_path: Path) -> None:
    d = tmp_path / "hashes"
    with (
        running_server("--lookup-hash-log-dir", str(d), "--disable-logging") as server,
        shm_kv() as kv,
    ):
        traffic = Traffic(server, kv)
        try:
            traffic.round(2, "a")
            traffic.lookup(list(range(900, 900 + 3 * C + 5)), "b")
        finally:
            traffic.close()
        assert server.obs.bus.flush()
    (path,) = d.iterdir()
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert [r["request_id"] for r in records] == ["a", "b"]
    b = records[1]
    assert list(b) == [
        "timestamp",
        "request_id",
        "model_name",
        "chunk_size",
        "seq_len",
        "dtypes",
        "shapes",
        "chunk_hashes",
    ]
    assert (b["model_name"], b["chunk_size"], b["seq_len"]) == (MODEL, C, 3 * C + 5)
    assert b["dtypes"] == ["torch.float16"] and len(b["chunk_hashes"]) == 3
    assert all(h.startswith("0x") and len(h) > 10 for h in b["chunk_hashes"])
