"""Copy engine between an engine's paged KV cache held in torch tensors and chunk objects.

:class:`TorchPagedKV` is the device-tensor twin of :class:`~kvhive.transfer.paged.PagedKV`:
same layouts (:func:`~kvhive.transfer.layouts.plan_layout` over the same descriptors), same
object bytes, same ``skip_tokens`` rounding, same validation -- but the engine pages are
torch tensors (CUDA device memory opened through IPC in production; plain CPU tensors in
the tests) and the copies are torch ops.  torch is imported lazily: this module is only
imported when a device registration arrives.

Copy plan, made once per registration.  Every transferred layer's tensor is re-viewed
(``torch.as_strided`` on the same storage, the elements reinterpreted as unsigned/signed
integers of the same width so every copy is a bit copy) as a *blocks-first* view::

    blocks[layer][id] = [kv, BS, NH, HS]      (canonical axes of its LayerView)

and chunk objects are staged on the KV's device in a buffer of ``k`` objects::

    staging[c] = [kv, NL, B, BS, NH, HS]      (= the object [kv, NL, C, hidden], contiguous)

Store (``gather``): per layer one ``index_select`` of all chunks' blocks, copied into that
layer's slots of the staging objects, then one copy per chunk staging -> L1.  Retrieve
(``scatter``): one copy per chunk L1 -> staging, then per layer one ``index_copy_`` of the
non-skipped blocks.  Block ids repeated within a batch are written once, from their last
occurrence (what the sequential CPU copy leaves); ``index_copy_`` with duplicates would be
nondeterministic on a GPU.  Batches larger than the staging buffer run in several passes
over the same buffer; on CUDA stream order makes the reuse safe.

On CUDA every batch runs on the backend's own copy stream, after the worker's event
(``events.wait_for_worker``); an event recorded after it (``events.record``) is the
ticket's handle, and a :class:`~kvhive.transfer.completion.CompletionThread` finishes the
ticket once that event completed.  On CPU tensors the copies run at once and the ticket is
:data:`~kvhive.transfer.backend.DONE`.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from kvhive.errors import BadRequest, RegistrationError, TransferFailed
from kvhive.transfer.backend import (
    DONE,
    ChunkRoute,
    CopyTicket,
    PendingTicket,
    gather_routes,
    scatter_routes,
)
from kvhive.transfer.completion import CompletionThread
from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.layouts import ChunkPlan, KVFormat, KVLayout, LayerView, plan_layout
from kvhive.transfer.shm import SegmentOwner

# The layout a GPU server assumes when a registration carries no kv_layout hint (the CPU
# server's default is HND, see kvhive.transfer.layouts.DEFAULT_KV_LAYOUT).
DEVICE_DEFAULT_KV_LAYOUT = "NHD"
# Staging buffer per backend: at most this many bytes (but always one object) ...
DEFAULT_STAGING_BYTES = 256 << 20
# ... and at most this many objects.
MAX_STAGING_CHUNKS = 64

_RAW_DTYPES = {1: "uint8", 2: "int16", 4: "int32", 8: "int64"}


def _torch() -> Any:
    import torch  # lazy on purpose: the server runs without torch

    return torch


class DeviceLayer(Protocol):
    """One opened layer: its descriptor and a torch tensor viewing exactly that."""

    @property
    def desc(self) -> TensorDesc: ...

    @property
    def tensor(self) -> Any: ...


class RecordedEvent(Protocol):
    """An event recorded on the copy stream (exported: ``handle`` goes to the worker)."""

    @property
    def handle(self) -> bytes: ...

    def synchronize(self) -> None: ...

    def query(self) -> bool: ...


class CopyEvents(Protocol):
    """The event helper: waits on the worker's event, records the server's."""

    def wait_for_worker(self, handle: bytes, stream: Any) -> None: ...

    def record(self, stream: Any) -> RecordedEvent: ...


class Closeable(Protocol):
    def close(self) -> None: ...


def _raw(torch: Any, tensor: Any) -> Any:
    """``tensor`` with its elements reinterpreted as integers of the same width."""
    name = _RAW_DTYPES.get(tensor.element_size())
    return tensor if name is None else tensor.view(getattr(torch, name))


def _blocks_view(torch: Any, layer: DeviceLayer, view: LayerView) -> Any:
    """The blocks-first canonical view ``[NB, kv, BS, NH, HS]`` of one layer's storage."""
    t, desc = layer.tensor, layer.desc
    if tuple(t.shape) != desc.shape or tuple(t.stride()) != desc.stride:
        raise RegistrationError(
            f"opened tensor {list(t.shape)}/{list(t.stride())} does not match its descriptor "
            f"{list(desc.shape)}/{list(desc.stride)}"
        )
    if t.element_size() != desc.itemsize:
        raise RegistrationError(
            f"opened tensor has {t.element_size()}-byte elements, not {desc.dtype}"
        )
    raw = _raw(torch, t)
    kv, nb, bs, nh, hs = view.sizes
    s_kv, s_blk, s_slot, s_head, s_dim = view.strides
    try:  # as_strided checks the view against the storage's size
        return torch.as_strided(
            raw, (nb, kv, bs, nh, hs), (s_blk, s_kv, s_slot, s_head, s_dim), raw.storage_offset()
        )
    except RuntimeError as exc:
        raise RegistrationError(f"KV view does not fit its storage: {exc}") from None


