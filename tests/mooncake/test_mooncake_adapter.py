"""``mooncake_store`` on the real library and a real master (inside a private netns)."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from mc_testlib import Master, MiB, client_config

from kvhive.config.l2_adapters import parse_adapter
from kvhive.errors import ConfigError
from kvhive.keys import ObjectKey
from kvhive.storage.l2.adapters.mooncake import address
from kvhive.storage.l2.integrity import TRAILER_BYTES
from kvhive.storage.l2.managed import ManagedAdapter
from kvhive.storage.l2.naming import flat_name
from kvhive.storage.l2.registry import build_adapter
from support.l2kit import Opener, done, hammer_concurrently, keys_for, payloads, store_all
from support.l2kit import load_all as kit_load_all
from support.net import free_port

N = 64 * 1024 + 123  # unaligned: the trailer follows an odd-sized payload


def raw_client(master_addr: str, segment: int = 0) -> Any:
    """A plain MooncakeDistributedStore on the same master (for tampering and figures)."""
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    assert store.setup(client_config(master_addr, segment)) == 0
    return store


def load_all(
    adapter: ManagedAdapter, keys: list[ObjectKey], nbytes: int = N
) -> tuple[list[bool], list[np.ndarray]]:
    return kit_load_all(adapter, keys, nbytes)


def test_round_trip_small_batches_and_32_mib(mc_json: Any, open_adapter: Opener) -> None:
    adapter = open_adapter(mc_json(num_workers=2, per_op_workers={"retrieve": 3}))
    keys, data = keys_for(7, salt="tenant"), payloads(7, N)
    big_key, big = keys_for(1)[0], payloads(1, 32 * MiB, seed=3)[0]
    assert store_all(adapter, keys, data) == [True] * 7
    assert store_all(adapter, [big_key], [big]) == [True]
    assert done(adapter.lookup([*keys, big_key])) == [True] * 8
    ok, bufs = load_all(adapter, keys)
    assert ok == [True] * 7
    assert all(np.array_equal(a, b) for a, b in zip(bufs, data, strict=True))
    ok, (got,) = load_all(adapter, [big_key], 32 * MiB)
    assert ok == [True] and np.array_equal(got, big)
    usage = adapter.usage()
    assert usage.objects == 8 and usage.bytes_by_salt["tenant"] == 7 * (N + TRAILER_BYTES)
    assert done(adapter.delete(keys[:2])) == [True, True]
    assert done(adapter.lookup(keys)) == [False, False, *[True] * 5]
    assert adapter.usage().objects == 6
    status = adapter.adapter.status()
    assert status["is_healthy"] is True and status["integrity"] == "checksum"
    assert status["workers"] == {"lookup": 2, "retrieve": 3, "store": 2, "delete": 2}


def test_missing_keys_and_wrong_length_are_misses(mc_json: Any, open_adapter: Opener) -> None:
    adapter = open_adapter(mc_json())
    stored, absent = keys_for(2), keys_for(2)
    store_all(adapter, stored, payloads(2, N))
    assert done(adapter.lookup([absent[0], stored[0], absent[1], stored[1]])) == [
        False, True, False, True]  # fmt: skip
    ok, _ = load_all(adapter, [absent[0], stored[1]])
    assert ok == [False, True]
    assert done(adapter.delete(absent)) == [False, False]
    ok, _ = load_all(adapter, stored[:1], nbytes=N - 7)  # the caller expects another size
    assert ok == [False]
    assert adapter.adapter.status()["corrupt"] == 1


def test_restore_keeps_the_first_value(mc_json: Any, open_adapter: Opener) -> None:
    """Mooncake's put keeps an existing value; the adapter does not upsert (its docstring)."""
    adapter = open_adapter(mc_json())
    key = keys_for(1)
    first, second = payloads(2, N, seed=5)
    assert store_all(adapter, key, [first]) == [True]
    assert store_all(adapter, key, [second]) == [True]
    ok, (got,) = load_all(adapter, key)
    assert ok == [True] and np.array_equal(got, first)


