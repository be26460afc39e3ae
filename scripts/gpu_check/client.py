"""The GPU side of the check: the real lmcache 0.5.6 worker adapter on CUDA KV caches.

Runs in the client venv (torch with CUDA, lmcache installed from the bundle); never
imports kvhive.  It builds the same two objects vLLM's ``LMCacheMPConnector`` builds,
``LMCacheMPSchedulerAdapter`` and ``LMCacheMPWorkerAdapter``, without vLLM: the worker
adapter only duck-types vLLM's KV cache config (``kv_cache_groups`` -> ``layer_names`` +
``kv_cache_spec.block_size``), as tests/interop/drivers/_common.py does on the CPU.

One round trip (:func:`roundtrip`), per layout case:

1. allocate zeroed GPU KV caches, register them lmcache-driven (CUDA IPC descriptors);
2. enqueue a ~20 ms GPU sleep, then random bytes into the source blocks, and store:
   the store's event is recorded after the fill, so a server that copies before the
   worker's event fired reads stale blocks;
3. overwrite the source blocks (the server must have copied, not aliased);
4. scheduler lookup (takes the read locks), then enqueue a sleep and garbage into FRESH
   destination blocks, retrieve into them and wait only on the future the client got
   back (``result()`` = host-side event sync); compare byte for byte;
5. lookup again and retrieve into the source blocks, this time ordered by
   ``wait_on_stream(current stream)`` with no host sync before the comparison;
6. blocks that no transfer targets must still be zero.

Each command prints one ``RESULT_MARK`` line (JSON) for the orchestrator.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("LMCACHE_TRACK_USAGE", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("LMCACHE_LOG_LEVEL", "WARNING")

import torch
import zmq

from gpu_check import RESULT_MARK
from gpu_check.kv_layouts import (
    CASE_NAMES,
    Geometry,
    LayoutCase,
    case_by_name,
    fill_blocks,
    first_mismatch,
    snapshot_blocks,
)

SLEEP_CYCLES = 40_000_000  # ~20 ms of GPU time before each fill: makes event ordering observable


# ----------------------------------------------------------------- fake vLLM config objects


@dataclass(frozen=True, slots=True)
class AttentionSpec:
    block_size: int
    num_kv_heads: int
    head_size: int
    dtype: torch.dtype


@dataclass(frozen=True, slots=True)
class KVCacheGroup:
    layer_names: list[str]
    kv_cache_spec: AttentionSpec


@dataclass(frozen=True, slots=True)
class KVCacheConfig:
    num_blocks: int
    kv_cache_groups: list[KVCacheGroup] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Parallel:
    """This process's place in a TP group."""

    world_size: int = 1
    rank: int = 0


# ----------------------------------------------------------------- the adapters