class _Pipeline:
    """The registration's copy plan and staging buffer (module doc).

    Not thread-safe: the owner runs one batch at a time (its enqueue lock), so the staging
    buffer is written by one batch at a time; on CUDA everything runs on ``stream``.
    """

    def __init__(
        self, torch: Any, layout: KVLayout, blocks: list[Any], chunk_size: int, staging_bytes: int
    ) -> None:
        self.torch = torch
        self.blocks = blocks  # per transferred layer, in object order
        self.device = blocks[0].device
        self.cuda = self.device.type == "cuda"
        self.kv, self.nl = layout.kv_size, layout.num_layers
        self.bpc = chunk_size // layout.block_size
        self.block_shape = (layout.block_size, layout.num_heads, layout.head_size)
        self.object_nbytes = math.prod(layout.object_shape(chunk_size)) * layout.itemsize
        self.capacity = max(1, min(MAX_STAGING_CHUNKS, staging_bytes // self.object_nbytes))
        self.stream = torch.cuda.Stream(device=self.device) if self.cuda else None
        with self._on_stream():
            self.staging_bytes = torch.empty(
                self.capacity * self.object_nbytes, dtype=torch.uint8, device=self.device
            )
        self.staging = self.staging_bytes.view(blocks[0].dtype).view(
            self.capacity, self.kv, self.nl, self.bpc, *self.block_shape
        )
        self.host = None if self.cuda else self.staging_bytes.numpy()

    def _on_stream(self) -> Any:
        if self.stream is None:
            return contextlib.nullcontext()
        return self.torch.cuda.stream(self.stream)

    def run(self, chunks: Sequence[ChunkRoute], to_engine: bool) -> None:
        """Enqueue (CUDA) or run (CPU) every chunk, ``capacity`` chunks per pass."""
        with self._on_stream():
            for s in range(0, len(chunks), self.capacity):
                part = chunks[s : s + self.capacity]
                if to_engine:
                    self._scatter(part)
                else:
                    self._gather(part)

    def _slot(self, c: int) -> Any:
        return self.staging_bytes[c * self.object_nbytes : (c + 1) * self.object_nbytes]

    def _ids(self, ids: np.ndarray) -> Any:
        t = self.torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))
        return t.to(self.device, non_blocking=True) if self.cuda else t

    def _gather(self, part: Sequence[ChunkRoute]) -> None:
        n, bpc = len(part), self.bpc
        ids = self._ids(np.concatenate([c.ids for c in part]))
        st = self.staging[:n]
        for j, blocks in enumerate(self.blocks):
            got = blocks.index_select(0, ids).view(n, bpc, self.kv, *self.block_shape)
            st[:, :, j].copy_(got.transpose(1, 2))
        for c, chunk in enumerate(part):
            if self.host is not None:
                np.copyto(
                    chunk.buf, self.host[c * self.object_nbytes : (c + 1) * self.object_nbytes]
                )
            else:
                self.torch.from_numpy(chunk.buf).copy_(self._slot(c), non_blocking=True)

    def _scatter(self, part: Sequence[ChunkRoute]) -> None:
        for c, chunk in enumerate(part):
            if self.host is not None:
                self.host[c * self.object_nbytes : (c + 1) * self.object_nbytes] = chunk.buf
            else:  # from_numpy warns on read-only arrays; L1 views are writable
                src = chunk.buf if chunk.buf.flags.writeable else chunk.buf.copy()
                self._slot(c).copy_(self.torch.from_numpy(src), non_blocking=True)
        ids = np.concatenate([c.ids for c in part])
        if ids.size == 0:
            return
        which = np.concatenate([np.full(c.ids.size, i, np.int64) for i, c in enumerate(part)])
        block = np.concatenate([np.arange(c.first, c.first + c.ids.size) for c in part])
        # Each id once, from its last occurrence (the order a sequential copy writes in).
        _, last_rev = np.unique(ids[::-1], return_index=True)
        keep = np.sort(ids.size - 1 - last_rev)
        dst = self._ids(ids[keep])
        ci, bi = self._ids(which[keep]), self._ids(block[keep])
        st = self.staging[: len(part)]
        for j, blocks in enumerate(self.blocks):
            blocks.index_copy_(0, dst, st[:, :, j][ci, :, bi])  # [P, kv, BS, NH, HS]

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()


