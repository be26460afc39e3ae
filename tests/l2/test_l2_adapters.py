"""Every adapter type against its real backend: the same contract tests for each."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from l2_testlib import DURABLE, KINDS, done, keys_for, payloads

from kvhive.keys import ObjectKey
from kvhive.storage.controllers.prefetch import PrefetchController
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.l2.managed import ManagedAdapter
from kvhive.storage.l2.naming import block_name, flat_name, fs_name, nixl_relpath
from support.l2kit import Opener, hammer_concurrently, store_all
from support.l2kit import load_all as kit_load_all

N = 64 * 1024 + 123  # unaligned on purpose: trailers and O_DIRECT tails get exercised


def load_all(
    adapter: ManagedAdapter, keys: list[ObjectKey], nbytes: int = N
) -> tuple[list[bool], list[np.ndarray]]:
    return kit_load_all(adapter, keys, nbytes)


@pytest.fixture(params=KINDS)
def kind(request: pytest.FixtureRequest) -> str:
    return request.param


def test_round_trip_is_byte_exact(kind: str, adapter_json: Any, open_adapter: Opener) -> None:
    adapter = open_adapter(adapter_json(kind))
    keys, data = keys_for(4, salt="tenant"), payloads(4, N)
    assert store_all(adapter, keys, data) == [True] * 4
    assert done(adapter.lookup(keys)) == [True] * 4
    ok, bufs = load_all(adapter, keys)
    assert ok == [True] * 4
    assert all(np.array_equal(a, b) for a, b in zip(bufs, data, strict=True))
    usage = adapter.usage()
    assert usage.objects == 4 and set(usage.bytes_by_salt) == {"tenant"}
    assert done(adapter.delete(keys[:1])) == [True]
    assert done(adapter.lookup(keys)) == [False, True, True, True]
    assert adapter.usage().objects == 3


def test_missing_keys_are_misses(kind: str, adapter_json: Any, open_adapter: Opener) -> None:
    adapter = open_adapter(adapter_json(kind))
    stored, absent = keys_for(2), keys_for(2)
    store_all(adapter, stored, payloads(2, N))
    assert done(adapter.lookup([absent[0], stored[0], absent[1], stored[1]])) == [
        False,
        True,
        False,
        True,
    ]
    ok, _ = load_all(adapter, [absent[0], stored[1]])
    assert ok == [False, True]
    assert done(adapter.delete(absent)) in ([False, False], [True, True])  # s3 cannot tell


def test_wrong_length_is_a_miss(kind: str, adapter_json: Any, open_adapter: Opener) -> None:
    adapter = open_adapter(adapter_json(kind))
    keys = keys_for(1)
    store_all(adapter, keys, payloads(1, N))
    ok, _ = load_all(adapter, keys, nbytes=N - 7)
    assert ok == [False]


CAPACITY: dict[str, dict[str, Any]] = {
    "fs_native": {"max_capacity_gb": 3.5 * N / 2**30},
    "mock": {"max_size_gb": 3.5 * N / 2**30},
    "raw_block": {"capacity_bytes": (1 << 20) + 3 * (1 << 18)},  # metadata + 3 slots
    "dax": {"max_dax_size_gb": None},  # set below: metadata + 3 slots
    "plugin": {"max_capacity_gb": 3.5 * N / 2**30},
    "native_plugin": {"max_capacity_gb": 3.5 * N / 2**30},
    "resp": {"max_capacity_gb": 3.5 * N / 2**30},
    "s3": {"max_capacity_gb": 3.5 * N / 2**30},
    "valkey": {"max_capacity_gb": 3.5 * N / 2**30},
}


def test_capacity_refuses_and_eviction_makes_room(
    kind: str, adapter_json: Any, open_adapter: Opener
) -> None:
    from kvhive.storage.controllers.eviction import L2EvictionController
    from kvhive.storage.quota import QuotaRegistry

    if kind == "fs":
        pytest.skip("fs has no capacity setting (reference); its quota eviction is tested below")
    extra = dict(CAPACITY.get(kind, {}))
    if kind == "nixl_store":  # 52 pages of 4 KiB: three framed objects of 17 pages fit
        params = {**adapter_json(kind)["backend_params"], "file_size": str(13 * 4096)}
        extra = {"backend_params": params}
    if kind == "nixl_store_dynamic":
        params = {**adapter_json(kind)["backend_params"], "max_capacity_gb": str(3.5 * N / 2**30)}
        extra = {"backend_params": params}
    if kind == "dax":
        extra["max_dax_size_gb"] = (3 * ((1 << 18) + 4096) + 2 * 12288 + 1000) / 2**30  # 3 slots
    policy = {"eviction_policy": "LRU", "trigger_watermark": 0.5, "eviction_ratio": 0.5}
    adapter = open_adapter(adapter_json(kind, eviction=policy, **extra))
    keys, data = keys_for(4), payloads(4, N)
    assert store_all(adapter, keys, data) == [True, True, True, False]
    assert adapter.counters["store_refused_full"] + adapter.counters["store_failed"] == 1
    evictor = L2EvictionController([adapter], QuotaRegistry())
    assert evictor.tick() >= 1
    # A batch is ranked back to front (tail chunks leave first): keys[2] was least recent.
    assert done(adapter.lookup(keys[:3])) == [True, False, False]
    assert store_all(adapter, keys[3:], data[3:]) == [True]


def test_fs_isolated_quota_eviction(adapter_json: Any, open_adapter: Opener) -> None:
    from kvhive.storage.controllers.eviction import L2EvictionController
    from kvhive.storage.quota import QuotaRegistry

    policy = {"eviction_policy": "IsolatedLRU", "trigger_watermark": 1.0, "eviction_ratio": 0.5}
    adapter = open_adapter(adapter_json("fs", eviction=policy))
    quotas = QuotaRegistry()
    quotas.set("a", 10 * N)
    kept, over, unlisted = keys_for(2, salt="a"), keys_for(2, salt="b"), keys_for(2)
    quotas.set("b", N)
    for ks in (kept, over, unlisted):
        store_all(adapter, ks, payloads(2, N))
    L2EvictionController([adapter], quotas).tick()
    assert done(adapter.lookup(kept)) == [True, True]  # within quota
    assert done(adapter.lookup(over)).count(True) == 1  # over quota: half of its bytes
    assert done(adapter.lookup(unlisted)) == [False, False]  # whitelist: no quota, no data


def test_concurrent_use(kind: str, adapter_json: Any, open_adapter: Opener) -> None:
    adapter = open_adapter(adapter_json(kind, **({"capacity_bytes": 32 << 20} if kind == "raw_block" else {}),
                                        **({"max_dax_size_gb": 32 / 1024} if kind == "dax" else {})))  # fmt: skip
    assert hammer_concurrently(adapter, N) == []


@pytest.mark.parametrize("durable_kind", DURABLE)
def test_restart_finds_the_data(durable_kind: str, adapter_json: Any, open_adapter: Opener) -> None:
    raw = adapter_json(durable_kind)
    first = open_adapter(raw)
    keys, data = keys_for(3, salt="s"), payloads(3, N)
    assert store_all(first, keys, data) == [True] * 3
    first.close()
    second = open_adapter(raw)
    assert done(second.lookup(keys)) == [True] * 3
    ok, bufs = load_all(second, keys)
    assert ok == [True] * 3 and all(np.array_equal(a, b) for a, b in zip(bufs, data, strict=True))
    if durable_kind in ("fs", "fs_native", "raw_block", "dax", "nixl_store_dynamic"):
        assert second.rebuild_usage() == 3  # usage survives the restart
        assert second.usage().bytes_by_salt["s"] > 0


def _corrupt(
    kind: str, adapter: ManagedAdapter, key: ObjectKey, raw: dict[str, Any], request: Any
) -> None:
    if kind in ("fs", "fs_native"):
        path = Path(raw["base_path"]) / fs_name(key)
        blob = bytearray(path.read_bytes())
        blob[100] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif kind in ("raw_block", "dax"):
        store = adapter.adapter.store  # type: ignore[attr-defined]
        slot, _ = store._index[block_name(key)]
        with open(raw["device_path"], "r+b") as f:
            f.seek(store._offset(slot) + store.header + 100)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif kind == "resp":
        import redis

        client = redis.Redis(host=raw["host"], port=raw["port"])
        blob = bytearray(client.get(flat_name(key)))
        blob[100] ^= 0xFF
        client.set(flat_name(key), bytes(blob))
        client.close()
    elif kind == "s3":
        store = adapter.adapter.store  # type: ignore[attr-defined]
        blob = memoryview(bytearray(N + 64))
        size = store.get(key, [blob])
        blob[100] ^= 0xFF
        store.put(key, [blob[:size]])  # signed like any write, bytes flipped
    elif kind == "nixl_store_dynamic":
        path = Path(raw["backend_params"]["file_path"]) / nixl_relpath(key, shard_dirs=False)
        blob = bytearray(path.read_bytes())
        blob[100] ^= 0xFF
        path.write_bytes(bytes(blob))
    elif kind == "nixl_store":  # flip a byte of the object's first page in its pool file
        store = adapter.adapter.store  # type: ignore[attr-defined]
        run = store._index[key].pages[0]
        item, page = divmod(run.start, store._per_item)
        path = Path(raw["backend_params"]["file_path"]) / store._files.names[item]
        with open(path, "r+b") as f:
            f.seek(page * store.page + 100)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
    elif kind == "plugin":
        store = adapter.adapter.store  # type: ignore[attr-defined]
        blob = bytearray(store._data[key])
        blob[100] ^= 0xFF
        store._data[key] = bytes(blob)


@pytest.mark.parametrize("durable_kind", [*DURABLE, "plugin", "nixl_store"])
def test_corruption_is_a_counted_miss_and_removed(
    durable_kind: str, adapter_json: Any, open_adapter: Opener, request: Any
) -> None:
    raw = adapter_json(durable_kind)
    adapter = open_adapter(raw)
    keys, data = keys_for(2), payloads(2, N)
    store_all(adapter, keys, data)
    _corrupt(durable_kind, adapter, keys[0], raw, request)
    ok, bufs = load_all(adapter, keys)
    assert ok == [False, True]
    assert np.array_equal(bufs[1], data[1])
    assert adapter.adapter.status()["corrupt"] == 1
    assert done(adapter.lookup(keys)) == [False, True]  # removed: no endless re-misses


@pytest.mark.parametrize("fault", ["slow", "failing"])
def test_slow_or_failing_backend_costs_a_miss_not_a_hang(
    kind: str, fault: str, l1: L1Manager, adapter_json: Any, open_adapter: Opener
) -> None:
    inner = adapter_json(kind)
    faults = {"load_delay_ms": 2000} if fault == "slow" else {"fail_ops": ["load"]}
    adapter = open_adapter({"type": "fault_inject", "inner": inner, "timeout_s": 0.3, **faults})
    keys = keys_for(3)
    store_all(adapter, keys, payloads(3, N))
    ctl = PrefetchController(
        l1, [adapter], object_nbytes=lambda k: N, retain=False, max_in_flight=8
    )
    got: list[int] = []
    finished = threading.Event()
    start = time.monotonic()
    ctl.prefetch(
        [[k] for k in keys], lambda k: "reader", 1, lambda n: (got.append(n), finished.set())
    )
    assert finished.wait(5)
    assert got == [0]
    assert time.monotonic() - start < 1.5
    assert l1.stats().objects == 0
    ctl.close()


def test_objects_gone_behind_kvhives_back_stop_counting(
    adapter_json: Any, open_adapter: Opener
) -> None:
    """A backend may drop objects on its own (eviction, lifecycle rules, another node): the
    lookup or load that finds one gone is a miss and the adapter's usage forgets it."""
    raw = adapter_json("fs")
    adapter = open_adapter(raw)
    keys, data = keys_for(3), payloads(3, N)
    assert store_all(adapter, keys, data) == [True] * 3
    assert adapter.usage().objects == 3
    for key in keys[:2]:
        (Path(raw["base_path"]) / fs_name(key)).unlink()
    assert done(adapter.lookup(keys[:1] + keys[2:])) == [False, True]
    assert (adapter.usage().objects, adapter.counters["vanished"]) == (2, 1)
    ok, _ = load_all(adapter, keys[1:2])
    assert ok == [False]
    assert (adapter.usage().objects, adapter.counters["vanished"]) == (1, 2)
    assert adapter.usage().used_bytes == adapter.adapter.footprint(N)


