"""The copy backend interface: what the engine needs from one registration's KV cache.

A backend moves one chunk object at a time between an engine's paged KV cache and an L1
buffer, following a copy plan made once at registration:

    gather(block_ids, out)            engine pages --> object bytes   (store)
    scatter(src, block_ids, skip)     object bytes --> engine pages   (retrieve)
    gather_many / scatter_many        the same for all chunks of one request, as one batch

:class:`~kvhive.transfer.paged.PagedKV` (numpy over ``cpu_shm`` segments) is the CPU
backend; a CUDA backend (IPC-opened device tensors) implements the same calls.

Contracts the engine relies on:

* ``block_ids`` are the engine block ids of ONE chunk, ``blocks_per_chunk`` of them; a
  bad id raises (``BadRequest``) before any byte moves.
* ``out``/``src`` is a flat ``uint8`` view of exactly ``object_nbytes`` bytes of L1; the
  caller owns the L1 lock that keeps it valid for the whole call.  The backend never
  keeps a reference to it after returning.
* ``scatter`` leaves the first ``skip_tokens`` tokens of the chunk untouched.
* Calls may run on several threads at once (one per connection); ``close`` waits for
  calls in flight, unmaps everything and makes later calls raise ``RegistrationError``.
* Whatever the client does to its own memory (it may truncate a shared segment after
  registering it), a call fails with ``TransferFailed`` instead of crashing the server.
* ``segment_owners`` are the host segments whose creator was proven at registration; the
  registry hands them to a :class:`~kvhive.transfer.shm.SegmentReaper` when it drops the
  registration (empty for backends without host segments).

Asynchronous copies (device backends).  A backend whose copies run on a device stream also
implements :class:`AsyncCopyBackend`: ``gather_async``/``scatter_async`` take the worker's
event handle (protocol §15.2: the copy waits on it), enqueue the whole batch and return a
:class:`CopyTicket` at once.  ``ticket.handle`` is what the reply carries to the worker (an
exported interprocess event recorded after the copy; ``b""`` when the copy already
completed).  The caller keeps the L1 lock over every buffer of the batch until the ticket's
done callback has run: L1 buffers live until then, not until the call returns.
:func:`gather_batch` / :func:`scatter_batch` are the one entry point the engine uses; for a
synchronous backend they copy at once and return :data:`DONE`.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from kvhive.errors import BadRequest
from kvhive.transfer.shm import SegmentOwner

log = logging.getLogger(__name__)


@runtime_checkable
class CopyBackend(Protocol):
    """One registration's copy engine (see the module docstring for the contracts)."""

    @property
    def object_shape(self) -> tuple[int, ...]: ...

    @property
    def object_nbytes(self) -> int: ...

    @property
    def dtype(self) -> str: ...

    @property
    def blocks_per_chunk(self) -> int: ...

    def gather(self, block_ids: Sequence[int], out: np.ndarray) -> None: ...

    def scatter(self, src: np.ndarray, block_ids: Sequence[int], skip_tokens: int = 0) -> None: ...

    def gather_many(self, chunks: Sequence[tuple[Sequence[int], np.ndarray]]) -> None: ...

    def scatter_many(self, chunks: Sequence[tuple[np.ndarray, Sequence[int], int]]) -> None: ...

    @property
    def segment_owners(self) -> Sequence[SegmentOwner]: ...

    def close(self) -> None: ...


def check_block_ids(block_ids: Sequence[int], count: int | None, num_blocks: int) -> np.ndarray:
    """One chunk's engine block ids as int64 (``count`` of them, unless None), or
    BadRequest naming what is wrong: the contract's "a bad id raises before any byte
    moves", shared by every backend."""
    n = len(block_ids)
    if count is not None and n != count:
        raise BadRequest(f"expected {count} block ids per chunk, got {n}")
    if n == 0:
        return np.zeros(0, np.int64)
    ids = np.asarray(block_ids)
    if ids.ndim != 1 or ids.dtype.kind not in "iu":
        raise BadRequest("block ids must be a flat sequence of integers")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= num_blocks:
        bad = lo if lo < 0 else hi
        raise BadRequest(f"block id {bad} outside 0..{num_blocks - 1}")
    return ids.astype(np.int64, copy=False)


def check_object_buffer(buf: np.ndarray, nbytes: int, what: str) -> np.ndarray:
    """``buf`` (an L1 buffer) as a flat uint8 view of exactly ``nbytes``, or ValueError."""
    if not isinstance(buf, np.ndarray) or buf.dtype != np.uint8:
        raise ValueError(f"{what} must be a uint8 numpy array")
    if buf.size != nbytes:
        raise ValueError(f"{what} has {buf.size} bytes, the object has {nbytes}")
    if not buf.flags.c_contiguous:
        raise ValueError(f"{what} must be C-contiguous")  # a reshape would copy silently
    return buf.reshape(-1)


@dataclass(frozen=True, slots=True)
class ChunkRoute:
    """One chunk of a batch after validation: its L1 bytes, the block ids that move, and
    the object block of ``ids[0]`` (``skip_tokens // block_size`` on retrieve, else 0)."""

    buf: np.ndarray  # flat uint8 view of the L1 object (borrowed, see the contracts above)
    ids: np.ndarray  # int64 engine block ids
    first: int


