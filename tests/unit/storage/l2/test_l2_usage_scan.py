"""Start-up usage scans of durable L2 adapters: found objects count, a failed scan is
counted with its error and shown in the L2 section of /status."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from kvhive.config.l2 import L2Config
from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.storage.controllers import L2Layer
from kvhive.storage.eviction import make_policy
from kvhive.storage.l1 import L1Manager, L1Params
from kvhive.storage.l2.naming import fs_name
from kvhive.storage.l2.tracker import Tracker
from kvhive.storage.quota import QuotaRegistry

N = 4096


def keys(n: int) -> list[ObjectKey]:
    return [ObjectKey(i.to_bytes(8, "big"), "m", pack_kv_rank(1, 0), 0, "") for i in range(n)]


@pytest.fixture
def fs_layer(tmp_path: Path) -> Iterator[Callable[[Path], L2Layer]]:
    """``fs_layer(dir)``: an L2 layer over one fs adapter in ``dir`` (opened, not started)."""
    l1 = L1Manager(
        L1Params(size_bytes=1 << 20, align_bytes=N, lazy=False, init_bytes=0, write_ttl=600.0,
                 read_ttl=300.0, watermark=0.9, eviction_ratio=0.2, shm_name=""),
        policy=make_policy("LRU"),
    )  # fmt: skip
    made: list[L2Layer] = []

    def make(base: Path) -> L2Layer:
        cfg = L2Config(adapters=(json.dumps({"type": "fs", "base_path": str(base)}),))
        made.append(L2Layer(cfg, l1, QuotaRegistry(), object_nbytes=lambda k: N, read_ttl_s=300.0))
        return made[-1]

    yield make
    for layer in made:
        layer.close()
    l1.close()


def scan_status(layer: L2Layer, done: Callable[[dict], bool]) -> dict:
    """The first adapter's /status entry once ``done(entry)`` holds (the scan is a thread)."""
    deadline = time.monotonic() + 10.0
    while True:
        entry = layer.status()["adapters"][0]
        if done(entry) or time.monotonic() > deadline:
            return entry
        time.sleep(0.01)


def test_a_scan_counts_what_a_previous_run_left(fs_layer, tmp_path: Path) -> None:
    base = tmp_path / "l2"
    base.mkdir()
    for key in keys(3):
        (base / fs_name(key)).write_bytes(b"x" * 100)
    layer = fs_layer(base)
    layer.start()
    entry = scan_status(layer, lambda e: e["objects"] == 3)
    assert (entry["objects"], entry["used_bytes"]) == (3, 300)
    assert entry["usage_scan"] == {"scan_failures": 0, "last_scan_error": None}


def test_a_failed_scan_is_counted_and_shown_in_status(fs_layer, tmp_path: Path) -> None:
    base = tmp_path / "l2"
    layer = fs_layer(base)  # the adapter creates its directory
    base.rmdir()
    base.write_bytes(b"")  # the directory is now a plain file: listing it fails
    layer.start()
    entry = scan_status(layer, lambda e: e["usage_scan"]["scan_failures"] > 0)
    assert entry["usage_scan"]["scan_failures"] == 1
    assert entry["usage_scan"]["last_scan_error"].startswith("NotADirectoryError")
    assert entry["objects"] == 0


def test_a_scan_failing_part_way_keeps_what_it_listed() -> None:
    tracker = Tracker(policy=make_policy("LRU"))
    ks = keys(3)

    def failing_scan() -> Iterator[tuple[ObjectKey, int]]:  # a backend lost mid-listing
        yield ks[0], 10
        yield ks[1], 20
        raise OSError("device went away")

    with pytest.raises(OSError):
        tracker.add_existing(failing_scan())
    assert (tracker.usage().objects, tracker.usage().used_bytes) == (2, 30)
    assert tracker.status() == {"scan_failures": 1, "last_scan_error": "OSError: device went away"}
    assert tracker.add_existing(iter([(ks[1], 20), (ks[2], 5)])) == 1  # a later scan adds
    assert tracker.status()["scan_failures"] == 1
