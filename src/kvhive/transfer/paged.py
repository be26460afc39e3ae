"""Copy engine between an engine's paged KV cache (in shared memory) and chunk objects.

One :class:`PagedKV` per ``cpu_shm`` registration.  It maps the segments
once, works out a copy plan, and then moves one chunk per call:

    gather : engine pages --(block_ids)--> object bytes   (store)
    scatter: object bytes --(block_ids)--> engine pages   (retrieve)

Copy plan.  Each (layer, kv) plane of a chunk object is ``[B, BS, NH, HS]``
elements, contiguous.  The engine side is some strided view; we find the
longest run of elements that is contiguous on both sides (a whole block for
NHD-style layouts, one head row of ``HS`` elements for HND) and cut it into
"rows" of ``r`` elements, ``r`` dividing every stride involved.  A chunk is
then, in byte offsets into the segment::

    object plane (kv, layer) = rows at   off[b, q] = static[kv, layer, q]
                                                    + block_ids[b] * block_step[layer]

so a gather is one row batch per (kv, layer) -- or per chunk when all layers
share one segment -- and a scatter the matching batch the other way.  numpy
computes the offsets; the rows are moved by the SIGBUS-safe native helper
(:mod:`kvhive.transfer.safecopy`), in C, without the GIL, at memcpy speed: a
worker that shrinks its segment gets a failed store or retrieve, never a
crashed server.  There is no Python loop per token or block.

Large chunks are copied by two threads at once (the caller and one helper, see
``COPY_THREADS``): on the 2-core dev box one thread copies ~9.5 GB/s and two
~14 GB/s, so a 32 MiB chunk is gathered ~1.5x faster.  Each thread copies
whole (layer, kv) planes, or for one all-layers batch half of its rows.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import math
import os
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvhive.errors import BadRequest, LayoutError, RegistrationError, UnsupportedError
from kvhive.transfer import safecopy
from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.layouts import DEFAULT_KV_LAYOUT, KVFormat, KVLayout, LayerView, plan_layout
from kvhive.transfer.shm import SegmentOwner, SegmentTable, ShmMapping, tensor_view


@dataclass(frozen=True, slots=True)
class _Run:
    """Consecutive object layers ``[j0, j1)`` whose pages are rows of one segment."""

    seg: np.ndarray = field(repr=False)  # flat uint8 view of the whole segment mapping
    name: str  # the segment's name (for errors)
    row_bytes: int
    j0: int
    j1: int
    static: np.ndarray  # [kv_size, j1 - j0, rows_per_block] int64: byte offsets in block 0
    block_step: np.ndarray  # [j1 - j0] int64: bytes per block id


# Gathers read the engine's shared pages one memcpy per row.  From 4 KiB rows
# up glibc's memcpy uses "rep movsb", which reads these 4 KiB-paged
# shared-memory pages at ~2.5 GB/s on the 2-core dev box against ~8-10 GB/s
# for rows of 128-512 bytes (bench_paged.py), so gather rows are cut to at
# most this many bytes.  Scatters write the pages, which prefers long rows;
# they are not cut.
GATHER_ROW_CAP = 256


# A chunk of at least this many bytes is copied by COPY_THREADS threads; below it the
# hand-off to a helper (~50 us) costs more than it saves.
PARALLEL_MIN_BYTES = 4 << 20
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


def _run_parts(parts: list[list[Callable[[], None]]]) -> None:
    """Run each part's copies in order; part 0 on this thread, the others on helpers.
    Returns when all are done; the first error is raised after every part finished."""
    futures = [_helper_pool().submit(_run_all, p) for p in parts[1:] if p]
    try:
        _run_all(parts[0])
    finally:
        errors = [f.exception() for f in futures]
    for exc in errors:
        if exc is not None:
            raise exc


def _run_all(tasks: list[Callable[[], None]]) -> None:
    for task in tasks:
        task()


def _split(tasks: list[Callable[[], None]], nbytes: int) -> list[list[Callable[[], None]]]:
    """Tasks (equal-sized copies) dealt into COPY_THREADS contiguous parts, or one part."""
    k = COPY_THREADS if nbytes >= PARALLEL_MIN_BYTES else 1
    if k <= 1 or len(tasks) < 2:
        return [tasks]
    k = min(k, len(tasks))
    step = -(-len(tasks) // k)
    return [tasks[i : i + step] for i in range(0, len(tasks), step)]


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


def _plan_runs(
    layout: KVLayout, maps: Mapping[str, ShmMapping], max_row_elems: int | None
) -> list[_Run]:
    """Row plans of the transferred layers, consecutive layers on one segment merged."""
    runs: list[_Run] = []
    # Layers with the same geometry share one ``static`` array, so a copy computes each
    # distinct row offset once per chunk (see PagedKV._indices).
    statics: dict[tuple[bytes, tuple[int, ...]], np.ndarray] = {}
    for j, i in enumerate(layout.layer_indices):
        lv = layout.layers[i]
        assert lv is not None
        r, static_rows, block_rows = _row_plan(lv, max_row_elems)
        rb = r * layout.itemsize
        static = (static_rows * rb).astype(np.int64)
        static = statics.setdefault((static.tobytes(), static.shape), static)
        block_step = block_rows * rb
        seg = maps[lv.desc.shm_name].array
        end = int(static.max()) + (lv.num_blocks - 1) * block_step + rb
        if end > seg.size:  # cannot happen after the span check; the helper checks again
            raise RegistrationError(f"layer {i} pages exceed segment {lv.desc.shm_name!r}")
        prev = runs[-1] if runs else None
        if (
            prev is not None
            and prev.seg is seg
            and prev.row_bytes == rb
            and prev.static.shape[2] == static.shape[1]
        ):
            runs[-1] = dataclasses.replace(
                prev,
                j1=j + 1,
                static=np.concatenate([prev.static, static[:, None, :]], axis=1),
                block_step=np.append(prev.block_step, block_step).astype(np.int64),
            )
        else:
            steps = np.array([block_step], np.int64)
            static3 = _interned(statics, static[:, None, :])
            runs.append(_Run(seg, lv.desc.shm_name, rb, j, j + 1, static3, steps))
    return runs


def _interned(cache: dict[tuple[bytes, tuple[int, ...]], np.ndarray], a: np.ndarray) -> np.ndarray:
    return cache.setdefault((a.tobytes(), a.shape), a)


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
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
            raise LayoutError(f"chunk size must be a positive integer, got {chunk_size!r}")
        if chunk_size % layout.block_size:
            raise LayoutError(
                f"chunk size {chunk_size} is not a multiple of the block size {layout.block_size}"
            )
        self.layout = layout
        self.kv_format: KVFormat = layout.fmt
        self.dtype: str = layout.dtype
        self.block_size: int = layout.block_size
        self.num_blocks: int = layout.num_blocks
        self.chunk_size: int = chunk_size
        self.blocks_per_chunk: int = chunk_size // layout.block_size
        self.object_shape: tuple[int, ...] = layout.object_shape(chunk_size)
        self.object_nbytes: int = math.prod(self.object_shape) * layout.itemsize
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
        self._gather_runs: list[_Run] = []
        self._scatter_runs: list[_Run] = []
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
        self._gather_runs = _plan_runs(layout, maps, GATHER_ROW_CAP // layout.itemsize)
        self._scatter_runs = _plan_runs(layout, maps, None)

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
            self._gather_runs = []
            self._scatter_runs = []
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

    def _block_ids(self, block_ids: Sequence[int], count: int | None) -> np.ndarray:
        n = len(block_ids)
        if count is not None and n != count:
            raise BadRequest(f"expected {count} block ids per chunk, got {n}")
        if n == 0:
            return np.zeros(0, np.intp)
        ids = np.asarray(block_ids)
        if ids.ndim != 1 or ids.dtype.kind not in "iu":
            raise BadRequest("block ids must be a flat sequence of integers")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.num_blocks:
            bad = lo if lo < 0 else hi
            raise BadRequest(f"block id {bad} outside 0..{self.num_blocks - 1}")
        return ids.astype(np.intp, copy=False)

    def _flat(self, buf: np.ndarray, what: str) -> np.ndarray:
        if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8:
            raise ValueError(f"{what} must be a uint8 numpy array")
        if buf.size != self.object_nbytes:
            raise ValueError(f"{what} has {buf.size} bytes, the object has {self.object_nbytes}")
        if not buf.flags.c_contiguous:
            raise ValueError(f"{what} must be C-contiguous")  # a reshape would copy silently
        return buf.reshape(-1)

    @staticmethod
    def is_null_chunk(block_ids: Sequence[int], null_block_id: int = 0) -> bool:
        """True when every id is the null block (such chunks hold no KV, §14)."""
        return all(int(b) == null_block_id for b in block_ids)

    # -- copies -----------------------------------------------------------------

    def _plane_bytes(self) -> int:
        return self.blocks_per_chunk * self.layout.hidden * self.block_size * self.layout.itemsize

    def gather(self, block_ids: Sequence[int], out: np.ndarray) -> None:
        """Copy one chunk from the engine pages into ``out`` (the object's bytes)."""
        ids = self._block_ids(block_ids, self.blocks_per_chunk)
        dst = self._flat(out, "out")
        if not dst.flags.writeable:
            raise ValueError("out must be writable")
        self._enter()
        try:
            kv_size, nl = self.layout.kv_size, self.layout.num_layers
            plane = self._plane_bytes()
            tasks: list[Callable[[], None]] = []
            memo: dict[tuple[int, int, int], np.ndarray] = {}
            for run in self._gather_runs:
                rb = run.row_bytes
                if run.j0 == 0 and run.j1 == nl:  # every layer: the whole object at once
                    offs = (
                        run.static[:, :, None, :]
                        + ids[None, None, :, None] * run.block_step[None, :, None, None]
                    ).reshape(-1)
                    k = COPY_THREADS if self.object_nbytes >= PARALLEL_MIN_BYTES else 1
                    cuts = [offs.size * i // k for i in range(k + 1)]
                    for a, b in itertools.pairwise(cuts):
                        tasks.append(_copy(dst[a * rb : b * rb], None, run, offs[a:b]))
                    continue
                for kv in range(kv_size):
                    offs = _indices(memo, run, kv, ids).reshape(-1)
                    part = dst[(kv * nl + run.j0) * plane : (kv * nl + run.j1) * plane]
                    tasks.append(_copy(part, None, run, offs))
            _run_parts(_split(tasks, self.object_nbytes))
        finally:
            self._exit()

    def scatter(self, src: np.ndarray, block_ids: Sequence[int], skip_tokens: int = 0) -> None:
        """Copy one chunk object into the engine pages.

        The first ``floor(skip_tokens / BS)`` blocks of the chunk are left
        untouched (vLLM may share them with other requests, §14).
        """
        if isinstance(skip_tokens, bool) or not isinstance(skip_tokens, int) or skip_tokens < 0:
            raise BadRequest(f"skip_tokens must be a non-negative integer, got {skip_tokens!r}")
        ids = self._block_ids(block_ids, self.blocks_per_chunk)
        flat = self._flat(src, "src")
        skip = skip_tokens // self.block_size
        if skip >= self.blocks_per_chunk:
            return
        self._enter()
        try:
            kv_size, nl, nb = self.layout.kv_size, self.layout.num_layers, self.blocks_per_chunk
            plane = self._plane_bytes()
            tasks: list[Callable[[], None]] = []
            memo: dict[tuple[int, int, int], np.ndarray] = {}
            for run in self._scatter_runs:
                src_offs = None  # the object's rows back to back...
                if skip:  # ...but for the skipped blocks of each layer
                    rb, nlr, m = run.row_bytes, run.j1 - run.j0, run.static.shape[2]
                    src_offs = (
                        (np.arange(nlr)[:, None, None] * nb + np.arange(skip, nb)[None, :, None])
                        * m
                        + np.arange(m)[None, None, :]
                    ).reshape(-1).astype(np.int64) * rb
                for kv in range(kv_size):
                    offs = _indices(memo, run, kv, ids[skip:]).reshape(-1)
                    part = flat[(kv * nl + run.j0) * plane : (kv * nl + run.j1) * plane]
                    tasks.append(_copy_in(run, offs, part, src_offs))
            _run_parts(_split(tasks, self.object_nbytes))
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
        ids = self._block_ids(block_ids, None)
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


def _indices(
    memo: dict[tuple[int, int, int], np.ndarray], run: _Run, kv: int, ids: np.ndarray
) -> np.ndarray:
    """Row indices ``[layers, blocks, rows per block]`` of plane ``kv`` of ``run`` for the
    chunk's block ``ids``; runs that share their geometry share the result (``memo``, one
    per copy call: ``ids`` is fixed within it)."""
    key = (
        id(run.static),
        kv,
        id(run.block_step) if len(run.block_step) > 1 else -int(run.block_step[0]),
    )
    idx = memo.get(key)
    if idx is None:
        idx = memo[key] = (
            run.static[kv][:, None, :] + ids[None, :, None] * run.block_step[:, None, None]
        )
    return idx


def _copy(
    dst: np.ndarray, dst_offs: np.ndarray | None, run: _Run, src_offs: np.ndarray
) -> Callable[[], None]:
    """A gather task: rows of ``run``'s segment at ``src_offs`` into ``dst``."""

    def copy() -> None:
        safecopy.copy_rows(dst, dst_offs, run.seg, src_offs, run.row_bytes, segment=run.name)

    return copy


def _copy_in(
    run: _Run, dst_offs: np.ndarray, src: np.ndarray, src_offs: np.ndarray | None
) -> Callable[[], None]:
    """A scatter task: rows of ``src`` (at ``src_offs``) into ``run``'s segment."""

    def copy() -> None:
        safecopy.copy_rows(run.seg, dst_offs, src, src_offs, run.row_bytes, segment=run.name)

    return copy


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
