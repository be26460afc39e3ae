"""Store/retrieve/lookup timings through the real lmcache 0.5.6 vLLM adapters.

Runs INSIDE the lmcache client venv (torch + lmcache 0.5.6) against any server that
speaks the protocol (kvhive or the reference).  Prints one JSON object.

    python benchmarks/lmcache_client_bench.py --url tcp://127.0.0.1:5555 --mode lmcache_driven
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "interop" / "drivers"))

from _common import (  # noqa: E402
    ModelShape,
    VllmHarness,
    fake_kv_cache_config,
    fill_blocks,
    make_vllm_cpu_kv_caches,
    tokens,
)


def median_ms(samples: list[float]) -> float:
    return statistics.median(samples) * 1000


def pct(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, int(q * len(s)))] * 1000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--mode", default="lmcache_driven", choices=["lmcache_driven", "engine_driven"])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=16, help="chunks per batched request")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--lookups", type=int, default=200)
    args = ap.parse_args()

    shape = ModelShape(args.layers, args.heads, args.head_size, "bfloat16")
    h = VllmHarness(args.url, "bench-model", args.block_size, args.mode, mq_timeout=60)
    c, bic = h.chunk_size, h.blocks_in_chunk
    n = args.chunks
    num_blocks = 2 * n * bic + 1
    kv = make_vllm_cpu_kv_caches(shape, num_blocks, args.block_size)
    h.register(kv, fake_kv_cache_config(shape, num_blocks, args.block_size))
    src = list(range(1, 1 + n * bic))
    dst = list(range(1 + n * bic, 1 + 2 * n * bic))
    fill_blocks(kv, src, seed=1)
    chunk_bytes = 2 * args.layers * c * args.heads * args.head_size * 2
    out: dict[str, object] = {"mode": args.mode, "chunk_bytes": chunk_bytes, "chunks": n}

    def run(kind: str, per_req: int) -> list[float]:
        times = []
        for r in range(args.rounds):
            toks = tokens(1000 * per_req + r + (0 if kind == "store" else 0), n * c)
            rid = f"{kind}-{per_req}-{r}"
            if kind == "store":
                for i in range(0, n, per_req):
                    t0 = time.perf_counter()
                    ok = h.store(rid, toks, src[i * bic : (i + per_req) * bic], i * c, (i + per_req) * c)
                    times.append(time.perf_counter() - t0)
                    assert ok
            else:
                # store first (untimed), then lookup to lock, then timed retrieves
                h.store(rid + "s", toks, src, 0, n * c)
                hit = h.lookup(rid, toks)
                assert hit >= n * c - 1, hit
                for i in range(0, n, per_req):
                    t0 = time.perf_counter()
                    ok, errs = h.retrieve(rid, toks, dst[i * bic : (i + per_req) * bic], i * c, (i + per_req) * c)
                    times.append(time.perf_counter() - t0)
                    assert ok and not errs
                h.end_session(rid)
        return times

    for per_req in (1, n):
        for kind in ("store", "retrieve"):
            t = run(kind, per_req)
            gbs = chunk_bytes * per_req / statistics.median(t) / 1e9
            out[f"{kind}_{per_req}chunk_ms"] = round(median_ms(t), 3)
            out[f"{kind}_{per_req}chunk_gbs"] = round(gbs, 3)
            print(f"{kind} {per_req} chunk(s)/req: {median_ms(t):.2f} ms, {gbs:.2f} GB/s", file=sys.stderr)

    if args.lookups:
        hit_toks = tokens(424242, n * c)
        h.store("lk", hit_toks, src, 0, n * c)
        for label, toks in (("hit", hit_toks), ("miss", tokens(999, n * c))):
            lat = []
            for i in range(args.lookups):
                rid = f"lk-{label}-{i}"
                t0 = time.perf_counter()
                h.lookup(rid, toks)
                lat.append(time.perf_counter() - t0)
                h.end_session(rid)
            out[f"lookup_{label}_p50_ms"] = round(pct(lat, 0.5), 3)
            out[f"lookup_{label}_p99_ms"] = round(pct(lat, 0.99), 3)
            print(f"lookup {label} ({n} chunks): p50 {pct(lat, 0.5):.3f} ms p99 {pct(lat, 0.99):.3f} ms", file=sys.stderr)
    h.shutdown()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
