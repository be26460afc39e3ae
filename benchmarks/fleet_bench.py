"""A fleet of kvhive servers sharing one L2 tier (issue 15 item 6).

    .venv/bin/python benchmarks/fleet_bench.py [--nodes 1,2,4] [--tier resp|s3|valkey]
        [--modes off,shared,shared-nowait] [--prefixes 4] [--prefix-chunks 16] [--requests 32]
        [--shape smollm2-135m] [--xfer-shape 32L-8H-128D] [--xfer-chunks 8] [--xfer-reps 5]
        [--json benchmarks/results/fleet-resp.json]

**Hit rate.**  For each N in ``--nodes`` and each mode, N ``kvhive server`` processes on free
loopback ports, each with its own L1 (``--l1-size-gb``, default 1) and, in the ``shared``
modes, the same ``--l2-adapter`` (one fresh throwaway service per fleet: ``redis-server``
for ``resp``, moto's S3 server for ``s3``, a 3-master + 3-replica Redis Cluster for
``valkey``).  One simulated engine per node (kvhive's own client, ``kvhive.bench.kvengine``)
registers its own shared-memory KV cache (vLLM CPU layout, ``--shape``) with its node.  The
workload: ``--prefixes`` shared prefixes of ``--prefix-chunks`` chunks each, ``--requests``
requests, each one of the prefixes (drawn with a seeded RNG, the same sequence for every
fleet) plus one private suffix chunk, sent round-robin to the nodes one after the other.  A
request does what a serving engine does: lookup (the hit is what the node finds in its L1 or,
loading it, in L2), retrieve the hit chunks into a fresh block table (random blocks of the
cache) and check every byte, write the missing chunks (the prefill the engine computes) and
store them, end the session.  Modes:

* ``off``: no L2; each node has only its L1.
* ``shared``: after each store, wait until the storing node's write-behind has put every
  stored chunk in L2 (its ``/status`` store counters grew by the chunks stored and its
  lanes are idle), so the next request, on the next node, can find it: the upper bound.
* ``shared-nowait``: the realistic case: the next request follows at once, and finds what
  the write-behind has written by then (a prefix hit is contiguous from the first chunk).

Reported per fleet: prefix hit rate (hit tokens / shared-prefix tokens), prefill tokens
saved (hit tokens / prompt tokens), the same for one cache that saw every request (ideal:
only each prefix's first request misses), requests whose whole prefix hit, chunks loaded
from L2, chunks verified, wall time.

**Cross-node retrieve.**  A fresh 2-node fleet with the shared tier and ``--xfer-shape``
(default the 8B-class 32 MiB chunk).  Each repetition: node A stores ``--xfer-chunks``
fresh chunks and waits for its write-behind; then A looks them up and retrieves them (an L1
hit within one node), then node B does the same (B's lookup loads them from the tier into
B's L1, B retrieves them).  GB/s = bytes / seconds of lookup + retrieve (and of each part),
medians over ``--xfer-reps``, next to a plain memcpy measured in the same run.

Every process and temporary directory started here is stopped/removed on exit, Ctrl-C or
SIGTERM included.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kvhive.bench.config import SHAPES, KVShape
from kvhive.bench.kvengine import KvhiveEngine, make_tokens
from kvhive.bench.l2_services import moto_service, redis_service
from kvhive.bench.runner import measure_memcpy
from kvhive.bench.servers import ServerProcess

REPO = Path(__file__).resolve().parents[1]
TIERS = ("resp", "s3", "valkey")
MODES = ("off", "shared", "shared-nowait")
MODEL = "fleet-bench"
#: Seeds of the chunk patterns: prefix p chunk c, request i's suffix, transfer rep r chunk c.
#: Distinct modulo 65536, so every chunk's bytes differ from every other chunk's.
PREFIX_SEED, SUFFIX_SEED, XFER_SEED = 1, 40_000, 60_000


def say(msg: str) -> None:
    sys.stderr.write(f"[fleet +{time.monotonic() - T0:6.1f}s] {msg}\n")
    sys.stderr.flush()


T0 = time.monotonic()


# -- the shared tier ------------------------------------------------------------------------


@contextlib.contextmanager
def tier_service(tier: str, work: Path) -> Iterator[dict[str, Any]]:
    """A fresh throwaway service for ``tier``; yields the ``--l2-adapter`` JSON object."""
    if tier == "resp":
        with redis_service(work) as (host, port):
            yield {"type": "resp", "host": host, "port": port}
    elif tier == "s3":
        with moto_service() as (_port, url):
            yield {"type": "s3", "s3_endpoint": url, "s3_region": "us-east-1",
                   "disable_tls": True, "aws_access_key_id": "test",
                   "aws_secret_access_key": "test"}  # fmt: skip
    elif tier == "valkey":
        if not (REPO / "src" / "kvhive" / "storage" / "l2" / "adapters" / "valkey.py").exists():
            raise SystemExit("this tree has no valkey adapter")
        sys.path.insert(0, str(REPO / "tests"))
        from support.redis_cluster import LocalCluster  # a test helper, needed only here

        with LocalCluster(workdir=work) as cluster:
            yield {"type": "valkey", "startup_nodes": cluster.startup_nodes, "cluster_mode": True}
    else:
        raise ValueError(f"unknown tier {tier!r}")


# -- chunk contents -------------------------------------------------------------------------


class Patterns:
    """Deterministic bytes of a chunk in an engine's cache: layer ``l`` of chunk ``seed``
    holds ``(arange(n) + base(seed, l)) & 0xFFFF``, a view into one ring (no per-chunk
    allocation), so writing and checking a chunk costs one copy / one compare."""

    def __init__(self, eng: KvhiveEngine) -> None:
        self.eng = eng
        kv = eng.kv
        sub = list(kv.layer_dims)
        sub[kv.shape.block_axis] = eng.blocks_per_chunk
        self.sub = tuple(sub)
        self.n = math.prod(sub)
        dtype = kv.layers[0].dtype
        self.ring = (np.arange(65536 + self.n, dtype=np.uint32) & 0xFFFF).astype(dtype)

    def _view(self, seed: int, layer: int) -> np.ndarray:
        base = (seed * 7919 + layer * 104_729) & 0xFFFF
        return self.ring[base : base + self.n].reshape(self.sub)

    def write(self, blocks: list[int], seed: int) -> None:
        idx = self.eng.kv.blocks(blocks)
        for li, layer in enumerate(self.eng.kv.layers):
            layer[idx] = self._view(seed, li)

    def check(self, blocks: list[int], seed: int) -> bool:
        idx = self.eng.kv.blocks(blocks)
        return all(
            np.array_equal(layer[idx], self._view(seed, li))
            for li, layer in enumerate(self.eng.kv.layers)
        )


# -- a node: a server and its engine ----------------------------------------------------------


@dataclass
class Node:
    server: ServerProcess
    eng: KvhiveEngine | None = None
    pat: Patterns | None = None
    rng: random.Random = field(default_factory=lambda: random.Random(0))
    seq: int = 0

    @property
    def engine(self) -> KvhiveEngine:
        assert self.eng is not None
        return self.eng

    @property
    def patterns(self) -> Patterns:
        assert self.pat is not None
        return self.pat

    def table(self, chunks: int) -> list[int]:
        """A fresh block table: ``chunks`` chunks' worth of random blocks of the cache."""
        blocks = range(1, self.engine.kv.num_blocks)  # block 0: vLLM's null block
        return self.rng.sample(blocks, chunks * self.engine.blocks_per_chunk)

    def rid(self, what: str) -> str:
        self.seq += 1
        return f"{what}-{self.server.rpc_port}-{self.seq}"

    def l2_counters(self) -> tuple[int, int, bool]:
        """(chunks the write-behind finished with, in any way; chunks loaded from L2; lanes
        idle) from ``/status``."""
        l2 = self.server.status()["l2"]
        done = sum(a["stored"] + a["store_failed"] + a["store_refused_full"]
                   + a["store_timeouts"] for a in l2["adapters"])  # fmt: skip
        lanes = l2["store"]["lanes"].values()
        done += sum(lane["given_up"] + lane["dropped_queue_full"] for lane in lanes)
        idle = all(lane["pending"] == 0 and lane["running_tasks"] == 0 for lane in lanes)
        return done, int(l2["prefetch"]["loaded_objects"]), idle

    def wait_l2(self, before: int, stored: int, timeout_s: float = 60.0) -> float:
        """Wait until the write-behind finished ``stored`` more chunks than ``before`` and its
        lanes are idle (or, for chunks that made no new L1 object, has been idle 0.5 s).
        Returns the seconds waited."""
        t0 = time.perf_counter()
        idle_since = None
        while True:
            done, _, idle = self.l2_counters()
            now = time.perf_counter()
            if idle and done >= before + stored:
                return now - t0
            idle_since = (idle_since or now) if idle else None
            if idle_since is not None and now - idle_since > 0.5:
                return now - t0
            if now - t0 > timeout_s:
                raise TimeoutError(
                    f"write-behind of {self.server.http_url} not done in {timeout_s} s"
                )
            time.sleep(0.005)


