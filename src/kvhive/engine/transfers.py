"""TransferService: lmcache-driven registration, store and retrieve.

The server copies between the engine's paged KV cache (a :class:`CopyBackend` built at
registration) and L1 buffers, on the caller connection's affinity thread.

    store     reserve L1 (WriterOwner of the instance) --gather--> commit, then reply:
              a stored chunk is visible to the next lookup.
    retrieve  pin the chunks (CopyPin) --scatter--> unpin, and give back one lookup lock
              per chunk (see :mod:`kvhive.engine.lookups` for the whole lock contract).

A CPU backend copies before the call returns (the reply's event handle is ``b""``).  A
device backend (CUDA) enqueues the batch behind the worker's event and returns a ticket at
once; the reply carries the ticket's event handle, the worker waits on that event, and the
commit (store) or the unpin (retrieve) runs from the ticket's done callback when the copy
completed.  Until then the reservations and the CopyPin keep every L1 buffer of the batch
in place (``transfer/backend.py``: buffers live until the done callback, not the call).
A store is therefore visible to lookups once its copy completed, which is no later than
the worker's own wait on the returned event.

Results are domain records; a request that decoded but cannot be served raises
:class:`~kvhive.errors.TransferFailed` and dispatch answers with the op's soft value.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kvhive.engine import keys as k
from kvhive.engine.lookups import LookupService
from kvhive.engine.registry import ChunkGeometry, Instance, Mode, Registry
from kvhive.engine.sessions import Sessions
from kvhive.engine.stats import TransferBrackets
from kvhive.errors import RegistrationError, TransferFailed, UnsupportedError
from kvhive.keys import ChunkHash, InstanceId, ObjectKey
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.owners import CopyPin, WriterOwner
from kvhive.transfer.backend import CopyBackend, CopyTicket, gather_batch, scatter_batch
from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.paged import PagedKV
from kvhive.wire import types as t

if TYPE_CHECKING:
    from kvhive.transfer.cuda.attach import OpenedDevice

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class StoreResult:
    """Chunks a store committed, and chunks it skipped (already resident or being written)."""

    stored: int
    skipped: int
    event: bytes = b""  # the copy's event for the worker; b"" when it already completed


@dataclass(frozen=True, slots=True)
class RetrieveResult:
    """Chunks a retrieve copied into the engine's blocks."""

    chunks: int
    event: bytes = b""  # as StoreResult.event


