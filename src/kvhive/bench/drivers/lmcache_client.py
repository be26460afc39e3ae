"""Store / retrieve / lookup timings through the real lmcache 0.5.6 vLLM adapters.

Runs INSIDE the lmcache client venv (torch + lmcache 0.5.6; ``scripts/setup_client_venv.sh``),
never in kvhive's: nothing here imports kvhive.  ``kvhive bench`` starts it as a subprocess
against any server speaking the protocol (kvhive or the reference) and reads the one JSON
object it prints last on stdout.  Progress goes to stderr.

    python lmcache_client.py transfer --url tcp://127.0.0.1:5555 --mode lmcache_driven
    python lmcache_client.py lookup   --url tcp://127.0.0.1:5555

``transfer``: one engine (a scheduler adapter and a worker adapter, as LMCacheMPConnector
builds them with TP = PP = 1) stores ``--rounds`` x ``--chunks`` chunks, ``--per-request``
chunks per store request, then locks them with lookups (untimed) and retrieves them.  Several
engines run as several processes meeting at a file barrier (``--barrier-dir``/``--engines``);
each reports the wall-clock span of every timed request so the caller can aggregate.

``lookup``: latency of submit + poll until the result, for each ``--prefixes`` length, on
resident chunks (hit) and on unknown tokens (miss), polling ``check_lookup_result`` with
``time.sleep(--poll-s)`` (vLLM polls once per scheduler step) and in a tight loop.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

import torch
import zmq

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
SETTLE_S = 0.1  # the reference commits a store after its reply


def log(msg: str) -> None:
    sys.stderr.write(f"[lmcache-client {os.getpid()}] {msg}\n")
    sys.stderr.flush()


# -- the fake vLLM objects the adapters duck-type --------------------------------------------


class _Spec:
    def __init__(self, block_size: int, heads: int, head_size: int, dtype: torch.dtype) -> None:
        self.block_size = block_size
        self.num_kv_heads = heads
        self.head_size = head_size
        self.dtype = dtype
        self.prefix_cacheable = True


class _Group:
    def __init__(self, layer_names: list[str], spec: _Spec) -> None:
        self.layer_names = layer_names
        self.kv_cache_spec = spec


class _KVCacheConfig:
    def __init__(self, num_blocks: int, groups: list[_Group]) -> None:
        self.num_blocks = num_blocks
        self.kv_cache_groups = groups


def nearest_rank(samples: list[float], q: float) -> float:
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))]


def tokens(seed: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 50_000, (n,), generator=gen).tolist()


class Engine:
    """One engine: the scheduler and worker adapters of LMCacheMPConnector, one server."""

    def __init__(self, url: str, mode: str, block_size: int, model: str) -> None:
        from lmcache.integration.vllm.vllm_multi_process_adapter import (
            LMCacheMPSchedulerAdapter,
            LMCacheMPWorkerAdapter,
            ParallelStrategy,
        )

        self.ctx = zmq.Context()
        strategy = ParallelStrategy(
            mla_only=False, vllm_world_size=1, vllm_worker_id=0, tp_size=1, pp_size=1, n_servers=1
        )
        extra = {
            "lmcache.mp.mq_timeout": 300.0,
            "lmcache.mp.heartbeat_interval": 10.0,
            "lmcache.mp.mp_transfer_mode": mode,
        }
        self.block_size = block_size
        self.scheduler = LMCacheMPSchedulerAdapter(
            [url], self.ctx, model, block_size, strategy, extra_config=extra
        )
        self.worker = LMCacheMPWorkerAdapter(
            url, self.ctx, model, block_size, strategy, extra_config=extra
        )
        self.chunk = int(self.worker.lmcache_tokens_per_chunk)
        self.bpc = int(self.worker.blocks_in_chunk)

    def register(self, layers: int, heads: int, head_size: int, dtype: str, nblocks: int) -> None:
        from lmcache.integration.vllm.kv_cache_groups import create_engine_group_infos_from_vllm

        td = DTYPES[dtype]
        names = [f"model.layers.{i}.self_attn.attn" for i in range(layers)]
        shape = (2, nblocks, heads, self.block_size, head_size)  # vLLM CPU: HND per layer
        self.kv = {n: torch.zeros(shape, dtype=td) for n in names}
        config = _KVCacheConfig(
            nblocks, [_Group(names, _Spec(self.block_size, heads, head_size, td))]
        )
        hints = {"kv_layout": "HND"}
        infos = create_engine_group_infos_from_vllm(config, self.kv, layout_hints=hints)
        self.worker.register_kv_caches(self.kv, engine_group_infos=infos, layout_hints=hints)

    def fill(self, block_ids: list[int], seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        idx = torch.tensor(block_ids, dtype=torch.long)
        for t in self.kv.values():
            t[:, idx] = torch.randn(t[:, idx].shape, generator=gen).to(t.dtype)

    def equal(self, a: list[int], b: list[int]) -> bool:
        ia, ib = torch.tensor(a), torch.tensor(b)
        return all(torch.equal(t[:, ia], t[:, ib]) for t in self.kv.values())

    def _op(self, toks: list[int], blocks: list[int], start: int, end: int) -> Any:
        from lmcache.integration.vllm.vllm_multi_process_adapter import LoadStoreOp

        return LoadStoreOp(
            token_ids=toks, block_ids=[list(blocks)], start=start, end=end, skip_first_n_tokens=0
        )

    def store(self, rid: str, toks: list[int], blocks: list[int], start: int, end: int) -> bool:
        self.worker.submit_store_request(
            rid, self._op(toks, blocks, start, end), self.worker.create_recorded_event()
        )
        fut = self.worker.store_futures.get(rid)
        if fut is None:
            raise RuntimeError("store dropped by the adapter (server unhealthy?)")
        ok = bool(fut.result(timeout=300))
        self.worker.get_finished({rid})
        return ok

    def retrieve(self, rid: str, toks: list[int], blocks: list[int], start: int, end: int) -> bool:
        self.worker.submit_retrieve_request(
            rid, self._op(toks, blocks, start, end), self.worker.create_recorded_event()
        )
        entry = self.worker.retrieve_futures.get(rid)
        if entry is None:
            raise RuntimeError("retrieve dropped by the adapter (server unhealthy?)")
        ok = bool(entry[0].result(timeout=300))
        self.worker.get_finished(set())
        return ok and not self.worker.get_block_ids_with_load_errors()

    def lookup(self, rid: str, toks: list[int], poll_s: float) -> int:
        self.scheduler.maybe_submit_lookup_request(rid, toks)
        deadline = time.monotonic() + 60
        while True:
            hit = self.scheduler.check_lookup_result(rid)
            if hit is not None:
                return int(hit)
            if time.monotonic() > deadline:
                raise TimeoutError(f"lookup {rid} did not finish")
            if poll_s:
                time.sleep(poll_s)

    def end_session(self, rid: str) -> None:
        self.scheduler.end_session(rid)
        self.scheduler.cleanup_lookup_result(rid)

    def close(self) -> None:
        self.worker.shutdown()
        self.scheduler.shutdown()
        self.ctx.destroy(linger=0)


class Barrier:
    """All ``n`` engine processes meet here before each timed phase."""

    def __init__(self, folder: str | None, n: int, idx: int) -> None:
        self.folder, self.n, self.idx, self.k = (Path(folder) if folder else None), n, idx, 0

    def wait(self, timeout: float = 600.0) -> None:
        if self.folder is None or self.n <= 1:
            return
        self.k += 1
        (self.folder / f"{self.k}.{self.idx}").touch()
        deadline = time.monotonic() + timeout
        while len(list(self.folder.glob(f"{self.k}.*"))) < self.n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"barrier {self.k}: peers missing")
            time.sleep(0.001)


def cmd_transfer(a: argparse.Namespace) -> dict[str, Any]:
    eng = Engine(a.url, a.mode, a.block_size, a.model)
    c, bpc, n = eng.chunk, eng.bpc, a.chunks
    src = list(range(1, 1 + n * bpc))
    dst = list(range(1 + n * bpc, 1 + 2 * n * bpc))
    eng.register(a.layers, a.heads, a.head_size, a.dtype, 1 + 2 * n * bpc)
    eng.fill(src, seed=a.index + 1)
    eng.fill(dst, seed=a.index + 10_001)
    # Untimed: one store of every source block and one retrieve into every destination
    # block, so the server's mappings of this engine's pages are touched before timing
    # (a long-running engine's are).
    warm = tokens(a.seed * 31 + a.index + 77, n * c)
    eng.store(f"warm-{a.index}-{a.seed}", warm, src, 0, n * c)
    time.sleep(SETTLE_S)
    if eng.lookup(f"warm-r-{a.index}-{a.seed}", warm, 0.0) >= n * c:
        eng.retrieve(f"warm-r-{a.index}-{a.seed}", warm, dst, 0, n * c)
    eng.end_session(f"warm-r-{a.index}-{a.seed}")
    barrier = Barrier(a.barrier_dir, a.engines, a.index)
    spans: dict[str, dict[str, list[tuple[float, float]]]] = {"store": {}, "retrieve": {}}
    failures: dict[str, dict[str, int]] = {"store": {}, "retrieve": {}}
    errors: list[str] = []

    def fail(op: str, p: int, msg: str) -> None:
        failures[op][str(p)] = failures[op].get(str(p), 0) + 1
        if len(errors) < 20:
            errors.append(msg)

    for p in a.per_request:
        base = a.seed * 1_000_003 + a.index * 7919 + p * 131
        toks = [tokens(base + r, n * c) for r in range(a.rounds)]
        ranges = [(i, min(n, i + p)) for i in range(0, n, p)]
        st: list[tuple[float, float]] = []
        barrier.wait()
        for r in range(a.rounds):
            for lo, hi in ranges:
                t0 = time.time()
                ok = eng.store(
                    f"s{a.index}-{p}-{r}", toks[r], src[lo * bpc : hi * bpc], lo * c, hi * c
                )
                st.append((t0, time.time()))
                if not ok:
                    fail("store", p, f"store failed ({p}/req, round {r})")
        time.sleep(SETTLE_S)
        rids = []
        for r in range(a.rounds):
            rid = f"r{a.index}-{p}-{r}-{a.seed}"
            hit = eng.lookup(rid, toks[r], 0.0)
            if hit < n * c:
                fail("retrieve", p, f"lookup hit {hit}/{n * c} tokens ({p}/req, round {r})")
            rids.append(rid)
        rt: list[tuple[float, float]] = []
        barrier.wait()
        for r in range(a.rounds):
            for lo, hi in ranges:
                t0 = time.time()
                ok = eng.retrieve(rids[r], toks[r], dst[lo * bpc : hi * bpc], lo * c, hi * c)
                rt.append((t0, time.time()))
                if not ok:
                    fail("retrieve", p, f"retrieve failed ({p}/req, round {r})")
        for rid in rids:
            eng.end_session(rid)
        if not eng.equal(src, dst):
            fail("retrieve", p, "retrieved bytes differ from the stored ones")
        spans["store"][str(p)] = st
        spans["retrieve"][str(p)] = rt
        med = {k: statistics.median(b - a_ for a_, b in v[str(p)]) for k, v in spans.items()}
        log(
            f"{a.mode} {p}/req: store {med['store'] * 1e3:.2f} ms, retrieve {med['retrieve'] * 1e3:.2f} ms"
        )
    chunk_bytes = 2 * a.layers * c * a.heads * a.head_size * DTYPES[a.dtype].itemsize
    eng.close()
    return {
        "chunk_bytes": chunk_bytes,
        "chunk_tokens": c,
        "spans": spans,
        "failures": failures,
        "errors": errors,
    }


def cmd_lookup(a: argparse.Namespace) -> dict[str, Any]:
    eng = Engine(a.url, "lmcache_driven", a.block_size, a.model)
    c, bpc = eng.chunk, eng.bpc
    per_store = 16
    blocks = list(range(1, 1 + per_store * bpc))
    eng.register(a.layers, a.heads, a.head_size, a.dtype, 1 + per_store * bpc)
    eng.fill(blocks, seed=3)
    top = max(a.prefixes)
    hit_toks = tokens(4242 + a.seed, top * c)
    errors: list[str] = []
    for lo in range(0, top, per_store):
        hi = min(top, lo + per_store)
        if not eng.store("lk-store", hit_toks, blocks[: (hi - lo) * bpc], lo * c, hi * c):
            errors.append(f"store [{lo}, {hi}) failed")
    time.sleep(SETTLE_S)
    miss_toks = tokens(999 + a.seed, top * c)
    out: dict[str, Any] = {"errors": errors}
    seq = 0
    # "tight": the adapter's replies arrive on its own thread, so a spin without sleeping
    # would starve it of the GIL; 50 us sleeps are as tight as the adapter allows.
    for poll_name, poll_s in (("tight", 0.00005), ("poll", a.poll_s)):
        res: dict[str, Any] = {"hit": {}, "miss": {}}
        for label, toks in (("hit", hit_toks), ("miss", miss_toks)):
            for n in a.prefixes:
                # one token past the chunk boundary, as vLLM sends whole prompts
                prompt = [*toks[: n * c], 7]
                expect = n * c if label == "hit" else 0
                lat = []
                for _ in range(a.samples):
                    rid = f"lk-{a.seed}-{seq}"
                    seq += 1
                    t0 = time.perf_counter()
                    hit = eng.lookup(rid, prompt, poll_s)
                    lat.append(time.perf_counter() - t0)
                    eng.end_session(rid)
                    if hit != expect and len(errors) < 10:
                        errors.append(f"lookup {label} {n}: {hit} tokens, expected {expect}")
                res[label][str(n)] = {
                    "p50_ms": round(nearest_rank(lat, 0.50) * 1e3, 4),
                    "p99_ms": round(nearest_rank(lat, 0.99) * 1e3, 4),
                    "n": len(lat),
                }
                log(f"lookup ({poll_name}) {label} {n}: p50 {res[label][str(n)]['p50_ms']:.3f} ms")
        out[poll_name] = res
    eng.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("transfer", "lookup"):
        p = sub.add_parser(name)
        p.add_argument("--url", required=True)
        p.add_argument("--model", default="bench-model")
        p.add_argument("--block-size", type=int, default=16)
        p.add_argument("--layers", type=int, default=32)
        p.add_argument("--heads", type=int, default=8)
        p.add_argument("--head-size", type=int, default=128)
        p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES))
        p.add_argument("--seed", type=int, default=0)
    t = sub.choices["transfer"]
    t.add_argument("--mode", default="lmcache_driven", choices=["lmcache_driven", "engine_driven"])
    t.add_argument("--chunks", type=int, default=16, help="chunks per round")
    t.add_argument("--per-request", type=int, nargs="+", default=[1, 16])
    t.add_argument("--rounds", type=int, default=3)
    t.add_argument("--engines", type=int, default=1)
    t.add_argument("--index", type=int, default=0)
    t.add_argument("--barrier-dir")
    lk = sub.choices["lookup"]
    lk.add_argument("--prefixes", type=int, nargs="+", default=[1, 64, 400])
    lk.add_argument("--samples", type=int, default=100)
    lk.add_argument("--poll-s", type=float, default=0.002)
    a = ap.parse_args()
    result = cmd_transfer(a) if a.cmd == "transfer" else cmd_lookup(a)
    sys.stdout.write(json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