@contextlib.contextmanager
def fleet(
    n: int,
    adapter: dict[str, Any] | None,
    shape: KVShape,
    cache_chunks: int,
    args: argparse.Namespace,
    logs: Path,
    label: str,
) -> Iterator[list[Node]]:
    """``n`` started servers (in parallel), each with a registered engine of ``cache_chunks``
    chunks; everything stopped on exit."""
    extra = list(args.server_arg)
    if adapter is not None:
        extra += ["--l2-adapter", json.dumps(adapter)]
    nodes = [
        Node(
            ServerProcess(
                "kvhive", args.l1_size_gb, extra=extra, log_path=logs / f"{label}-node{i}.log"
            ),
            rng=random.Random(1000 + i),
        )
        for i in range(n)
    ]
    try:
        with ThreadPoolExecutor(n) as pool:
            list(pool.map(lambda nd: nd.server.start(timeout_s=120), nodes))
            list(pool.map(lambda nd: nd.server.settle(timeout_s=30), nodes))
        for nd in nodes:
            nd.eng = KvhiveEngine(nd.server.rpc_url, shape, num_chunks=cache_chunks,
                                  model_name=MODEL)  # fmt: skip
            nd.pat = Patterns(nd.eng)
            for layer in nd.eng.kv.layers:
                layer.fill(1)  # a running engine's cache is all written
            nd.eng.register()
        yield nodes
    finally:
        for nd in nodes:
            if nd.eng is not None:
                with contextlib.suppress(Exception):
                    nd.eng.close()
        for nd in nodes:
            nd.server.stop()


