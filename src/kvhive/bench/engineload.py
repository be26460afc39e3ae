"""The engine's own access pattern: fresh block tables, lookup before retrieve, cold and warm.

A serving engine does not reuse the same blocks for every request.  vLLM's allocator hands
each request blocks from a free queue spread over the whole KV cache, so a store reads, and
a retrieve writes, blocks the server may never have touched in its own mapping of the
engine's segments.  One engine (kvhive's client, one thread) against one server:

1. a KV cache of ``cache_gib`` (at least what the cold pass needs), every page written by
   the engine first, as a running engine's are; registration is timed;
2. after ``settle_s`` (an engine's own start-up after registering takes longer) and
   :data:`PRIMING_REQUESTS` untimed 1-chunk requests on blocks set aside for them (a fresh
   server's first requests run slower whatever their blocks: code paths and threads warm
   up), the **cold** pass: ``cold_requests[p]`` requests of ``p`` chunks each store from
   blocks no earlier request used, then each is looked up and retrieved into other unused
   blocks;
3. an untimed **warm-up** pass stores from and retrieves into every block of the cache;
4. the **warm** pass: ``warm_requests[p]`` requests whose source and destination tables are
   drawn at random from the whole cache (blocks shared with earlier requests included).

Every request's source blocks get a new pattern first (the engine's prefill writes them),
and every retrieve is checked against that pattern.  Timed: the store request, the lookup
(request + status polls) and the retrieve request.  With ``server_pid`` (a local server) the
server's minor page faults during each store and retrieve are read from
``/proc/<pid>/stat``: a server that populated its mappings at registration takes ~0 per
chunk.

Result::

    {"chunk_bytes", "cache_blocks", "register_ms", "errors": [...],
     "phases": {"cold"|"warm": {
         "store"|"retrieve": {"<p>": {"gbs", "ms_p50", "requests", "failures",
                                      "faults_per_chunk" (None without server_pid)}},
         "lookup": {"<p>": {"p50_ms", "p99_ms", "n"}}}}}
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvhive.bench.config import KVShape
from kvhive.bench.kvengine import KvhiveEngine, make_tokens
from kvhive.bench.kvload import SETTLE_S, Progress, latency_summary

PHASES = ("cold", "warm")
#: Untimed requests before the cold pass (on their own blocks, never reused by it).
PRIMING_REQUESTS = 8


def server_minor_faults(pid: int | None) -> int | None:
    """Minor page faults of process ``pid`` so far (``/proc/<pid>/stat`` field 10)."""
    if pid is None:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[7])
    except (OSError, ValueError, IndexError):
        return None


@dataclass(frozen=True, slots=True)
class Request:
    """One engine request: its tokens, the blocks it stores from and retrieves into."""

    rid: str
    tokens: list[int]
    src: list[int]
    dst: list[int]
    seed: int


@dataclass
class _OpSamples:
    """One operation's samples in a pass: request seconds, server faults, failures."""

    times: list[float] = field(default_factory=list)
    faults: list[int] = field(default_factory=list)
    failures: int = 0


@dataclass(frozen=True, slots=True)
class PassSamples:
    """What :meth:`EngineWorkload.run` measured: stores, retrieves, lookup seconds."""

    store: _OpSamples
    retrieve: _OpSamples
    lookups: list[float]


