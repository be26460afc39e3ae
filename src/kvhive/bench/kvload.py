"""Load generators on kvhive's own client (threads, one :class:`KvhiveEngine` each).

Result dicts have the same shape as the lmcache client driver's (``drivers/lmcache_client.py``)
so the runner treats both alike::

    transfer: {"chunk_bytes": B, "engines": E, "errors": [...],
               "ops": {"store"|"retrieve": {"<chunks per request>": {
                   "gbs": aggregate GB/s, "ms_p50": per-request median, "requests": n,
                   "failures": requests that failed, missed or returned wrong bytes}}}}
    lookup:   {"hit"|"miss": {"<prefix chunks>": {"p50_ms", "p99_ms", "n"}},
               "packed": {the same, with 0.5.7 keys; only when asked for}}
    noop:     {"p50_ms", "p99_ms", "n"}
"""

from __future__ import annotations

import functools
import math
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kvhive.bench.config import SHAPES, KVShape
from kvhive.bench.kvengine import KvhiveEngine, Tokens, make_tokens, token_bytes
from kvhive.client import KvhiveClient

Progress = Callable[[str], None]
#: Pause between the last store and the first lookup: the reference commits a store only
#: after it has replied (protocol.md §23 defect 12); kvhive needs none.
SETTLE_S = 0.1


def percentile_ms(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ``samples`` (seconds), in milliseconds."""
    s = sorted(samples)
    return s[min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))] * 1000.0


def latency_summary(samples: Sequence[float]) -> dict[str, float]:
    return {
        "p50_ms": round(percentile_ms(samples, 0.50), 4),
        "p99_ms": round(percentile_ms(samples, 0.99), 4),
        "n": len(samples),
    }


def _ranges(n_chunks: int, per_req: int) -> list[tuple[int, int]]:
    return [(i, min(n_chunks, i + per_req)) for i in range(0, n_chunks, per_req)]


class _Engine:
    """One thread's engine: chunks ``[0, n)`` of its cache are the store source, ``[n, 2n)``
    the retrieve destination."""

    def __init__(
        self, url: str, shape: KVShape, chunks: int, block_size: int, idx: int, model: str
    ) -> None:
        self.idx = idx
        self.eng = KvhiveEngine(
            url, shape, num_chunks=2 * chunks, block_size=block_size, model_name=model
        )
        self.src = self.eng.chunk_blocks(0, chunks)
        self.dst = self.eng.chunk_blocks(chunks, chunks)

    def setup(self, seed: int) -> None:
        self.eng.register()
        self.eng.kv.fill(self.src, seed=self.idx)
        self.eng.kv.fill(self.dst, seed=10_000 + self.idx)
        warm_up(self.eng, self.src, self.dst, seed)


def warm_up(eng: KvhiveEngine, src: list[int], dst: list[int], seed: int) -> None:
    """One untimed store of every source block and retrieve into every destination block.

    The server maps the engine's segments at registration but its page tables fill on first
    touch; a long-running engine's pages are long touched, so the timed requests must not pay
    for that (on the 2-core box the first 512 MiB retrieve runs at half speed)."""
    c, n = eng.chunk_size, len(src) // eng.blocks_per_chunk
    toks = make_tokens(seed ^ 0x5EED, n * c)
    rid = f"warm-{seed}-{eng.instance_id}"
    eng.store(rid, toks, src, 0, n * c)
    time.sleep(SETTLE_S)
    if eng.lookup(rid + "-r", toks) == n:
        eng.retrieve(rid + "-r", toks, dst, 0, n * c)
    eng.end_session(rid + "-r")
    eng.end_session(rid)


def run_transfer(
    url: str,
    shape: KVShape,
    *,
    chunks: int = 16,
    per_request: Sequence[int] = (1, 16),
    rounds: int = 3,
    engines: int = 1,
    block_size: int = 16,
    seed: int | None = None,
    model_name: str = "bench-model",
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Store then retrieve ``rounds`` x ``chunks`` chunks per engine, ``per_request`` chunks
    per request, with ``engines`` engines (threads) at once.  Only the store and retrieve
    requests are timed; lookups (which lock the chunks for the retrieve) are not.  Token ids
    come from ``seed`` (random by default: a store of resident chunks would be skipped).

    A figure whose requests did not all succeed (a failed store; a lookup that did not hit
    every chunk, a failed retrieve or wrong bytes for the retrieve) reports its ``failures``;
    the caller must not use its GB/s then."""
    if seed is None:
        seed = random.getrandbits(40)
    workers: list[_Engine] = []
    try:
        for i in range(engines):
            workers.append(_Engine(url, shape, chunks, block_size, i, model_name))
    except BaseException:
        for w in workers:
            w.eng.close(unregister=False)
        raise
    barrier = threading.Barrier(engines)
    # samples[op][per_req] -> list of (t_start, t_end) per request, all engines
    samples: dict[str, dict[int, list[tuple[float, float]]]] = {
        "store": {p: [] for p in per_request},
        "retrieve": {p: [] for p in per_request},
    }
    errors: list[str] = []
    failures = {op: dict.fromkeys(per_request, 0) for op in ("store", "retrieve")}
    lock = threading.Lock()

    def fail(op: str, p: int, msg: str) -> None:
        with lock:
            failures[op][p] += 1
            if len(errors) < 20:
                errors.append(msg)

    def body(w: _Engine) -> None:
        w.setup(seed + w.idx)
        eng, c, bpc = w.eng, w.eng.chunk_size, w.eng.blocks_per_chunk
        for p in per_request:
            toks = [make_tokens(seed * 1_000_003 + w.idx * 7919 + p * 131 + r, chunks * c)
                    for r in range(rounds)]  # fmt: skip
            mine: dict[str, list[tuple[float, float]]] = {"store": [], "retrieve": []}
            barrier.wait()
            for r in range(rounds):
                for a, b in _ranges(chunks, p):
                    t0 = time.perf_counter()
                    ok = eng.store(f"s{w.idx}-{p}-{r}", toks[r], w.src[a * bpc : b * bpc],
                                   a * c, b * c)  # fmt: skip
                    mine["store"].append((t0, time.perf_counter()))
                    if not ok:
                        fail("store", p, f"store failed (engine {w.idx}, {p}/req, round {r})")
            time.sleep(SETTLE_S)
            rids = []
            for r in range(rounds):  # lock every round's chunks (untimed)
                rid = f"r{w.idx}-{p}-{r}"
                hit = eng.lookup(rid, toks[r])
                if hit != chunks:
                    fail("retrieve", p, f"lookup hit {hit}/{chunks} (engine {w.idx}, {p}/req)")
                rids.append(rid)
            barrier.wait()
            for r in range(rounds):
                for a, b in _ranges(chunks, p):
                    t0 = time.perf_counter()
                    ok = eng.retrieve(rids[r], toks[r], w.dst[a * bpc : b * bpc], a * c, b * c)
                    mine["retrieve"].append((t0, time.perf_counter()))
                    if not ok:
                        fail("retrieve", p, f"retrieve failed (engine {w.idx}, {p}/req, round {r})")
            for rid in rids:
                eng.end_session(rid)
            if not eng.kv.blocks_equal(w.src, w.dst):
                fail("retrieve", p, f"retrieved bytes differ from the stored ones (engine {w.idx})")
            with lock:
                for op in mine:
                    samples[op][p].extend(mine[op])

    try:
        _run_threads([functools.partial(body, w) for w in workers], errors)
    finally:
        for w in workers:
            w.eng.close()
    chunk_bytes = shape.chunk_bytes(workers[0].eng.chunk_size)
    out = _summarise(samples, chunk_bytes, chunks, rounds, engines)
    for op, by_p in failures.items():
        for p, n in by_p.items():
            if str(p) in out["ops"][op]:
                out["ops"][op][str(p)]["failures"] = n
    out["errors"] = errors
    if progress:
        progress(_describe(out))
    return out


def _run_threads(bodies: list[Callable[[], None]], errors: list[str]) -> None:
    def guard(fn: Callable[[], None]) -> None:
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - thread boundary: reported in the result, never hangs the others
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=guard, args=(b,), daemon=True) for b in bodies]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


