"""Store / lookup / retrieve round trip through the real lmcache 0.5.6 vLLM adapters.

Runs in the client venv. One scheduler adapter and one worker adapter (TP=1)
with CPU KV caches in vLLM's CPU layout ([2, NB, NH, BS, HS] per layer, "HND"
hint), in the transfer mode given on the command line:

1. register; fill the source blocks of request A with random data;
2. store A's chunks in two steps (two STORE entries, as two scheduler steps);
3. full hit: look up A's tokens under a new request id, retrieve into OTHER
   blocks, compare bytes;
4. partial hit: a token list sharing a prefix of A and then diverging;
5. zero hit: unrelated tokens;
6. vLLM prefix-cache overlap: look up A again, free the locks over the part
   vLLM computed itself (free_lookup_locks over [0, vllm_hit)), retrieve the
   rest with skip_first_n_tokens, check the skipped block was left untouched;
7. store A again (already resident: harmless, ok=True);
8. shut down the worker adapter (unregister) unless --keep-registered.
"""

from __future__ import annotations

import time

import _common as common

SENTINEL = 7.0


def main() -> None:
    p = common.driver_parser("interop-roundtrip")
    p.add_argument("--mode", choices=["lmcache_driven", "engine_driven"], required=True)
    p.add_argument("--block-size", type=int, default=16)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--storage", choices=["per-layer", "shared"], default="per-layer")
    p.add_argument("--num-chunks", type=int, default=8)
    p.add_argument("--partial-chunks", type=int, default=3)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument(
        "--settle-ms",
        type=float,
        default=0.0,
        help="pause between a store reply and the next lookup",
    )
    p.add_argument("--keep-registered", action="store_true")
    args = p.parse_args()

    shape = common.ModelShape(dtype=args.dtype)
    bs = args.block_size
    h = common.VllmHarness(args.url, args.model, bs, args.mode)
    c, b, n = h.chunk_size, h.blocks_in_chunk, args.num_chunks
    res: dict = {"chunk_size": c, "blocks_in_chunk": b, "instance_id": h.instance_id}

    # Block regions (block 0 is vLLM's null block and is never used).
    src, dst_full = common.src_dst_blocks(n, b)
    dst_partial = common.blocks_for(dst_full[-1] + 1, args.partial_chunks, b)
    dst_apc = common.blocks_for(dst_partial[-1] + 1, n - 1, b)
    num_blocks = dst_apc[-1] + 1
    kv = common.make_vllm_cpu_kv_caches(shape, num_blocks, bs, args.storage)
    res["group_infos"] = h.register(kv, common.fake_kv_cache_config(shape, num_blocks, bs))
    common.log(f"registered instance {h.instance_id} chunk={c} B={b} blocks={num_blocks}")

    tok_a = common.tokens(args.seed, n * c + 17)  # a non-aligned tail, as real prompts have
    common.fill_blocks(kv, src, seed=args.seed)
    src_snap = common.snapshot_blocks(kv, src)

    half = n // 2
    res["store_ok"] = [
        h.store("req-A", tok_a, src[: half * b], 0, half * c),
        h.store("req-A", tok_a, src[half * b :], half * c, n * c),
    ]
    h.end_session("req-A")
    time.sleep(args.settle_ms / 1000)

    # Full hit, retrieve into other blocks.
    hit = h.lookup("req-full", tok_a)
    res["full_hit_tokens"] = hit
    common.set_blocks(kv, dst_full, SENTINEL)
    if hit:
        nb = hit // c * b
        ok, errs = h.retrieve("req-full", tok_a, dst_full[:nb], 0, hit)
        res["full_retrieve_ok"], res["full_load_errors"] = ok, errs
        res["full_bytes_equal"] = common.bytes_equal(
            common.snapshot_blocks(kv, dst_full[:nb]), snapshot_blocks_from(src_snap, 0, nb)
        )
    h.end_session("req-full")

    # Partial hit: shared prefix, then divergence.
    k = args.partial_chunks
    tok_p = tok_a[: k * c] + common.tokens(args.seed + 1, (n - k) * c + 5)
    hit = h.lookup("req-partial", tok_p)
    res["partial_hit_tokens"] = hit
    common.set_blocks(kv, dst_partial, SENTINEL)
    if hit:
        nb = min(hit // c, k) * b
        ok, errs = h.retrieve("req-partial", tok_p, dst_partial[:nb], 0, nb // b * c)
        res["partial_retrieve_ok"], res["partial_load_errors"] = ok, errs
        res["partial_bytes_equal"] = common.bytes_equal(
            common.snapshot_blocks(kv, dst_partial[:nb]), snapshot_blocks_from(src_snap, 0, nb)
        )
    h.end_session("req-partial")

    # Zero hit.
    res["zero_hit_tokens"] = h.lookup("req-zero", common.tokens(args.seed + 2, n * c))
    h.end_session("req-zero")

    # vLLM computed the first chunk plus one block itself (prefix cache).
    hit = h.lookup("req-apc", tok_a)
    res["apc_hit_tokens"] = hit
    vllm_hit = c + bs
    if hit >= 2 * c:
        h.free_lookup_locks("req-apc", tok_a, 0, vllm_hit)
        start = vllm_hit // c * c
        common.set_blocks(kv, dst_apc, SENTINEL)
        nb = (hit - start) // c * b
        ok, errs = h.retrieve("req-apc", tok_a, dst_apc[:nb], start, hit, skip=vllm_hit - start)
        res["apc_retrieve_ok"], res["apc_load_errors"] = ok, errs
        got = common.snapshot_blocks(kv, dst_apc[:nb])
        skipped = (vllm_hit - start) // bs
        res["apc_skipped_untouched"] = all(
            bool((t[:, :skipped] == sentinel_bytes(kv, t)).all()) for t in got
        )
        want = snapshot_blocks_from(src_snap, start // c * b, nb)
        res["apc_bytes_equal"] = common.bytes_equal(
            [t[:, skipped:] for t in got], [t[:, skipped:] for t in want]
        )
    h.end_session("req-apc")

    # Storing resident chunks again is harmless.
    res["store_again_ok"] = h.store("req-A2", tok_a, src, 0, n * c)
    h.end_session("req-A2")

    h.shutdown(unregister=not args.keep_registered)
    res["unregistered"] = not args.keep_registered
    common.emit(res)


def snapshot_blocks_from(snap, first_block: int, num_blocks: int):
    """Slice a snapshot (list of per-layer [2, n, ...] byte tensors) by block index."""
    return [t[:, first_block : first_block + num_blocks] for t in snap]


def sentinel_bytes(kv, like):
    """The byte pattern SENTINEL has in the KV dtype, broadcastable to ``like``."""
    dtype = next(iter(kv.values())).dtype
    import torch

    one = torch.full((1,), SENTINEL, dtype=dtype).view(torch.uint8)
    reps = like.shape[-1] // one.numel()
    return one.repeat(reps)


if __name__ == "__main__":
    main()
