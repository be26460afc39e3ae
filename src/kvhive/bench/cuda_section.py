"""The ``cuda`` section of ``kvhive bench``: store / retrieve GB/s of GPU engines through a
running kvhive server, read against this machine's pinned-copy floor.

1. **Floor**, measured first in the same run: pinned ``cudaMemcpy`` D2H and H2D of
   :data:`FLOOR_MIB` MiB (a device tensor and a pinned host tensor, ``copy_`` on a stream,
   synchronised; median of :data:`FLOOR_REPS`).
2. **Engines**: for each count in :data:`ENGINES`, a fresh server and that many engine
   processes (spawned; each holds a device KV cache of the 8B-class GQA shape, 32 layers x 8
   KV heads x 128, bf16, NHD paged ``[2, blocks, 16, 8, 128]`` per layer, so a 256-token chunk
   is 32 MiB).  Each registers ``cuda`` descriptors built as lmcache 0.5.6's worker builds
   them (the storage's ``_share_cuda_()`` tuple, metadata with ``device_uuid``), and for each
   of :data:`PER_REQUEST` chunks per request: all engines store their requests (an
   interprocess event recorded on the engine's stream travels with each request; the engine
   then waits only on the event the server returns), look them up, retrieve them into other
   blocks, and byte-check a sample on the device.

Rows ``cuda/floor/d2h|h2d`` (GB/s), ``cuda/<n>e/<store|retrieve>/<p>`` (aggregate GB/s of
``n`` engines: all their bytes over the phase's wall time; ``floor`` = the D2H floor for
stores, H2D for retrieves, so ``x floor`` is the ratio) and ``.../added_ms`` (median request
latency minus the floor's time for the same bytes, per chunk).  Without torch or a CUDA
device the section is skipped with one line (``report.skipped``).  torch is imported only
inside the GPU path.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import multiprocessing as mp
import queue
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import msgspec

from kvhive.bench.kvengine import make_tokens
from kvhive.bench.report import BenchReport
from kvhive.client import KvhiveClient
from kvhive.wire import types as t

if TYPE_CHECKING:
    from kvhive.bench.runner import BenchRunner
    from kvhive.bench.servers import ServerProcess

GROUP = "CUDA data path (device KV cache <-> kvhive L1, cuda IPC, vs pinned cudaMemcpy)"
ENGINES = (1, 2, 4)
PER_REQUEST = (1, 16)
#: timed requests per engine for each chunks-per-request count
REQUESTS = {1: 8, 16: 2}
FLOOR_MIB = 32
FLOOR_REPS = 20
LAYERS, KV_HEADS, HEAD_SIZE, BLOCK_SIZE = 32, 8, 128, 16
MODEL = "bench-cuda-32L-8H-128D"
ENGINE_TIMEOUT_S = 600.0
PIN_WAIT_S = 300.0
Op = Literal["store", "retrieve"]


def cuda_unavailable() -> str:
    """Why the GPU path cannot run here ("" when it can): torch missing or no CUDA device."""
    if importlib.util.find_spec("torch") is None:
        return "no CUDA device (torch is not installed)"
    torch: Any = importlib.import_module("torch")
    if not torch.cuda.is_available():
        return f"no CUDA device (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return ""


# -- pure parts: descriptors, aggregation, rows ------------------------------------------


def cuda_descriptor(
    share: Sequence[Any],
    *,
    dtype: str,
    shape: Sequence[int],
    stride: Sequence[int],
    storage_offset: int,
    device_uuid: str,
) -> msgspec.msgpack.Ext:
    """The ext-1 ``cuda`` wrapper of one layer (protocol §4.3): ``share`` is the 8-element
    tuple of ``untyped_storage()._share_cuda_()``, sent as an array."""
    if len(share) != 8:
        raise ValueError(f"a CUDA storage sharing tuple has 8 elements, got {len(share)}")
    body = {
        "type": "cuda",
        "handle": list(share),
        "version": 1,
        "metadata": {
            "dtype": dtype,
            "shape": list(shape),
            "stride": list(stride),
            "storage_offset": storage_offset,
            "device_uuid": device_uuid,
        },
    }
    return msgspec.msgpack.Ext(1, msgspec.msgpack.encode(body))


@dataclass(frozen=True, slots=True)
class Floor:
    """Pinned-copy GB/s of this machine (D2H: what a store does, H2D: a retrieve)."""

    d2h_gbs: float
    h2d_gbs: float

    def gbs(self, op: Op) -> float:
        return self.d2h_gbs if op == "store" else self.h2d_gbs

    def seconds(self, op: Op, nbytes: int) -> float:
        return nbytes / (self.gbs(op) * 1e9)


@dataclass(frozen=True, slots=True)
class Phase:
    """One engine's timed requests of one op and chunks-per-request count: monotonic start
    and end of the phase, each request's latency (send to returned event done), failures."""

    op: Op
    per_request: int
    start: float
    end: float
    latencies: list[float]
    failures: int = 0


