"""Scenarios for the ops 0.5.7 changed, sent by 0.5.7's own client (``drive.py`` runs them).

Each builds its requests with 0.5.7's classes (``IPCCacheServerKey.from_token_ids``,
``RegisterEngineDrivenContextPayload``, ``GroupLayout``, ``tensor_wire``, the CPU shared-memory
KV wrapper ``CpuShmTensorWrapper``) and sends them through 0.5.7's ``ZmqMultiprocessClient``,
which always sends every declared argument (``extra_ranges``, ``skipped_chunks``).  Where
0.5.7's own transfer contexts need native code (``transfer_context.inline``/``shm``), the
scenario makes the same calls they make; see ``tests/interop057/README.md``.

Runs INSIDE the 0.5.7 client venv; imports nothing from kvhive.
"""

from __future__ import annotations

import argparse
import json
import urllib.request
import uuid
from collections.abc import Callable
from multiprocessing import shared_memory
from typing import Any

import lmc057

Scenario = Callable[[lmc057.Lmc057, Any, lmc057.Steps, argparse.Namespace], None]
SCENARIOS: dict[str, Scenario] = {}

LAYERS, HEADS, HEAD_SIZE, BLOCK = 2, 2, 16, 16


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


def tokens(n: int, seed: int) -> list[int]:
    """``n`` token ids, distinct per ``seed``, many above 65535 (all 4 packed bytes used)."""
    return [(seed * 1_000_003 + i * 7919) % 150_000 for i in range(n)]


def rid(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:8]}"


def read_locked(args: argparse.Namespace) -> int:
    """The server's count of read-locked L1 objects (``GET /status``)."""
    with urllib.request.urlopen(args.http_url + "/status", timeout=5.0) as resp:
        return int(json.loads(resp.read())["l1"]["read_locked_objects"])


def record(steps: lmc057.Steps, name: str, value: Any) -> None:
    steps.results[name] = {"ok": True, "value": value}


