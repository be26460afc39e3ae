"""Producer-side helpers: what the engine publishes, built in one place.

Every method returns at once when the bus is disabled, so a server run with
``--disable-observability`` pays one attribute test per operation (never per chunk).  Events are
built on the calling thread and handed to the bus; nothing here logs or formats.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from kvhive.keys import ObjectKey
from kvhive.observability import events as ev
from kvhive.observability.bus import EventBus
from kvhive.observability.events import EventType

_transfer_ids = itertools.count()


def transfer_key(request_id: str) -> str:
    """Per-operation key ``"{request_id}#{n}"`` (one request can store/retrieve many times)."""
    return f"{request_id}#{next(_transfer_ids)}"


@dataclass(slots=True)
class Transfer:
    """A store/retrieve in progress (only created when the bus is enabled)."""

    key: str
    started: float  # perf_counter seconds


@dataclass(slots=True)
class StoreTally:
    """What a store bracket reports at its end; the body fills it in as it goes."""

    stored: int = 0
    skipped: int = 0


@dataclass(slots=True)
class RetrieveTally:
    """What a retrieve bracket reports at its end.  ``ok`` stays False unless the body
    completes and sets it, so a body that raises reports a failed read."""

    ok: bool = False


class EngineTelemetry:
    """Builds and publishes the MP-server events of one :class:`CacheEngine`.

    Use the :meth:`storing` and :meth:`retrieving` brackets rather than the ``*_begin`` /
    ``*_end`` pairs: they publish the end event on every way out of the body, an exception
    included, so no tracing span stays open and no failed read goes uncounted.
    """

    def __init__(self, bus: EventBus, chunk_size: int) -> None:
        self.bus = bus
        self.chunk_size = chunk_size

    @contextmanager
    def storing(
        self, key: Any, engine_id: int, *, object_nbytes: int, worker_copied: bool = False
    ) -> Iterator[StoreTally]:
        """Bracket one store: start events now, ``StoreEnd`` with the tally on exit (raised
        or not).  ``worker_copied``: the worker did the copy (no throughput sample)."""
        tally = StoreTally()
        tr = self.store_begin(key, engine_id)
        try:
            yield tally
        finally:
            self.store_end(
                tr,
                key,
                engine_id,
                stored=tally.stored,
                skipped=tally.skipped,
                object_nbytes=object_nbytes,
                elapsed=0.0 if worker_copied else None,
            )

    @contextmanager
    def retrieving(
        self,
        key: Any,
        engine_id: int,
        *,
        keys: Sequence[ObjectKey],
        object_nbytes: int,
        worker_copied: bool = False,
    ) -> Iterator[RetrieveTally]:
        """Bracket one retrieve of ``keys``: ``RetrieveEnd`` (and ``L1ReadFinished`` or
        ``L1ReadFailed``) on exit; a failure unless the body set ``tally.ok``."""
        tally = RetrieveTally()
        tr = self.retrieve_begin(key, engine_id)
        try:
            yield tally
        finally:
            self.retrieve_end(
                tr,
                key,
                engine_id,
                keys=keys,
                ok=tally.ok,
                object_nbytes=object_nbytes,
                elapsed=0.0 if worker_copied else None,
            )

    # ---- store / retrieve ----------------------------------------------------------------------

    def _begin(self, request_id: str, engine_id: int, model: str, store: bool) -> Transfer | None:
        bus = self.bus
        if not bus.enabled:
            return None
        tk = transfer_key(request_id)
        if store:
            bus.publish(ev.StoreSubmitted(session_id=request_id))
            bus.publish(
                ev.StoreStart(
                    session_id=request_id, engine_id=engine_id, model_name=model, transfer_key=tk
                )
            )
        else:
            bus.publish(ev.RetrieveSubmitted(session_id=request_id))
            bus.publish(
                ev.RetrieveStart(
                    session_id=request_id, engine_id=engine_id, model_name=model, transfer_key=tk
                )
            )
        return Transfer(tk, time.perf_counter())

    def store_begin(self, key: Any, engine_id: int) -> Transfer | None:
        return self._begin(key.request_id, engine_id, key.model_name, True)

    def retrieve_begin(self, key: Any, engine_id: int) -> Transfer | None:
        return self._begin(key.request_id, engine_id, key.model_name, False)

    def store_end(
        self,
        tr: Transfer | None,
        key: Any,
        engine_id: int,
        *,
        stored: int,
        skipped: int,
        object_nbytes: int,
        elapsed: float | None = None,
    ) -> None:
        """``elapsed=0.0`` when the worker did the copy (no throughput sample)."""
        if tr is None:
            return
        self.bus.publish(
            ev.StoreEnd(
                session_id=key.request_id,
                stored_count=stored,
                skipped_count=skipped,
                total_bytes=stored * object_nbytes,
                num_tokens=stored * self.chunk_size,
                engine_id=engine_id,
                model_name=key.model_name,
                cache_salt=key.cache_salt,
                transfer_key=tr.key,
                elapsed_seconds=_elapsed(tr, elapsed),
            )
        )

    def retrieve_end(
        self,
        tr: Transfer | None,
        key: Any,
        engine_id: int,
        *,
        keys: Sequence[ObjectKey],
        ok: bool,
        object_nbytes: int,
        elapsed: float | None = None,
    ) -> None:
        if tr is None:
            return
        bus = self.bus
        n = len(keys) if ok else 0
        if ok:
            bus.publish(ev.L1ReadFinished(keys=keys))
        else:
            bus.publish(ev.L1ReadFailed(keys=keys, model_name=key.model_name))
        bus.publish(
            ev.RetrieveEnd(
                session_id=key.request_id,
                retrieved_count=n,
                total_bytes=n * object_nbytes,
                num_tokens=n * self.chunk_size,
                engine_id=engine_id,
                model_name=key.model_name,
                cache_salt=key.cache_salt,
                transfer_key=tr.key,
                success=ok,
                elapsed_seconds=_elapsed(tr, elapsed),
            )
        )

    @property
    def wants_tokens(self) -> bool:
        """Whether a store should publish its token bindings (the KV-event log listens)."""
        return self.bus.has_subscribers(EventType.MP_TOKENS)

    @property
    def wants_lookup_tokens(self) -> bool:
        """Whether a lookup that goes on to L2 should publish its token bindings: the log
        records L2 presence (``--kv-events-l2``), whose "discovered" records need them."""
        bus = self.bus
        return bus.has_subscribers(EventType.MP_TOKENS) and bus.has_subscribers(
            EventType.L2_KEYS_PRESENT
        )

    def tokens_bound(
        self, key: Any, hashes: Sequence[bytes], parent: bytes | None, first_token: int
    ) -> None:
        """``mp.tokens`` for chunks ``hashes`` of ``key`` starting at token ``first_token``
        (see :class:`~kvhive.observability.events.TokenBindings`); publish it before the
        chunks are committed, so the log has their tokens when the commit event arrives."""
        if hashes and self.wants_tokens:
            self.bus.publish(
                ev.TokenBindings(
                    session_id=key.request_id,
                    chunk_hashes=hashes,
                    parent_hash=parent,
                    tokens=key.token_ids,
                    first_token=first_token,
                    chunk_size=self.chunk_size,
                )
            )

    # ---- lookups ---------------------------------------------------------------------------------

    def lookup_start(self, key: Any) -> None:
        bus = self.bus
        if bus.enabled:
            bus.publish(ev.RequestStart(session_id=key.request_id))
            bus.publish(ev.LookupStart(session_id=key.request_id, model_name=key.model_name))

    def lookup_hashes(
        self, key: Any, hashes: Sequence[bytes], geometry_of: Callable[[], Any]
    ) -> None:
        """``mp.lookup`` for the lookup-hash log; built only when someone subscribes.
        ``geometry_of()`` gives the registered chunk geometry (dtype, shape) or None."""
        if not hashes or not self.bus.has_subscribers(EventType.MP_LOOKUP):
            return
        geometry = geometry_of()
        self.bus.publish(
            ev.LookupHashes(
                session_id=key.request_id,
                request_id=key.request_id,
                model_name=key.model_name,
                chunk_size=self.chunk_size,
                seq_len=len(key.token_ids),
                chunk_hashes=list(hashes),
                dtypes=[geometry.dtype] if geometry is not None else [],
                shapes=[list(geometry.shape)] if geometry is not None else [],
            )
        )

    def early_exit(self, key: Any, hashes: Sequence[bytes]) -> str:
        if hashes or not self.bus.enabled:
            return ""
        if min(key.end, len(key.token_ids)) // self.chunk_size == 0:
            return "empty_chunk_hashes"
        return "no_gpu_context"

    def lookup_end(
        self, request_id: str, state: Any, *, l1_chunks: int, l2_chunks: int, early_exit: str
    ) -> None:
        if not self.bus.enabled:
            return
        c = self.chunk_size
        ranks = max(1, state.world_size)
        self.bus.publish(
            ev.LookupEnd(
                session_id=request_id,
                found_count=l1_chunks + l2_chunks,
                requested_tokens=len(state.hashes) * c,
                hit_tokens=(l1_chunks + l2_chunks) * c,
                l1_hit_tokens=l1_chunks * c,
                l2_hit_tokens=l2_chunks * c,
                l1_hit_keys=l1_chunks * ranks,
                l2_hit_keys=l2_chunks * ranks,
                early_exit_reason=early_exit,
                model_name=state.model_name,
                cache_salt=state.cache_salt,
            )
        )

    # ---- sessions and telemetry ------------------------------------------------------------------

    def request_end(self, request_id: str) -> None:
        if self.bus.enabled:
            self.bus.publish(ev.RequestEnd(session_id=request_id))

    def sessions_expired(self, count: int) -> None:
        if count and self.bus.enabled:
            self.bus.publish(ev.SessionsExpired(count=count))

    def block_allocation(self, instance_id: int, model_name: str, records: int) -> None:
        if self.bus.enabled:
            self.bus.publish(
                ev.BlockAllocation(
                    instance_id=instance_id, model_name=model_name, record_count=records
                )
            )


def _elapsed(tr: Transfer, given: float | None) -> float:
    return time.perf_counter() - tr.started if given is None else given