@dataclass(frozen=True, slots=True)
class OpFigure:
    """All engines' phases of one (op, chunks per request), aggregated."""

    op: Op
    per_request: int
    engines: int
    gbs: float | None  # total bytes / wall time; None when a request failed
    p50_s: float
    added_ms_per_chunk: float | None  # (p50 - floor time of the same bytes) / chunks


def aggregate(
    phases: Sequence[Phase], *, engines: int, chunk_bytes: int, floor: Floor | None
) -> list[OpFigure]:
    """One :class:`OpFigure` per (op, chunks per request) over every engine's phase."""
    keys = sorted({(p.op, p.per_request) for p in phases}, key=lambda k: (k[1], k[0] != "store"))
    out = []
    for op, per in keys:
        mine = [p for p in phases if (p.op, p.per_request) == (op, per)]
        lat = [x for p in mine for x in p.latencies]
        wall = max(p.end for p in mine) - min(p.start for p in mine)
        ok = lat and wall > 0 and not any(p.failures for p in mine)
        p50 = statistics.median(lat) if lat else 0.0
        added = None
        if floor is not None and lat:
            added = (p50 - floor.seconds(op, per * chunk_bytes)) / per * 1e3
        gbs = len(lat) * per * chunk_bytes / wall / 1e9 if ok else None
        out.append(OpFigure(op, per, engines, gbs, p50, added))
    return out


def record_floor(report: BenchReport, floor: Floor) -> None:
    for key, what, gbs in (("d2h", "D2H", floor.d2h_gbs), ("h2d", "H2D", floor.h2d_gbs)):
        report.put(f"cuda/floor/{key}", "kvhive", round(gbs, 3), group=GROUP,
                   label=f"pinned cudaMemcpy {what}, {FLOOR_MIB} MiB (median of {FLOOR_REPS})",
                   unit="GB/s", better="higher")  # fmt: skip


def record(report: BenchReport, figures: Sequence[OpFigure], floor: Floor, mib: float) -> None:
    """Rows of one engine count (``x floor`` is computed by ``report.finalize``)."""
    for f in figures:
        key = f"cuda/{f.engines}e/{f.op}/{f.per_request}"
        what = f"{f.op} {f.per_request} chunk/req, {f.engines} engine(s), {mib:g} MiB chunks"
        report.put(key, "kvhive", None if f.gbs is None else round(f.gbs, 3), group=GROUP,
                   label=what, unit="GB/s", better="higher", floor=round(floor.gbs(f.op), 3))  # fmt: skip
        added = None if f.added_ms_per_chunk is None else round(f.added_ms_per_chunk, 3)
        report.put(key + "/added_ms", "kvhive", added, group=GROUP,
                   label=f"latency added per chunk over the pinned copy, {what}", unit="ms",
                   better="lower")  # fmt: skip


# -- GPU path ----------------------------------------------------------------------------


