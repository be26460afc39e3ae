"""Store far more than L1 holds; every reported hit prefix must be retrievable byte-exact.

Runs in the client venv against a server started with a small ``--l1-size-gb``.
Requests 0..N-1 each store ``--chunks`` chunks of distinct data (regenerated
from a per-request seed, so the driver keeps nothing in memory). Afterwards
each request is looked up again; whatever prefix the server reports is
retrieved into other blocks and compared with the data that was stored.
"""

from __future__ import annotations

import time

import _common as common


def main() -> None:
    p = common.driver_parser("interop-eviction")
    p.add_argument("--mode", choices=["lmcache_driven", "engine_driven"], default="lmcache_driven")
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--settle-ms", type=float, default=0.0)
    args = p.parse_args()

    shape = common.ModelShape()  # 4 layers x 2 x 4 heads x 64, bf16: 1 MiB per 256-token chunk
    h = common.VllmHarness(args.url, args.model, args.block_size, args.mode)
    c, b, n = h.chunk_size, h.blocks_in_chunk, args.chunks
    src, dst = common.src_dst_blocks(n, b)
    kv = common.register_cpu_kv(h, shape, dst[-1] + 1)
    chunk_bytes = 2 * shape.num_layers * c * shape.num_kv_heads * shape.head_size * 2
    res: dict = {"chunk_size": c, "chunk_bytes": chunk_bytes, "instance_id": h.instance_id}

    toks = [common.tokens(10_000 + i, n * c) for i in range(args.requests)]
    store_ok = []
    t0 = time.monotonic()
    for i, tk in enumerate(toks):
        common.fill_blocks(kv, src, seed=10_000 + i)
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
            common.fill_blocks(kv, src, seed=10_000 + i)
            want = common.snapshot_blocks(kv, src[:nb])
            common.set_blocks(kv, dst, 3.0)
            ok, errs = h.retrieve(rid, toks[i], dst[:nb], 0, hit)
            retrieve_ok.append(ok)
            errors.extend(errs)
            equal.append(common.bytes_equal(common.snapshot_blocks(kv, dst[:nb]), want))
        h.end_session(rid)
        common.log(f"request {i}: hit {hit // c} chunks")
    res["hit_chunks_newest_first"] = [x // c for x in hits]
    res["retrieve_ok"] = retrieve_ok
    res["bytes_equal"] = equal
    res["load_errors"] = errors
    res["ping_after"] = bool(h.worker.req_client.ping(h.instance_id).result(timeout=10))
    h.shutdown()
    common.emit(res)


if __name__ == "__main__":
    main()
