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
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import numpy as np

from kvhive.transfer.shm import SegmentOwner


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