def measure_floor(mib: int = FLOOR_MIB, reps: int = FLOOR_REPS, device: int = 0) -> Floor:
    """Median GB/s of pinned D2H and H2D copies of ``mib`` MiB on ``device``."""
    torch: Any = importlib.import_module("torch")
    n = mib << 20
    dev = torch.device("cuda", device)
    d = torch.randint(0, 255, (n,), dtype=torch.uint8, device=dev)
    h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    stream = torch.cuda.Stream(dev)

    def median_gbs(copy: Callable[[], Any]) -> float:
        times = []
        for _ in range(reps + 2):  # two untimed
            torch.cuda.synchronize(dev)
            t0 = time.perf_counter()
            with torch.cuda.stream(stream):
                copy()
            stream.synchronize()
            times.append(time.perf_counter() - t0)
        return n / statistics.median(times[2:]) / 1e9

    d2h = median_gbs(lambda: h.copy_(d, non_blocking=True))
    h2d = median_gbs(lambda: d.copy_(h, non_blocking=True))
    return Floor(d2h, h2d)


@dataclass(frozen=True, slots=True)
class EngineSpec:
    """What one engine process does (picklable for ``spawn``)."""

    idx: int
    url: str
    device: int
    per_request: tuple[int, ...] = PER_REQUEST
    requests: dict[int, int] = field(default_factory=lambda: dict(REQUESTS))


@dataclass(frozen=True, slots=True)
class _Request:
    """One engine request: its tokens, the blocks it stores from and retrieves into."""

    rid: str
    tokens: list[int]
    src: list[int]
    dst: list[int]