def _summarise(
    samples: dict[str, dict[int, list[tuple[float, float]]]],
    chunk_bytes: int,
    chunks: int,
    rounds: int,
    engines: int,
) -> dict[str, Any]:
    ops: dict[str, dict[str, dict[str, float]]] = {}
    for op, by_p in samples.items():
        ops[op] = {}
        for p, spans in by_p.items():
            if not spans:
                continue
            ops[op][str(p)] = transfer_figures(spans, chunk_bytes, p, engines)
    return {"chunk_bytes": chunk_bytes, "engines": engines, "chunks": chunks, "ops": ops}


def transfer_figures(
    spans: Sequence[tuple[float, float]], chunk_bytes: int, per_req: int, engines: int
) -> dict[str, float]:
    """GB/s of a set of request spans ``(t_start, t_end)``.

    One engine: ``bytes per request / median request time`` (what a single request achieves).
    Several: all their bytes over the wall time from the first start to the last end.
    """
    times = [b - a for a, b in spans]
    per_req_bytes = chunk_bytes * per_req
    if engines == 1:
        gbs = per_req_bytes / statistics.median(times) / 1e9
    else:
        wall = max(b for _, b in spans) - min(a for a, _ in spans)
        gbs = per_req_bytes * len(spans) / wall / 1e9
    return {
        "gbs": round(gbs, 4),
        "ms_p50": round(statistics.median(times) * 1000, 4),
        "requests": len(spans),
    }


