"""An object is data only for its own key (issue 10, fault 4).

A valid object of chunk B stored under chunk A's name (a copied file, a restored backup, a
confused shared tier) must load as a corrupt miss for A, be removed, and be labelled
``corrupt`` in the prefetch-failure metric, on every L2 type that keeps named objects; and
models whose reference fs names collide (``a/b`` vs ``a-SEP-b``) must keep separate objects.
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from l2_testlib import KINDS, aligned_copy, done, keys_for, payloads
from prometheus_client import CollectorRegistry

from kvhive.config.l2_adapters import parse_adapter
from kvhive.errors import CorruptObject
from kvhive.keys import ObjectKey, pack_kv_rank
from kvhive.observability.bus import EventBus
from kvhive.observability.metrics import MetricsSubscriber
from kvhive.storage.controllers.prefetch import PrefetchController
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.l2 import integrity, naming
from kvhive.storage.l2.futures import CORRUPT, MISSING, reason
from kvhive.storage.l2.managed import ManagedAdapter
from kvhive.storage.l2.registry import build_adapter
from support.integrity import read_stored

N = 64 * 1024 + 123
NAMED = ("fs", "fs_native", "raw_block", "dax", "plugin", "native_plugin", "resp", "s3")

Opener = Callable[..., ManagedAdapter]


# -- swapping a stored object under another key's name, per backend ---------------------


def _copy_object(
    kind: str, adapter: ManagedAdapter, raw: dict[str, Any], src: ObjectKey, dst: ObjectKey
) -> None:
    """Make ``dst``'s stored object a byte copy of ``src``'s, through the backend itself."""
    if kind in ("fs", "fs_native"):
        base = Path(raw["base_path"])
        shutil.copyfile(base / naming.fs_name(src), base / naming.fs_name(dst))
    elif kind in ("raw_block", "dax"):
        store = adapter.adapter.store  # type: ignore[attr-defined]
        slot_src, _ = store._index[naming.block_name(src)]
        slot_dst, _ = store._index[naming.block_name(dst)]
        with open(raw["device_path"], "r+b") as f:  # slot rewrite: header and payload
            f.seek(store._offset(slot_src))
            blob = f.read(store.stride)
            f.seek(store._offset(slot_dst))
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
    elif kind == "resp":
        import redis

        client = redis.Redis(host=raw["host"], port=raw["port"])
        client.set(naming.flat_name(dst), client.get(naming.flat_name(src)))
        client.close()
    elif kind == "s3":
        import boto3

        endpoint, _, bucket = raw["s3_endpoint"].rpartition("/")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                          aws_access_key_id="test", aws_secret_access_key="test")  # fmt: skip
        s3.copy_object(Bucket=bucket, Key=naming.flat_name(dst),
                       CopySource={"Bucket": bucket, "Key": naming.flat_name(src)})  # fmt: skip
    elif kind == "plugin":
        store = adapter.adapter.store  # type: ignore[attr-defined]
        store._data[dst] = store._data[src]
    elif kind == "native_plugin":
        store = adapter.adapter.store  # type: ignore[attr-defined]
        blob = memoryview(bytearray(N + 4096))
        size = store.get(src, [blob])
        store.put(dst, [blob[:size]])
    else:
        raise ValueError(kind)


def _load(adapter: ManagedAdapter, keys: list[ObjectKey]) -> tuple[list[Any], list[np.ndarray]]:
    bufs = [aligned_copy(np.zeros(N, dtype=np.uint8)) for _ in keys]
    return done(adapter.load(keys, [memoryview(b) for b in bufs])), bufs


@pytest.mark.parametrize("kind", NAMED)
def test_another_keys_object_under_this_name_is_a_corrupt_miss(
    kind: str, adapter_json: Any, open_adapter: Opener
) -> None:
    raw = adapter_json(kind)
    adapter = open_adapter(raw)
    (a, b), data = keys_for(2), payloads(2, N, seed=4)
    assert done(adapter.store([a, b], [memoryview(d) for d in data])) == [True, True]
    _copy_object(kind, adapter, raw, b, a)
    ok, bufs = _load(adapter, [a, b])
    assert ok == [False, True]  # never B's bytes as A
    assert reason(ok[0]) == "corrupt" and reason(ok[1]) is None
    assert np.array_equal(bufs[1], data[1])
    assert adapter.adapter.status()["corrupt"] == 1
    assert adapter.counters["load_corrupt"] == 1
    assert done(adapter.lookup([a, b])) == [False, True]  # removed: no endless re-misses


@pytest.mark.parametrize("kind", KINDS)
def test_models_with_colliding_reference_fs_names_keep_separate_objects(
    kind: str, adapter_json: Any, open_adapter: Opener
) -> None:
    adapter = open_adapter(adapter_json(kind))
    digest, rank = os.urandom(8), pack_kv_rank(1, 0)
    models = ["a/b", "a-SEP-b", "x-SEP/", "x/SEP-", "a%2Fb", "a%b"]
    keys = [ObjectKey(digest, m, rank, 0, "") for m in models]
    data = payloads(len(keys), N, seed=5)
    assert done(adapter.store(keys, [memoryview(d) for d in data])) == [True] * len(keys)
    ok, bufs = _load(adapter, keys)
    assert ok == [True] * len(keys)
    for model, got, want in zip(models, bufs, data, strict=True):
        assert np.array_equal(got, want), f"model {model!r} was served another model's object"


# -- the prefetch-failure metric -----------------------------------------------------------


@pytest.mark.parametrize("kind", ["fs", "resp"])
def test_prefetch_failure_metric_says_corrupt(
    kind: str, l1: L1Manager, adapter_json: Any, tmp_path: Path
) -> None:
    registry = CollectorRegistry()
    bus = EventBus(max_queue_size=1000)
    bus.register(MetricsSubscriber(registry, sample_rate=0.0))
    raw = adapter_json(kind)
    spec = parse_adapter(0, json.loads(json.dumps(raw)))
    adapter = ManagedAdapter(spec, build_adapter(spec), bus=bus)
    ctl = PrefetchController(l1, [adapter], object_nbytes=lambda k: N, retain=False,
                             max_in_flight=2)  # fmt: skip
    try:
        a, b, c = keys_for(3, model="org/m")
        data = payloads(3, N, seed=6)
        assert done(adapter.store([a, b, c], [memoryview(d) for d in data])) == [True] * 3
        _copy_object(kind, adapter, raw, a, b)  # B's name now holds A's (valid) object
        got: list[int] = []
        finished = threading.Event()
        ctl.prefetch([[a], [b], [c]], lambda k: "reader", 1,
                     lambda n: (got.append(n), finished.set()))  # fmt: skip
        assert finished.wait(10)
        assert got == [1]  # the prefix ends at the corrupt chunk
        bus.drain()

        def failed(why: str) -> float | None:
            return registry.get_sample_value(
                "lmcache_mp_l2_prefetch_failure_chunks_total",
                {"reason": why, "model_name": "org/m"},
            )

        assert failed("corrupt") == 1.0
        assert failed("not_found") is None
    finally:
        ctl.close()
        adapter.close()


# -- the pieces: trailer binding, outcomes, names -----------------------------------------


def test_trailer_is_bound_to_the_key() -> None:
    a, b = keys_for(2)
    da, db = integrity.key_digest(a), integrity.key_digest(b)
    assert da != db and len(da) == 8
    data = bytes(range(256)) * 20
    framed = data + integrity.make_trailer(memoryview(data), da)
    integrity.verify(*read_stored(framed, len(data)), da)
    with pytest.raises(CorruptObject, match="another key"):
        integrity.verify(*read_stored(framed, len(data)), db)
    # the same payload stored for two keys: two different trailers
    assert framed[-integrity.TRAILER_BYTES :] != integrity.make_trailer(memoryview(data), db)


def test_unbound_version_1_trailers_are_corrupt() -> None:
    import struct
    import zlib

    data = bytes(range(256)) * 20
    v1 = struct.pack("<8sQII", b"KVHVOBJ1", len(data), zlib.crc32(data), 1)
    with pytest.raises(CorruptObject, match="version-1"):
        integrity.verify(*read_stored(data + v1, len(data)), integrity.key_digest(keys_for(1)[0]))


def test_miss_outcomes_equal_false_and_carry_their_reason() -> None:
    assert MISSING == False and CORRUPT == False  # noqa: E712 - the contract is ==
    assert not CORRUPT and [CORRUPT, True] == [False, True] and sum([CORRUPT, True]) == 1
    assert reason(CORRUPT) == "corrupt" and reason(MISSING) == "not_found"
    assert reason(False) == "not_found" and reason(True) is None


def test_fs_names_are_injective_and_keep_the_reference_names() -> None:
    rank = pack_kv_rank(1, 0)
    digest = bytes.fromhex("0101010101010101")
    reference = {"org/m": "org-SEP-m", "meta-llama/Llama-3-8B": "meta-llama-SEP-Llama-3-8B",
                 "m": "m", "a-b": "a-b", "x/SEP-": "x-SEP-SEP-"}  # fmt: skip
    for model, part in reference.items():
        key = ObjectKey(digest, model, rank)
        assert naming.fs_name(key) == f"{part}@0x01000100@0@0101010101010101.data"
        assert naming.parse_fs_name(naming.fs_name(key)) == key
    tricky = ["a/b", "a-SEP-b", "x-SEP/", "x/SEP-", "a%2Fb", "a%b", "%", "-", "/", "--SEP--",
              "a/-SEP-/b", "a-SEP-/b", "a%2DSEP%2Db", "-SEP-", "-SEP", "SEP-", "%2D", "é/ü"]  # fmt: skip
    names = {}
    for model in tricky:
        key = ObjectKey(digest, model, rank, 0, "s")
        name = naming.fs_name(key)
        assert "/" not in name and name not in names, (model, names.get(name))
        names[name] = model
        assert naming.parse_fs_name(name) == key
    assert naming.fs_name(ObjectKey(digest, "a-SEP-b", rank)).startswith("a%2DSEP%2Db@")
    # a name fs_name never produces is not parsed (no aliasing in scans)
    assert naming.parse_fs_name("a%2db@0x01000100@0@0101010101010101.data") is None