SHARED = ("fs", "fs_native", "resp", "s3", "nixl_store_dynamic")


@pytest.mark.parametrize("shared_kind", SHARED)
def test_two_nodes_storing_one_chunk_never_show_a_torn_object(
    shared_kind: str, adapter_json: Any, open_adapter: Opener
) -> None:
    """Two servers ("nodes": two adapters on one backend) write the same chunk again and again
    while a third loads it: every load is either a miss or the exact bytes; each node finds
    objects the other wrote (shared-tier discovery), and a salt stays its own."""
    raw = adapter_json(shared_kind)
    node_a, node_b, reader = open_adapter(raw), open_adapter(raw), open_adapter(raw)
    key = keys_for(1, salt="tenant-a")[0]
    data = payloads(1, N, seed=5)[0]
    stop = threading.Event()
    errors: list[str] = []

    def write(node: ManagedAdapter) -> None:
        while not stop.is_set():
            if store_all(node, [key], [data]) != [True]:
                errors.append("store failed")

    writers = [threading.Thread(target=write, args=(n,)) for n in (node_a, node_b)]
    for t in writers:
        t.start()
    loads = hits = 0
    deadline = time.monotonic() + 2.0
    try:
        while time.monotonic() < deadline:
            ok, bufs = load_all(reader, [key])
            loads += 1
            if ok == [True]:
                hits += 1
                if not np.array_equal(bufs[0], data):
                    errors.append("torn or wrong bytes served")
    finally:
        stop.set()
        for t in writers:
            t.join(30)
    assert errors == [] and hits > 0, (errors[:3], loads, hits)
    assert reader.adapter.status().get("corrupt", 0) == 0
    other = ObjectKey(key.chunk_hash, key.model_name, key.kv_rank, key.object_group_id, "tenant-b")
    assert done(node_b.lookup([key, other])) == [True, False]  # B sees A's; salts stay apart