class Adapters:
    """One worker adapter (and optionally the scheduler adapter), as the connector builds them.

    Owns a ZMQ context; :meth:`close` unregisters and shuts everything down.
    """

    def __init__(
        self,
        url: str,
        model: str,
        block_size: int,
        par: Parallel,
        *,
        isolated_ipc: bool = False,
        with_scheduler: bool = True,
        mq_timeout: float = 30.0,
    ) -> None:
        from lmcache.integration.vllm.vllm_multi_process_adapter import (
            LMCacheMPSchedulerAdapter,
            LMCacheMPWorkerAdapter,
            ParallelStrategy,
        )

        self.ctx = zmq.Context()
        self.mq_timeout = mq_timeout
        strategy = ParallelStrategy(
            mla_only=False,
            vllm_world_size=par.world_size,
            vllm_worker_id=par.rank,
            tp_size=par.world_size,
            pp_size=1,
            n_servers=1,
        )
        extra = {
            "lmcache.mp.mq_timeout": mq_timeout,
            "lmcache.mp.heartbeat_interval": 5.0,
            "lmcache.mp.mp_transfer_mode": "lmcache_driven",
            "lmcache.mp.isolated_ipc": isolated_ipc,
        }
        self.scheduler = (
            LMCacheMPSchedulerAdapter(
                [url], self.ctx, model, block_size, strategy, extra_config=extra
            )
            if with_scheduler
            else None
        )
        self.worker = LMCacheMPWorkerAdapter(
            url, self.ctx, model, block_size, strategy, extra_config=extra
        )
        self.chunk_size: int = self.worker.lmcache_tokens_per_chunk
        self.blocks_in_chunk: int = self.worker.blocks_in_chunk

    def register(self, kv: dict[str, torch.Tensor], kv_layout: str, g: Geometry) -> None:
        from lmcache.integration.vllm.kv_cache_groups import create_engine_group_infos_from_vllm

        t0 = next(iter(kv.values()))
        spec = AttentionSpec(g.block_size, g.num_heads, g.head_size, t0.dtype)
        cfg = KVCacheConfig(g.num_blocks, [KVCacheGroup(list(kv), spec)])
        hints = {"kv_layout": kv_layout}
        infos = create_engine_group_infos_from_vllm(cfg, kv, layout_hints=hints)
        self.worker.register_kv_caches(kv, engine_group_infos=infos, layout_hints=hints)

    def lookup(self, request_id: str, tokens: list[int], timeout: float = 30.0) -> int:
        assert self.scheduler is not None
        self.scheduler.maybe_submit_lookup_request(request_id, tokens)
        deadline = time.monotonic() + timeout
        while (hit := self.scheduler.check_lookup_result(request_id)) is None:
            if time.monotonic() > deadline:
                raise TimeoutError(f"lookup {request_id} unanswered after {timeout}s")
            time.sleep(0.002)
        return int(hit)

    def end_session(self, request_id: str) -> None:
        if self.scheduler is not None:
            self.scheduler.end_session(request_id)
            self.scheduler.cleanup_lookup_result(request_id)

    def _op(self, tokens: list[int], blocks: list[int], end: int) -> Any:
        from lmcache.integration.vllm.vllm_multi_process_adapter import LoadStoreOp

        return LoadStoreOp(
            token_ids=tokens, block_ids=[list(blocks)], start=0, end=end, skip_first_n_tokens=0
        )

    def store(self, request_id: str, tokens: list[int], blocks: list[int], end: int) -> bool:
        """Record the worker's event after what the stream has queued, store, wait on the
        returned future only."""
        event = self.worker.create_recorded_event()
        self.worker.submit_store_request(request_id, self._op(tokens, blocks, end), event)
        fut = self.worker.store_futures.get(request_id)
        if fut is None:
            raise RuntimeError("the adapter dropped the store (server unhealthy?)")
        ok = bool(fut.result(timeout=self.mq_timeout))
        self.worker.get_finished({request_id})
        return ok

    def retrieve(
        self, request_id: str, tokens: list[int], blocks: list[int], end: int, *, on_stream: bool
    ) -> bool:
        """Retrieve into ``blocks``; wait with ``result()`` (host) or ``wait_on_stream``."""
        event = self.worker.create_recorded_event()
        self.worker.submit_retrieve_request(request_id, self._op(tokens, blocks, end), event)
        entry = self.worker.retrieve_futures.get(request_id)
        if entry is None:
            raise RuntimeError("the adapter dropped the retrieve (server unhealthy?)")
        fut = entry[0]
        if on_stream:
            ok = bool(fut.wait_on_stream(torch.cuda.current_stream(), timeout=self.mq_timeout))
        else:
            ok = bool(fut.result(timeout=self.mq_timeout))
        return ok

    def close(self) -> None:
        try:
            self.worker.shutdown()
        finally:
            if self.scheduler is not None:
                self.scheduler.shutdown()
            self.ctx.destroy(linger=0)


# ----------------------------------------------------------------- one round trip