def test_capacity_refuses_and_eviction_makes_room(mc_json: Any, open_adapter: Opener) -> None:
    from kvhive.storage.controllers.eviction import L2EvictionController
    from kvhive.storage.quota import QuotaRegistry

    policy = {"eviction_policy": "LRU", "trigger_watermark": 0.5, "eviction_ratio": 0.5}
    adapter = open_adapter(mc_json(max_capacity_gb=3.5 * N / 2**30, eviction=policy))
    keys, data = keys_for(4), payloads(4, N)
    assert store_all(adapter, keys, data) == [True, True, True, False]
    assert adapter.counters["store_refused_full"] == 1
    assert L2EvictionController([adapter], QuotaRegistry()).tick() >= 1
    assert done(adapter.lookup(keys[:3])) == [True, False, False]  # tail chunks leave first
    assert store_all(adapter, keys[3:], data[3:]) == [True]
    ok, bufs = load_all(adapter, [keys[0], keys[3]])
    assert ok == [True, True] and np.array_equal(bufs[1], data[3])


def test_concurrent_use(mc_json: Any, open_adapter: Opener) -> None:
    adapter = open_adapter(mc_json(num_workers=3))
    assert hammer_concurrently(adapter, N) == []


def test_tampered_objects_are_counted_corrupt_misses_and_removed(
    master: Master, mc_json: Any, open_adapter: Opener
) -> None:
    adapter = open_adapter(mc_json())
    keys, data = keys_for(4), payloads(4, N)
    store_all(adapter, keys, data)
    raw = raw_client(master.addr)
    try:
        other = bytes(np.random.default_rng(1).integers(0, 256, N + TRAILER_BYTES, dtype=np.uint8))
        assert raw.upsert(flat_name(keys[0]), other) == 0  # other bytes, right length
        copied = raw.get(flat_name(keys[2]))  # a valid object of another key under this name
        assert len(copied) == N + TRAILER_BYTES
        assert raw.upsert(flat_name(keys[1]), copied) == 0
        assert raw.upsert(flat_name(keys[3]), copied[: N // 2]) == 0  # truncated
    finally:
        raw.close()
    ok, bufs = load_all(adapter, keys)
    assert ok == [False, False, True, False]
    assert np.array_equal(bufs[2], data[2])
    status = adapter.adapter.status()
    assert status["corrupt"] == 3
    assert adapter.counters["load_corrupt"] == 3
    assert done(adapter.lookup(keys)) == [False, False, True, False]  # removed


def test_bare_and_framed_objects_read_in_either_mode(
    master: Master, mc_json: Any, open_adapter: Opener
) -> None:
    """A bare object (the reference's format) reads in a checksum tier, and an integrity
    "raw" adapter writes bare objects and still checks framed ones."""
    framed = open_adapter(mc_json())
    bare = open_adapter(mc_json(integrity="raw"), index=1)
    keys, data = keys_for(2), payloads(2, N)
    assert store_all(bare, keys[:1], data[:1]) == [True]
    assert store_all(framed, keys[1:], data[1:]) == [True]
    raw = raw_client(master.addr)
    try:
        assert raw.get_size(flat_name(keys[0])) == N
        assert raw.get_size(flat_name(keys[1])) == N + TRAILER_BYTES
    finally:
        raw.close()
    for adapter in (framed, bare):
        ok, bufs = load_all(adapter, keys)
        assert ok == [True, True]
        assert all(np.array_equal(a, b) for a, b in zip(bufs, data, strict=True))
    assert bare.adapter.footprint(N) == N and framed.adapter.footprint(N) == N + TRAILER_BYTES


def test_setup_against_no_master_is_a_config_error_in_time(tmp_path: Path) -> None:
    addr = f"127.0.0.1:{free_port()}"
    raw = {"type": "mooncake_store", **client_config(addr), "setup_timeout_s": 2}
    spec = parse_adapter(0, raw)
    start = time.monotonic()
    with pytest.raises(ConfigError) as info:
        build_adapter(spec)
    took = time.monotonic() - start
    assert took < 2 + 1.5, took
    assert f"master_server_addr {addr}" in str(info.value)
    assert str(info.value).startswith("--l2-adapter: #0 (mooncake_store)")


def test_kvhive_restart_finds_only_what_other_segments_hold(
    master: Master, mc_json: Any, open_adapter: Opener
) -> None:
    """Objects live in the mounting clients' segments: a restarted kvhive finds none of the
    objects its own segment held, but those placed in another client's segment survive."""
    own = mc_json()
    first = open_adapter(own)
    keys, data = keys_for(3), payloads(3, N)
    assert store_all(first, keys, data) == [True] * 3
    first.close()
    second = open_adapter(own)
    assert done(second.lookup(keys)) == [False] * 3
    second.close()

    holder = raw_client(master.addr, segment=256 * MiB)  # e.g. a mooncake_client process
    try:
        lean = mc_json(global_segment_size="0")  # mounts nothing: objects go to the holder
        third = open_adapter(lean)
        assert store_all(third, keys, data) == [True] * 3
        third.close()
        fourth = open_adapter(lean)
        assert done(fourth.lookup(keys)) == [True] * 3
        ok, bufs = load_all(fourth, keys)
        assert ok == [True] * 3
        assert all(np.array_equal(a, b) for a, b in zip(bufs, data, strict=True))
        fourth.close()
    finally:
        holder.close()


def test_master_restart_costs_misses_then_recovers(tmp_path: Path, open_adapter: Opener) -> None:
    master = Master(tmp_path)
    master.start()
    try:
        adapter = open_adapter({"type": "mooncake_store", **client_config(master.addr)})
        keys, data = keys_for(2), payloads(2, N)
        assert store_all(adapter, keys, data) == [True, True]
        master.stop()
        start = time.monotonic()
        assert done(adapter.lookup(keys), timeout=20) == [False, False]
        ok, _ = load_all(adapter, keys)
        assert ok == [False, False]
        assert store_all(adapter, keys_for(1), payloads(1, N)) == [False]
        assert time.monotonic() - start < 30  # errors, never a hang
        status = adapter.adapter.status()
        assert status["errors"] >= 3
        master.start()
        fresh, more = keys_for(2), payloads(2, N, seed=7)
        deadline = time.monotonic() + 30
        while store_all(adapter, fresh, more) != [True, True]:
            assert time.monotonic() < deadline, "no recovery within 30 s"
            time.sleep(0.5)
        assert done(adapter.lookup(keys)) == [False, False]  # the new master forgot them
        ok, bufs = load_all(adapter, fresh)
        assert ok == [True, True] and np.array_equal(bufs[0], more[0])
        assert adapter.adapter.status()["is_healthy"] is True
        adapter.close()
    finally:
        master.stop()


def test_32_mib_figures_adapter_vs_raw(tmp_path: Path, open_adapter: Opener) -> None:
    """32 MiB through the adapter (checksum: + CRC and trailer; raw: bare) vs the library's
    put_from/get_into on the same client, in one run against a master of its own, so every
    object lands in that client's segment.  Printed as FIGURE lines (``pytest -s``)."""
    from kvhive.storage.l2.adapters.mooncake import MooncakeAdapter

    master = Master(tmp_path)
    master.start()
    try:
        adapter = open_adapter({"type": "mooncake_store", **client_config(master.addr)})
        store = adapter.adapter.store  # type: ignore[attr-defined]
        bare = MooncakeAdapter(store, workers={}, framed=False, master=master.addr)
        src = payloads(1, 32 * MiB, seed=11)[0]
        dst = np.zeros_like(src)
        figures: dict[str, list[float]] = {}

        def timed(label: str, fn: Callable[..., Any], *args: Any) -> Any:
            t = time.perf_counter()
            out = fn(*args)
            figures.setdefault(label, []).append((time.perf_counter() - t) * 1e3)
            return out

        src_view, dst_view = memoryview(src), memoryview(dst)
        for i in range(7):
            (k1,), (k2,) = keys_for(1), keys_for(1)
            name = f"raw-{i}"
            assert timed("raw put_from", store.put_from, name, address(src), src.nbytes) == 0
            got = timed("raw get_into", store.get_into, name, address(dst), dst.nbytes)
            assert got == src.nbytes
            for label, adp, key in (("checksum", adapter.adapter, k1), ("raw", bare, k2)):
                fut = timed(f"adapter store ({label})", _wait, adp.submit_store, key, src_view)
                assert fut == [True]
                fut = timed(f"adapter load ({label})", _wait, adp.submit_load, key, dst_view)
                assert fut == [True]
                assert np.array_equal(dst, src)
            store.batch_remove([name, flat_name(k1), flat_name(k2)], True)
        for name, ms in figures.items():
            ms = sorted(ms[1:])  # the first run pays for first-touch page faults
            print(f"FIGURE 32MiB {name}: median {ms[len(ms) // 2]:.1f} ms, min {ms[0]:.1f} ms")
        adapter.close()
    finally:
        master.stop()


def _wait(submit: Callable[..., Any], key: ObjectKey, view: memoryview) -> list[bool]:
    return done(submit([key], [view]))
