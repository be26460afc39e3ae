"""The engine pattern's floor: what any server pays per request on this machine.

Plain memcpy of a contiguous, huge-page-backed buffer in a tight loop is the bandwidth
floor, but it is not what a request of the engine pattern can reach.  Its bytes sit in the
engine's blocks, a few KiB each at random places in 4 KiB-page shared memory, and each
request arrives after the engine (here: the bench, writing and checking its patterns) has
kept the server idle for milliseconds.  On the dev VM that idle time costs by itself: a bare
pyzmq echo takes ~0.1 ms back to back and 0.27-0.47 ms after a 10 ms pause, and copies of
scattered blocks slow down too (caches, TLBs and page-walk caches refilled after the vCPU
slept), while a contiguous memcpy does not.

So the floor of one request is measured here, in the bench process, in the same sequence
and after the same client work as :meth:`~kvhive.bench.engineload.EngineWorkload.run`:

* **store** = an empty round trip to a bare echo (:mod:`kvhive.bench.echo`), then one libc
  ``memcpy`` per run the object format needs from the request's blocks (:func:`block_runs`:
  a head's row of one token for HND layouts, a whole block for MLA) into a buffer, one
  thread, through kvhive's SIGBUS-safe row copy (no plan, no batching: one call per layer
  with an offset per run);
* **retrieve** = after the lookup's two round trips, an empty round trip, then the same runs
  copied back into the request's destination blocks.

A server that sends its reply after the copy cannot beat that sum with one copy thread; a
parallel copy can.  Each row of the engine section is then also read as ``floor / kvhive``
(``x floor``): 1.0 means the server adds nothing beyond one empty round trip and the bytes'
own cost.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvhive.bench.engineload import EngineWorkload, Request
from kvhive.bench.kvengine import ShmKVCache
from kvhive.bench.kvload import SETTLE_S
from kvhive.client import KvhiveClient
from kvhive.transfer import safecopy


@dataclass(frozen=True, slots=True)
class BlockRuns:
    """Byte offsets of the contiguous runs of some blocks within one layer's segment, in
    object order (plane-major, then the blocks in table order, then the rows of a block in
    the object's order); every layer has the same dims, so the same offsets serve each.
    Every run is ``run_bytes`` long."""

    offsets: np.ndarray  # int64 byte offsets into a layer segment
    run_bytes: int
    layers: int

    @property
    def layer_nbytes(self) -> int:
        return int(self.offsets.size) * self.run_bytes

    @property
    def nbytes(self) -> int:
        return self.layer_nbytes * self.layers


def block_runs(kv: ShmKVCache, blocks: Sequence[int]) -> BlockRuns:
    """The runs of ``blocks`` in every layer of ``kv`` (``KVShape.layer_dims`` layouts).

    A chunk object holds each block token-major (slot, head, dim), as every server's object
    format does; the engine's HND blocks are head-major (head, slot, dim), so the contiguous
    runs both sides share are one head's row of one token (``head_size`` elements) -- the
    copy any server must make, here one libc memcpy per row.  MLA blocks (slot, latent) are
    the same on both sides: one run per block."""
    dims, item = kv.layer_dims, kv.shape.itemsize
    axis = kv.shape.block_axis
    block_bytes = int(np.prod(dims[axis + 1 :])) * item
    plane_bytes = dims[axis] * block_bytes  # one K or V plane of a layer (MLA: the layer)
    planes = int(np.prod(dims[:axis])) if axis else 1
    ids = np.asarray(blocks, np.int64) * block_bytes
    if kv.shape.mla:
        rows, run = np.zeros(1, np.int64), block_bytes
    else:
        heads, slots, dim = dims[axis + 1 :]
        run = dim * item
        slot_of = np.arange(slots, dtype=np.int64)[:, None] * run
        head_of = np.arange(heads, dtype=np.int64)[None, :] * (slots * run)
        rows = (slot_of + head_of).reshape(-1)  # slot-major, head inner: the object's order
    per_block = (ids[:, None] + rows[None, :]).reshape(-1)
    per_layer = np.concatenate([per_block + p * plane_bytes for p in range(planes)])
    return BlockRuns(per_layer, run, len(kv.layers))


def _flat(layer: np.ndarray) -> np.ndarray:
    return layer.reshape(-1).view(np.uint8)


def gather_floor(kv: ShmKVCache, runs: BlockRuns, out: np.ndarray) -> None:
    """Copy the runs into ``out`` (uint8, at least ``runs.nbytes``), layer after layer."""
    n = runs.layer_nbytes
    for i, layer in enumerate(kv.layers):
        safecopy.copy_rows(out[i * n : (i + 1) * n], None, _flat(layer), runs.offsets,
                           runs.run_bytes, segment="bench floor")  # fmt: skip


def scatter_floor(kv: ShmKVCache, buf: np.ndarray, runs: BlockRuns) -> None:
    """Copy ``buf`` (as :func:`gather_floor` wrote it) back into the runs."""
    n = runs.layer_nbytes
    for i, layer in enumerate(kv.layers):
        safecopy.copy_rows(_flat(layer), runs.offsets, buf[i * n : (i + 1) * n], None,
                           runs.run_bytes, segment="bench floor")  # fmt: skip


@dataclass
class _FloorSamples:
    total: list[float]
    rtt: list[float]

    def summary(self, nbytes: int) -> dict[str, Any]:
        med = statistics.median(self.total)
        copy = statistics.median(t - r for t, r in zip(self.total, self.rtt, strict=True))
        return {
            "gbs": round(nbytes / med / 1e9, 4),
            "ms_p50": round(med * 1000, 4),
            "rtt_ms_p50": round(statistics.median(self.rtt) * 1000, 4),
            "copy_ms_p50": round(copy * 1000, 4),
            "requests": len(self.total),
        }


def run_floor(w: EngineWorkload, echo_url: str, reqs: Sequence[Request]) -> dict[str, Any]:
    """The floor of ``reqs`` (same chunk count each) in the engine pattern's sequence: every
    store (after writing its source pattern), then a settle, then every lookup (two echoes)
    and retrieve (after checking the previous request's bytes, as the pattern does)."""
    echo = KvhiveClient(echo_url)
    store, retrieve = _FloorSamples([], []), _FloorSamples([], [])
    try:
        for _ in range(20):
            echo.call("noop")
        runs = [block_runs(w.eng.kv, r.src) for r in reqs]
        # Two buffers alternate (no cache reuse between requests) unless a request is
        # large enough to be out of cache anyway; written once, untimed: a fresh buffer's
        # first touch is not part of the floor (kvhive's L1 is populated ahead too).
        nbytes = runs[0].nbytes if runs else 0
        bufs = [np.ones(nbytes, np.uint8) for _ in range(2 if nbytes < 64 << 20 else 1)]
        for i, (r, rr) in enumerate(zip(reqs, runs, strict=True)):
            w.write_pattern(r.src, r.seed)
            t0 = time.perf_counter()
            echo.call("noop")
            t1 = time.perf_counter()
            gather_floor(w.eng.kv, rr, bufs[i % len(bufs)])
            store.total.append(time.perf_counter() - t0)
            store.rtt.append(t1 - t0)
            echo.call("noop")  # the pattern's end_session
        time.sleep(SETTLE_S)
        for i, r in enumerate(reqs):
            echo.call("noop")  # lookup
            echo.call("noop")  # its status poll
            dst = block_runs(w.eng.kv, r.dst)
            t0 = time.perf_counter()
            echo.call("noop")
            t1 = time.perf_counter()
            scatter_floor(w.eng.kv, bufs[i % len(bufs)], dst)
            retrieve.total.append(time.perf_counter() - t0)
            retrieve.rtt.append(t1 - t0)
            echo.call("noop")  # end_session
            w.holds_pattern(r.src, r.seed)  # the pattern's check: same bytes read
    finally:
        echo.close()
    return {"store": store.summary(nbytes), "retrieve": retrieve.summary(nbytes)}


def measure_floors(
    w: EngineWorkload, echo_url: str, requests: Mapping[int, int]
) -> dict[str, dict[str, Any]]:
    """``{"store"|"retrieve": {"<p>": summary}}`` for ``requests[p]`` requests of ``p``
    chunks each, their tables drawn at random from the whole cache."""
    out: dict[str, dict[str, Any]] = {"store": {}, "retrieve": {}}
    for p, n in requests.items():
        res = run_floor(w, echo_url, w.random_tables(p, n))
        for op in out:
            out[op][str(p)] = res[op]
    return out
