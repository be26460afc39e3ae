"""Engine-driven transfers: the worker gathers/scatters itself (protocol.md §15.4-15.5).

Two strategies, chosen at registration:
* shared L1 pool (``--shm-name``): the whole L1 arena is a POSIX segment the worker
  maps; prepare_* hand out ``{offset, length, shape, dtype}`` slots in it and
  commit_* publish (store) or unlock (retrieve).  Zero copies in the server.
* inline: chunk tensors travel inside commit_store/prepare_retrieve, in one of two forms:
  torch pickles from 0.5.6 workers (needs torch in the server; a restricted unpickler
  guards the decode) or 0.5.7's msgpack tensor envelopes (no torch:
  :mod:`kvhive.transfer.tensor_envelope`), checked against the registered layout.

Which inline form an instance speaks: a commit says it by its first byte; a retrieve is
answered in the form of the registration, which says it by its field set (a 0.5.7
worker always sends ``group_layouts``, a 0.5.6 one never does); a commit in the other
form switches the instance to it.  kvhive stores one LMCache group per worker: a 0.5.7
registration with several ``group_layouts`` (hybrid KV) is refused, one layout must
describe the top-level object.  0.5.7's ``skipped_chunks`` (chunks whose blocks are all
the null block) get no reservation on the shared pool.

Locks (see :mod:`kvhive.engine.lookups` for the whole contract): prepare_store reserves
under the instance's ``WriterOwner`` until commit_store; prepare_retrieve pins the chunks
under ``WorkerCopyPin(instance)`` and, like a lmcache-driven retrieve, gives back one lookup
lock per chunk when the retrieve is over (commit_retrieve on the shared pool; at once for
pickle, and on failure).  Unregistering or reaping the instance drops its pins and the
pending tables below.

Threads: every call runs on the caller connection's affinity thread; the pending tables
are shared with the registry's drop listener (any thread) under ``_lock``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from kvhive.engine import keys as k
from kvhive.engine.inline_payloads import InlinePayloads
from kvhive.engine.lookups import LookupService
from kvhive.engine.registry import ChunkGeometry, Instance, Mode, Registry
from kvhive.engine.stats import TransferBrackets
from kvhive.engine.transfers import TransferService
from kvhive.errors import BadRequest, RegistrationError, TransferFailed, UnsupportedError
from kvhive.keys import InstanceId, ObjectKey
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.l1.records import Slot
from kvhive.storage.owners import WorkerCopyPin, WriterOwner
from kvhive.transfer import pickle_codec
from kvhive.transfer.descriptors import canonical_dtype, itemsize
from kvhive.transfer.tensor_envelope import PayloadForm
from kvhive.wire import types as t

log = logging.getLogger(__name__)
MODE: Mode = "engine_driven"


@dataclass(frozen=True, slots=True)
class PendingKey:
    """Names one prepared transfer: the same request range from the same instance."""

    instance_id: int
    model_name: str
    request_id: str
    worker_id: int | None
    start: int
    end: int
    cache_salt: str

    @classmethod
    def of(cls, instance_id: int, key: t.CacheKey) -> PendingKey:
        return cls(
            instance_id,
            key.model_name,
            key.request_id,
            key.worker_id,
            key.start,
            key.end,
            key.cache_salt,
        )


class EngineDriven:
    """The engine-driven operations (module docstring)."""

    def __init__(
        self,
        *,
        l1: L1Manager,
        registry: Registry,
        transfers: TransferService,
        lookups: LookupService,
        brackets: TransferBrackets,
        pool_name: str = "",
        pool_size: int = 0,
    ) -> None:
        self.l1 = l1
        self.registry = registry
        self.transfers = transfers
        self.lookups = lookups
        self.brackets = brackets
        self.pool_name = pool_name
        self.pool_size = pool_size
        self._pending_stores: dict[PendingKey, list[Slot | None]] = {}
        self._pending_reads: dict[PendingKey, list[ObjectKey]] = {}
        self.inline = InlinePayloads(l1=l1, transfers=transfers, brackets=brackets)
        self._lock = threading.Lock()
        registry.on_drop(self._forget)

    def register_kv_cache_engine_driven_context(
        self, p: t.EngineDrivenPayload
    ) -> t.EngineDrivenResponse:
        if MODE not in self.transfers.transfer_modes:
            raise UnsupportedError("this server runs with --supported-transfer-mode lmcache_driven")
        v057 = p.group_layouts is not msgspec.UNSET  # module docstring
        form: PayloadForm = "envelope" if v057 else "pickle"
        if not self.pool_name and form == "pickle" and not pickle_codec.torch_available():
            raise UnsupportedError(
                "engine-driven pickle transfer (a 0.5.6 worker) needs torch in the server "
                "(pip install 'kvhive[torch]') or a shared L1 pool (--shm-name)"
            )
        for name, v in (
            ("block_size", p.block_size),
            ("num_layers", p.num_layers),
            ("hidden_dim_size", p.hidden_dim_size),
        ):
            if v < 1:
                raise BadRequest(f"{name} must be >= 1, got {v}")
        slots = p.num_physical_slots or self.transfers.chunk_size
        if isinstance(p.group_layouts, list):
            self._check_group_layouts(p, p.group_layouts, slots)
        shape = (
            (p.num_layers, slots, p.hidden_dim_size)
            if p.use_mla
            else (2, p.num_layers, slots, p.hidden_dim_size)
        )
        try:
            size = itemsize(p.dtype_str)
        except (RegistrationError, KeyError, ValueError, TypeError) as exc:
            raise BadRequest(f"unknown dtype {p.dtype_str!r}") from exc
        nbytes = size
        for d in shape:
            nbytes *= d
        self.registry.add(
            Instance(
                instance_id=InstanceId(p.instance_id),
                mode=MODE,
                model_name=p.model_name,
                world_size=p.world_size,
                geometry=ChunkGeometry(shape, p.dtype_str, nbytes),
                layout="engine_driven",
                shm_pool=bool(self.pool_name),
            )
        )
        # after add(): replacing drops the old registration's entry
        self.inline.set_form(p.instance_id, form)
        log.info(
            "registered engine-driven instance %d (%s, object %s %s, %s)",
            p.instance_id,
            p.model_name,
            shape,
            p.dtype_str,
            "shm pool" if self.pool_name else f"inline {form}",
        )
        return t.EngineDrivenResponse(
            shm_name=self.pool_name,
            pool_size=self.pool_size,
            null_block_id=self.transfers.null_block_id if v057 else msgspec.UNSET,
        )

    @staticmethod
    def _check_group_layouts(
        p: t.EngineDrivenPayload, layouts: list[t.GroupLayout], slots: int
    ) -> None:
        """A 0.5.7 registration's ``group_layouts``: none (one group, the top-level fields
        describe it) or one that describes the same object; several are refused."""
        if len(layouts) > 1:
            raise UnsupportedError(
                f"group_layouts lists {len(layouts)} LMCache groups: kvhive serves one group "
                "per engine-driven worker (hybrid-KV models with sliding-window or recurrent "
                "groups are not supported)"
            )
        if not layouts:
            return
        g = layouts[0]
        planes = 1 if p.use_mla else 2
        try:
            same_dtype = canonical_dtype(g.dtype_str) == canonical_dtype(p.dtype_str)
        except RegistrationError:
            same_dtype = False
        for field, ok in (
            ("num_layers", g.num_layers == p.num_layers),
            ("hidden_dim_size", g.hidden_dim_size == p.hidden_dim_size),
            ("dtype_str", same_dtype),
            ("window_tokens", g.window_tokens in (0, slots)),
            ("kv_size", g.kv_size in (0, planes)),
            ("window_chunks", g.window_chunks == 0),
            ("recurrent", not g.recurrent),
        ):
            if not ok:
                raise UnsupportedError(
                    f"group_layouts[0].{field} = {getattr(g, field)!r} does not describe the "
                    "registered full-attention object (kvhive serves one full-attention group)"
                )

    def unregister_kv_cache_engine_driven_context(self, instance_id: int) -> None:
        self.registry.remove(instance_id)

    def _forget(self, inst: Instance, reason: str) -> None:
        self.inline.forget(inst.instance_id)
        with self._lock:
            for table in (self._pending_stores, self._pending_reads):
                for pk in [pk for pk in table if pk.instance_id == inst.instance_id]:
                    del table[pk]

    def _inst(self, instance_id: int) -> Instance:
        inst = self.transfers.instance(instance_id, MODE)
        if inst is None:
            raise BadRequest(
                f"instance {instance_id} is not registered for engine-driven transfers"
            )
        return inst

    @staticmethod
    def _slot_desc(slot: Slot, inst: Instance) -> dict[str, Any]:
        g = inst.geometry
        return {
            "offset": slot.offset,
            "length": slot.nbytes,
            "shape": list(g.shape),
            "dtype": g.dtype,
        }

    # ---- store ---------------------------------------------------------------------

    def prepare_store(
        self, key: t.CacheKey, instance_id: int, skipped_chunks: Sequence[Sequence[int]] = ()
    ) -> t.PrepareStoreResponse:
        """Shared pool: reserve L1 slots for the range and hand out where they are; no
        slot for the chunks ``skipped_chunks`` names (0.5.7: per group, the positions in
        the range whose blocks are all the null block; one group here)."""
        inst = self._inst(instance_id)
        kv_rank = k.kv_rank_of(key)
        inst.kv_ranks.add(kv_rank)
        skip = self._skipped(key, skipped_chunks)
        if not inst.shm_pool:
            return t.PrepareStoreResponse(context={})
        keys = self.transfers.chunk_keys(key, kv_rank)
        todo = [i for i in range(len(keys)) if i not in skip]
        slots: list[Slot | None] = [None] * len(keys)
        reserved = self.l1.reserve(
            [keys[i] for i in todo], inst.geometry.nbytes, WriterOwner(inst.instance_id)
        )
        for i, slot in zip(todo, reserved, strict=True):
            slots[i] = slot
        pk = PendingKey.of(instance_id, key)
        with self._lock:
            old = self._pending_stores.pop(pk, None)
            self._pending_stores[pk] = slots
        if old:
            self.l1.abort([s for s in old if s is not None])
        got = [(i, s) for i, s in enumerate(slots) if s is not None]
        return t.PrepareStoreResponse(
            context={
                "slots": [self._slot_desc(s, inst) for _, s in got],
                "chunk_indices": [i for i, _ in got],
            }
        )

    def _skipped(self, key: t.CacheKey, skipped_chunks: Sequence[Sequence[int]]) -> set[int]:
        """The chunk positions of ``key``'s range not to reserve; BadRequest unless there is
        one entry per registered group (here: one) and each position is in the range."""
        if not skipped_chunks:
            return set()
        if len(skipped_chunks) != 1:
            raise BadRequest(
                f"skipped_chunks has {len(skipped_chunks)} groups; the worker registered 1"
            )
        first, end = k.chunk_range(key, self.transfers.chunk_size, aligned=True)
        skip = set(skipped_chunks[0])
        if any(not 0 <= i < end - first for i in skip):
            raise BadRequest(f"skipped_chunks[0] names a chunk outside the {end - first} in range")
        return skip

    def commit_store(self, key: t.CacheKey, instance_id: int, data: bytes) -> bool:
        """Publish what the worker wrote (shared pool), or decode and store its inline
        chunk tensors (a pickle or a tensor envelope).  True when every reserved chunk
        was committed."""
        inst = self._inst(instance_id)
        self.transfers.bind_tokens(key)  # ahead of the commit (KV-event "stored" records)
        if data:
            return self.inline.commit(inst, key, data)
        with self._lock:
            slots = self._pending_stores.pop(PendingKey.of(instance_id, key), None)
        if slots is None:
            raise TransferFailed(f"commit_store without prepare_store ({key.request_id})")
        taken = [s for s in slots if s is not None]
        with self.brackets.storing(
            key, instance_id, object_nbytes=inst.geometry.nbytes, server_copies=False
        ) as tally:
            tally.stored = sum(self.l1.commit(taken))
            tally.skipped = len(slots) - len(taken)
        if tally.stored != len(taken):
            raise TransferFailed(f"{len(taken) - tally.stored} reservations expired before commit")
        return True

    # ---- retrieve ------------------------------------------------------------------

    def prepare_retrieve(self, key: t.CacheKey, instance_id: int) -> t.PrepareRetrieveResponse:
        """Pin the range's chunks; hand out their slots (shared pool) or their bytes
        (pickle).  The lookup locks go back here unless the worker still has to copy."""
        inst = self._inst(instance_id)
        kv_rank = k.kv_rank_of(key)
        inst.kv_ranks.add(kv_rank)
        keys = self.transfers.chunk_keys(key, kv_rank)
        pin = WorkerCopyPin(inst.instance_id)
        slots = self.l1.read_lock(keys, pin)
        held = [s for s in slots if s is not None]
        if len(held) < len(slots):
            self.l1.unlock([s.key for s in held], pin)
            self.lookups.release_retrieved(key, kv_rank, keys)
            with self.brackets.retrieving(
                key, instance_id, keys, object_nbytes=inst.geometry.nbytes, server_copies=False
            ):
                raise TransferFailed(
                    f"{len(slots) - len(held)} of {len(keys)} chunks are no longer in L1"
                )
        if inst.shm_pool:
            with self._lock:
                self._pending_reads[PendingKey.of(instance_id, key)] = keys
            return t.PrepareRetrieveResponse(
                success=True, context={"slots": [self._slot_desc(s, inst) for s in held]}
            )
        g = inst.geometry
        try:
            with self.brackets.retrieving(key, instance_id, keys, object_nbytes=g.nbytes) as tally:
                data = self.inline.encode(inst, [self.l1.view(s) for s in held])
                tally.ok = True
        finally:
            self.l1.unlock(keys, pin)
            self.lookups.release_retrieved(key, kv_rank, keys)
        return t.PrepareRetrieveResponse(success=True, data=data)

    def commit_retrieve(self, key: t.CacheKey, instance_id: int) -> bool:
        """The worker finished copying out of the shared pool: unpin, give locks back."""
        inst = self._inst(instance_id)
        with self._lock:
            keys = self._pending_reads.pop(PendingKey.of(instance_id, key), None)
        if keys is None:
            return True  # pickle path: prepare_retrieve already released everything
        self.l1.unlock(keys, WorkerCopyPin(inst.instance_id))
        self.lookups.release_retrieved(key, k.kv_rank_of(key), keys)
        with self.brackets.retrieving(
            key, instance_id, keys, object_nbytes=inst.geometry.nbytes, server_copies=False
        ) as tally:
            tally.ok = True
        return True