class _Engine:
    """One GPU engine on :class:`KvhiveClient` (runs in its own process; see module doc)."""

    def __init__(self, spec: EngineSpec) -> None:
        self.torch: Any = importlib.import_module("torch")
        torch = self.torch
        self.spec = spec
        self.dev = torch.device("cuda", spec.device)
        torch.cuda.set_device(self.dev)
        self.stream = torch.cuda.Stream(self.dev)
        self.client = KvhiveClient(spec.url, timeout=ENGINE_TIMEOUT_S)
        self.iid = random.getrandbits(62)
        self.chunk = int(self.client.call("get_chunk_size"))
        self.bpc = self.chunk // BLOCK_SIZE
        span = max(spec.requests[p] * p for p in spec.per_request) * self.bpc
        self.blocks = 1 + 2 * span  # block 0: vLLM's null block; then sources, destinations
        shape = (2, self.blocks, BLOCK_SIZE, KV_HEADS, HEAD_SIZE)
        self.layers = [
            torch.empty(shape, dtype=torch.bfloat16, device=self.dev) for _ in range(LAYERS)
        ]
        for layer in self.layers:
            layer.view(torch.int16).random_()  # [0, 32767]: bits to move and compare
        torch.cuda.synchronize(self.dev)
        self.chunk_bytes = LAYERS * 2 * self.chunk * KV_HEADS * HEAD_SIZE * 2
        self.dst0 = 1 + span

    def register(self) -> None:
        uuid = str(self.torch.cuda.get_device_properties(self.spec.device).uuid)
        descs = [
            cuda_descriptor(
                layer.untyped_storage()._share_cuda_(), dtype="bfloat16", shape=layer.shape,
                stride=layer.stride(), storage_offset=layer.storage_offset(), device_uuid=uuid,
            )
            for layer in self.layers
        ]  # fmt: skip
        group = {"engine_group_id": 0, "layer_indices": list(range(LAYERS)),
                 "tokens_per_block": BLOCK_SIZE, "sw_size_tokens": -1,
                 "extra_object_group_tag": 0, "recurrent_state": False}  # fmt: skip
        self.client.call("register_kv_cache", self.iid, descs, MODEL, 1, "vllm",
                         {"kv_layout": "NHD"}, [group])  # fmt: skip

    def _request(self, op: Op, key: t.CacheKey, blocks: list[int]) -> tuple[float, bool]:
        """One store/retrieve: our event on the stream travels with it; then wait only on
        the event the server returns (none: done at the reply).  Seconds and ok."""
        torch = self.torch
        t0 = time.perf_counter()
        ev = torch.cuda.Event(interprocess=True)
        ev.record(self.stream)
        args: tuple[Any, ...] = (key, self.iid, [blocks], bytes(ev.ipc_handle()))
        handle, ok = self.client.call(op, *args, *((0,) if op == "retrieve" else ()))
        if handle:
            torch.cuda.Event.from_ipc_handle(self.dev, bytes(handle)).synchronize()
        return time.perf_counter() - t0, bool(ok)

    def _lookup(self, rid: str, tokens: list[int], n: int) -> bool:
        deadline = time.monotonic() + 10.0
        while True:
            key = t.CacheKey(MODEL, 1, None, tokens, 0, len(tokens), rid, "", None, 1)
            self.client.call("lookup", key, 1)
            while (hit := self.client.call("query_prefetch_status", rid)) is None:
                pass
            if int(hit) == n or time.monotonic() > deadline:
                return int(hit) == n
            self.client.call("end_session", rid)  # drop the partial prefix's locks, retry
            time.sleep(0.01)  # the commit runs after the store's copy: let it land

    def run(self, phase_barrier: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"phases": [], "errors": [], "chunk_bytes": self.chunk_bytes}
        for p in self.spec.per_request:
            reqs = [self._make_request(p, r) for r in range(self.spec.requests[p])]
            for op in ("store", "retrieve"):
                phase_barrier.wait(ENGINE_TIMEOUT_S)
                if op == "retrieve":
                    for q in reqs:
                        if not self._lookup(q.rid + "-r", q.tokens, p):
                            out["errors"].append(f"{p} chunk/req: lookup missed {q.rid}")
                    phase_barrier.wait(ENGINE_TIMEOUT_S)
                lat, failures, start = [], 0, time.monotonic()
                for q in reqs:
                    rid = q.rid + ("-r" if op == "retrieve" else "")
                    key = t.CacheKey(MODEL, 1, 0, q.tokens, 0, len(q.tokens), rid, "", None, 1)
                    s, ok = self._request(op, key, q.src if op == "store" else q.dst)
                    lat.append(s)
                    failures += not ok
                out["phases"].append(Phase(op, p, start, time.monotonic(), lat, failures))
            for q in {reqs[0].rid: reqs[0], reqs[-1].rid: reqs[-1]}.values():  # a sample
                if not self._same(q.src, q.dst):
                    out["errors"].append(f"{p} chunk/req: retrieved bytes differ ({q.rid})")
            for q in reqs:
                self.client.call("end_session", q.rid)
                self.client.call("end_session", q.rid + "-r")
        return out

    def _make_request(self, p: int, r: int) -> _Request:
        """Request ``r`` of ``p`` chunks: its own source blocks, destinations ``span`` later."""
        tokens = make_tokens(hash((self.spec.idx, p, r)) & 0xFFFFFFFF, p * self.chunk)
        first = 1 + r * p * self.bpc
        src = list(range(first, first + p * self.bpc))
        dst = [b + self.dst0 - 1 for b in src]
        return _Request(f"cuda-{self.iid}-{p}-{r}", tokens, src, dst)

    def _same(self, src: list[int], dst: list[int]) -> bool:
        torch = self.torch
        a = torch.tensor(src, device=self.dev)
        b = torch.tensor(dst, device=self.dev)
        return all(
            torch.equal(
                layer.index_select(1, a).view(torch.int16),
                layer.index_select(1, b).view(torch.int16),
            )
            for layer in self.layers
        )

    def close(self) -> None:
        try:
            with contextlib.suppress(Exception):
                self.client.call("unregister_kv_cache", self.iid)
        finally:
            self.client.close()