class EngineWorkload:
    """One engine's cache and its requests (see module doc).  Not thread-safe."""

    def __init__(
        self, url: str, shape: KVShape, *, cache_chunks: int, block_size: int, model: str, seed: int
    ) -> None:
        self.eng = KvhiveEngine(
            url, shape, num_chunks=cache_chunks, block_size=block_size, model_name=model
        )
        self.shape = shape
        self.seed = seed
        self.rng = random.Random(seed)
        self.chunk = self.eng.chunk_size
        self.bpc = self.eng.blocks_per_chunk
        self.all_blocks = list(range(1, self.eng.kv.num_blocks))  # block 0: vLLM's null block
        self._n = 0

    # -- the engine's memory ----------------------------------------------------------

    def touch_everything(self) -> None:
        """Write every page of the cache (a running engine's KV cache is all written)."""
        for layer in self.eng.kv.layers:
            layer.fill(1)

    def _pattern(
        self, seed: int, layer: int, shape: tuple[int, ...], dtype: np.dtype
    ) -> np.ndarray:
        n = int(np.prod(shape))
        base = (seed * 7919 + layer * 104_729) & 0xFFFF
        return ((np.arange(n, dtype=np.uint32) + base) & 0xFFFF).astype(dtype).reshape(shape)

    def write_pattern(self, blocks: list[int], seed: int) -> None:
        idx = self.eng.kv.blocks(blocks)
        for li, layer in enumerate(self.eng.kv.layers):
            layer[idx] = self._pattern(seed, li, layer[idx].shape, layer.dtype)

    def holds_pattern(self, blocks: list[int], seed: int) -> bool:
        idx = self.eng.kv.blocks(blocks)
        for li, layer in enumerate(self.eng.kv.layers):
            got = layer[idx]
            if not np.array_equal(got, self._pattern(seed, li, got.shape, layer.dtype)):
                return False
        return True

    # -- requests ---------------------------------------------------------------------

    def request(self, chunks: int, src: list[int], dst: list[int]) -> Request:
        self._n += 1
        seed = self.rng.getrandbits(40)
        toks = make_tokens(seed, chunks * self.chunk)
        return Request(f"eng-{self.seed}-{self._n}", toks, src, dst, seed)

    def fresh_tables(self, chunks: int, n: int, pool: list[int]) -> list[Request]:
        """``n`` requests whose tables are taken, in order, from ``pool`` (consumed)."""
        k = chunks * self.bpc
        out = []
        for _ in range(n):
            src, dst = pool[:k], pool[k : 2 * k]
            del pool[: 2 * k]
            out.append(self.request(chunks, src, dst))
        return out

    def random_tables(self, chunks: int, n: int) -> list[Request]:
        """``n`` requests whose tables are drawn at random from the whole cache."""
        k = chunks * self.bpc
        return [
            self.request(
                chunks, self.rng.sample(self.all_blocks, k), self.rng.sample(self.all_blocks, k)
            )
            for _ in range(n)
        ]

    def run(
        self, reqs: Sequence[Request], server_pid: int | None, errors: list[str]
    ) -> PassSamples:
        """Store every request, then look up and retrieve each; samples per operation."""
        store, retrieve, lookups = _OpSamples(), _OpSamples(), []
        eng = self.eng
        for r in reqs:
            self.write_pattern(r.src, r.seed)  # the engine's prefill wrote these blocks
            f0 = server_minor_faults(server_pid)
            t0 = time.perf_counter()
            ok = eng.store(r.rid, r.tokens, r.src, 0, len(r.tokens))
            store.times.append(time.perf_counter() - t0)
            _add_faults(store, f0, server_pid)
            eng.end_session(r.rid)
            if not ok:
                store.failures += 1
                _err(errors, f"store {r.rid} failed")
        time.sleep(SETTLE_S)
        for r in reqs:
            rid = r.rid + "-load"
            t0 = time.perf_counter()
            hit = eng.lookup(rid, r.tokens)
            lookups.append(time.perf_counter() - t0)
            f0 = server_minor_faults(server_pid)
            t0 = time.perf_counter()
            ok = hit * self.chunk == len(r.tokens) and eng.retrieve(
                rid, r.tokens, r.dst, 0, len(r.tokens)
            )
            retrieve.times.append(time.perf_counter() - t0)
            _add_faults(retrieve, f0, server_pid)
            eng.end_session(rid)
            if not ok:
                retrieve.failures += 1
                _err(errors, f"lookup hit {hit} chunk(s) or retrieve failed ({r.rid})")
            elif not self.holds_pattern(r.dst, r.seed):
                retrieve.failures += 1
                _err(errors, f"retrieved bytes differ from the stored ones ({r.rid})")
        return PassSamples(store, retrieve, lookups)

    def warm_up(self) -> None:
        """Untimed: store from and retrieve into every block (16 chunks per request)."""
        per = 16 * self.bpc
        pool = self.all_blocks[:]
        self.rng.shuffle(pool)
        dst = self.all_blocks[:]
        self.rng.shuffle(dst)
        usable = len(pool) // self.bpc * self.bpc
        for a in range(0, usable, per):
            src_t, dst_t = pool[a : min(a + per, usable)], dst[a : min(a + per, usable)]
            r = self.request(len(src_t) // self.bpc, src_t, dst_t)
            self.eng.store(r.rid, r.tokens, r.src, 0, len(r.tokens))
            self.eng.end_session(r.rid)
            time.sleep(SETTLE_S)
            if self.eng.lookup(r.rid + "-w", r.tokens) * self.chunk == len(r.tokens):
                self.eng.retrieve(r.rid + "-w", r.tokens, r.dst, 0, len(r.tokens))
            self.eng.end_session(r.rid + "-w")


def _add_faults(s: _OpSamples, before: int | None, pid: int | None) -> None:
    after = server_minor_faults(pid)
    if before is not None and after is not None:
        s.faults.append(after - before)


def _err(errors: list[str], msg: str) -> None:
    if len(errors) < 20:
        errors.append(msg)


def cache_chunks_for(
    shape: KVShape, chunk_tokens: int, cache_gib: float, cold_requests: Mapping[int, int]
) -> int:
    """Chunks of cache: ``cache_gib`` worth, and at least what the cold pass consumes."""
    need = 2 * (sum(p * n for p, n in cold_requests.items()) + PRIMING_REQUESTS) + 1
    return max(need, int(cache_gib * 2**30) // shape.chunk_bytes(chunk_tokens))


def run_engine(
    url: str,
    shape: KVShape,
    *,
    cache_gib: float = 2.0,
    cold_requests: Mapping[int, int] | None = None,
    warm_requests: Mapping[int, int] | None = None,
    block_size: int = 16,
    settle_s: float = 1.0,
    server_pid: int | None = None,
    chunk_tokens: int = 256,
    seed: int | None = None,
    model_name: str = "bench-engine",
    progress: Progress | None = None,
    ready: Callable[[], float | None] | None = None,
    after_warm: Callable[[EngineWorkload], Any] | None = None,
) -> dict[str, Any]:
    """The engine pattern of the module doc against the server at ``url``.  ``ready``
    (optional) waits until the server is ready again after the untimed warm-up pass, as
    an engine's idle time would let it be (L1 population), and returns the seconds it
    waited (``out["ready_after_warm_up_s"]``).  ``after_warm`` (optional) runs on the
    workload after the warm pass, before it closes; its result is ``out["after_warm"]``
    (the section's floor, :mod:`kvhive.bench.engine_floor`)."""
    cold_requests = dict(cold_requests or {1: 6, 16: 2})
    warm_requests = dict(warm_requests or {1: 12, 16: 3})
    seed = random.getrandbits(30) if seed is None else seed
    chunks = cache_chunks_for(shape, chunk_tokens, cache_gib, cold_requests)
    w = EngineWorkload(url, shape, cache_chunks=chunks, block_size=block_size,
                       model=model_name, seed=seed)  # fmt: skip
    errors: list[str] = []
    out: dict[str, Any] = {
        "chunk_bytes": shape.chunk_bytes(w.chunk),
        "cache_blocks": len(w.all_blocks) + 1,
        "errors": errors,
        "phases": {},
    }
    say = progress or (lambda _m: None)
    try:
        t0 = time.perf_counter()
        w.touch_everything()
        say(f"engine cache {chunks} chunks ({len(w.all_blocks) + 1} blocks) written "
            f"in {time.perf_counter() - t0:.1f} s")  # fmt: skip
        t0 = time.perf_counter()
        w.eng.register()
        out["register_ms"] = round((time.perf_counter() - t0) * 1000, 2)
        time.sleep(settle_s)
        pool = w.all_blocks[:]
        w.rng.shuffle(pool)
        w.run(w.fresh_tables(1, PRIMING_REQUESTS, pool), None, errors)
        passes = {"cold": {p: w.fresh_tables(p, n, pool) for p, n in cold_requests.items()}}
        out["phases"]["cold"] = _measure(w, passes["cold"], server_pid, errors)
        say(_describe("cold", out["phases"]["cold"]))
        w.warm_up()
        if ready is not None:
            out["ready_after_warm_up_s"] = ready()
        warm = {p: w.random_tables(p, n) for p, n in warm_requests.items()}
        out["phases"]["warm"] = _measure(w, warm, server_pid, errors)
        say(_describe("warm", out["phases"]["warm"]))
        if after_warm is not None:
            out["after_warm"] = after_warm(w)
    finally:
        w.eng.close()
    return out


def _measure(
    w: EngineWorkload,
    by_p: Mapping[int, list[Request]],
    server_pid: int | None,
    errors: list[str],
) -> dict[str, Any]:
    res: dict[str, Any] = {"store": {}, "retrieve": {}, "lookup": {}}
    chunk_bytes = w.shape.chunk_bytes(w.chunk)
    for p, reqs in by_p.items():
        samples = w.run(reqs, server_pid, errors)
        for op, s in (("store", samples.store), ("retrieve", samples.retrieve)):
            med = statistics.median(s.times)
            res[op][str(p)] = {
                "gbs": round(p * chunk_bytes / med / 1e9, 4),
                "ms_p50": round(med * 1000, 4),
                "requests": len(s.times),
                "failures": s.failures,
                "faults_per_chunk": round(statistics.median(s.faults) / p, 1) if s.faults else None,
            }
        res["lookup"][str(p)] = latency_summary(samples.lookups)
    return res


def _describe(phase: str, res: dict[str, Any]) -> str:
    parts = []
    for op in ("store", "retrieve"):
        for p, f in res[op].items():
            faults = (
                "" if f["faults_per_chunk"] is None else f", {f['faults_per_chunk']:g} faults/chunk"
            )
            parts.append(f"{op} {p}/req {f['gbs']:.2f} GB/s{faults}")
    return f"engine {phase}: " + "; ".join(parts)