def tokens_for(seed: int, n: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(1, 50_000, (n,), generator=gen).tolist()


@dataclass(slots=True)
class Timer:
    """Named wall-clock spans, for the report."""

    spans: dict[str, float] = field(default_factory=dict)

    def run(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.spans[name] = round(time.perf_counter() - t0, 4)


def roundtrip(
    url: str,
    case: LayoutCase,
    *,
    chunks: int = 3,
    isolated_ipc: bool = False,
    seed: int = 1,
    par: Parallel | None = None,
    barrier: Callable[[str, dict[str, Any]], None] | None = None,
    request_id: str = "",
    device: str = "cuda",
) -> dict[str, Any]:
    """One layout's store -> overwrite -> retrieve round trip; returns a check record.

    With ``par.world_size > 1`` the process is one TP rank: its scheduler adapter is
    skipped (the parent does the lookups), every rank uses the same ``request_id`` and
    ``barrier(stage, info)`` is called after the store and before the second retrieve.

    ``device="cpu"`` is the CPU smoke variant (named as such: no GPU there): the same
    steps on CPU tensors, which the client registers as ``cpu_shm``; no GPU sleeps, and
    the "stream-ordered" retrieve waits with ``result()``.
    """
    par = par or Parallel()
    g = Geometry()
    on_gpu = device == "cuda"
    dev = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(dev)

    def gpu_sleep() -> None:
        if on_gpu:
            torch.cuda._sleep(SLEEP_CYCLES)

    timer = Timer()
    model = f"gpu-check-{case.name}{'-raw' if isolated_ipc else ''}-tp{par.world_size}"
    ad = timer.run(
        "connect",
        lambda: Adapters(
            url, model, g.block_size, par, isolated_ipc=isolated_ipc,
            with_scheduler=par.world_size == 1,
        ),
    )  # fmt: skip
    details: dict[str, Any] = {
        "layout": case.what, "dtype": case.dtype, "chunk_size": ad.chunk_size, "device": device,
    }  # fmt: skip
    try:
        kv = case.allocate(g, dev)
        n_blocks = chunks * ad.blocks_in_chunk
        if 1 + 2 * n_blocks > g.num_blocks:
            raise RuntimeError(f"{g.num_blocks} blocks cannot hold 2 x {n_blocks} (+ null block)")
        src = list(range(1, 1 + n_blocks))
        dst = list(range(1 + n_blocks, 1 + 2 * n_blocks))
        spare = list(range(1 + 2 * n_blocks, g.num_blocks))
        end = chunks * ad.chunk_size
        tokens = tokens_for(seed, end + 7)  # an unaligned tail, as vLLM sends
        timer.run("register", lambda: ad.register(kv, case.kv_layout, g))
        ax = case.block_axis

        gpu_sleep()
        fill_blocks(kv, ax, src, seed * 100 + par.rank)
        expected = snapshot_blocks(kv, ax, src)
        rid = request_id or f"gpu-check-{uuid.uuid4().hex[:8]}"
        if not timer.run("store", lambda: ad.store(rid, tokens, src, end)):
            raise AssertionError("store returned False")
        fill_blocks(kv, ax, src, seed * 100 + 50 + par.rank)  # overwrite the engine blocks
        if on_gpu:
            torch.cuda.synchronize()

        if barrier:
            barrier("stored", {"rid": rid, "seed": seed, "n_tokens": len(tokens), "end": end})
        else:
            hit = timer.run("lookup", lambda: ad.lookup(rid, tokens))
            if hit < end:
                raise AssertionError(f"lookup hit {hit} tokens, stored {end}")
        gpu_sleep()
        fill_blocks(kv, ax, dst, seed * 100 + 77)  # garbage the retrieve must overwrite
        if not timer.run("retrieve", lambda: ad.retrieve(rid, tokens, dst, end, on_stream=False)):
            raise AssertionError("retrieve (result()) returned False")
        bad = first_mismatch(snapshot_blocks(kv, ax, dst), expected)
        if bad:
            raise AssertionError(f"retrieve into fresh blocks differs: {bad}")
        ad.end_session(rid)

        rid2 = rid + "-s"
        if barrier:
            barrier("again", {"rid": rid2, "seed": seed, "n_tokens": len(tokens), "end": end})
        else:
            ad.lookup(rid2, tokens)
        ok = timer.run(
            "retrieve_stream", lambda: ad.retrieve(rid2, tokens, src, end, on_stream=on_gpu)
        )
        if not ok:
            raise AssertionError("retrieve (wait_on_stream) returned False")
        # no host sync between the stream wait and these reads: the stream orders them
        bad = first_mismatch(snapshot_blocks(kv, ax, src), expected)
        if bad:
            raise AssertionError(f"stream-ordered retrieve into the source blocks differs: {bad}")
        ad.end_session(rid2)
        untouched = snapshot_blocks(kv, ax, [0, *spare])
        if any(bool(t.any()) for t in untouched):
            raise AssertionError("a block outside every transfer changed (null or spare block)")
        mib = sum(t.numel() for t in expected) / 2**20
        details.update(bytes_per_direction_mib=round(mib, 3), blocks=n_blocks, chunks=chunks)
        return {"status": "passed", "details": details, "timings": timer.spans}
    finally:
        ad.close()


# ----------------------------------------------------------------- commands


def _result(payload: dict[str, Any]) -> None:
    sys.stdout.write(RESULT_MARK + json.dumps(payload, sort_keys=True) + "\n")
    sys.stdout.flush()


def _guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    t0 = time.perf_counter()
    try:
        rec = fn()
    except Exception as e:  # noqa: BLE001 - every failure becomes the check's error text
        rec = {
            "status": "failed",
            "error": f"{type(e).__name__}: {e}",
            "trace": traceback.format_exc()[-3000:],
        }
    rec["name"] = name
    rec["seconds"] = round(time.perf_counter() - t0, 3)
    return rec


def cmd_case(args: argparse.Namespace) -> int:
    case = case_by_name(args.case)
    name = f"{'cuda_raw' if args.isolated_ipc else 'cuda'}/{case.name}"
    rec = _guarded(
        name, lambda: roundtrip(args.url, case, isolated_ipc=args.isolated_ipc, device=args.device)
    )
    if args.isolated_ipc and rec["status"] == "failed" and "returned False" in rec.get("error", ""):
        # A soft failure is kvhive's documented answer to timeline-semaphore events
        # (`kvhive server --help`, --isolated-ipc); registration of cuda_raw got through.
        rec["status"] = "skipped"
        rec["error"] = "server soft-failed an isolated_ipc transfer: " + rec["error"]
    _result(rec)
    return 0


def cmd_tp_rank(args: argparse.Namespace) -> int:
    """One TP rank; talks to the parent over stdin/stdout (lines ``@@STAGE name``/``GO``)."""

    def barrier(stage: str, info: dict[str, Any]) -> None:
        sys.stdout.write(f"@@STAGE {stage} {json.dumps(info)}\n")
        sys.stdout.flush()
        line = sys.stdin.readline()
        if line.strip() != "GO":
            raise RuntimeError(f"parent said {line!r} at {stage}")

    par = Parallel(args.world_size, args.rank)
    case = case_by_name("nhd")
    rec = _guarded(
        f"tp{args.world_size}/rank{args.rank}",
        lambda: roundtrip(
            args.url,
            case,
            par=par,
            barrier=barrier,
            seed=7,
            request_id=args.request_id,
            device=args.device,
        ),
    )
    _result(rec)
    return 0


def cmd_tp_scheduler(args: argparse.Namespace) -> int:
    """The TP group's scheduler: lookups between the ranks' stages (driven by the parent)."""
    par = Parallel(args.world_size, 0)
    g = Geometry()
    from lmcache.integration.vllm.vllm_multi_process_adapter import (
        LMCacheMPSchedulerAdapter,
        ParallelStrategy,
    )

    ctx = zmq.Context()
    strategy = ParallelStrategy(False, par.world_size, 0, par.world_size, 1, 1)
    extra = {"lmcache.mp.mq_timeout": 30.0, "lmcache.mp.heartbeat_interval": 5.0}
    model = f"gpu-check-nhd-tp{par.world_size}"
    sched = LMCacheMPSchedulerAdapter(
        [args.url], ctx, model, g.block_size, strategy, extra_config=extra
    )
    rids: list[str] = []
    try:
        for line in sys.stdin:
            cmd = json.loads(line)
            if cmd["op"] == "quit":
                break
            rids.append(cmd["rid"])
            sched.maybe_submit_lookup_request(cmd["rid"], tokens_for(cmd["seed"], cmd["n_tokens"]))
            deadline = time.monotonic() + 30
            while (
                hit := sched.check_lookup_result(cmd["rid"])
            ) is None and time.monotonic() < deadline:
                time.sleep(0.002)
            sys.stdout.write(json.dumps({"hit": hit}) + "\n")
            sys.stdout.flush()
    finally:
        for rid in rids:
            sched.end_session(rid)
        sched.shutdown()
        ctx.destroy(linger=0)
    return 0


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="gpu_check client")
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("case")
    c.add_argument("--url", required=True)
    c.add_argument("--case", required=True, choices=CASE_NAMES)
    c.add_argument("--isolated-ipc", action="store_true")
    c.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    r = sub.add_parser("tp-rank")
    r.add_argument("--url", required=True)
    r.add_argument("--rank", type=int, required=True)
    r.add_argument("--world-size", type=int, default=2)
    r.add_argument("--request-id", required=True)
    r.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    s = sub.add_parser("tp-scheduler")
    s.add_argument("--url", required=True)
    s.add_argument("--world-size", type=int, default=2)
    args = p.parse_args(argv)
    return {"case": cmd_case, "tp-rank": cmd_tp_rank, "tp-scheduler": cmd_tp_scheduler}[args.cmd](
        args
    )