class TransferService:
    """Registration, store and retrieve for lmcache-driven workers (module docstring)."""

    def __init__(
        self,
        *,
        l1: L1Manager,
        sessions: Sessions,
        registry: Registry,
        lookups: LookupService,
        brackets: TransferBrackets,
        transfer_modes: frozenset[str],
        null_block_id: int,
        device_opener: DeviceOpener | None = None,
    ) -> None:
        self.l1 = l1
        self.sessions = sessions
        self.registry = registry
        self.lookups = lookups
        self.brackets = brackets
        self.chunk_size = sessions.chunk_size
        self.transfer_modes = transfer_modes
        self.null_block_id = null_block_id
        self.device_opener: DeviceOpener = device_opener or _open_cuda

    # ---- shared with the engine-driven path -------------------------------------------

    def chunk_keys(self, key: t.CacheKey, kv_rank: int) -> list[ObjectKey]:
        """Object keys of the chunks in ``key``'s (chunk-aligned) range for ``kv_rank``."""
        first, hashes = self._range_hashes(key)
        return k.object_keys(key, hashes[first:], kv_rank)

    def _range_hashes(self, key: t.CacheKey) -> tuple[int, list[ChunkHash]]:
        """``key``'s first chunk, and the hashes of chunks 0 .. its end chunk - 1."""
        first, end = k.chunk_range(key, self.chunk_size, aligned=True)
        session = self.sessions.get(key.request_id)
        assert session is not None  # get() creates
        return first, self.sessions.hashes(session, key.token_ids, end)

    def bind_tokens(
        self, key: t.CacheKey, first: int | None = None, hashes: list[ChunkHash] | None = None
    ) -> None:
        """Before a store commits: tell the KV-event log the tokens and parent hash of each
        chunk in ``key``'s range (its "stored" records carry them).  Worker 0 (or a
        scheduler key) only, as the reference: a chunk's tokens do not depend on the rank.
        Free unless the log listens; ``first, hashes`` as :meth:`_range_hashes` gives them
        (computed here when not given)."""
        telemetry = self.brackets.telemetry
        if key.worker_id not in (0, None) or not telemetry.wants_tokens:
            return
        if first is None or hashes is None:
            first, hashes = self._range_hashes(key)
        parent = hashes[first - 1] if first else None
        telemetry.tokens_bound(key, hashes[first:], parent, first * self.chunk_size)

    def instance(self, instance_id: int, mode: Mode) -> Instance | None:
        """The live registration ``instance_id`` if it uses ``mode`` (marks it seen)."""
        inst = self.registry.get(instance_id)
        if inst is None or inst.mode != mode:
            return None
        return inst

    # ---- registration --------------------------------------------------------------------

    def register_kv_cache(
        self,
        instance_id: int,
        descriptors: list[Any],
        model_name: str,
        world_size: int,
        engine_type: str,
        layout_hints: dict[str, Any],
        group_infos: list[t.EngineGroupInfo],
    ) -> None:
        """Map the worker's KV cache and plan its copies; replaces an older registration."""
        if "lmcache_driven" not in self.transfer_modes:
            raise UnsupportedError("this server runs with --supported-transfer-mode engine_driven")
        groups = [
            {
                "engine_group_id": g.engine_group_id,
                "layer_indices": list(g.layer_indices),
                "tokens_per_block": g.tokens_per_block,
                "sw_size_tokens": g.sw_size_tokens,
            }
            for g in group_infos
        ]
        backend = self._open_backend(descriptors, dict(layout_hints), groups)
        geometry = ChunkGeometry(tuple(backend.object_shape), backend.dtype, backend.object_nbytes)
        self.registry.add(
            Instance(
                instance_id=InstanceId(instance_id),
                mode="lmcache_driven",
                model_name=model_name,
                world_size=world_size,
                geometry=geometry,
                mapping=backend,
                layout=str(layout_hints.get("kv_layout", "")),
            )
        )
        log.info(
            "registered instance %d: %s world %d, %d layers, object %s %s (%d bytes)",
            instance_id,
            model_name,
            world_size,
            len(descriptors),
            geometry.shape,
            geometry.dtype,
            geometry.nbytes,
        )

    def _open_backend(
        self, descriptors: list[Any], layout_hints: dict[str, Any], groups: list[dict[str, Any]]
    ) -> CopyBackend:
        """``cpu_shm`` layers: PagedKV over the mapped segments.  CUDA layers: the device
        backend (torch imported only now; refused with the ``kvhive[cuda]`` hint when this
        server has no usable CUDA), and L1 is page-locked for DMA from then on."""
        kinds = sorted({str(getattr(d, "type", type(d).__name__)) for d in descriptors})
        if kinds == ["cpu_shm"] or not descriptors:
            descs = [_tensor_desc(d) for d in descriptors]
            return PagedKV.from_descriptors(descs, layout_hints, groups, self.chunk_size)
        if not set(kinds) <= CUDA_KINDS:
            raise RegistrationError(
                f"IPC descriptor types {kinds} are not served: one registration carries "
                "cpu_shm layers or CUDA (cuda, cuda_raw, cuda_vmm) layers"
            )
        opened = self.device_opener(descriptors, layout_hints, groups, self.chunk_size)
        if opened.pinner is not None:
            self.l1.pin_host_memory(opened.pinner)  # once: later calls do nothing
        log.info("CUDA registration on device %d (%s)", opened.device, ", ".join(kinds))
        return opened.backend

    def unregister_kv_cache(self, instance_id: int) -> None:
        self.registry.remove(instance_id)

    # ---- store / retrieve --------------------------------------------------------------

    def store(
        self, key: t.CacheKey, instance_id: int, block_ids: list[list[int]], event: bytes
    ) -> StoreResult:
        """Copy the range's chunks out of the engine's blocks into L1 and commit them.
        Chunks whose blocks are all the null block are left out."""
        inst = self.instance(instance_id, "lmcache_driven")
        if inst is None or inst.mapping is None:
            raise TransferFailed(f"store from unknown instance {instance_id}")
        backend = inst.mapping
        kv_rank = k.kv_rank_of(key)
        inst.kv_ranks.add(kv_rank)
        first, hashes = self._range_hashes(key)
        keys = k.object_keys(key, hashes[first:], kv_rank)
        per_chunk = _split_blocks(block_ids, len(keys), backend.blocks_per_chunk)
        todo = [
            (obj, blocks)
            for obj, blocks in zip(keys, per_chunk, strict=True)
            if any(b != self.null_block_id for b in blocks)
        ]
        self.bind_tokens(key, first, hashes)
        with self.brackets.storing(key, instance_id, object_nbytes=inst.geometry.nbytes) as tally:
            slots = self.l1.reserve(
                [obj for obj, _ in todo], inst.geometry.nbytes, WriterOwner(inst.instance_id)
            )
            taken = [s for s in slots if s is not None]
            try:  # one batch: the copy engine deals the request's chunks to its threads
                ticket = gather_batch(
                    backend,
                    [
                        (blocks, self.l1.view(slot))
                        for slot, (_, blocks) in zip(slots, todo, strict=True)
                        if slot is not None
                    ],
                    event,
                )
            except BaseException:
                self.l1.abort(taken)
                raise
            if ticket.handle:  # a device copy in flight: commit when it completes
                ticket.add_done_callback(lambda err: self._settle_store(taken, err))
                tally.stored = len(taken)
            else:
                try:
                    ticket.wait()
                except BaseException:
                    self.l1.abort(taken)
                    raise
                tally.stored = sum(self.l1.commit(taken))
            tally.skipped = len(todo) - len(taken)
        return StoreResult(tally.stored, tally.skipped, ticket.handle)

    def _settle_store(self, taken: list[Any], error: BaseException | None) -> None:
        """Done callback of an asynchronous store: commit, or free the reservations."""
        if error is None:
            self.l1.commit(taken)
            return
        self.l1.abort(taken)
        self.brackets.stats.add(store_copy_failures=1)
        log.warning("an asynchronous store copy failed; %d chunks dropped: %s", len(taken), error)

    def retrieve(
        self, key: t.CacheKey, instance_id: int, block_ids: list[list[int]], event: bytes, skip: int
    ) -> RetrieveResult:
        """Copy the range's chunks from L1 into the engine's blocks, leaving the first
        ``skip`` tokens untouched; gives back one lookup lock per chunk however it ends."""
        kv_rank = k.kv_rank_of(key)
        # Keys first: the lookup locks go back even if the instance is gone.
        keys = self.chunk_keys(key, kv_rank)
        try:
            inst = self.instance(instance_id, "lmcache_driven")
            nbytes = inst.geometry.nbytes if inst is not None else 0
            with self.brackets.retrieving(key, instance_id, keys, object_nbytes=nbytes) as tally:
                if inst is None or inst.mapping is None:
                    raise TransferFailed(f"retrieve for unknown instance {instance_id}")
                inst.kv_ranks.add(kv_rank)
                ticket = self._scatter(inst.mapping, keys, block_ids, skip, event)
                tally.ok = True
        finally:
            # The CopyPin, not the lookup's locks, keeps the objects while a copy runs.
            self.lookups.release_retrieved(key, kv_rank, keys)
        return RetrieveResult(len(keys), ticket.handle)

    def _scatter(
        self,
        backend: CopyBackend,
        keys: list[ObjectKey],
        block_ids: list[list[int]],
        skip: int,
        event: bytes,
    ) -> CopyTicket:
        """Copy the chunks into the engine's blocks; returns the copy's ticket.  The CopyPin
        is released when the copy completed (at once for a synchronous backend)."""
        per_chunk = _split_blocks(block_ids, len(keys), backend.blocks_per_chunk)
        # A copy-scoped lock keeps the objects in place even if the lookup's lock expired.
        pin = CopyPin(threading.get_ident())
        slots = self.l1.read_lock(keys, pin)
        held = [s.key for s in slots if s is not None]
        ticket: CopyTicket | None = None
        try:
            if any(s is None for s in slots):
                raise TransferFailed(
                    f"{sum(s is None for s in slots)} of {len(keys)} chunks are no longer in L1"
                )
            c = self.chunk_size
            batch = []
            for i, (slot, blocks) in enumerate(zip(slots, per_chunk, strict=True)):
                assert slot is not None
                batch.append((self.l1.view(slot), blocks, min(max(skip - i * c, 0), c)))
            ticket = scatter_batch(backend, batch, event)  # one batch, as in store
            if ticket.handle:
                ticket.add_done_callback(lambda err: self._settle_retrieve(held, pin, err))
                return ticket
            ticket.wait()
            return ticket
        finally:
            if ticket is None or not ticket.handle:
                self.l1.unlock(held, pin)

    def _settle_retrieve(
        self, held: list[ObjectKey], pin: CopyPin, error: BaseException | None
    ) -> None:
        """Done callback of an asynchronous retrieve: unpin; count a failed copy (the
        worker sees it only as wrong bytes, so it is logged loudly)."""
        self.l1.unlock(held, pin)
        if error is not None:
            self.brackets.stats.add(retrieve_copy_failures=1)
            log.error("an asynchronous retrieve copy failed after its reply: %s", error)


