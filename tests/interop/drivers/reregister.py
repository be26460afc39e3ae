"""Same instance_id, NEW shared-memory KV cache: the server must use the new cache.

Runs in the client venv, lmcache-driven (cpu_shm) only.

Worker 1 registers cache A, stores request T1 from it, then "crashes": its
heartbeat stops and its socket closes without unregistering. Worker 2 comes
up with the SAME instance_id (as a restarted client with a fixed id would)
and registers a fresh cache B (new shm segments). Then:

* T1 is looked up and retrieved into B: B must receive T1's bytes;
* T2 is stored from B and retrieved into other blocks of B: the server must
  have read T2 from B (not from A's stale pages).

The reference treats the second registration as a liveness refresh and keeps
mapping A (spec defect 6), so both checks fail there.
"""

from __future__ import annotations

import time

import _common as common


def main() -> None:
    p = common.driver_parser("interop-reregister")
    p.add_argument("--chunks", type=int, default=2)
    p.add_argument("--settle-ms", type=float, default=0.0)
    args = p.parse_args()

    shape, bs, n = common.ModelShape(), 16, args.chunks
    res: dict = {}

    h1 = common.VllmHarness(args.url, args.model, bs, "lmcache_driven", with_scheduler=False)
    c, b = h1.chunk_size, h1.blocks_in_chunk
    src, dst = common.src_dst_blocks(n, b)
    nblocks = dst[-1] + 1
    kv_a = common.register_cpu_kv(h1, shape, nblocks)
    iid = h1.instance_id
    res["instance_id"] = iid
    t1, t2 = common.tokens(501, n * c), common.tokens(502, n * c)
    common.fill_blocks(kv_a, src, seed=501)
    want_t1 = common.snapshot_blocks(kv_a, src)
    res["store_t1_ok"] = h1.store("rr-t1", t1, src, 0, n * c)
    # Crash worker 1: no unregister, heartbeat gone, socket closed.
    hb = h1.worker._heartbeat
    if hb is not None:
        hb.stop()
    h1.worker.req_client.close()
    # Make A's pages distinguishable from anything the test expects.
    common.set_blocks(kv_a, src + dst, -5.0)
    common.log(f"worker 1 (instance {iid}) abandoned")

    h2 = common.VllmHarness(args.url, args.model, bs, "lmcache_driven")
    h2.worker.instance_id = iid  # a restarted client reusing its fixed id
    kv_b = common.make_vllm_cpu_kv_caches(shape, nblocks, bs)
    try:
        h2.register(kv_b, common.fake_kv_cache_config(shape, nblocks, bs))
        res["register_error"] = None
    except Exception as exc:  # noqa: BLE001 - an explicit rejection is reported, not hidden
        res["register_error"] = f"{type(exc).__name__}: {exc}"
        common.emit(res)
        return
    time.sleep(args.settle_ms / 1000)

    # T1 (stored from A) retrieved into B.
    common.set_blocks(kv_b, dst, 9.0)
    res["t1_hit_tokens"] = hit = h2.lookup("rr-load-t1", t1)
    if hit == n * c:
        ok, errs = h2.retrieve("rr-load-t1", t1, dst, 0, hit)
        res["t1_retrieve_ok"], res["t1_load_errors"] = ok, errs
        res["t1_into_new_cache"] = common.bytes_equal(common.snapshot_blocks(kv_b, dst), want_t1)
    h2.end_session("rr-load-t1")

    # T2 stored from B, retrieved into other blocks of B.
    common.fill_blocks(kv_b, src, seed=502)
    want_t2 = common.snapshot_blocks(kv_b, src)
    res["store_t2_ok"] = h2.store("rr-t2", t2, src, 0, n * c)
    h2.end_session("rr-t2")
    time.sleep(args.settle_ms / 1000)
    common.set_blocks(kv_b, dst, 9.0)
    res["t2_hit_tokens"] = hit = h2.lookup("rr-load-t2", t2)
    if hit == n * c:
        ok, errs = h2.retrieve("rr-load-t2", t2, dst, 0, hit)
        res["t2_retrieve_ok"], res["t2_load_errors"] = ok, errs
        res["t2_from_new_cache"] = common.bytes_equal(common.snapshot_blocks(kv_b, dst), want_t2)
    h2.end_session("rr-load-t2")
    h2.shutdown()
    h1.shutdown(unregister=False)
    common.emit(res)


if __name__ == "__main__":
    main()