BIG = (12 << 20) + 123  # checked piece by piece while read (pooled.STREAM_CHECK_MIN)


@pytest.mark.parametrize("big_kind", ["fs", "fs_native", "nixl_store", "nixl_store_dynamic"])
def test_large_objects_checked_while_read_catch_damage_in_any_piece(
    big_kind: str, adapter_json: Any, open_adapter: Opener
) -> None:
    extra = {}
    if big_kind == "nixl_store":
        extra = {"backend_params": {**adapter_json(big_kind)["backend_params"],
                                    "file_size": str(16 << 20)}}  # fmt: skip
    raw = adapter_json(big_kind, **extra)
    adapter = open_adapter(raw)
    keys, data = keys_for(2), payloads(2, BIG, seed=3)
    assert store_all(adapter, keys, data) == [True, True]
    ok, bufs = load_all(adapter, keys, nbytes=BIG)
    assert ok == [True, True] and all(np.array_equal(a, b) for a, b in zip(bufs, data, strict=True))
    # flip one byte in the third 4 MiB piece of the first object
    if big_kind == "nixl_store":
        store = adapter.adapter.store  # type: ignore[attr-defined]
        place = store._index[keys[0]]
        at = 0
        for ext in store._extents(place.pages, place.length):  # the extent holding byte 9 MiB
            if at <= (9 << 20) < at + ext.nbytes:
                name = store._files.names[store._devs.index(ext.dev_id)]
                path = Path(raw["backend_params"]["file_path"]) / name
                offset = ext.offset + (9 << 20) - at
            at += ext.nbytes
    else:
        base = Path(raw.get("base_path") or raw["backend_params"]["file_path"])
        rel = fs_name(keys[0]) if big_kind.startswith("fs") else nixl_relpath(keys[0], False)
        path, offset = base / rel, 9 << 20
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x40]))
    ok, bufs = load_all(adapter, keys, nbytes=BIG)
    assert ok == [False, True] and np.array_equal(bufs[1], data[1])
    assert adapter.adapter.status()["corrupt"] == 1