def _split_blocks(block_ids: list[list[int]], n_chunks: int, per_chunk: int) -> list[Sequence[int]]:
    """Block ids of group 0 cut into ``n_chunks`` runs of ``per_chunk``; fails closed
    (TransferFailed) when there are too few."""
    if not block_ids:
        if n_chunks:
            raise TransferFailed(f"no block ids for {n_chunks} chunks")
        return []
    ids = block_ids[0]
    if len(ids) < n_chunks * per_chunk:
        raise TransferFailed(
            f"{len(ids)} block ids for {n_chunks} chunks of {per_chunk} blocks each"
        )
    return [ids[i * per_chunk : (i + 1) * per_chunk] for i in range(n_chunks)]


CUDA_KINDS = frozenset({"cuda", "cuda_raw", "cuda_vmm"})

DeviceOpener = Callable[[list[Any], dict[str, Any], list[dict[str, Any]], int], "OpenedDevice"]
"""Opens one CUDA registration: ``(descriptors, layout_hints, groups, chunk_size)``."""


def _open_cuda(
    descriptors: list[Any], layout_hints: dict[str, Any], groups: list[dict[str, Any]], chunk: int
) -> OpenedDevice:
    from kvhive.transfer.cuda.attach import open_cuda_backend  # imports no torch by itself

    return open_cuda_backend(descriptors, layout_hints, groups, chunk)


def _tensor_desc(d: Any) -> TensorDesc:
    if not isinstance(d, t.CpuShmDescriptor):
        kind = getattr(d, "type", type(d).__name__)
        raise RegistrationError(
            f"IPC descriptor type {kind!r} is not served by this CPU build (cpu_shm only)"
        )
    m = d.metadata
    return TensorDesc(
        dtype=m.dtype,
        shape=tuple(m.shape),
        stride=tuple(m.stride),
        storage_offset=m.storage_offset,
        shm_name=d.shm_name,
        nbytes=d.nbytes,
    )