# -- the workload -------------------------------------------------------------------------------


def request_plan(prefixes: int, requests: int, seed: int) -> list[int]:
    """The prefix of each request, the same for every fleet: every prefix as often as the
    others (within one), in a seeded random order."""
    plan = [i % prefixes for i in range(requests)]
    random.Random(seed).shuffle(plan)
    return plan


def run_workload(
    nodes: list[Node], plan: list[int], k: int, wait: bool, errors: list[str]
) -> dict[str, Any]:
    """The requests of ``plan`` round-robin over ``nodes`` (module docstring)."""
    c = nodes[0].engine.chunk_size
    bpc = nodes[0].engine.blocks_per_chunk
    prefix_tokens = [make_tokens(PREFIX_SEED + p * 1000, k * c) for p in range(max(plan) + 1)]
    hits: list[int] = []
    per_node_seen: list[set[int]] = [set() for _ in nodes]
    full_hits = verified = bad = 0
    op_s: list[float] = []
    wait_s = 0.0
    loaded0 = [nd.l2_counters()[1] for nd in nodes]
    t_start = time.perf_counter()
    for i, p in enumerate(plan):
        nd = nodes[i % len(nodes)]
        eng, pat = nd.engine, nd.patterns
        tokens = prefix_tokens[p] + make_tokens(SUFFIX_SEED + i, c)
        seeds = [PREFIX_SEED + p * 1000 + j for j in range(k)] + [SUFFIX_SEED + i]
        rid = nd.rid("req")
        table = nd.table(k + 1)
        t0 = time.perf_counter()
        hit = eng.lookup(rid, tokens)
        ok = True
        if hit:
            ok = eng.retrieve(rid, tokens, table[: hit * bpc], 0, hit * c)
        t_ops = time.perf_counter() - t0
        if not ok:
            errors.append(f"request {i}: retrieve of {hit} hit chunk(s) failed")
        for j in range(hit):
            verified += 1
            if not ok or not pat.check(table[j * bpc : (j + 1) * bpc], seeds[j]):
                bad += 1
        for j in range(hit, k + 1):  # the prefill: the engine computes the missing chunks
            pat.write(table[j * bpc : (j + 1) * bpc], seeds[j])
        before = nd.l2_counters()[0] if wait else 0
        t0 = time.perf_counter()
        if not eng.store(rid, tokens, table[hit * bpc :], hit * c, (k + 1) * c):
            errors.append(f"request {i}: store of chunks [{hit}, {k + 1}) failed")
        eng.end_session(rid)
        op_s.append(t_ops + time.perf_counter() - t0)
        if wait:
            wait_s += nd.wait_l2(before, k + 1 - hit)
        hits.append(hit)
        full_hits += hit >= k
        per_node_seen[i % len(nodes)].add(p)
    wall = time.perf_counter() - t_start
    loaded = sum(nd.l2_counters()[1] for nd in nodes) - sum(loaded0)
    prompt_tokens = len(plan) * (k + 1) * c
    hit_tokens = sum(min(h, k) for h in hits) * c
    ideal_hit_tokens = (len(plan) - len(set(plan))) * k * c
    return {
        "requests": len(plan),
        "prompt_tokens": prompt_tokens,
        "prefix_tokens": len(plan) * k * c,
        "hit_tokens": hit_tokens,
        "prefix_hit_rate": round(hit_tokens / (len(plan) * k * c), 4),
        "prefill_saved": round(hit_tokens / prompt_tokens, 4),
        "ideal_prefill_saved": round(ideal_hit_tokens / prompt_tokens, 4),
        "full_prefix_hits": full_hits,
        "l2_loaded_chunks": loaded,
        "verified_chunks": verified,
        "bad_chunks": bad,
        "wall_s": round(wall, 3),
        "request_ms_p50": round(statistics.median(op_s) * 1000, 2),
        "write_behind_wait_s": round(wait_s, 3),
        "hits_per_request": hits,
    }


