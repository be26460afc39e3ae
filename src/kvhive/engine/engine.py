"""CacheEngine: the operations of the protocol on top of L1 and the copy engines.

Thread model: registration, store, retrieve and the engine-driven prepare/commit
run on the caller connection's affinity thread; lookups and session operations
on the CPU pool; ``ping``/``get_chunk_size``/``noop`` inline on the loop thread.
Stores commit before they reply, so a stored chunk is visible to the next lookup.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from functools import partial
from typing import Any

from kvhive.engine import keys as k
from kvhive.engine.prefetch import Prefetcher
from kvhive.engine.registry import ChunkGeometry, Instance, Registry
from kvhive.engine.sessions import LookupJob, LookupState, Session, Sessions
from kvhive.errors import BadRequest, KvhiveError, RegistrationError, UnsupportedError
from kvhive.keys import ObjectKey
from kvhive.observability.bus import DISABLED, EventBus
from kvhive.observability.health import InFlight
from kvhive.observability.publish import EngineTelemetry
from kvhive.storage.l1.manager import L1Manager
from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.paged import PagedKV
from kvhive.wire import types as t
from kvhive.wire.ops import SOFT_TRANSFER_FAILURE, AfterReply

log = logging.getLogger(__name__)

OK = (b"", True)


class CacheEngine:
    def __init__(
        self,
        *,
        l1: L1Manager,
        sessions: Sessions,
        registry: Registry,
        transfer_modes: frozenset[str],
        null_block_id: int = 0,
        prefetcher: Prefetcher | None = None,
        bus: EventBus = DISABLED,
        inflight: InFlight | None = None,
    ) -> None:
        self.l1 = l1
        self.sessions = sessions
        self.registry = registry
        self.chunk_size = sessions.chunk_size
        self.transfer_modes = transfer_modes
        self.null_block_id = null_block_id
        self.prefetcher = prefetcher
        self.telemetry = EngineTelemetry(bus, self.chunk_size)
        self.inflight = inflight or InFlight()
        self._stats_lock = threading.Lock()
        self.counters: dict[str, int] = {
            "stored_chunks": 0,
            "store_skipped_resident": 0,
            "store_dropped": 0,
            "retrieved_chunks": 0,
            "retrieve_failures": 0,
            "lookups": 0,
            "lookup_hit_chunks": 0,
            "lookup_chunks": 0,
        }
        registry.on_drop(self._on_instance_dropped)

    # ---- small ops -------------------------------------------------------------

    def get_chunk_size(self) -> int:
        return self.chunk_size

    def get_experimental(self) -> list[str]:
        return []

    def noop(self) -> str:
        return "OK"

    def ping(self, instance_id: int | None) -> bool:
        self.registry.ping(instance_id)
        return True

    def report_block_allocation(
        self, instance_id: int, model_name: str, records: list[Any]
    ) -> None:
        self.telemetry.block_allocation(instance_id, model_name, len(records))
        return None  # telemetry only; the empty reply is the acknowledgement

    def clear(self, force: bool) -> None:
        removed = self.l1.clear(force=force)
        log.info("clear(force=%s) removed %d objects", force, removed)

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for name, d in deltas.items():
                self.counters[name] += d

    # ---- registration (lmcache-driven) ------------------------------------------

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
        if "lmcache_driven" not in self.transfer_modes:
            raise UnsupportedError("this server runs with --supported-transfer-mode engine_driven")
        descs = [_tensor_desc(d) for d in descriptors]
        groups = [
            {
                "engine_group_id": g.engine_group_id,
                "layer_indices": list(g.layer_indices),
                "tokens_per_block": g.tokens_per_block,
                "sw_size_tokens": g.sw_size_tokens,
            }
            for g in group_infos
        ]
        mapping = PagedKV.from_descriptors(descs, dict(layout_hints), groups, self.chunk_size)
        geometry = ChunkGeometry(tuple(mapping.object_shape), mapping.dtype, mapping.object_nbytes)
        self.registry.add(
            Instance(
                instance_id=instance_id,
                mode="lmcache_driven",
                model_name=model_name,
                world_size=world_size,
                geometry=geometry,
                mapping=mapping,
                layout=str(layout_hints.get("kv_layout", ""))
                or getattr(mapping, "layout_name", ""),
            )
        )
        log.info(
            "registered instance %d: %s world %d, %d layers, object %s %s (%d bytes)",
            instance_id,
            model_name,
            world_size,
            len(descs),
            geometry.shape,
            geometry.dtype,
            geometry.nbytes,
        )

    def unregister_kv_cache(self, instance_id: int) -> None:
        self.registry.remove(instance_id)

    def _on_instance_dropped(self, inst: Instance, reason: str) -> None:
        """Release at once what a gone client held (the reference waits for the TTLs)."""
        iid = inst.instance_id
        mine = (k.write_owner(iid), ("edcopy", iid))
        released = self.l1.release_owners(lambda o: o in mine)
        orphan_ranks = {
            r for r in inst.kv_ranks if not self.registry.serves_rank(inst.model_name, r, iid)
        }
        if orphan_ranks and reason != "replaced":
            locks = self.l1.release_owners(
                lambda o: o[0] == "req" and o[2] == inst.model_name and o[3] in orphan_ranks
            )
            released = (released[0] + locks[0], released[1] + locks[1])
        log.info("instance %d %s; released %d locks, %d reservations", iid, reason, *released)

    def _instance(self, instance_id: int, mode: str) -> Instance | None:
        inst = self.registry.get(instance_id)
        if inst is None or inst.mode != mode:
            return None
        return inst

    # ---- store / retrieve (lmcache-driven) ---------------------------------------

    def _chunk_keys(self, key: t.CacheKey, kv_rank: int) -> tuple[list[ObjectKey], int]:
        first, end = k.chunk_range(key, self.chunk_size, aligned=True)
        session = self.sessions.get(key.request_id)
        assert session is not None
        hashes = self.sessions.hashes(session, key.token_ids, end)[first:end]
        return k.object_keys(key, hashes, kv_rank), first

    def store(
        self, key: t.CacheKey, instance_id: int, block_ids: list[list[int]], event: bytes
    ) -> tuple[bytes, bool]:
        inst = self._instance(instance_id, "lmcache_driven")
        if inst is None:
            log.warning("store from unknown instance %d", instance_id)
            return SOFT_TRANSFER_FAILURE
        kv_rank = k.kv_rank_of(key)
        inst.kv_ranks.add(kv_rank)
        keys, _ = self._chunk_keys(key, kv_rank)
        per_chunk = _split_blocks(block_ids, len(keys), inst.mapping.blocks_per_chunk)
        if per_chunk is None:
            return SOFT_TRANSFER_FAILURE  # fail closed: too few block ids
        todo = [
            (key_, blocks)
            for key_, blocks in zip(keys, per_chunk, strict=True)
            if any(b != self.null_block_id for b in blocks)
        ]
        slots = self.l1.reserve(
            [x[0] for x in todo], inst.geometry.nbytes, k.write_owner(instance_id)
        )
        taken = [s for s in slots if s is not None]
        tr = self.telemetry.store_begin(key, instance_id)
        copy = self.inflight.begin("store", key.request_id)
        try:
            for slot, (_, blocks) in zip(slots, todo, strict=True):
                if slot is not None:
                    inst.mapping.gather(blocks, self.l1.view(slot))
        except BaseException:
            self.l1.abort(taken)
            raise
        finally:
            self.inflight.end(copy)
        committed = sum(self.l1.commit(taken))
        skipped = len(todo) - len(taken)
        self._count(stored_chunks=committed, store_skipped_resident=skipped)
        self.telemetry.store_end(
            tr,
            key,
            instance_id,
            stored=committed,
            skipped=skipped,
            object_nbytes=inst.geometry.nbytes,
        )
        return OK

    def retrieve(
        self, key: t.CacheKey, instance_id: int, block_ids: list[list[int]], event: bytes, skip: int
    ) -> tuple[bytes, bool]:
        kv_rank = k.kv_rank_of(key)
        owner = k.read_owner(key.request_id, key.model_name, kv_rank)
        keys, _ = self._chunk_keys(key, kv_rank)
        inst = self._instance(instance_id, "lmcache_driven")
        if inst is None:
            self.l1.unlock(keys, owner)
            self._count(retrieve_failures=1)
            return SOFT_TRANSFER_FAILURE
        inst.kv_ranks.add(kv_rank)
        tr = self.telemetry.retrieve_begin(key, instance_id)
        try:
            ok = self._scatter(inst, keys, block_ids, skip)
        finally:
            self.l1.unlock(keys, owner)
        self.telemetry.retrieve_end(
            tr, key, instance_id, keys=keys, ok=ok, object_nbytes=inst.geometry.nbytes
        )
        if not ok:
            self._count(retrieve_failures=1)
            return SOFT_TRANSFER_FAILURE
        self._count(retrieved_chunks=len(keys))
        return OK

    def _scatter(
        self, inst: Instance, keys: list[ObjectKey], block_ids: list[list[int]], skip: int
    ) -> bool:
        per_chunk = _split_blocks(block_ids, len(keys), inst.mapping.blocks_per_chunk)
        if per_chunk is None:
            return False
        # A copy-scoped lock keeps the objects in place even if the lookup's lock expired.
        pin = ("copy", threading.get_ident())
        slots = self.l1.read_lock(keys, pin)
        try:
            if any(s is None for s in slots):
                return False
            c = self.chunk_size
            with self.inflight.track("retrieve"):
                for i, (slot, blocks) in enumerate(zip(slots, per_chunk, strict=True)):
                    chunk_skip = min(max(skip - i * c, 0), c)
                    inst.mapping.scatter(self.l1.view(slot), blocks, chunk_skip)
            return True
        finally:
            self.l1.unlock([s.key for s in slots if s is not None], pin)

    # ---- lookup and locks --------------------------------------------------------

    def lookup(self, key: t.CacheKey, tp_size: int) -> None:
        """Lock the longest resident prefix (loading from L2 when a prefetcher is set)."""
        self.start_lookup(key, tp_size).then()

    def start_lookup(self, key: t.CacheKey, tp_size: int) -> AfterReply:
        """Publish the lookup job (so a status query can never miss it) and return the
        acknowledgement with the lookup itself as the work left to do."""
        session = self.sessions.get(key.request_id)
        assert session is not None
        old, session.job = session.job, None
        if old is not None:  # replaced before consumed: free its locks (now or when it ends)
            self._orphan(key.request_id, old)
        state = LookupState(
            key.model_name, key.world_size, key.cache_salt, key.num_kv_readers, [], 0
        )
        job = session.job = LookupJob(state)
        return AfterReply(None, partial(self._run_lookup, key, session, job))

    def _run_lookup(self, key: t.CacheKey, session: Session, job: LookupJob) -> None:
        state = job.state
        self.telemetry.lookup_start(key)
        try:
            rows = self._lookup_l1(key, session, state)
        except KvhiveError as exc:
            log.warning("lookup %s: %s; reporting 0 hits", key.request_id, exc)
            rows = []
        except BaseException:
            self._finish_job(key.request_id, job, 0)  # a status query must never hang
            raise
        self.telemetry.lookup_hashes(key, state.hashes, lambda: self._geometry(key))
        if rows and self.prefetcher is not None:
            owners = {r: k.read_owner(key.request_id, key.model_name, r) for r in k.all_ranks(key)}
            self.prefetcher.prefetch(
                rows,
                lambda obj: owners[obj.kv_rank],
                state.num_readers,
                lambda extra: self._finish_job(key.request_id, job, extra),
            )
        else:
            exit_reason = self.telemetry.early_exit(key, state.hashes)
            self._finish_job(key.request_id, job, 0, exit_reason)

    def _geometry(self, key: t.CacheKey) -> ChunkGeometry | None:
        for inst in self.registry.snapshot():
            if inst.model_name == key.model_name and inst.world_size == key.world_size:
                return inst.geometry
        return None

    def _finish_job(
        self, request_id: str, job: LookupJob, extra_chunks: int, early_exit: str = ""
    ) -> None:
        self.telemetry.lookup_end(
            request_id,
            job.state,
            l1_chunks=job.state.hit_chunks,
            l2_chunks=max(0, extra_chunks),
            early_exit=early_exit,
        )
        job.state.hit_chunks += max(0, extra_chunks)
        self._count(lookup_hit_chunks=job.state.hit_chunks)
        if job.orphaned:
            self._release_lookup(request_id, job.state, 0, job.state.hit_chunks)
        job.finish()

    def _orphan(self, request_id: str, job: LookupJob) -> None:
        job.orphaned = True
        if job.is_done():
            self._release_lookup(request_id, job.state, 0, job.state.hit_chunks)

    def _lookup_l1(
        self, key: t.CacheKey, session: Session, state: LookupState
    ) -> list[list[ObjectKey]]:
        """Lock the L1 prefix for every rank; return the rows (all ranks' keys per chunk)
        after it that a prefetcher may still load from L2."""
        if key.num_kv_readers < 1:
            raise BadRequest(f"num_kv_readers={key.num_kv_readers}: must be >= 1")
        n_chunks = min(key.end, len(key.token_ids)) // self.chunk_size
        self._count(lookups=1, lookup_chunks=n_chunks)
        if n_chunks == 0 or not self.registry.has_layout(key.model_name, key.world_size):
            return []
        state.hashes = self.sessions.hashes(session, key.token_ids, n_chunks)
        per_rank = state.keys = {
            rank: k.object_keys(key, state.hashes, rank) for rank in k.all_ranks(key)
        }
        hits: dict[int, int] = {}
        for rank, keys in per_rank.items():
            owner = k.read_owner(key.request_id, key.model_name, rank)
            hits[rank] = self.l1.lock_prefix(zip(keys), key.num_kv_readers, owner)
        state.hit_chunks = min(hits.values())
        for rank, got in hits.items():  # ranks that found more give the extra back
            if got > state.hit_chunks:
                owner = k.read_owner(key.request_id, key.model_name, rank)
                self.l1.unlock(per_rank[rank][state.hit_chunks : got], owner, key.num_kv_readers)
        return [[per_rank[r][i] for r in per_rank] for i in range(state.hit_chunks, n_chunks)]

    def _take(self, session: Session) -> int:
        """Report a finished job once: its result moves into the session."""
        job, session.job = session.job, None
        if job is None:
            return 0
        session.lookup = job.state
        return job.state.hit_chunks

    def query_prefetch_status(self, request_id: str) -> int | None:
        session = self.sessions.get(request_id, create=False)
        if session is None or session.job is None:
            return 0
        if not session.job.is_done():
            return None
        return self._take(session)

    def wait_prefetch_status(self, request_id: str, timeout: float) -> int | None:
        session = self.sessions.get(request_id, create=False)
        job = session.job if session is not None else None
        if session is None or job is None:
            return 0
        if not job.wait(max(0.0, min(timeout, 3600.0))):
            return None
        return self._take(session) if session.job is job else 0

    def free_lookup_locks(self, key: t.CacheKey, tp_size: int) -> None:
        session = self.sessions.get(key.request_id, create=False)
        if session is None or key.start >= key.end:
            return
        if session.job is not None and session.job.is_done():
            self._take(session)
        state = session.lookup
        if state is None:
            log.debug("free_lookup_locks for %s without a lookup result", key.request_id)
            return
        first = key.start // self.chunk_size
        end = min(-(-key.end // self.chunk_size), state.hit_chunks)
        self._release_lookup(key.request_id, state, first, end)

    def _release_lookup(self, request_id: str, state: LookupState, first: int, end: int) -> None:
        if end <= first:
            return
        for packed, keys in state.keys.items():
            self.l1.unlock(
                keys[first:end],
                k.read_owner(request_id, state.model_name, packed),
                state.num_readers,
            )

    def end_session(self, request_id: str) -> None:
        session = self.sessions.pop(request_id)
        self.telemetry.request_end(request_id)
        if session is None:
            return
        if session.job is not None:
            session.job.orphaned = True  # a still-running prefetch frees its own locks
        state = session.lookup or (session.job.state if session.job else None)
        if state is not None:
            for keys in state.keys.values():
                self.l1.touch(keys)
        # The request is over: whatever its lookups still pin is released now, not at the TTL.
        self.l1.release_owners(lambda o: o[0] == "req" and o[1] == request_id)

    def reap_sessions(self) -> int:
        dead = self.sessions.expired()
        self.telemetry.sessions_expired(len(dead))
        for s in dead:
            rid = s.request_id
            self.l1.release_owners(lambda o, rid=rid: o[0] == "req" and o[1] == rid)
        return len(dead)

    # ---- status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._stats_lock:
            counters = dict(self.counters)
        return {
            "active_sessions": len(self.sessions),
            "registered_instances": {
                str(i.instance_id): i.describe() for i in self.registry.snapshot()
            },
            "counters": counters,
        }


def _split_blocks(
    block_ids: list[list[int]], n_chunks: int, per_chunk: int
) -> list[Sequence[int]] | None:
    """Block ids of group 0 cut into ``n_chunks`` runs of ``per_chunk``; None on shortfall."""
    if not block_ids:
        return None if n_chunks else []
    ids = block_ids[0]
    if len(ids) < n_chunks * per_chunk:
        return None
    return [ids[i * per_chunk : (i + 1) * per_chunk] for i in range(n_chunks)]


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
