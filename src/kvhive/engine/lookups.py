"""LookupService: lookups, the read locks they take, sessions, and who gives locks back.

Lock contract (owners are the records of :mod:`kvhive.storage.owners`)::

    lookup(key, N = key.num_kv_readers)
        for every KV rank r of the model:  N read locks per chunk of the hit prefix,
        owner LookupOwner(request, model, r).  Ranks that found a longer prefix than the
        shortest give the extra back at once, so every rank holds the same prefix.
        With L2, the prefetch adds loaded chunks under the same owners and counts.
        A 0.5.7 key (``token_bytes``) with ``start`` > 0 starts past the engine's own
        prefix-cache hit: chunks below ``start`` are touched, not locked, and count as
        hit (the reported hit is absolute); 0.5.6 keys always look up from chunk 0.
    retrieve / prepare_retrieve (one worker of rank r)
        returns ONE of the N locks of rank r on the chunks it read, on every way out:
        copied, failed, or instance unknown.  That is why ``retrieve`` builds the chunk
        keys before it checks the instance: the lock must go back even when the worker
        is gone.  (Its copy runs under a CopyPin / WorkerCopyPin of its own.)
    free_lookup_locks(key)    returns all N locks of every rank on the chunks in range
                              (the engine decided not to load them), never below the
                              lookup's first locked chunk.
      + extra_ranges (0.5.7)  each (start, hit_end) names an abandoned lookup: a reported
                              lookup that a newer one of the request replaced (a
                              ``RetiredLookup``; its locks stay until named).  Its chunks
                              from ``start`` up are given back once: a range that matches
                              no retired lookup, or one already given back, releases
                              nothing (all lookups of a request share its owners, so a
                              guessed range would take the current lookup's locks).
    end_session(request)      drops whatever the request still holds (all ranks).
    reap_sessions()           the same for sessions idle past the session TTL.
    session evicted           the same when the session table is full (``MAX_SESSIONS``)
                              and a new request needs room: the least recently used
                              session is ended early (counted in ``sessions_evicted``).
    a newer lookup            for the same request frees the older one's locks (now, or
                              when its prefetch finishes) if that one was never reported;
                              a reported one is retired (see extra_ranges): the client may
                              be loading from it.
    instance dropped          (unregister, reaped, replaced) drops its WriterOwner and
                              WorkerCopyPin holds; if no other live worker serves one of
                              its ranks, also that rank's LookupOwner locks.
    TTL                       every hold expires after --l1-read-ttl-seconds regardless.

Threads: ``start_lookup`` and the lookup work run on the CPU pool (or inline on the loop
thread for small lookups); status queries inline; the rest on the CPU pool.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from functools import partial

from kvhive.engine import keys as k
from kvhive.engine.prefetch import Prefetcher
from kvhive.engine.registry import ChunkGeometry, Instance, Registry
from kvhive.engine.retired import RetiredLookups
from kvhive.engine.sessions import LookupJob, LookupState, Session, Sessions
from kvhive.engine.stats import EngineStats
from kvhive.errors import BadRequest, KvhiveError
from kvhive.keys import ObjectKey, RequestId
from kvhive.observability.publish import EngineTelemetry
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.owners import LookupOwner, Owner, WorkerCopyPin, WriterOwner
from kvhive.wire import types as t
from kvhive.wire.ops import AfterReply

log = logging.getLogger(__name__)

"""Replaced reported lookups remembered per session for ``extra_ranges``; beyond, the
oldest is forgotten (its locks then go back at ``end_session`` or the read TTL)."""


class LookupService:
    """Lookups, their lock lifetimes and the request sessions (module docstring)."""

    def __init__(
        self,
        *,
        l1: L1Manager,
        sessions: Sessions,
        registry: Registry,
        telemetry: EngineTelemetry,
        stats: EngineStats,
        prefetcher: Prefetcher | None = None,
    ) -> None:
        self.l1 = l1
        self.sessions = sessions
        self.registry = registry
        self.chunk_size = sessions.chunk_size
        self.telemetry = telemetry
        self.stats = stats
        self.prefetcher = prefetcher
        self.retired = RetiredLookups(self.chunk_size)
        sessions.on_evict(self._evicted)

    # ---- lookup ----------------------------------------------------------------------

    def lookup(self, key: t.CacheKey, tp_size: int) -> None:
        """Lock the longest resident prefix (loading from L2 when a prefetcher is set);
        runs the whole lookup before it returns."""
        self.start_lookup(key, tp_size).then()

    def start_lookup(self, key: t.CacheKey, tp_size: int) -> AfterReply:
        """Publish the lookup job (so a status query can never miss it) and return the
        acknowledgement with the lookup itself as the work left to do."""
        session = self._session(key.request_id)
        old, session.job = session.job, None
        if old is not None:  # replaced before consumed: free its locks (now or when it ends)
            self._orphan(key.request_id, old)
        if session.lookup is not None:  # replaced after it was reported: keep its locks
            self._retire(session, session.lookup)
            session.lookup = None
        state = LookupState(
            key.model_name, key.world_size, key.cache_salt, key.num_kv_readers, [], 0
        )
        job = session.job = LookupJob(state)
        return AfterReply(None, partial(self._run_lookup, key, session, job))

    def _run_lookup(self, key: t.CacheKey, session: Session, job: LookupJob) -> None:
        state = job.state
        self.telemetry.lookup_start(key)
        try:
            rows = self._lock_l1_prefix(key, session, state)
        except KvhiveError as exc:
            log.warning("lookup %s: %s; reporting 0 hits", key.request_id, exc)
            rows = []
        except BaseException:
            self._finish_job(key.request_id, job, 0)  # a status query must never hang
            raise
        self.telemetry.lookup_hashes(key, state.hashes, lambda: self._geometry(key))
        if rows and self.prefetcher is not None:
            self._bind_l2_tokens(key, state)
            owners = {r: k.lookup_owner(key, r) for r in k.all_ranks(key)}
            self.prefetcher.prefetch(
                rows,
                lambda obj: owners[obj.kv_rank],
                state.num_readers,
                lambda extra: self._finish_job(key.request_id, job, extra),
            )
        else:
            exit_reason = self.telemetry.early_exit(key, state.hashes)
            self._finish_job(key.request_id, job, 0, exit_reason)

    def _bind_l2_tokens(self, key: t.CacheKey, state: LookupState) -> None:
        """Tokens of the chunks the L2 lookup asks about, for the KV-event log's STORAGE
        "stored" records of objects another node wrote (free unless ``--kv-events-l2``)."""
        if not self.telemetry.wants_lookup_tokens:
            return
        h = state.hit_chunks
        parent = state.hashes[h - 1] if h else None
        self.telemetry.tokens_bound(key, state.hashes[h:], parent, h * self.chunk_size)

    def _lock_l1_prefix(
        self, key: t.CacheKey, session: Session, state: LookupState
    ) -> list[list[ObjectKey]]:
        """Lock the L1 prefix for every rank; return the rows (all ranks' keys per chunk)
        after it that a prefetcher may still load from L2 (none without a prefetcher)."""
        if key.num_kv_readers < 1:
            raise BadRequest(f"num_kv_readers={key.num_kv_readers}: must be >= 1")
        n_chunks = min(key.end, len(key.token_ids)) // self.chunk_size
        self.stats.add(lookups=1, lookup_chunks=n_chunks)
        if n_chunks == 0 or not self.registry.has_layout(key.model_name, key.world_size):
            return []
        state.hashes = self.sessions.hashes(session, key.token_ids, n_chunks)
        per_rank = state.keys = {
            rank: k.object_keys(key, state.hashes, rank) for rank in k.all_ranks(key)
        }
        first = state.first_chunk = self._first_chunk(key, n_chunks)
        if first:  # the engine holds these itself: keep their recency, lock nothing
            for keys in per_rank.values():
                self.l1.touch(keys[:first])
        hits = {
            rank: first
            + self.l1.lock_prefix(zip(keys[first:]), key.num_kv_readers, k.lookup_owner(key, rank))
            for rank, keys in per_rank.items()
        }
        state.hit_chunks = min(hits.values())
        for rank, got in hits.items():  # ranks that found more give the extra back
            if got > state.hit_chunks:
                self.l1.unlock(
                    per_rank[rank][state.hit_chunks : got],
                    k.lookup_owner(key, rank),
                    key.num_kv_readers,
                )
        if self.prefetcher is None:  # nobody loads the rest: do not build its rows
            return []
        return [[per_rank[r][i] for r in per_rank] for i in range(state.hit_chunks, n_chunks)]

    def _first_chunk(self, key: t.CacheKey, n_chunks: int) -> int:
        """The first chunk a lookup locks: 0.5.7 keys (packed tokens) start at ``start``,
        past the engine's prefix-cache hit; 0.5.6 keys always start at chunk 0 (as the
        0.5.6 server, which ignores a lookup's ``start``)."""
        if not isinstance(key.token_ids, t.PackedTokens) or key.start <= 0:
            return 0
        return min(key.start // self.chunk_size, n_chunks)

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
            l1_chunks=max(0, job.state.hit_chunks - job.state.first_chunk),
            l2_chunks=max(0, extra_chunks),
            early_exit=early_exit,
        )
        job.state.hit_chunks += max(0, extra_chunks)
        self.stats.add(lookup_hit_chunks=job.state.hit_chunks)
        if job.orphaned:
            self._release_range(request_id, job.state, 0, job.state.hit_chunks)
        job.finish()

    def _orphan(self, request_id: str, job: LookupJob) -> None:
        job.orphaned = True
        if job.is_done():
            self._release_range(request_id, job.state, 0, job.state.hit_chunks)

    # ---- results ---------------------------------------------------------------------

    def _take(self, session: Session) -> int:
        """Report a finished job once: its result moves into the session."""
        job, session.job = session.job, None
        if job is None:
            return 0
        session.lookup = job.state
        return job.state.hit_chunks

    def query_prefetch_status(self, request_id: str) -> int | None:
        """Hit chunks of the request's finished lookup (reported once), None while it runs."""
        session = self.sessions.get(request_id, create=False)
        if session is None or session.job is None:
            return 0
        if not session.job.is_done():
            return None
        return self._take(session)

    def wait_prefetch_status(self, request_id: str, timeout: float) -> int | None:
        """As :meth:`query_prefetch_status`, blocking up to ``timeout`` seconds."""
        session = self.sessions.get(request_id, create=False)
        job = session.job if session is not None else None
        if session is None or job is None:
            return 0
        if not job.wait(max(0.0, min(timeout, 3600.0))):
            return None
        return self._take(session) if session.job is job else 0

    # ---- giving locks back -------------------------------------------------------------

    def release_retrieved(self, key: t.CacheKey, kv_rank: int, keys: list[ObjectKey]) -> None:
        """A retrieve of ``kv_rank`` is over (copied or not): one lookup lock per chunk back."""
        self.l1.unlock(keys, k.lookup_owner(key, kv_rank))

    def free_lookup_locks(
        self, key: t.CacheKey, tp_size: int, extra_ranges: Sequence[tuple[int, int]] = ()
    ) -> None:
        """Return every rank's locks on the chunks of ``key``'s range, and those of the
        abandoned lookups ``extra_ranges`` names (0.5.7; module docstring)."""
        session = self.sessions.get(key.request_id, create=False)
        if session is None:
            return
        for start, end in extra_ranges:
            self._release_abandoned(session, start, end)
        if key.start >= key.end:
            return
        if session.job is not None and session.job.is_done():
            self._take(session)
        state = session.lookup
        if state is None:
            log.debug("free_lookup_locks for %s without a lookup result", key.request_id)
            return
        # Whole chunks only, as both references: a chunk that ``end`` cuts is still to be
        # retrieved (from its start, skipping what the engine has), and that gives it back.
        first = key.start // self.chunk_size
        end = min(key.end // self.chunk_size, state.hit_chunks)
        self._release_range(key.request_id, state, first, end)

    def _retire(self, session: Session, state: LookupState) -> None:
        self.retired.retire(session, state)

    def _release_abandoned(self, session: Session, start: int, end: int) -> None:
        """Give back the locks of the abandoned lookup whose hit ended at token ``end``,
        from token ``start`` up; each chunk once (module docstring)."""
        taken = self.retired.take(session, start, end)
        if taken is not None:
            self._release_range(session.request_id, *taken)

    def _release_range(self, request_id: str, state: LookupState, first: int, end: int) -> None:
        first = max(first, state.first_chunk)  # nothing below it was locked
        if end <= first:
            return
        rid = RequestId(request_id)
        for rank, keys in state.keys.items():
            self.l1.unlock(
                keys[first:end], LookupOwner(rid, state.model_name, rank), state.num_readers
            )

    def end_session(self, request_id: str) -> None:
        """The request is over: touch what it looked up, release everything it holds."""
        session = self.sessions.pop(request_id)
        self.telemetry.request_end(request_id)
        if session is not None:
            self._end(session)

    def _evicted(self, session: Session) -> None:
        """The session table was full and ``session`` its least recently used: end it as
        ``end_session`` does (runs on the thread whose new session made room)."""
        self.stats.add(sessions_evicted=1)
        self.telemetry.request_end(session.request_id)
        self._end(session)

    def _end(self, session: Session) -> None:
        """A session left the table: touch what it looked up, release all it holds."""
        request_id = session.request_id
        if session.job is not None:
            session.job.orphaned = True  # a still-running prefetch frees its own locks
        state = session.lookup or (session.job.state if session.job else None)
        if state is not None:
            for keys in state.keys.values():
                self.l1.touch(keys)
        self._release_request(request_id)

    def reap_sessions(self) -> int:
        """Expire idle sessions and release their locks; returns how many expired."""
        dead = self.sessions.expired()
        self.telemetry.sessions_expired(len(dead))
        for s in dead:
            self._release_request(s.request_id)
        return len(dead)

    def _release_request(self, request_id: str) -> None:
        self.l1.release_owners(lambda o: isinstance(o, LookupOwner) and o.request_id == request_id)

    def release_instance(self, inst: Instance, reason: str) -> None:
        """Release at once what a gone worker held (the reference waits for the TTLs)."""
        iid = inst.instance_id
        mine: tuple[Owner, ...] = (WriterOwner(iid), WorkerCopyPin(iid))
        released = self.l1.release_owners(lambda o: o in mine)
        orphan_ranks = {
            r for r in inst.kv_ranks if not self.registry.serves_rank(inst.model_name, r, iid)
        }
        if orphan_ranks and reason != "replaced":
            model = inst.model_name
            locks = self.l1.release_owners(
                lambda o: (
                    isinstance(o, LookupOwner)
                    and o.model_name == model
                    and o.kv_rank in orphan_ranks
                )
            )
            released = (released[0] + locks[0], released[1] + locks[1])
        log.info("instance %d %s; released %d locks, %d reservations", iid, reason, *released)

    def _session(self, request_id: str) -> Session:
        session = self.sessions.get(request_id)
        assert session is not None  # get() creates
        return session