def _describe(out: dict[str, Any]) -> str:
    parts = []
    for op, by_p in out["ops"].items():
        for p, f in by_p.items():
            parts.append(f"{op} {p}/req {f['gbs']:.2f} GB/s")
    return f"{out['engines']} engine(s): " + ", ".join(parts)


def run_lookups(
    url: str,
    *,
    prefixes: Sequence[int] = (1, 64, 400),
    samples: int = 200,
    block_size: int = 16,
    shape: KVShape | None = None,
    packed: bool = False,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Lookup latency (lookup + status polls, no sleeps) for each prefix length, on chunks that
    are resident (hit) and on tokens never stored (miss).  Each sample is a new request id.

    With ``packed`` (kvhive only: ``lmcache server`` 0.5.6 refuses 0.5.7 keys) every sample
    is also taken with 0.5.7 keys (``token_bytes``, packed once per token list as an engine
    packs a request's tokens once), alternating with the 0.5.6 sample so that machine noise
    hits both forms alike; those figures come under ``"packed"`` in the same shape."""
    shape = shape or SHAPES["tiny"]
    top = max(prefixes)
    per_store = 16
    eng = KvhiveEngine(
        url, shape, num_chunks=per_store, block_size=block_size, model_name="bench-lookup-kvhive"
    )
    chunk, bpc = eng.chunk_size, eng.blocks_per_chunk
    forms = ("ints", "packed") if packed else ("ints",)
    res: dict[str, dict[str, Any]] = {f: {"hit": {}, "miss": {}} for f in forms}
    errors: list[str] = []
    try:
        eng.register()
        blocks = eng.chunk_blocks(0, per_store)
        eng.kv.fill(blocks, seed=3)
        hit_tokens = make_tokens(4242, top * chunk)
        for a in range(0, top, per_store):  # store `top` chunks, 16 per request
            b = min(top, a + per_store)
            if not eng.store("lk-store", hit_tokens, blocks[: (b - a) * bpc], a * chunk, b * chunk):
                errors.append(f"store of chunks [{a}, {b}) failed")
        eng.end_session("lk-store")
        time.sleep(SETTLE_S)
        miss_tokens = make_tokens(999, top * chunk)
        seq = 0
        for label, toks in (("hit", hit_tokens), ("miss", miss_tokens)):
            for n in prefixes:
                expect = n if label == "hit" else 0
                ints = toks[: n * chunk]
                sent: dict[str, Tokens] = {"ints": ints, "packed": token_bytes(ints)}
                lat: dict[str, list[float]] = {f: [] for f in forms}
                for _ in range(samples):
                    for form in forms:
                        rid = f"lk-{seq}"
                        seq += 1
                        t0 = time.perf_counter()
                        hit = eng.lookup(rid, sent[form])
                        lat[form].append(time.perf_counter() - t0)
                        eng.end_session(rid)
                        if hit != expect and len(errors) < 10:
                            errors.append(f"lookup {label} {n} ({form}): {hit} chunks, "
                                          f"expected {expect}")  # fmt: skip
                for form in forms:
                    f = res[form][label][str(n)] = latency_summary(lat[form])
                    if progress:
                        progress(f"lookup {label} {n} chunk(s), {form}: p50 {f['p50_ms']:.3f} "
                                 f"ms p99 {f['p99_ms']:.3f} ms")  # fmt: skip
    finally:
        eng.close()
    out: dict[str, Any] = {**res["ints"], "errors": errors}
    if packed:
        out["packed"] = res["packed"]
    return out


def run_noop(
    url: str,
    *,
    samples: int = 2000,
    floor_url: str | None = None,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Round trip of the empty ``noop`` request (after 100 warm-up calls).  With
    ``floor_url`` (a bare echo, see ``kvhive.bench.echo``) the same client times both in
    alternating blocks, so machine noise hits them alike; its figures come as ``floor``."""
    targets = {"server": url} | ({"floor": floor_url} if floor_url else {})
    lat: dict[str, list[float]] = {name: [] for name in targets}
    clients = {name: KvhiveClient(u) for name, u in targets.items()}
    block = 250
    try:
        for client in clients.values():
            for _ in range(100):
                client.call("noop")
        while len(lat["server"]) < samples:
            for name, client in clients.items():
                out = lat[name]
                for _ in range(min(block, samples - len(out))):
                    t0 = time.perf_counter()
                    client.call("noop")
                    out.append(time.perf_counter() - t0)
    finally:
        for client in clients.values():
            client.close()
    res: dict[str, Any] = latency_summary(lat["server"])
    if floor_url:
        res["floor"] = latency_summary(lat["floor"])
    if progress:
        floor = f", bare echo p50 {res['floor']['p50_ms'] * 1000:.0f} us" if floor_url else ""
        progress(f"noop: p50 {res['p50_ms'] * 1000:.0f} us p99 {res['p99_ms'] * 1000:.0f} us"
                 f"{floor}")  # fmt: skip
    return res
