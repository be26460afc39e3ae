"""Engine-driven transfers: the worker gathers/scatters itself (protocol.md §15.4-15.5).

Two strategies, chosen at registration:
* shared L1 pool (``--shm-name``): the whole L1 arena is a POSIX segment the worker
  maps; prepare_* hand out ``{offset, length, shape, dtype}`` slots in it and
  commit_* publish (store) or unlock (retrieve).  Zero copies in the server.
* pickle: chunk tensors travel as torch pickles inside commit_store/prepare_retrieve
  (needs torch in the server; a restricted unpickler guards the decode).
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kvhive.engine import keys as k
from kvhive.engine.engine import CacheEngine
from kvhive.engine.registry import ChunkGeometry, Instance
from kvhive.errors import BadRequest, UnsupportedError
from kvhive.keys import ObjectKey
from kvhive.storage.l1.manager import Slot
from kvhive.transfer import pickle_codec
from kvhive.transfer.descriptors import itemsize
from kvhive.wire import types as t

log = logging.getLogger(__name__)
MODE = "engine_driven"


class EngineDriven:
    def __init__(self, engine: CacheEngine, *, pool_name: str = "", pool_size: int = 0) -> None:
        self.engine = engine
        self.l1 = engine.l1
        self.pool_name = pool_name
        self.pool_size = pool_size
        self._pending_stores: dict[tuple[Any, ...], list[Slot | None]] = {}
        self._pending_reads: dict[tuple[Any, ...], list[ObjectKey]] = {}
        self._lock = threading.Lock()
        engine.registry.on_drop(self._forget)

    def register_kv_cache_engine_driven_context(
        self, p: t.EngineDrivenPayload
    ) -> t.EngineDrivenResponse:
        if MODE not in self.engine.transfer_modes:
            raise UnsupportedError("this server runs with --supported-transfer-mode lmcache_driven")
        if not self.pool_name and not pickle_codec.torch_available():
            raise UnsupportedError(
                "engine-driven pickle transfer needs torch in the server "
                "(pip install 'kvhive[torch]') or a shared L1 pool (--shm-name)"
            )
        for name, v in (
            ("block_size", p.block_size),
            ("num_layers", p.num_layers),
            ("hidden_dim_size", p.hidden_dim_size),
        ):
            if v < 1:
                raise BadRequest(f"{name} must be >= 1, got {v}")
        slots = p.num_physical_slots or self.engine.chunk_size
        shape = (
            (p.num_layers, slots, p.hidden_dim_size)
            if p.use_mla
            else (2, p.num_layers, slots, p.hidden_dim_size)
        )
        try:
            size = itemsize(p.dtype_str)
        except Exception as exc:
            raise BadRequest(f"unknown dtype {p.dtype_str!r}") from exc
        nbytes = size
        for d in shape:
            nbytes *= d
        self.engine.registry.add(
            Instance(
                instance_id=p.instance_id,
                mode=MODE,
                model_name=p.model_name,
                world_size=p.world_size,
                geometry=ChunkGeometry(shape, p.dtype_str, nbytes),
                layout="engine_driven",
                shm_pool=bool(self.pool_name),
            )
        )
        log.info(
            "registered engine-driven instance %d (%s, object %s %s, %s)",
            p.instance_id,
            p.model_name,
            shape,
            p.dtype_str,
            "shm pool" if self.pool_name else "pickle",
        )
        return t.EngineDrivenResponse(shm_name=self.pool_name, pool_size=self.pool_size)

    def unregister_kv_cache_engine_driven_context(self, instance_id: int) -> None:
        self.engine.registry.remove(instance_id)

    def _forget(self, inst: Instance, reason: str) -> None:
        with self._lock:
            for table in (self._pending_stores, self._pending_reads):
                for sig in [s for s in table if s[0] == inst.instance_id]:
                    del table[sig]

    def _inst(self, instance_id: int) -> Instance:
        inst = self.engine._instance(instance_id, MODE)
        if inst is None:
            raise BadRequest(
                f"instance {instance_id} is not registered for engine-driven transfers"
            )
        return inst

    def _slot_desc(self, slot: Slot, inst: Instance) -> dict[str, Any]:
        g = inst.geometry
        return {
            "offset": slot.offset,
            "length": slot.nbytes,
            "shape": list(g.shape),
            "dtype": g.dtype,
        }

    # ---- store ---------------------------------------------------------------------

    def prepare_store(self, key: t.CacheKey, instance_id: int) -> t.PrepareStoreResponse:
        inst = self._inst(instance_id)
        kv_rank = k.kv_rank_of(key)
        inst.kv_ranks.add(kv_rank)
        if not inst.shm_pool:
            return t.PrepareStoreResponse(context={})
        keys, _ = self.engine._chunk_keys(key, kv_rank)
        slots = self.l1.reserve(keys, inst.geometry.nbytes, k.write_owner(instance_id))
        sig = _sig(instance_id, key)
        with self._lock:
            old = self._pending_stores.pop(sig, None)
            self._pending_stores[sig] = slots
        if old:
            self.l1.abort([s for s in old if s is not None])
        got = [(i, s) for i, s in enumerate(slots) if s is not None]
        return t.PrepareStoreResponse(
            context={
                "slots": [self._slot_desc(s, inst) for _, s in got],
                "chunk_indices": [i for i, _ in got],
            }
        )

    def commit_store(self, key: t.CacheKey, instance_id: int, data: bytes) -> bool:
        inst = self._inst(instance_id)
        if data:
            return self._commit_pickle(inst, key, data)
        with self._lock:
            slots = self._pending_stores.pop(_sig(instance_id, key), None)
        if slots is None:
            return False
        taken = [s for s in slots if s is not None]
        done = sum(self.l1.commit(taken))
        self.engine._count(stored_chunks=done)
        tel = self.engine.telemetry  # the worker copied; no server-side copy time
        tel.store_end(
            tel.store_begin(key, instance_id),
            key,
            instance_id,
            stored=done,
            skipped=len(slots) - len(taken),
            object_nbytes=inst.geometry.nbytes,
            elapsed=0.0,
        )
        return done == len(taken)

    def _commit_pickle(self, inst: Instance, key: t.CacheKey, data: bytes) -> bool:
        tensors = pickle_codec.decode_tensors(data)
        kv_rank = k.kv_rank_of(key)
        keys, _ = self.engine._chunk_keys(key, kv_rank)
        if len(tensors) != len(keys):
            log.warning("commit_store: %d tensors for %d chunks", len(tensors), len(keys))
            return False
        nbytes = inst.geometry.nbytes
        if any(a.nbytes != nbytes for a in tensors):
            log.warning(
                "commit_store: chunk tensor size differs from the object layout (%d)", nbytes
            )
            return False
        slots = self.l1.reserve(keys, nbytes, k.write_owner(inst.instance_id))
        taken = [s for s in slots if s is not None]
        tel = self.engine.telemetry
        tr = tel.store_begin(key, inst.instance_id)
        try:
            with self.engine.inflight.track("store", key.request_id):
                for slot, arr in zip(slots, tensors, strict=True):
                    if slot is not None:
                        self.l1.view(slot)[:] = arr.reshape(-1)
        except BaseException:
            self.l1.abort(taken)
            raise
        done = sum(self.l1.commit(taken))
        self.engine._count(stored_chunks=done)
        tel.store_end(
            tr,
            key,
            inst.instance_id,
            stored=done,
            skipped=len(slots) - len(taken),
            object_nbytes=nbytes,
        )
        return done == len(taken)

    # ---- retrieve ------------------------------------------------------------------

    def prepare_retrieve(self, key: t.CacheKey, instance_id: int) -> t.PrepareRetrieveResponse:
        inst = self._inst(instance_id)
        kv_rank = k.kv_rank_of(key)
        inst.kv_ranks.add(kv_rank)
        keys, _ = self.engine._chunk_keys(key, kv_rank)
        lookup_owner = k.read_owner(key.request_id, key.model_name, kv_rank)
        pin = ("edcopy", instance_id)
        slots = self.l1.read_lock(keys, pin)
        if any(s is None for s in slots):
            self.l1.unlock([s.key for s in slots if s is not None], pin)
            self.l1.unlock(keys, lookup_owner)
            self._report_uncopied_retrieve(key, inst, keys, ok=False)
            return t.PrepareRetrieveResponse(success=False)
        if inst.shm_pool:
            with self._lock:
                self._pending_reads[_sig(instance_id, key)] = keys
            return t.PrepareRetrieveResponse(
                success=True, context={"slots": [self._slot_desc(s, inst) for s in slots if s]}
            )
        tel = self.engine.telemetry
        tr = tel.retrieve_begin(key, instance_id)
        try:
            g = inst.geometry
            with self.engine.inflight.track("retrieve", key.request_id):
                data = pickle_codec.encode_tensors(
                    [self.l1.view(s) for s in slots if s], g.shape, g.dtype
                )
        finally:
            self.l1.unlock(keys, pin)
            self.l1.unlock(keys, lookup_owner)
        self.engine._count(retrieved_chunks=len(keys))
        tel.retrieve_end(tr, key, instance_id, keys=keys, ok=True, object_nbytes=g.nbytes)
        return t.PrepareRetrieveResponse(success=True, data=data)

    def commit_retrieve(self, key: t.CacheKey, instance_id: int) -> bool:
        inst = self._inst(instance_id)
        with self._lock:
            keys = self._pending_reads.pop(_sig(instance_id, key), None)
        if keys is None:
            return True  # pickle path: prepare_retrieve already released everything
        kv_rank = k.kv_rank_of(key)
        self.l1.unlock(keys, ("edcopy", instance_id))
        self.l1.unlock(keys, k.read_owner(key.request_id, key.model_name, kv_rank))
        self._report_uncopied_retrieve(key, inst, keys, ok=True)
        return True

    def _report_uncopied_retrieve(
        self, key: t.CacheKey, inst: Instance, keys: list[ObjectKey], *, ok: bool
    ) -> None:
        """Count and publish a retrieve the server did not copy (it failed before the copy,
        or the worker copied from the shared pool): no server-side copy time."""
        if ok:
            self.engine._count(retrieved_chunks=len(keys))
        else:
            self.engine._count(retrieve_failures=1)
        tel = self.engine.telemetry
        tel.retrieve_end(
            tel.retrieve_begin(key, inst.instance_id),
            key,
            inst.instance_id,
            keys=keys,
            ok=ok,
            object_nbytes=inst.geometry.nbytes,
            elapsed=0.0,
        )


def _sig(instance_id: int, key: t.CacheKey) -> tuple[Any, ...]:
    return (
        instance_id,
        key.model_name,
        key.request_id,
        key.worker_id,
        key.start,
        key.end,
        key.cache_salt,
    )
