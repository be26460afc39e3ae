"""Store, prefetch and eviction controllers over a real L1 and in-process adapters."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest

from kvhive.config.l2 import L2Config
from kvhive.config.l2_adapters import parse_adapter
from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.storage.controllers import L2Layer
from kvhive.storage.eviction import make_policy
from kvhive.storage.l1 import L1Manager, L1Params
from kvhive.storage.quota import QuotaRegistry

N = 8192 + 100
MOCK = {"type": "mock", "max_size_gb": 1, "mock_bandwidth_gb": 100}


def keys(n: int, salt: str = "", start: int = 0) -> list[ObjectKey]:
    return [
        ObjectKey(i.to_bytes(8, "big"), "m", pack_kv_rank(1, 0), 0, salt)
        for i in range(start, start + n)
    ]


@pytest.fixture
def l1() -> Iterator[L1Manager]:
    m = L1Manager(L1Params(size_bytes=4 << 20, align_bytes=4096, lazy=False, init_bytes=0,
                           write_ttl=600.0, read_ttl=300.0, watermark=0.9, eviction_ratio=0.2,
                           shm_name=""),
                  policy=make_policy("LRU"))  # fmt: skip
    yield m
    m.close()


@pytest.fixture
def layer(l1: L1Manager) -> Iterator[Callable[..., L2Layer]]:
    made: list[L2Layer] = []

    def make(*adapters: dict[str, Any], **policies: Any) -> L2Layer:
        cfg = L2Config(adapters=tuple(json.dumps(a) for a in adapters), **policies)
        lay = L2Layer(cfg, l1, QuotaRegistry(), object_nbytes=lambda k: N, read_ttl_s=300.0)
        lay.start()
        made.append(lay)
        return lay

    yield make
    for lay in made:
        lay.close()


def put_l1(l1: L1Manager, ks: list[ObjectKey], fill: int = 1) -> None:
    slots = l1.reserve(ks, N, "writer")
    for i, s in enumerate(slots):
        assert s is not None
        l1.view(s)[:] = (fill + i) % 256
    assert all(l1.commit(slots))


def prefetch(lay: L2Layer, ks: list[ObjectKey], readers: int = 1) -> int:
    got: list[int] = []
    ev = threading.Event()
    lay.prefetch.prefetch(
        [[k] for k in ks], lambda k: "reader", readers, lambda n: (got.append(n), ev.set())
    )
    assert ev.wait(10)
    return got[0]


def in_adapter(lay: L2Layer, index: int, ks: list[ObjectKey]) -> list[bool]:
    return lay.adapters[index].lookup(ks).result(10)


def test_write_behind_reaches_every_adapter_and_keeps_l1(
    l1: L1Manager, layer: Any, tmp_path: Any
) -> None:
    lay = layer(MOCK, {"type": "fs", "base_path": str(tmp_path)})
    ks = keys(5)
    put_l1(l1, ks)
    assert lay.store.drain(10)
    assert in_adapter(lay, 0, ks) == [True] * 5 and in_adapter(lay, 1, ks) == [True] * 5
    assert l1.contains(ks) == [True] * 5
    assert l1.stats().read_locked_objects == 0


def test_skip_l1_frees_only_after_every_adapter_stored(
    l1: L1Manager, layer: Any, tmp_path: Any
) -> None:
    lay = layer(MOCK, {"type": "fs", "base_path": str(tmp_path)}, store_policy="skip_l1")
    ks = keys(4)
    put_l1(l1, ks)
    assert lay.store.drain(10)
    assert l1.contains(ks) == [False] * 4
    assert lay.store.freed_from_l1 == 4
    assert in_adapter(lay, 1, ks) == [True] * 4


def test_skip_l1_failed_write_keeps_l1_and_retries(
    l1: L1Manager, layer: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr("kvhive.storage.controllers.store.RETRY_BASE_S", 0.05)
    failing = {"type": "fault_inject", "inner": MOCK, "fail_ops": ["store"]}
    lay = layer(MOCK, failing, store_policy="skip_l1")
    ks = keys(3)
    put_l1(l1, ks)
    time.sleep(0.5)
    assert l1.contains(ks) == [True] * 3  # adapter 1 never stored them: they stay in L1
    lanes = lay.store.status()["lanes"]
    assert lanes["#1 (fault_inject)"]["retried"] >= 3
    assert lanes["#0 (mock)"]["retried"] == 0


def test_default_policy_gives_up_after_attempts(
    l1: L1Manager, layer: Any, monkeypatch: Any
) -> None:
    monkeypatch.setattr("kvhive.storage.controllers.store.RETRY_BASE_S", 0.01)
    lay = layer({"type": "fault_inject", "inner": MOCK, "fail_ops": ["store"]})
    put_l1(l1, keys(2))
    deadline = time.monotonic() + 5
    while lay.store.status()["lanes"]["#0 (fault_inject)"]["given_up"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert l1.stats().read_locked_objects == 0


def test_prefetch_loads_longest_prefix_from_lowest_index(
    l1: L1Manager, layer: Any, tmp_path: Any
) -> None:
    fs = {"type": "fs", "base_path": str(tmp_path)}
    lay = layer(MOCK, fs)
    ks = keys(4)
    put_l1(l1, ks, fill=7)
    assert lay.store.drain(10)
    # Chunk 2 is only in fs (index 1); chunk 3 is nowhere: hit = 3, chunk 2 from fs.
    lay.adapters[0].delete(ks[2:]).result(10)
    lay.adapters[1].delete(ks[3:]).result(10)
    l1.clear(force=True)
    assert prefetch(lay, ks) == 3
    assert lay.adapters[0].counters["loaded"] == 2 and lay.adapters[1].counters["loaded"] == 1
    slots = l1.resident(ks[:3])
    assert all(np.all(l1.view(s) == (7 + i) % 256) for i, s in enumerate(slots))
    l1.unlock(ks[:3], "reader")
    assert l1.stats().objects == 0  # default policy: temporary, gone after the reader


def test_prefetch_hole_in_the_middle_cuts_the_prefix(l1: L1Manager, layer: Any) -> None:
    lay = layer(MOCK)
    ks = keys(5)
    put_l1(l1, ks)
    assert lay.store.drain(10)
    lay.adapters[0].delete(ks[1:2]).result(10)
    l1.clear(force=True)
    assert prefetch(lay, ks) == 1
    assert l1.stats().read_locked_objects == 1


def test_retain_keeps_prefetched_objects_and_never_writes_them_back(
    l1: L1Manager, layer: Any
) -> None:
    lay = layer(MOCK, prefetch_policy="retain")
    ks = keys(3)
    put_l1(l1, ks)
    assert lay.store.drain(10)
    stored = lay.adapters[0].counters["stored"]
    l1.clear(force=True)
    assert prefetch(lay, ks, readers=2) == 3
    l1.unlock(ks, "reader", 2)
    assert l1.contains(ks) == [True] * 3
    assert lay.store.drain(5)
    assert lay.adapters[0].counters["stored"] == stored  # no write-back of loaded data


def test_prefetch_mixes_l1_hits_and_l2_loads(l1: L1Manager, layer: Any) -> None:
    lay = layer(MOCK)
    ks = keys(3)
    put_l1(l1, ks)
    assert lay.store.drain(10)
    l1.delete(ks[:1])
    assert prefetch(lay, ks) == 3
    assert lay.adapters[0].counters["loaded"] == 1


def test_max_in_flight_bounds_concurrent_prefetches(l1: L1Manager, layer: Any) -> None:
    slow = {"type": "fault_inject", "inner": MOCK, "lookup_delay_ms": 200}
    lay = layer(slow, prefetch_max_in_flight=2)
    ks = keys(6)
    put_l1(l1, ks)
    assert lay.store.drain(10)
    l1.clear(force=True)
    done = threading.Event()
    got: list[int] = []

    def finished(n: int) -> None:
        got.append(n)
        if len(got) == 6:
            done.set()

    start = time.monotonic()
    for k in ks:
        lay.prefetch.prefetch([[k]], lambda key: ("r", key), 1, finished)
    assert done.wait(10)
    assert sorted(got) == [1] * 6
    assert time.monotonic() - start >= 0.55  # 6 requests, 2 at a time, 0.2 s each


def test_late_load_keeps_its_reservation_until_it_finishes(l1: L1Manager, layer: Any) -> None:
    slow = {"type": "fault_inject", "inner": MOCK, "load_delay_ms": 600, "timeout_s": 0.2}
    lay = layer(slow)
    ks = keys(2)
    put_l1(l1, ks)
    assert lay.store.drain(10)
    l1.clear(force=True)
    assert prefetch(lay, ks) == 0
    assert l1.stats().staging_objects == 2  # the adapter may still write into them
    deadline = time.monotonic() + 5
    while l1.stats().staging_objects:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert lay.prefetch.status()["timeouts"] == 1


def test_duplicate_prefetches_share_one_load(l1: L1Manager, layer: Any) -> None:
    slow = {"type": "fault_inject", "inner": MOCK, "load_delay_ms": 150}
    lay = layer(slow)
    ks = keys(2)
    put_l1(l1, ks)
    assert lay.store.drain(10)
    l1.clear(force=True)
    got: list[int] = []
    ev = threading.Event()
    for r in ("a", "b"):
        lay.prefetch.prefetch([[k] for k in ks], lambda k, r=r: r, 1,
                              lambda n: (got.append(n), len(got) == 2 and ev.set()))  # fmt: skip
    assert ev.wait(10)
    assert got == [2, 2]
    assert lay.adapters[0].counters["loaded"] == 2


def test_cascade_of_three_adapter_types(l1: L1Manager, layer: Any, tmp_path: Any) -> None:
    dax = {
        "type": "dax",
        "device_path": str(tmp_path / "dax.img"),
        "max_dax_size_gb": 0.01,
        "slot_bytes": 16384,
    }
    fs = {"type": "fs_native", "base_path": str(tmp_path / "fs")}
    lay = layer(MOCK, dax, fs)
    ks = keys(3)
    put_l1(l1, ks, fill=3)
    assert lay.store.drain(10)
    for i in range(3):
        assert in_adapter(lay, i, ks) == [True] * 3  # writes go to all
    lay.adapters[0].delete(ks[1:]).result(10)  # mock keeps chunk 0
    lay.adapters[1].delete(ks[2:]).result(10)  # dax keeps chunks 0, 1
    l1.clear(force=True)
    assert prefetch(lay, ks) == 3
    assert [a.counters["loaded"] for a in lay.adapters] == [1, 1, 1]  # lowest index holder
    assert all(np.all(l1.view(s) == (3 + i) % 256) for i, s in enumerate(l1.resident(ks)))


def test_isolated_lru_quotas_on_l2(l1: L1Manager, layer: Any) -> None:
    ev = {"eviction_policy": "IsolatedLRU", "trigger_watermark": 1.0, "eviction_ratio": 0.5}
    lay = layer({**MOCK, "eviction": ev})
    lay.eviction.quotas.set("paid", 100 * N)
    paid, free = keys(2, salt="paid"), keys(2, salt="free", start=10)
    put_l1(l1, paid + free)
    assert lay.store.drain(10)
    assert lay.usage_by_salt() == {"paid": 2 * N, "free": 2 * N}
    lay.eviction.tick()
    assert in_adapter(lay, 0, paid) == [True, True]
    assert in_adapter(lay, 0, free) == [False, False]
    assert lay.usage_by_salt() == {"paid": 2 * N}


def test_default_quota_keeps_unlisted_salts(l1: L1Manager, layer: Any) -> None:
    ev = {"eviction_policy": "IsolatedLRU", "default_quota_gb": 1}
    lay = layer({**MOCK, "eviction": ev})
    put_l1(l1, keys(2))
    assert lay.store.drain(10)
    lay.eviction.tick()
    assert in_adapter(lay, 0, keys(2)) == [True, True]


def test_adapter_json_errors_name_index_field_and_choices() -> None:
    from kvhive.errors import ConfigError

    cases = [
        ({"type": "fs", "base_path": "/x", "use_odirect": "yes"}, "#0 (fs): field 'use_odirect' must be true or false"),
        ({"type": "raw_block", "device_path": "/d", "slot_bytes": 5000}, "multiple of block_align"),
        ({"type": "mooncake_store"}, "#0 (mooncake_store): field 'local_hostname' is required"),
        ({"type": "fs", "base_path": "/x", "serde": {"type": "fp8"}}, "'serde' is not supported yet"),
        ({"type": "frob"}, "unknown adapter type 'frob'; one of dax, fault_inject"),
        ({"type": "mock", "max_size_gb": 1, "mock_bandwidth_gb": 1, "eviction": {"eviction_policy": "ARC"}},
         "field 'eviction_policy' must be one of LRU, IsolatedLRU, noop"),
        ({"type": "dax", "slot_bytes": 4096}, "either 'device_path'"),
        ({"type": "fs", "base_path": "/x", "relative_tmp_dir": "../t"}, "relative path"),
    ]  # fmt: skip
    for raw, fragment in cases:
        with pytest.raises(ConfigError) as info:
            parse_adapter(0, raw)
        assert info.value.flag == "--l2-adapter" and fragment in info.value.message, (
            info.value.message
        )
    spec = parse_adapter(3, {"type": "s3", "s3_endpoint": "s3://b.h", "s3_region": "r",
                             "aws_secret_access_key": "k"})  # fmt: skip
    assert spec.to_dict()["aws_secret_access_key"] == "***"
    assert spec.integrity == "checksum" and parse_adapter(0, MOCK).integrity == "raw"
