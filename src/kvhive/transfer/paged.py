"""Copy engine between an engine's paged KV cache (in shared memory) and chunk objects.

One :class:`PagedKV` per ``cpu_shm`` registration.  It maps the segments
once, works out a copy plan, and then moves one chunk per call:

    gather : engine pages --(block_ids)--> object bytes   (store)
    scatter: object bytes --(block_ids)--> engine pages   (retrieve)

Copy plan.  Each (layer, kv) plane of a chunk object is ``[B, BS, NH, HS]``
elements, contiguous.  The engine side is some strided view; we find the
longest run of elements that is contiguous on both sides (a whole block for
NHD-style layouts and MLA, one head row of ``HS`` elements for HND) and cut it
into "rows" of ``r`` elements, ``r`` dividing every stride involved.  At
registration every plane ``p`` of the object gets (:class:`_BlockPlan`, one
per registration, reused by every request)::

    engine row q of block id   = segment[seg[p]] + id * step[p] + static[p, q]
    object row q of block b    = obj + obj_off[p] + (b * Q + q) * row_bytes

and a copy hands the plan and the chunk's block ids to the SIGBUS-safe native
helper (:func:`kvhive.transfer.safecopy.copy_blocks`), which computes every
row's address itself, checks them all against the buffers, and moves the rows
in C without the GIL -- rows of 32..1024 bytes by inlined fixed-size moves.
Per request nothing is built but the block-id array: no per-row offset table,
no Python loop per layer, token or block.  A worker that shrinks its segment
gets a failed store or retrieve, never a crashed server.

Requests of several chunks (:meth:`PagedKV.gather_many`,
:meth:`PagedKV.scatter_many`) are one batch: its (chunk, plane, block) units
are shared by ``COPY_THREADS`` threads (the caller and a helper) when the batch
holds at least ``PARALLEL_MIN_BYTES``; below that the hand-off to a helper
(~50 us) costs more than it saves.  The threads take pieces of about
``SHARE_PIECE_BYTES`` in turn, so a helper slow to wake never holds the request up.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvhive.errors import BadRequest, RegistrationError, UnsupportedError
from kvhive.transfer import safecopy
from kvhive.transfer.backend import (
    ChunkRoute,
    check_block_ids,
    gather_routes,
    scatter_routes,
)
from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.layouts import (
    DEFAULT_KV_LAYOUT,
    ChunkPlan,
    KVFormat,
    KVLayout,
    LayerView,
    plan_layout,
)
from kvhive.transfer.shm import SegmentOwner, SegmentTable, ShmMapping, tensor_view


@dataclass(frozen=True, slots=True)
class _BlockPlan:
    """Where the rows of some object planes are, for the native copy (module doc).

    Made once per registration; immutable.  The segment arrays are the registration's
    mappings (valid until :meth:`PagedKV.close`, which waits for copies in flight).
    All planes of one plan share ``row_bytes`` and rows per block (``rows``).
    """

    segs: tuple[np.ndarray, ...] = field(repr=False)  # flat uint8 views of the segments
    names: tuple[str, ...]  # their names (for errors)
    plane_seg: np.ndarray  # [P] int64: index into segs
    plane_step: np.ndarray  # [P] int64: bytes per block id
    plane_obj: np.ndarray  # [P] int64: object byte offset of the plane
    statics: np.ndarray  # [P * rows] int64: row byte offsets within block 0
    rows: int  # rows per block (Q)
    row_bytes: int

    @property
    def planes(self) -> int:
        return int(self.plane_seg.size)

    def segment_at(self, addr: int) -> str:
        """The name of the segment mapped at address ``addr`` (all names if none)."""
        for seg, name in zip(self.segs, self.names, strict=True):
            base = seg.ctypes.data
            if base <= addr < base + seg.size:
                return name
        return ", ".join(self.names)


# Rows longer than this many bytes are cut into pieces of at most this size for
# gathers (None: never cut).  An older note blamed glibc's "rep movsb" for slow reads
# of 4 KiB+ rows from shared pages; re-measured with bench_paged.py (MLA: 18 KiB
# block rows; NHD: 32 KiB) uncut rows are as fast or faster, so nothing is cut.
GATHER_ROW_CAP: int | None = None


# A request of at least this many bytes is copied by COPY_THREADS threads; below it the
# hand-off to a helper (~50 us) costs more than it saves.
PARALLEL_MIN_BYTES = 4 << 20
# Threads sharing a batch take it in pieces of about this many bytes (_run_jobs).
SHARE_PIECE_BYTES = 1 << 20
COPY_THREADS = max(1, min(2, os.cpu_count() or 1))

_helpers: ThreadPoolExecutor | None = None
_helpers_lock = threading.Lock()


def _helper_pool() -> ThreadPoolExecutor:
    global _helpers
    if _helpers is None:
        with _helpers_lock:
            if _helpers is None:
                _helpers = ThreadPoolExecutor(
                    max_workers=COPY_THREADS - 1, thread_name_prefix="kvhive-copy"
                )
    return _helpers


@dataclass(frozen=True, slots=True)
class _Job:
    """One chunk's rows of one plan: object ``obj`` (the caller's L1 view, borrowed for
    the call), block ``ids`` landing at object blocks ``first ..``."""

    plan: _BlockPlan
    obj: np.ndarray
    ids: np.ndarray  # int64
    first: int
    blocks_per_chunk: int

    @property
    def units(self) -> int:
        return self.plan.planes * int(self.ids.size)

    @property
    def unit_bytes(self) -> int:
        return self.plan.rows * self.plan.row_bytes


def _run_job(job: _Job, u0: int, u1: int, to_engine: bool) -> None:
    p = job.plan
    safecopy.copy_blocks(
        job.obj,
        p.segs,
        p.plane_seg,
        p.plane_step,
        p.plane_obj,
        p.statics,
        job.ids,
        job.first,
        job.blocks_per_chunk,
        p.row_bytes,
        to_engine,
        u0,
        u1,
        where=p.segment_at,
    )


_Part = list[tuple[_Job, int, int]]


def _deal(jobs: Sequence[_Job], k: int) -> list[_Part]:
    """The jobs' units cut into at most ``k`` parts of about equal bytes, in order."""
    total = sum(j.units * j.unit_bytes for j in jobs)
    cuts = [total * t // k for t in range(1, k)]
    parts: list[_Part] = [[]]
    pos = 0  # bytes dealt so far
    for job in jobs:
        u, ub = 0, job.unit_bytes
        while u < job.units:
            t = len(parts) - 1
            if t < len(cuts):
                end = min(job.units, u + max(0, -(-(cuts[t] - pos) // ub)))
                if end == u:  # part t holds its share
                    parts.append([])
                    continue
            else:
                end = job.units
            parts[-1].append((job, u, end))
            pos += (end - u) * ub
            u = end
    return [part for part in parts if part]


def _run_jobs(jobs: Sequence[_Job], to_engine: bool) -> None:
    """Run every job; shared with COPY_THREADS - 1 helpers when they move
    PARALLEL_MIN_BYTES or more.  Returns when all are done; the first error is raised
    after every piece taken has finished.

    Work sharing, not a static split: the batch is cut into pieces of about
    ``SHARE_PIECE_BYTES`` and every thread takes the next piece until none is left, so a
    helper that wakes late (a halted vCPU takes 50-300 us to wake on a VM) only helps:
    the caller copies whatever the helper has not taken, and a helper that has not
    started when the caller is done is cancelled, never waited for.  Pieces are taken
    with ``next()`` on a shared ``itertools.count`` (atomic under the GIL)."""
    nbytes = sum(j.units * j.unit_bytes for j in jobs)
    k = COPY_THREADS if nbytes >= PARALLEL_MIN_BYTES else 1
    if k <= 1:
        for job in jobs:
            _run_job(job, 0, job.units, to_engine)
        return
    pieces = _deal(jobs, max(k, -(-nbytes // SHARE_PIECE_BYTES)))
    taken = itertools.count()

    def share() -> None:
        while (i := next(taken)) < len(pieces):
            _run_part(pieces[i], to_engine)

    futures = [_helper_pool().submit(share) for _ in range(k - 1)]
    try:
        share()
    finally:
        for f in futures:
            f.cancel()  # not started yet: it never will, and holds nothing of this batch
        errors = [f.exception() for f in futures if not f.cancelled()]
    for exc in errors:
        if exc is not None:
            raise exc


def _run_part(part: _Part, to_engine: bool) -> None:
    for job, u0, u1 in part:
        _run_job(job, u0, u1, to_engine)


def _largest_divisor_at_most(n: int, cap: int) -> int:
    best = 1
    for d in range(1, math.isqrt(n) + 1):
        if n % d == 0:
            for c in (d, n // d):
                if best < c <= cap:
                    best = c
    return best


def _row_plan(view: LayerView, max_row_elems: int | None = None) -> tuple[int, np.ndarray, int]:
    """``(r, static[kv, q], block_rows)`` of one layer, in elements/rows (see module doc).

    With ``max_row_elems``, rows longer than that are cut into equal pieces
    (unless the only way to do so would make them tiny).
    """
    kv_size, _nb, bs, nh, hs = view.sizes
    s_kv, s_blk, s_slot, s_head, s_dim = view.strides
    dims = [(bs, s_slot), (nh, s_head), (hs, s_dim)]  # object order within a block
    run, cut = 1, len(dims)
    for i in range(len(dims) - 1, -1, -1):  # merge innermost dims contiguous on both sides
        n, s = dims[i]
        if n != 1 and s != run:
            break
        run *= n
        cut = i
    outer = [(n, s) for n, s in dims[:cut] if n != 1]
    r = math.gcd(run, view.offset, s_kv if kv_size > 1 else 0, s_blk, *(s for _, s in outer))
    if max_row_elems is not None and r > max_row_elems:
        d = _largest_divisor_at_most(r, max_row_elems)
        r = d if d * 8 >= max_row_elems else r  # pieces of a few bytes would be slower still
    base = np.zeros(1, dtype=np.int64)
    for n, s in dims[:cut]:
        base = (base[:, None] + np.arange(n, dtype=np.int64)[None, :] * s).reshape(-1)
    elem = (base[:, None] + np.arange(0, run, r, dtype=np.int64)[None, :]).reshape(-1)
    planes = view.offset + np.arange(kv_size, dtype=np.int64)[:, None] * s_kv
    static = (planes + elem[None, :]) // r  # exact: r divides every term
    return r, static.astype(np.intp), s_blk // r


def _plan_blocks(
    layout: KVLayout, maps: Mapping[str, ShmMapping], max_row_elems: int | None, chunk_size: int
) -> tuple[_BlockPlan, ...]:
    """Block plans of the transferred layers' planes: one plan for the planes that share a
    row size and rows per block (normally all of them)."""
    kv_size, nl = layout.kv_size, layout.num_layers
    plane_bytes = chunk_size * layout.hidden * layout.itemsize
    seg_index: dict[str, int] = {}
    segs: list[np.ndarray] = []
    # (row_bytes, rows) -> planes as (seg, step, obj offset, statics)
    groups: dict[tuple[int, int], list[tuple[int, int, int, np.ndarray]]] = {}
    for j, i in enumerate(layout.layer_indices):
        lv = layout.layers[i]
        assert lv is not None
        r, static_rows, block_rows = _row_plan(lv, max_row_elems)
        rb = r * layout.itemsize
        static = static_rows.astype(np.int64) * rb  # [kv, rows]
        step = block_rows * rb
        name = lv.desc.shm_name
        seg = maps[name].array
        end = int(static.max()) + (lv.num_blocks - 1) * step + rb
        if end > seg.size:  # cannot happen after the span check; the helper checks again
            raise RegistrationError(f"layer {i} pages exceed segment {name!r}")
        if name not in seg_index:
            seg_index[name] = len(segs)
            segs.append(seg)
        planes = groups.setdefault((rb, static.shape[1]), [])
        for kv in range(kv_size):
            planes.append((seg_index[name], step, (kv * nl + j) * plane_bytes, static[kv]))
    names = tuple(seg_index)
    return tuple(
        _BlockPlan(
            segs=tuple(segs),
            names=names,
            plane_seg=np.array([p[0] for p in planes], np.int64),
            plane_step=np.array([p[1] for p in planes], np.int64),
            plane_obj=np.array([p[2] for p in planes], np.int64),
            statics=np.ascontiguousarray(np.stack([p[3] for p in planes]).reshape(-1)),
            rows=rows,
            row_bytes=rb,
        )
        for (rb, rows), planes in groups.items()
    )


class PagedKV:
    """The per-registration copy engine (protocol §14, §17).

    Attributes:
        object_shape: ``(kv_size, num_layers, chunk_tokens, hidden)`` of one chunk object.
        object_nbytes: bytes of one chunk object.
        dtype: torch dtype name of the KV elements.
        block_size: tokens per engine block (BS).
        blocks_per_chunk: B = chunk_tokens / BS.
        num_blocks: blocks in the engine cache (valid ids are ``0..num_blocks-1``).
    """

    def __init__(self, layout: KVLayout, segments: SegmentTable, chunk_size: int) -> None:
        plan = ChunkPlan.of(layout, chunk_size)
        self.layout = layout
        self.kv_format: KVFormat = plan.kv_format
        self.dtype: str = plan.dtype
        self.block_size: int = plan.block_size
        self.num_blocks: int = plan.num_blocks
        self.chunk_size: int = plan.chunk_size
        self.blocks_per_chunk: int = plan.blocks_per_chunk
        self.object_shape: tuple[int, ...] = plan.object_shape
        self.object_nbytes: int = plan.object_nbytes
        safecopy.require()  # no copy of an engine page without the SIGBUS-safe helper
        self._segments = segments
        # Who created the segments, as proven now (the registry's reaper may unlink them
        # once that process is gone, see kvhive.transfer.shm.SegmentReaper).
        self._owners: tuple[SegmentOwner, ...] = segments.owners()
        self._cond = threading.Condition()
        self._active = 0
        self._closed = False
        # Where every registered layer's elements are (checksums), by index.
        self._layers: list[_LayerBytes | None] = []
        self._gather_plans: tuple[_BlockPlan, ...] = ()
        self._scatter_plans: tuple[_BlockPlan, ...] = ()
        self._build(layout)

    # -- construction -------------------------------------------------------

    @classmethod
    def from_descriptors(
        cls,
        descs: Sequence[TensorDesc],
        layout_hints: Mapping[str, Any] | None,
        group_infos: Sequence[Any],
        chunk_size: int,
        *,
        default_kv_layout: str = DEFAULT_KV_LAYOUT,
    ) -> PagedKV:
        """Detect the layout, map every segment once and plan the copies.

        Raises LayoutError (unsupported layout/groups) or RegistrationError
        (segment missing, too small, unmappable); nothing stays mapped then.
        """
        layout = plan_layout(descs, layout_hints, group_infos, default_kv_layout=default_kv_layout)
        sizes: dict[str, int] = {}
        for d in descs:  # map each segment once, at the largest size any view declares
            if d.numel:
                sizes[d.shm_name] = max(sizes.get(d.shm_name, 0), d.nbytes)
        safecopy.require()
        table = SegmentTable()
        try:
            for name, nbytes in sizes.items():
                table.acquire(name, nbytes)
            table.record_owners()
            return cls(layout, table, chunk_size)
        except BaseException:
            table.close()
            raise

    def _build(self, layout: KVLayout) -> None:
        maps: dict[str, ShmMapping] = {}
        for lv in layout.layers:
            if lv is None or lv.desc.numel == 0:
                self._layers.append(None)
                continue
            m = maps.get(lv.desc.shm_name)
            if m is None:
                m = maps[lv.desc.shm_name] = self._segments.get(lv.desc.shm_name)
            norm = dataclasses.replace(lv.desc, shape=lv.shape, stride=lv.stride)
            tensor_view(m, norm)  # checks that the view lies inside the mapping
            isz = norm.itemsize
            self._layers.append(
                _LayerBytes(
                    m.array,
                    m.name,
                    norm.storage_offset * isz,
                    norm.shape,
                    tuple(st * isz for st in norm.stride),
                    isz,
                )
            )
        self._scatter_plans = _plan_blocks(layout, maps, None, self.chunk_size)
        cap = GATHER_ROW_CAP
        self._gather_plans = (
            self._scatter_plans
            if cap is None or all(p.row_bytes <= cap for p in self._scatter_plans)
            else _plan_blocks(layout, maps, max(1, cap // layout.itemsize), self.chunk_size)
        )

    # -- lifecycle ------------------------------------------------------------

    def _enter(self) -> None:
        with self._cond:
            if self._closed:
                raise RegistrationError("the KV registration is closed")
            self._active += 1

    def _exit(self) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0:
                self._cond.notify_all()

    def close(self) -> None:
        """Wait for in-flight copies, then unmap every segment.  Idempotent."""
        with self._cond:
            self._closed = True
            while self._active:
                self._cond.wait()
            self._gather_plans = ()
            self._scatter_plans = ()
            self._layers = []
        self._segments.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def segment_names(self) -> list[str]:
        """Names of the segments this registration maps."""
        return self._segments.names()

    @property
    def segment_owners(self) -> tuple[SegmentOwner, ...]:
        """The segments whose creator kvhive proved at registration (kept after close)."""
        return self._owners

    def __enter__(self) -> PagedKV:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- validation -----------------------------------------------------------

    @staticmethod
    def is_null_chunk(block_ids: Sequence[int], null_block_id: int = 0) -> bool:
        """True when every id is the null block (such chunks hold no KV, §14)."""
        return all(int(b) == null_block_id for b in block_ids)

    # -- copies -----------------------------------------------------------------

    def gather(self, block_ids: Sequence[int], out: np.ndarray) -> None:
        """Copy one chunk from the engine pages into ``out`` (the object's bytes)."""
        self.gather_many([(block_ids, out)])

    def gather_many(self, chunks: Sequence[tuple[Sequence[int], np.ndarray]]) -> None:
        """Copy several chunks, ``(block_ids, out)`` each, as one batch (one request).

        Every chunk is validated before any byte moves.  ``out`` buffers are borrowed for
        the call only.  On a failure (TransferFailed) some chunks may be partly written.
        """
        self._copy(gather_routes(self, chunks), to_engine=False)

    def scatter(self, src: np.ndarray, block_ids: Sequence[int], skip_tokens: int = 0) -> None:
        """Copy one chunk object into the engine pages.

        The first ``floor(skip_tokens / BS)`` blocks of the chunk are left
        untouched (vLLM may share them with other requests, §14).
        """
        self.scatter_many([(src, block_ids, skip_tokens)])

    def scatter_many(self, chunks: Sequence[tuple[np.ndarray, Sequence[int], int]]) -> None:
        """Copy several chunk objects, ``(src, block_ids, skip_tokens)`` each, into the
        engine pages as one batch; ``skip_tokens`` as in :meth:`scatter`.

        Every chunk is validated before any byte moves; ``src`` buffers are borrowed for
        the call only.
        """
        self._copy(scatter_routes(self, chunks), to_engine=True)

    def _copy(
        self,
        chunks: Sequence[ChunkRoute],
        *,
        to_engine: bool,
    ) -> None:
        """Run checked chunks through the plans (the scatter plans ``to_engine``, else the
        gather plans)."""
        if not chunks:
            return
        self._enter()
        try:
            plans = self._scatter_plans if to_engine else self._gather_plans
            bpc = self.blocks_per_chunk
            jobs = [
                _Job(plan, c.buf, c.ids, c.first, bpc)
                for c in chunks
                for plan in plans
                if c.ids.size
            ]
            _run_jobs(jobs, to_engine)
        finally:
            self._exit()

    # -- /cache/checksums ------------------------------------------------------

    def checksums(
        self, block_ids: list[int], blocks_per_chunk: int, layerwise: bool = False
    ) -> list[str] | dict[str, list[str]]:
        """MD5 per chunk of ``blocks_per_chunk`` blocks over the engine's KV blocks.

        Same values as the reference's ``POST /cache/checksums``: for every
        registered layer, the selected blocks of its memory-order view along
        the format's block axis (axis 1 for ``[2, NB, ...]`` layouts, else 0),
        C-order bytes, with ``bfloat16`` widened to ``float32`` first.  The last
        chunk may be short.  Aggregated: one digest per chunk over all layers in
        order; ``layerwise``: ``{"layer_<i>": [digest per chunk]}``.
        """
        if isinstance(blocks_per_chunk, bool) or not isinstance(blocks_per_chunk, int):
            raise BadRequest("chunk_size must be an integer")
        if blocks_per_chunk <= 0:
            raise BadRequest("chunk_size must be positive")
        if not block_ids:
            raise BadRequest("block_ids is required")
        ids = check_block_ids(block_ids, None, self.num_blocks)
        self._enter()
        try:
            layers = []
            for li, (lv, where) in enumerate(zip(self.layout.layers, self._layers, strict=True)):
                if lv is None or where is None:
                    raise UnsupportedError(f"checksum not supported: layer {li} has no usable KV")
                layers.append((where, lv.checksum_axis, lv.desc.dtype))
            starts = range(0, len(ids), blocks_per_chunk)
            if layerwise:
                return {
                    f"layer_{li}": [
                        _md5(_chunk_bytes(*layer, ids[s : s + blocks_per_chunk])) for s in starts
                    ]
                    for li, layer in enumerate(layers)
                }
            out = []
            for s in starts:
                h = hashlib.md5(usedforsecurity=False)
                for layer in layers:
                    h.update(_chunk_bytes(*layer, ids[s : s + blocks_per_chunk]))
                out.append(h.hexdigest())
            return out
        finally:
            self._exit()


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


@dataclass(frozen=True, slots=True)
class _LayerBytes:
    """Where one registered layer's elements lie in its segment, in bytes."""

    seg: np.ndarray = field(repr=False)  # flat uint8 view of the whole segment mapping
    name: str
    offset: int
    shape: tuple[int, ...]
    strides: tuple[int, ...]
    itemsize: int


def _chunk_bytes(layer: _LayerBytes, axis: int, dtype: str, ids: np.ndarray) -> bytes:
    """C-order bytes of ``layer``'s view with only blocks ``ids`` along ``axis``, read
    through the SIGBUS-safe helper (rows: the innermost dims contiguous in the segment)."""
    shape = list(layer.shape)
    if ids.size and int(ids.max()) >= shape[axis]:  # a layer outside the group, fewer blocks
        raise BadRequest(f"block ids exceed a layer's {shape[axis]} blocks")
    shape[axis] = ids.size
    if math.prod(shape) == 0:
        return b""
    run, cut = layer.itemsize, len(shape)
    for d in range(len(shape) - 1, axis, -1):
        if shape[d] != 1 and layer.strides[d] != run:
            break
        run *= shape[d]
        cut = d
    offs = np.full(1, layer.offset, np.int64)
    for d in range(cut):
        idx = ids.astype(np.int64) if d == axis else np.arange(shape[d], dtype=np.int64)
        offs = (offs[:, None] + idx[None, :] * layer.strides[d]).reshape(-1)
    out = np.empty(offs.size * run, np.uint8)
    safecopy.copy_rows(out, None, layer.seg, offs, run, segment=layer.name)
    if dtype == "bfloat16":  # the reference hashes bf16 widened to fp32: bits << 16
        return (out.view("<u2").astype("<u4") << np.uint32(16)).tobytes()
    return out.tobytes()