class TorchPagedKV:
    """The per-registration copy engine over torch tensors (module doc).

    Implements :class:`~kvhive.transfer.backend.CopyBackend` and
    :class:`~kvhive.transfer.backend.AsyncCopyBackend`.  Attributes as on
    :class:`~kvhive.transfer.paged.PagedKV`.

    Locks: ``_cond`` guards the open/closed state and the count of batches in flight (from
    validation until the device finished, not until the done callbacks ran);
    ``_enqueue`` serialises batches (they share the staging buffer and, on CUDA, the
    stream).  ``close`` waits for batches in flight, then drops the views and closes
    ``owner`` (the IPC mappings); it never waits for done callbacks.
    """

    def __init__(
        self,
        layout: KVLayout,
        layers: Sequence[DeviceLayer],
        chunk_size: int,
        *,
        events: CopyEvents | None = None,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        owner: Closeable | None = None,
        async_completion: bool | None = None,
    ) -> None:
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
        torch = _torch()
        blocks = []
        for i in layout.layer_indices:
            lv = layout.layers[i]
            assert lv is not None
            blocks.append(_blocks_view(torch, layers[i], lv))
        devices = {str(b.device) for b in blocks}
        if len(devices) != 1:
            raise RegistrationError(f"KV layers on several devices: {sorted(devices)}")
        self._pipe: _Pipeline | None = _Pipeline(torch, layout, blocks, chunk_size, staging_bytes)
        self.device: str = devices.pop()
        asynchronous = self._pipe.cuda if async_completion is None else async_completion
        if asynchronous and events is None:
            raise RegistrationError("asynchronous copies (a CUDA KV cache) need an event helper")
        self._events = events
        self._done = CompletionThread(f"kvhive-copy-done-{self.device}") if asynchronous else None
        self._owner = owner
        self._cond = threading.Condition()
        self._enqueue = threading.Lock()
        self._active = 0
        self._closed = False

    @classmethod
    def from_layers(
        cls,
        layers: Sequence[DeviceLayer],
        layout_hints: Mapping[str, Any] | None,
        group_infos: Sequence[Any],
        chunk_size: int,
        *,
        events: CopyEvents | None = None,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
        owner: Closeable | None = None,
        default_kv_layout: str = DEVICE_DEFAULT_KV_LAYOUT,
        async_completion: bool | None = None,
    ) -> TorchPagedKV:
        """Plan the layout over the layers' descriptors (as PagedKV does) and the copies.

        Raises LayoutError or RegistrationError; ``owner`` is closed then too (it is this
        backend's to close from the call on).
        """
        try:
            layout = plan_layout(
                [layer.desc for layer in layers],
                layout_hints,
                group_infos,
                default_kv_layout=default_kv_layout,
            )
            return cls(
                layout,
                layers,
                chunk_size,
                events=events,
                staging_bytes=staging_bytes,
                owner=owner,
                async_completion=async_completion,
            )
        except BaseException:
            if owner is not None:
                owner.close()
            raise

    # -- lifecycle ------------------------------------------------------------

    def _enter(self) -> _Pipeline:
        with self._cond:
            if self._closed or self._pipe is None:
                raise RegistrationError("the KV registration is closed")
            self._active += 1
            return self._pipe

    def _exit(self) -> None:
        with self._cond:
            self._active -= 1
            if self._active == 0:
                self._cond.notify_all()

    def close(self) -> None:
        """Wait for batches in flight (until the device finished them), then drop the
        views and close the owner.  Idempotent."""
        with self._cond:
            self._closed = True
            while self._active:
                self._cond.wait()
            pipe, self._pipe = self._pipe, None
        if pipe is None:  # closed before (or by a concurrent close that got here first)
            return
        if self._done is not None:
            self._done.close()
        if self._owner is not None:
            self._owner.close()

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def segment_owners(self) -> tuple[SegmentOwner, ...]:
        """No host segments: always empty."""
        return ()

    def __enter__(self) -> TorchPagedKV:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- copies ---------------------------------------------------------------

    def gather(self, block_ids: Sequence[int], out: np.ndarray) -> None:
        """Copy one chunk from the engine pages into ``out`` (the object's bytes)."""
        self.gather_many([(block_ids, out)])

    def gather_many(self, chunks: Sequence[tuple[Sequence[int], np.ndarray]]) -> None:
        self.gather_async(chunks, b"").wait()

    def scatter(self, src: np.ndarray, block_ids: Sequence[int], skip_tokens: int = 0) -> None:
        """Copy one chunk object into the engine pages, leaving the first
        ``floor(skip_tokens / BS)`` blocks of the chunk untouched."""
        self.scatter_many([(src, block_ids, skip_tokens)])

    def scatter_many(self, chunks: Sequence[tuple[np.ndarray, Sequence[int], int]]) -> None:
        self.scatter_async(chunks, b"").wait()

    def gather_async(
        self, chunks: Sequence[tuple[Sequence[int], np.ndarray]], wait_event: bytes
    ) -> CopyTicket:
        """Store one request's chunks, ``(block_ids, out)`` each.  Every chunk is checked
        before any byte moves; ``out`` buffers must live until the ticket is done."""
        routes = gather_routes(self, chunks)
        return self._start(routes, wait_event, to_engine=False)

    def scatter_async(
        self, chunks: Sequence[tuple[np.ndarray, Sequence[int], int]], wait_event: bytes
    ) -> CopyTicket:
        """Retrieve one request's chunks, ``(src, block_ids, skip_tokens)`` each (as
        :meth:`scatter`); ``src`` buffers must live until the ticket is done."""
        routes = scatter_routes(self, chunks)
        return self._start(routes, wait_event, to_engine=True)

    def _start(self, routes: list[ChunkRoute], wait_event: bytes, *, to_engine: bool) -> CopyTicket:
        if not routes:
            return DONE
        pipe = self._enter()
        if self._done is None:  # CPU tensors: copy now
            try:
                with self._enqueue:
                    pipe.run(routes, to_engine)
            except RuntimeError as exc:
                raise TransferFailed(f"KV copy failed: {exc}") from exc
            finally:
                self._exit()
            return DONE
        assert self._events is not None
        submitted = False
        try:
            with self._enqueue:
                try:
                    if wait_event:
                        self._events.wait_for_worker(wait_event, pipe.stream)
                    pipe.run(routes, to_engine)
                    recorded = self._events.record(pipe.stream)
                except BaseException:
                    pipe.synchronize()  # nothing may touch the L1 buffers after we raise
                    raise
            ticket = PendingTicket(recorded.handle)
            self._done.submit(recorded, ticket, self._exit)  # it calls _exit when settled
            submitted = True
        except (BadRequest, RegistrationError):  # e.g. a malformed worker event handle
            raise
        except Exception as exc:
            raise TransferFailed(f"KV copy could not be enqueued: {exc}") from exc
        finally:
            if not submitted:
                self._exit()
        return ticket