class BatchGeometry(Protocol):
    """What the checks need of a backend (its ``ChunkPlan`` fields)."""

    @property
    def blocks_per_chunk(self) -> int: ...

    @property
    def num_blocks(self) -> int: ...

    @property
    def object_nbytes(self) -> int: ...

    @property
    def block_size(self) -> int: ...


def gather_routes(
    geo: BatchGeometry, chunks: Sequence[tuple[Sequence[int], np.ndarray]]
) -> list[ChunkRoute]:
    """A store batch ``(block_ids, out)`` checked whole before any byte moves."""
    routes = []
    for block_ids, out in chunks:
        ids = check_block_ids(block_ids, geo.blocks_per_chunk, geo.num_blocks)
        dst = check_object_buffer(out, geo.object_nbytes, "out")
        if not dst.flags.writeable:
            raise ValueError("out must be writable")
        routes.append(ChunkRoute(dst, ids, 0))
    return routes


def scatter_routes(
    geo: BatchGeometry, chunks: Sequence[tuple[np.ndarray, Sequence[int], int]]
) -> list[ChunkRoute]:
    """A retrieve batch ``(src, block_ids, skip_tokens)`` checked whole before any byte
    moves; the skip is rounded down to whole blocks and a fully skipped chunk left out."""
    routes = []
    for src, block_ids, skip_tokens in chunks:
        if isinstance(skip_tokens, bool) or not isinstance(skip_tokens, int) or skip_tokens < 0:
            raise BadRequest(f"skip_tokens must be a non-negative integer, got {skip_tokens!r}")
        ids = check_block_ids(block_ids, geo.blocks_per_chunk, geo.num_blocks)
        flat = check_object_buffer(src, geo.object_nbytes, "src")
        skip = skip_tokens // geo.block_size
        if skip < geo.blocks_per_chunk:
            routes.append(ChunkRoute(flat, ids[skip:], skip))
    return routes


DoneCallback = Callable[[BaseException | None], None]
"""Runs once when a copy finished: ``None`` on success, else the error (``TransferFailed``)."""


@runtime_checkable
class CopyTicket(Protocol):
    """A batch of copies in flight.  ``handle`` goes back to the worker in the reply."""

    @property
    def handle(self) -> bytes: ...

    def add_done_callback(self, fn: DoneCallback) -> None:
        """Run ``fn(error)`` once the copy finished (at once, on this thread, if it has)."""
        ...

    def wait(self, timeout: float | None = None) -> None:
        """Block until the copy finished; raises its error, or TimeoutError."""
        ...


class CompletedTicket:
    """A ticket for a copy that already finished (every synchronous backend)."""

    __slots__ = ("_error",)

    def __init__(self, error: BaseException | None = None) -> None:
        self._error = error

    @property
    def handle(self) -> bytes:
        return b""

    def add_done_callback(self, fn: DoneCallback) -> None:
        fn(self._error)

    def wait(self, timeout: float | None = None) -> None:
        if self._error is not None:
            raise self._error


DONE = CompletedTicket()


class PendingTicket:
    """A ticket completed later by whoever runs the copy (``finish``), from any thread.

    Callbacks added before ``finish`` run on the finishing thread, later ones at once on
    the adding thread; each runs exactly once.  ``handle`` is fixed at construction.
    """

    __slots__ = ("_callbacks", "_done", "_error", "_handle", "_lock")

    def __init__(self, handle: bytes = b"") -> None:
        self._handle = handle
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._error: BaseException | None = None
        self._callbacks: list[DoneCallback] = []

    @property
    def handle(self) -> bytes:
        return self._handle

    def finish(self, error: BaseException | None = None) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._error = error
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:  # each runs, even if an earlier one raised
            try:
                fn(error)
            except Exception:  # a callback's failure must not skip the others (logged)
                log.exception("a copy's done callback failed")

    def add_done_callback(self, fn: DoneCallback) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(fn)
                return
        fn(self._error)

    def wait(self, timeout: float | None = None) -> None:
        if not self._done.wait(timeout):
            raise TimeoutError("copy still in flight")
        if self._error is not None:
            raise self._error


@runtime_checkable
class AsyncCopyBackend(CopyBackend, Protocol):
    """A backend whose copies complete later (see the module docstring)."""

    def gather_async(
        self, chunks: Sequence[tuple[Sequence[int], np.ndarray]], wait_event: bytes
    ) -> CopyTicket: ...

    def scatter_async(
        self, chunks: Sequence[tuple[np.ndarray, Sequence[int], int]], wait_event: bytes
    ) -> CopyTicket: ...


def gather_batch(
    backend: CopyBackend, chunks: Sequence[tuple[Sequence[int], np.ndarray]], wait_event: bytes
) -> CopyTicket:
    """Store-side copy of one request's chunks (engine pages -> L1 buffers)."""
    start = getattr(backend, "gather_async", None)  # not isinstance: ~10 µs per Protocol check
    if start is not None:
        ticket: CopyTicket = start(chunks, wait_event)
        return ticket
    backend.gather_many(chunks)
    return DONE


def scatter_batch(
    backend: CopyBackend,
    chunks: Sequence[tuple[np.ndarray, Sequence[int], int]],
    wait_event: bytes,
) -> CopyTicket:
    """Retrieve-side copy of one request's chunks (L1 buffers -> engine pages)."""
    start = getattr(backend, "scatter_async", None)
    if start is not None:
        ticket: CopyTicket = start(chunks, wait_event)
        return ticket
    backend.scatter_many(chunks)
    return DONE