# -- cross-node retrieve ----------------------------------------------------------------------


def lookup_retrieve(
    nd: Node, tokens: list[int], n: int, seeds: list[int]
) -> tuple[float, float, bool]:
    """Lookup + retrieve of ``n`` chunks into a fresh table on ``nd``: (lookup s, retrieve s,
    every chunk hit and every byte right)."""
    eng, bpc, c = nd.engine, nd.engine.blocks_per_chunk, nd.engine.chunk_size
    rid, table = nd.rid("xfer"), nd.table(n)
    t0 = time.perf_counter()
    hit = eng.lookup(rid, tokens)
    t1 = time.perf_counter()
    ok = hit == n and eng.retrieve(rid, tokens, table, 0, n * c)
    t2 = time.perf_counter()
    eng.end_session(rid)
    ok = ok and all(
        nd.patterns.check(table[j * bpc : (j + 1) * bpc], s) for j, s in enumerate(seeds)
    )
    return t1 - t0, t2 - t1, ok


def run_transfer(nodes: list[Node], n: int, reps: int, errors: list[str]) -> dict[str, Any]:
    a, b = nodes
    chunk_bytes = a.engine.shape.chunk_bytes(a.engine.chunk_size)
    total = n * chunk_bytes
    samples: dict[str, list[tuple[float, float]]] = {"local": [], "cross": []}
    store_s: list[float] = []
    wb_s: list[float] = []
    for r in range(-1, reps):  # rep -1: untimed warm-up
        seeds = [XFER_SEED + (r + 1) * 100 + j for j in range(n)]
        tokens = make_tokens(XFER_SEED + r, n * a.engine.chunk_size)
        table = a.table(n)
        bpc = a.engine.blocks_per_chunk
        for j, s in enumerate(seeds):
            a.patterns.write(table[j * bpc : (j + 1) * bpc], s)
        before = a.l2_counters()[0]
        rid = a.rid("xfer-store")
        t0 = time.perf_counter()
        if not a.engine.store(rid, tokens, table, 0, n * a.engine.chunk_size):
            errors.append(f"transfer rep {r}: store failed")
        a.engine.end_session(rid)
        t1 = time.perf_counter()
        wait = a.wait_l2(before, n)
        for where, nd in (("local", a), ("cross", b)):
            loaded = nd.l2_counters()[1]
            lk, rt, ok = lookup_retrieve(nd, tokens, n, seeds)
            from_l2 = nd.l2_counters()[1] - loaded
            if not ok:
                errors.append(f"transfer rep {r}: {where} lookup/retrieve missed or wrong bytes")
            elif from_l2 != (n if where == "cross" else 0):
                errors.append(f"transfer rep {r}: {where} loaded {from_l2} chunk(s) from L2")
            elif r >= 0:
                samples[where].append((lk, rt))
        if r >= 0:
            store_s.append(t1 - t0)
            wb_s.append(wait)
    out: dict[str, Any] = {"chunks": n, "chunk_bytes": chunk_bytes, "bytes": total,
                           "reps": len(samples["cross"])}  # fmt: skip

    def gbs(secs: list[float]) -> float | None:
        return round(total / statistics.median(secs) / 1e9, 3) if secs else None

    for where, s in samples.items():
        out[where] = {
            "lookup_retrieve_GBps": gbs([lk + rt for lk, rt in s]),
            "lookup_GBps": gbs([lk for lk, _ in s]),
            "retrieve_GBps": gbs([rt for _, rt in s]),
            "lookup_ms_p50": round(statistics.median(lk for lk, _ in s) * 1000, 2) if s else None,
            "retrieve_ms_p50": round(statistics.median(rt for _, rt in s) * 1000, 2) if s else None,
        }
    out["store_GBps"] = gbs(store_s)
    out["store_plus_write_behind_GBps"] = gbs([x + y for x, y in zip(store_s, wb_s, strict=True)])
    return out