def _engine_main(spec: EngineSpec, ready: Any, phase: Any, results: Any) -> None:
    """An engine process: register, meet the parent at ``ready`` (it waits for the pinning of
    L1), run the phases in step with the other engines, put its result."""
    try:
        eng = _Engine(spec)
        try:
            eng.register()
            ready.wait(ENGINE_TIMEOUT_S)  # every engine registered
            ready.wait(ENGINE_TIMEOUT_S)  # the parent saw L1 pinned
            results.put(eng.run(phase))
        finally:
            eng.close()
    except BaseException as exc:  # noqa: BLE001 - process boundary: report, never hang the parent
        ready.abort()
        phase.abort()
        results.put({"phases": [], "errors": [f"engine {spec.idx}: {type(exc).__name__}: {exc}"]})


def run_engines(server: ServerProcess, n: int, say: Callable[[str], None]) -> dict[str, Any]:
    """``n`` engine processes against ``server``; their phases, errors and chunk size."""
    torch: Any = importlib.import_module("torch")
    devices = max(1, torch.cuda.device_count())
    ctx = mp.get_context("spawn")
    ready, phase, results = ctx.Barrier(n + 1), ctx.Barrier(n), ctx.Queue()
    procs = [
        ctx.Process(target=_engine_main, args=(EngineSpec(i, server.rpc_url, i % devices), ready, phase, results),
                    name=f"kvhive-bench-cuda-engine-{i}")
        for i in range(n)
    ]  # fmt: skip
    for p in procs:
        p.start()
    out: dict[str, Any] = {"phases": [], "errors": [], "chunk_bytes": 0}
    try:
        try:
            ready.wait(ENGINE_TIMEOUT_S)
            waited = wait_pinned(server)
            say(f"cuda: {n} engine(s) registered; L1 pinned after {waited:.1f} s")
            ready.wait(ENGINE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - a broken barrier: the engines say why
            out["errors"].append(f"engines did not start together: {type(exc).__name__} {exc}")
        for _ in procs:
            try:
                res = results.get(timeout=ENGINE_TIMEOUT_S)
            except queue.Empty:
                out["errors"].append("an engine gave no result")
                break
            out["phases"] += res["phases"]
            out["errors"] += res["errors"]
            out["chunk_bytes"] = res.get("chunk_bytes", out["chunk_bytes"])
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    return out


def wait_pinned(server: ServerProcess, timeout_s: float = PIN_WAIT_S) -> float:
    """Seconds until the server's L1 reports nothing left to pin or populate."""
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < timeout_s:
        st = server.status()
        pending = int(st.get("l1", {}).get("pin_pending_bytes", 0))
        pending += int(st.get("l1_populate", {}).get("pending_bytes", 0))
        if not pending:
            break
        time.sleep(0.2)
    return time.perf_counter() - t0


def run(runner: BenchRunner) -> None:
    """The section (module docstring); skipped with one line without a CUDA device."""
    why = cuda_unavailable()
    if why:
        runner.report.skipped.append(f"cuda: {why}")
        runner.say(f"cuda: skipped: {why}")
        return
    floor = measure_floor()
    record_floor(runner.report, floor)
    runner.say(
        f"cuda: pinned copy floor D2H {floor.d2h_gbs:.1f} GB/s, H2D {floor.h2d_gbs:.1f} GB/s"
    )
    for n in ENGINES:

        def measure(server: ServerProcess, n: int = n) -> dict[str, Any]:
            return run_engines(server, n, runner.say)

        res = runner._measure("kvhive", f"cuda, {n} engine(s)", measure)
        if not res:
            continue
        runner.report.errors += [f"kvhive cuda {n} engine(s): {e}" for e in res["errors"][:5]]
        if res["chunk_bytes"]:
            figs = aggregate(res["phases"], engines=n, chunk_bytes=res["chunk_bytes"], floor=floor)
            record(runner.report, figs, floor, res["chunk_bytes"] / (1 << 20))