def attempt(steps: lmc057.Steps, name: str, fn: Callable[[], Any]) -> Any:
    """Run ``fn`` (a client call that may raise before sending); record a failure."""
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - recorded as the step's result
        steps.results[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        return None


# ---- lmcache-driven: packed keys, lookups from start, extra_ranges ----------------------


@scenario
def lmcache_driven(
    lmc: lmc057.Lmc057, client: Any, steps: lmc057.Steps, args: argparse.Namespace
) -> None:
    """negotiate_chunk_size; a KV cache in shared memory (0.5.7's ``CpuShmTensorWrapper``)
    registered; store -> lookup -> retrieve into other blocks, byte-exact, with
    ``token_bytes`` keys; a lookup from ``start``; an abandoned lookup's locks released by
    ``free_lookup_locks(extra_ranges=...)`` exactly once (read-locked objects counted on
    the server); malformed ``token_bytes`` keys answered with an error reply."""
    import torch
    from lmcache.utils import EngineType
    from lmcache.v1.platform.devices.cpu.shm import migrate_to_shm_and_wrap

    chunk = steps.call("get_chunk_size", client.get_chunk_size())
    steps.call("negotiate_ok", client.negotiate_chunk_size(BLOCK))
    steps.call("negotiate_bad", client.negotiate_chunk_size(48))
    steps.call("negotiate_zero", client.negotiate_chunk_size(0))

    per_chunk = chunk // BLOCK
    src = list(range(1, 1 + 2 * per_chunk))  # block 0 is the null block
    dst = list(range(1 + 2 * per_chunk, 1 + 4 * per_chunk))
    shape = (2, 1 + 4 * per_chunk, HEADS, BLOCK, HEAD_SIZE)  # vLLM CPU: [2, NB, NH, BS, HS]
    kv = [torch.zeros(shape, dtype=torch.float16) for _ in range(LAYERS)]
    wrappers = [migrate_to_shm_and_wrap(t) for t in kv]  # re-points kv at shared memory
    gen = torch.Generator().manual_seed(5)
    for t in kv:
        t[:, src] = torch.randn(t[:, src].shape, generator=gen).to(t.dtype)
    iid = 5700 + uuid.uuid4().int % 10_000
    model = args.model + "/lmcache-driven"
    steps.call(
        "register",
        client.register_kv_cache(
            iid, wrappers, model, 1, EngineType.VLLM, {"kv_layout": "HND"}, []
        ),
    )

    toks = tokens(2 * chunk + 5, seed=11)

    def key(start: int, end: int, request_id: str, **kw: Any) -> Any:
        return lmc.key(model, toks, start=start, end=end, request_id=request_id, **kw)

    writer = rid("w")
    stored = steps.call(
        "store", client.store(key(0, 2 * chunk, writer, worker_id=0), iid, [src], b"")
    )
    record(steps, "store_ok", bool(stored and stored[1]))
    steps.call("store_end_session", client.end_session(writer))

    # lookup -> retrieve, byte-exact
    reader = rid("r")
    steps.call("lookup", client.lookup(key(0, 2 * chunk, reader), 1))
    steps.poll("lookup_hits", lambda: client.query_prefetch_status(reader))
    got = steps.call(
        "retrieve", client.retrieve(key(0, 2 * chunk, reader, worker_id=0), iid, [dst], b"", 0)
    )
    record(steps, "retrieve_ok", bool(got and got[1]))
    record(
        steps,
        "retrieve_bytes_equal",
        all(torch.equal(t[:, src].view(torch.uint8), t[:, dst].view(torch.uint8)) for t in kv),
    )
    steps.call("retrieve_end_session", client.end_session(reader))
    record(steps, "locked_after_retrieve", read_locked(args))

    # A lookup that starts past the engine's prefix-cache hit (chunk 0): it locks chunk 1
    # only and reports the hit in absolute chunks.  Then the prefix cache "shrinks": the
    # connector abandons it and looks up the whole prefix again (two readers this time).
    req = rid("apc")
    steps.call("lookup_from_start", client.lookup(key(chunk, 2 * chunk, req), 1))
    steps.poll("lookup_from_start_hits", lambda: client.query_prefetch_status(req))
    record(steps, "locked_after_lookup_from_start", read_locked(args))
    steps.call("lookup_again", client.lookup(key(0, 2 * chunk, req, num_kv_readers=2), 1))
    steps.poll("lookup_again_hits", lambda: client.query_prefetch_status(req))
    abandoned = ((chunk, 2 * chunk),)  # (its start, its hit end), as the connector records it
    for n in (1, 2):  # a second naming of the same range must release nothing
        steps.call(
            f"free_extra_{n}",
            client.free_lookup_locks(key(0, 0, req), 1, abandoned),
        )
    # Each worker retrieve gives back one lock per chunk: with the abandoned lookup's lock
    # released once, two retrieves leave nothing; after the first, both chunks still hold one.
    for n in (1, 2):
        steps.call(
            f"retrieve_{n}",
            client.retrieve(key(0, 2 * chunk, req, worker_id=0), iid, [dst], b"", 0),
        )
        record(steps, f"locked_after_retrieve_{n}", read_locked(args))
    steps.call("apc_end_session", client.end_session(req))

    # Keys 0.5.7's own class refuses to build, forced past its check as a broken client
    # would send them: the server answers each with an error reply naming the field.
    short = key(0, chunk, rid("bad"))
    object.__setattr__(short, "token_bytes", short.token_bytes[:-1])
    steps.call("lookup_ragged_token_bytes", client.lookup(short, 1))
    steps.call("lookup_end_beyond_tokens", client.lookup(key(0, len(toks) + 1, rid("bad")), 1))

    steps.call("unregister", client.unregister_kv_cache(iid))


# ---- engine-driven: registration fields and inline tensor envelopes --------------------


def _payload(lmc: lmc057.Lmc057, iid: int, model: str, chunk: int, layouts: list[Any]) -> Any:
    ct = lmc.custom_types
    return ct.RegisterEngineDrivenContextPayload(
        instance_id=iid, model_name=model, world_size=1, block_size=BLOCK,
        num_layers=LAYERS, hidden_dim_size=HEADS * HEAD_SIZE, dtype_str="float16",
        use_mla=False, num_physical_slots=chunk, group_layouts=layouts,
    )  # fmt: skip


@scenario
def engine_driven_inline(
    lmc: lmc057.Lmc057, client: Any, steps: lmc057.Steps, args: argparse.Namespace
) -> None:
    """A 0.5.7 registration (``group_layouts``, reply with ``null_block_id``); the inline
    path as ``transfer_context.inline`` drives it: prepare_store, commit_store with
    ``tensor_wire.encode_tensors``, lookup, prepare_retrieve decoded by
    ``tensor_wire.decode_tensors`` against the worker's layout (byte-exact), commit_retrieve;
    a grouped envelope; envelopes that do not match the registration; a multi-group
    registration."""
    import torch

    tw, ct = lmc.tensor_wire, lmc.custom_types
    chunk = client.get_chunk_size().result(timeout=args.timeout)
    iid = 5800 + uuid.uuid4().int % 10_000
    model = args.model + "/engine-driven"
    reply = steps.call("register", client.register_kv_cache_engine_driven_context(
        _payload(lmc, iid, model, chunk, [])))  # fmt: skip
    record(steps, "register_reply_type", type(reply).__name__)

    shape = torch.Size([2, LAYERS, chunk, HEADS * HEAD_SIZE])
    toks = tokens(3 * chunk, seed=21)
    gen = torch.Generator().manual_seed(9)
    chunks = [torch.randn(shape, generator=gen).to(torch.float16) for _ in range(2)]

    def key(start: int, end: int, request_id: str, worker_id: int | None = 0) -> Any:
        return lmc.key(
            model, toks, start=start, end=end, request_id=request_id, worker_id=worker_id
        )

    writer = rid("w")
    steps.call("prepare_store", client.prepare_store(key(0, 2 * chunk, writer), iid))
    steps.call("commit_store", client.commit_store(key(0, 2 * chunk, writer), iid,
                                                   tw.encode_tensors(chunks)))  # fmt: skip
    reader = rid("r")
    steps.call("lookup", client.lookup(key(0, 2 * chunk, reader, None), 1))
    steps.poll("lookup_hits", lambda: client.query_prefetch_status(reader))
    got = steps.call("prepare_retrieve", client.prepare_retrieve(key(0, 2 * chunk, reader), iid))
    if got is not None and got.success:
        back = attempt(steps, "decode", lambda: tw.decode_tensors(
            got.data, expected_shape=shape, expected_dtype=torch.float16, expected_count=2))  # fmt: skip
        record(steps, "retrieve_bytes_equal", back is not None and all(
            torch.equal(a.view(torch.uint8), b.view(torch.uint8))
            for a, b in zip(back, chunks, strict=True)))  # fmt: skip
    steps.call("commit_retrieve", client.commit_retrieve(key(0, 2 * chunk, reader), iid))
    steps.call("end_sessions", client.end_session(writer))
    client.end_session(reader).result(timeout=args.timeout)

    # A grouped envelope of the one registered group, carrying chunk 2 of [0, 3C) only.
    grouped = tw.encode_grouped_tensors([([2], [chunks[0]])])
    steps.call(
        "commit_store_grouped", client.commit_store(key(0, 3 * chunk, rid("g")), iid, grouped)
    )

    # Envelopes 0.5.7's encoder builds but that do not match the registered layout.
    wrong_shape = [torch.zeros(2, LAYERS, chunk // 2, 2 * HEADS * HEAD_SIZE, dtype=torch.float16)]
    wrong_dtype = [torch.zeros(shape, dtype=torch.bfloat16)]
    for name, bad in (("shape", wrong_shape), ("dtype", wrong_dtype), ("count", chunks)):
        steps.call(f"commit_store_wrong_{name}", client.commit_store(
            key(2 * chunk, 3 * chunk, rid("x")), iid, tw.encode_tensors(bad)))  # fmt: skip

    # A hybrid-KV worker's registration: two LMCache groups.
    groups = [ct.GroupLayout(num_layers=1, hidden_dim_size=HEADS * HEAD_SIZE, dtype_str="float16",
                             tokens_per_block=BLOCK) for _ in range(2)]  # fmt: skip
    steps.call("register_multi_group", client.register_kv_cache_engine_driven_context(
        _payload(lmc, iid + 1, model, chunk, groups)))  # fmt: skip
    steps.call("unregister", client.unregister_kv_cache_engine_driven_context(iid))


@scenario
def engine_driven_shm(
    lmc: lmc057.Lmc057, client: Any, steps: lmc057.Steps, args: argparse.Namespace
) -> None:
    """Against a server with a shared L1 pool (``--shm-name``): a 0.5.7 registration gets the
    pool and ``null_block_id``; ``prepare_store(..., skipped_chunks)`` reserves no slot for
    the skipped chunk; the worker writes the slots, commits, looks up and reads them back
    (what ``transfer_context.shm`` does, by hand: it needs native code here)."""
    import numpy as np

    chunk = client.get_chunk_size().result(timeout=args.timeout)
    iid = 5900 + uuid.uuid4().int % 10_000
    model = args.model + "/engine-driven-shm"
    reply = steps.call("register", client.register_kv_cache_engine_driven_context(
        _payload(lmc, iid, model, chunk, [])))  # fmt: skip
    if reply is None or not reply.shm_name:
        return
    pool = shared_memory.SharedMemory(name=reply.shm_name.lstrip("/"), create=False)
    try:
        toks = tokens(3 * chunk, seed=31)

        def key(request_id: str, worker_id: int | None = 0) -> Any:
            return lmc.key(model, toks, start=0, end=3 * chunk, request_id=request_id,
                           worker_id=worker_id)  # fmt: skip

        writer = rid("w")
        prep = steps.call("prepare_store", client.prepare_store(key(writer), iid, ((2,),)))
        slots = prep.context["slots"] if prep is not None else []
        rng = np.random.default_rng(4)
        written = []
        for slot in slots:
            data = rng.integers(0, 256, slot["length"], np.uint8).tobytes()
            pool.buf[slot["offset"] : slot["offset"] + slot["length"]] = data
            written.append(data)
        steps.call("commit_store", client.commit_store(key(writer), iid, b""))
        reader = rid("r")
        steps.call("lookup", client.lookup(key(reader, None), 1))
        steps.poll("lookup_hits", lambda: client.query_prefetch_status(reader))
        two = lmc.key(model, toks, start=0, end=2 * chunk, request_id=reader, worker_id=0)
        got = steps.call("prepare_retrieve", client.prepare_retrieve(two, iid))
        read = [
            bytes(pool.buf[s["offset"] : s["offset"] + s["length"]])
            for s in (got.context.get("slots", []) if got is not None else [])
        ]
        record(steps, "retrieve_bytes_equal", read == written)
        steps.call("commit_retrieve", client.commit_retrieve(two, iid))
        for request_id in (writer, reader):
            client.end_session(request_id).result(timeout=args.timeout)
        steps.call("unregister", client.unregister_kv_cache_engine_driven_context(iid))
    finally:
        pool.close()
