"""Store far more than L1 holds; every reported hit prefix must be retrievable byte-exact.

Runs in the client venv against a server started with a small ``--l1-size-gb``.
Requests 0..N-1 each store ``--chunks`` chunks of distinct data (regenerated
from a per-request seed, so the driver keeps nothing in memory). Afterwards
each request is looked up again; whatever prefix the server reports is
retrieved into other blocks and compared with the data that was stored.
"""

from __future__ import annotations

import argparse
import time

from _common import (
    ModelShape,
    VllmHarness,
    blocks_for,
    bytes_equal,
    emit,
    fake_kv_cache_config,
    fill_blocks,
    log,
    make_vllm_cpu_kv_caches,
    set_blocks,
    snapshot_blocks,
    tokens,
)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--url", required=True)
    p.add_argument("--mode", choices=["lmcache_driven", "engine_driven"], default="lmcache_driven")
    p.add_argument("--model", default="interop-eviction")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--settle-ms", type=float, default=0.0)
    args = p.parse_args()

    shape = ModelShape()  # 4 layers x 2 x 4 heads x 64, bf16: 1 MiB per 256-token chunk
    h = VllmHarness(args.url, args.model, args.block_size, args.mode)
    c, b, n = h.chunk_size, h.blocks_in_chunk, args.chunks
    src = blocks_for(1, n, b)
    dst = blocks_for(src[-1] + 1, n, b)
    kv = make_vllm_cpu_kv_caches(shape, dst[-1] + 1, args.block_size)
    h.register(kv, fake_kv_cache_config(shape, dst[-1] + 1, args.block_size))
    chunk_bytes = 2 * shape.num_layers * c * shape.num_kv_heads * shape.head_size * 2
    res: dict = {"chunk_size": c, "chunk_bytes": chunk_bytes, "instance_id": h.instance_id}

    toks = [tokens(10_000 + i, n * c) for i in range(args.requests)]
    store_ok = []
    t0 = time.monotonic()
    for i, tk in enumerate(toks):
        fill_blocks(kv, src, seed=10_000 + i)
        store_ok.append(h.store(f"ev-store-{i}", tk, src, 0, n * c))
        h.end_session(f"ev-store-{i}")
    res["store_ok"] = store_ok
    res["store_seconds"] = round(time.monotonic() - t0, 3)
    time.sleep(args.settle_ms / 1000)

    hits, retrieve_ok, equal, errors = [], [], [], []
    # Newest first: under LRU the newest data is the most likely to be resident.
    for i in reversed(range(args.requests)):
        rid = f"ev-load-{i}"
        hit = h.lookup(rid, toks[i])
        hits.append(hit)
        if hit:
            nb = hit // c * b
            fill_blocks(kv, src, seed=10_000 + i)
            want = snapshot_blocks(kv, src[:nb])
            set_blocks(kv, dst, 3.0)
            ok, errs = h.retrieve(rid, toks[i], dst[:nb], 0, hit)
            retrieve_ok.append(ok)
            errors.extend(errs)
            equal.append(bytes_equal(snapshot_blocks(kv, dst[:nb]), want))
        h.end_session(rid)
        log(f"request {i}: hit {hit // c} chunks")
    res["hit_chunks_newest_first"] = [x // c for x in hits]
    res["retrieve_ok"] = retrieve_ok
    res["bytes_equal"] = equal
    res["load_errors"] = errors
    res["ping_after"] = bool(h.worker.req_client.ping(h.instance_id).result(timeout=10))
    h.shutdown()
    emit(res)


if __name__ == "__main__":
    main()