# -- report ---------------------------------------------------------------------------------


def emit(*parts: str, sep: str = " ") -> None:
    sys.stdout.write(sep.join(parts) + "\n")


def print_report(res: dict[str, Any]) -> None:
    cfg = res["config"]
    emit(f"\nFleet: {cfg['prefixes']} prefixes x {cfg['prefix_chunks']} chunks + 1 private "
          f"chunk, {cfg['requests']} requests round-robin, shape {cfg['shape']} "
          f"({cfg['chunk_bytes'] / 2**20:.2f} MiB/chunk), tier {cfg['tier']}, "
          f"L1 {cfg['l1_size_gb']:g} GB/node")  # fmt: skip
    head = (f"{'N':>2} {'mode':14} {'prefix hit':>10} {'prefill saved':>13} {'ideal':>6} "
            f"{'full hits':>9} {'L2 loads':>8} {'verified':>8} {'bad':>4} {'wall s':>7} "
            f"{'req ms p50':>10}")  # fmt: skip
    emit(head)
    for row in res["workload"]:
        emit(f"{row['nodes']:>2} {row['mode']:14} {row['prefix_hit_rate']:10.1%} "
              f"{row['prefill_saved']:13.1%} {row['ideal_prefill_saved']:6.1%} "
              f"{row['full_prefix_hits']:>4}/{row['requests']:<4} {row['l2_loaded_chunks']:>8} "
              f"{row['verified_chunks']:>8} {row['bad_chunks']:>4} {row['wall_s']:7.2f} "
              f"{row['request_ms_p50']:10.1f}")  # fmt: skip
    x = res.get("transfer")
    if x:
        emit(f"\nRetrieve of {x['chunks']} chunks ({x['bytes'] / 2**20:.0f} MiB, "
              f"{x['chunk_bytes'] / 2**20:.0f} MiB/chunk, shape {cfg['xfer_shape']}), "
              f"median of {x['reps']}; memcpy {res['memcpy_GBps']:.2f} GB/s")  # fmt: skip
        emit(f"{'where':34} {'lookup+retrieve GB/s':>20} {'lookup ms':>10} {'retrieve ms':>11} "
              f"{'retrieve GB/s':>13}")  # fmt: skip
        for where, what in (("local", "within one node (L1 hit)"),
                            ("cross", "cross-node (L2 load + retrieve)")):  # fmt: skip
            w = x[where]
            emit(f"{what:34} {w['lookup_retrieve_GBps'] or 0:20.3f} "
                  f"{w['lookup_ms_p50'] or 0:10.1f} {w['retrieve_ms_p50'] or 0:11.1f} "
                  f"{w['retrieve_GBps'] or 0:13.3f}")  # fmt: skip
        emit(f"node A store {x['store_GBps']} GB/s; store + write-behind to the tier "
              f"{x['store_plus_write_behind_GBps']} GB/s")  # fmt: skip
    if res["errors"]:
        emit(f"\nERRORS ({len(res['errors'])}):", *res["errors"][:20], sep="\n  ")


# -- main -----------------------------------------------------------------------------------


def csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda s: [kind(x) for x in s.split(",") if x]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--nodes", type=csv(int), default=[1, 2, 4])
    p.add_argument("--tier", choices=TIERS, default="resp")
    p.add_argument("--modes", type=csv(str), default=list(MODES))
    p.add_argument("--prefixes", type=int, default=4)
    p.add_argument("--prefix-chunks", type=int, default=16)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--seed", type=int, default=15)
    p.add_argument("--shape", choices=sorted(SHAPES), default="smollm2-135m")
    p.add_argument("--l1-size-gb", type=float, default=1.0)
    p.add_argument("--xfer-shape", choices=sorted(SHAPES), default="32L-8H-128D")
    p.add_argument("--xfer-chunks", type=int, default=8)
    p.add_argument("--xfer-reps", type=int, default=5, help="0: no cross-node section")
    p.add_argument("--server-arg", action="append", default=[],
                   help="one more `kvhive server` argument (repeatable)")  # fmt: skip
    p.add_argument("--log-dir", default=None, help="keep the servers' logs here")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    bad = [m for m in a.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}; choose from {MODES}")
    return a


def _sigterm(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt  # unwind: every finally stops what it started


def run(args: argparse.Namespace) -> dict[str, Any]:
    shape, xshape = SHAPES[args.shape], SHAPES[args.xfer_shape]
    k = args.prefix_chunks
    plan = request_plan(args.prefixes, args.requests, args.seed)
    errors: list[str] = []
    res: dict[str, Any] = {"config": {
        "nodes": args.nodes, "tier": args.tier, "modes": args.modes, "prefixes": args.prefixes,
        "prefix_chunks": k, "requests": args.requests, "seed": args.seed, "shape": args.shape,
        "chunk_bytes": shape.chunk_bytes(256), "l1_size_gb": args.l1_size_gb,
        "xfer_shape": args.xfer_shape, "xfer_chunks": args.xfer_chunks,
        "xfer_reps": args.xfer_reps, "server_args": args.server_arg, "plan": plan,
        "order": "sequential: one request at a time, request i on node i mod N",
    }, "workload": [], "errors": errors}  # fmt: skip
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="kvhive-fleet-")))
        logs = Path(args.log_dir) if args.log_dir else work
        logs.mkdir(parents=True, exist_ok=True)
        res["memcpy_GBps"] = round(measure_memcpy(32, chunks=8), 3)
        say(f"memcpy {res['memcpy_GBps']} GB/s")
        for n in args.nodes:
            for mode in args.modes:
                label = f"n{n}-{mode}"
                with contextlib.ExitStack() as inner:
                    adapter = None
                    if mode != "off":
                        tdir = work / f"tier-{label}"
                        tdir.mkdir()
                        adapter = inner.enter_context(tier_service(args.tier, tdir))
                    nodes = inner.enter_context(
                        fleet(n, adapter, shape, 2 * (k + 1), args, logs, label)
                    )
                    say(f"{label}: {n} node(s) up")
                    row = run_workload(nodes, plan, k, mode == "shared", errors)
                row = {"nodes": n, "mode": mode, **row}
                res["workload"].append(row)
                say(f"{label}: prefix hit {row['prefix_hit_rate']:.1%}, prefill saved "
                    f"{row['prefill_saved']:.1%} (ideal {row['ideal_prefill_saved']:.1%}), "
                    f"L2 loads {row['l2_loaded_chunks']}, bad {row['bad_chunks']}, "
                    f"{row['wall_s']:.1f} s")  # fmt: skip
        if args.xfer_reps > 0:
            tdir = work / "tier-xfer"
            tdir.mkdir()
            with (
                tier_service(args.tier, tdir) as adapter,
                fleet(2, adapter, xshape, 2 * args.xfer_chunks, args, logs, "xfer") as nodes,
            ):
                say("transfer: 2 nodes up")
                res["transfer"] = run_transfer(nodes, args.xfer_chunks, args.xfer_reps, errors)
            say(f"transfer: local {res['transfer']['local']['lookup_retrieve_GBps']} GB/s, "
                f"cross {res['transfer']['cross']['lookup_retrieve_GBps']} GB/s")  # fmt: skip
    return res


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _sigterm)
    res = run(args)
    print_report(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 1 if res["errors"] or any(r["bad_chunks"] for r in res["workload"]) else 0


if __name__ == "__main__":
    sys.exit(main())
