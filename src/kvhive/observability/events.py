"""Typed events: one frozen, slotted struct per event type.

Producers (engine, L1, L2, registry) build an event and hand it to the bus; they never see an
exporter.  The string values of :class:`EventType` are the reference's (``mp.store.end``,
``l1.keys.evicted``, ...) because traces and dashboards key on them; kvhive-only events use
the same dotted style.  ``metadata()`` gives the flat payload the reference carries in its
``metadata`` dict (used for span attributes and log lines).

Units: bytes for ``*_bytes``, tokens for ``*_tokens``, seconds for times; ``timestamp`` is
wall-clock ``time.time()`` taken when the event is built (just before publishing).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from kvhive.keys import ObjectKey

if TYPE_CHECKING:
    from typing_extensions import dataclass_transform
else:  # only type checkers read it (typing has it from 3.11; no runtime dependency for 3.10)

    def dataclass_transform(**_: object):
        return lambda decorator: decorator


class EventType(str, Enum):
    MP_REQUEST_START = "mp.request.start"
    MP_REQUEST_END = "mp.request.end"
    MP_LOOKUP_PREFETCH_START = "mp.lookup_prefetch.start"
    MP_LOOKUP = "mp.lookup"
    MP_LOOKUP_PREFETCH_END = "mp.lookup_prefetch.end"
    MP_STORE_SUBMITTED = "mp.store.submitted"
    MP_TOKENS = "mp.tokens"
    MP_STORE_START = "mp.store.start"
    MP_STORE_END = "mp.store.end"
    MP_RETRIEVE_SUBMITTED = "mp.retrieve.submitted"
    MP_RETRIEVE_START = "mp.retrieve.start"
    MP_RETRIEVE_END = "mp.retrieve.end"
    MP_VLLM_BLOCK_ALLOCATION = "mp.vllm.block_allocation"
    MP_INSTANCE_REGISTERED = "mp.instance.registered"
    MP_INSTANCE_DROPPED = "mp.instance.dropped"
    MP_SESSIONS_EXPIRED = "mp.sessions.expired"
    L1_READ_FINISHED = "l1.read.finished"
    L1_WRITE_FINISHED = "l1.write.finished"
    L1_KEYS_EVICTED = "l1.keys.evicted"
    L1_EVICTION_LOOP_TICK = "l1.eviction.loop_tick"
    L1_ALLOCATION_FAILED = "l1.allocation.failed"
    L1_READ_FAILED = "l1.read.failed"
    L2_STORE_SUBMITTED = "l2.store.submitted"
    L2_STORE_COMPLETED = "l2.store.completed"
    L2_LOAD_TASK_SUBMITTED = "l2.load_task.submitted"
    L2_LOAD_TASK_COMPLETED = "l2.load_task.completed"
    L2_KEYS_EVICTED = "l2.keys.evicted"
    L2_PREFETCH_FAILED = "l2.prefetch.failed"
    L2_KEYS_PRESENT = "l2.keys.present"
    L2_KEYS_GONE = "l2.keys.gone"
    TIMEOUT_RAISED = "timeout.raised"


_BASE_FIELDS = frozenset({"timestamp", "session_id"})


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """Base of every event.  ``session_id`` is the request id where one exists."""

    TYPE: ClassVar[EventType]
    session_id: str = ""
    timestamp: float = field(default_factory=time.time)

    @property
    def type(self) -> EventType:
        return self.TYPE

    def metadata(self) -> dict[str, Any]:
        """The payload fields (everything but ``session_id`` and ``timestamp``)."""
        return {name: getattr(self, name) for name in _payload_fields(type(self))}


_PAYLOAD_FIELDS: dict[type, tuple[str, ...]] = {}


def _payload_fields(cls: type) -> tuple[str, ...]:
    names = _PAYLOAD_FIELDS.get(cls)
    if names is None:  # once per event class (a race only computes the same tuple twice)
        names = tuple(f.name for f in dataclasses.fields(cls) if f.name not in _BASE_FIELDS)
        _PAYLOAD_FIELDS[cls] = names
    return names


_E = TypeVar("_E", bound=Event)


@dataclass_transform(kw_only_default=True, frozen_default=True)
def _event(kind: EventType) -> Callable[[type[_E]], type[_E]]:
    """Class decorator: a frozen slotted kw-only event of type ``kind``."""

    def wrap(cls: type[_E]) -> type[_E]:
        cls.TYPE = kind
        return dataclass(frozen=True, slots=True, kw_only=True)(cls)

    return wrap


# ---- MP server (engine) ---------------------------------------------------------------------


@_event(EventType.MP_REQUEST_START)
class RequestStart(Event):
    pass


@_event(EventType.MP_REQUEST_END)
class RequestEnd(Event):
    pass


@_event(EventType.MP_LOOKUP_PREFETCH_START)
class LookupStart(Event):
    model_name: str = ""


@_event(EventType.MP_LOOKUP)
class LookupHashes(Event):
    """Every chunk hash of one lookup (only built when someone subscribes)."""

    request_id: str
    model_name: str
    chunk_size: int
    seq_len: int
    chunk_hashes: Sequence[bytes]
    dtypes: Sequence[str] = ()
    shapes: Sequence[Sequence[int]] = ()


@_event(EventType.MP_LOOKUP_PREFETCH_END)
class LookupEnd(Event):
    """A finished lookup: ``hit_tokens = l1_hit_tokens + l2_hit_tokens``."""

    found_count: int
    requested_tokens: int
    hit_tokens: int
    l1_hit_tokens: int
    l2_hit_tokens: int
    l1_hit_keys: int
    l2_hit_keys: int
    early_exit_reason: str = ""
    model_name: str = ""
    cache_salt: str = ""


@_event(EventType.MP_STORE_SUBMITTED)
class StoreSubmitted(Event):
    device: str = "cpu"


@_event(EventType.MP_TOKENS)
class TokenBindings(Event):
    """The tokens of the chunks a store is about to commit, published ahead of the commit
    (only built when someone subscribes: the KV-event log).  Chunk ``i`` is
    ``chunk_hashes[i]`` over ``tokens[first_token + i * chunk_size :][:chunk_size]``; its
    parent is ``chunk_hashes[i - 1]``, and ``parent_hash`` for ``i == 0`` (None: the first
    chunk of its sequence).  ``tokens`` is the request's token list, shared, never copied."""

    chunk_hashes: Sequence[bytes]
    parent_hash: bytes | None
    tokens: Sequence[int]
    first_token: int
    chunk_size: int


@_event(EventType.MP_STORE_START)
class StoreStart(Event):
    device: str = "cpu"
    engine_id: int = 0
    model_name: str = ""
    transfer_key: str = ""


@_event(EventType.MP_STORE_END)
class StoreEnd(Event):
    stored_count: int
    total_bytes: int
    num_tokens: int
    device: str = "cpu"
    engine_id: int = 0
    model_name: str = ""
    cache_salt: str = ""
    transfer_key: str = ""
    skipped_count: int = 0
    dropped_count: int = 0
    elapsed_seconds: float = 0.0


@_event(EventType.MP_RETRIEVE_SUBMITTED)
class RetrieveSubmitted(Event):
    device: str = "cpu"


@_event(EventType.MP_RETRIEVE_START)
class RetrieveStart(Event):
    device: str = "cpu"
    engine_id: int = 0
    model_name: str = ""
    transfer_key: str = ""


@_event(EventType.MP_RETRIEVE_END)
class RetrieveEnd(Event):
    retrieved_count: int
    total_bytes: int
    num_tokens: int
    device: str = "cpu"
    engine_id: int = 0
    model_name: str = ""
    cache_salt: str = ""
    transfer_key: str = ""
    success: bool = True
    elapsed_seconds: float = 0.0


@_event(EventType.MP_VLLM_BLOCK_ALLOCATION)
class BlockAllocation(Event):
    instance_id: int
    model_name: str
    record_count: int


@_event(EventType.MP_INSTANCE_REGISTERED)
class InstanceRegistered(Event):
    instance_id: int
    model_name: str
    world_size: int
    mode: str


@_event(EventType.MP_INSTANCE_DROPPED)
class InstanceDropped(Event):
    instance_id: int
    model_name: str
    reason: str  # unregistered, replaced, reaped, shutdown


@_event(EventType.MP_SESSIONS_EXPIRED)
class SessionsExpired(Event):
    count: int


# ---- L1 ----------------------------------------------------------------------------------


@_event(EventType.L1_READ_FINISHED)
class L1ReadFinished(Event):
    keys: Sequence[ObjectKey]
    l1_tag: str = "_default"


@_event(EventType.L1_WRITE_FINISHED)
class L1WriteFinished(Event):
    keys: Sequence[ObjectKey]
    total_bytes: int = 0
    l1_tag: str = "_default"


@_event(EventType.L1_KEYS_EVICTED)
class L1KeysEvicted(Event):
    keys: Sequence[ObjectKey]
    reason: str = "evicted"  # evicted (policy), deleted, cleared
    l1_tag: str = "_default"


@_event(EventType.L1_EVICTION_LOOP_TICK)
class L1EvictionTick(Event):
    usage: float
    watermark: float
    triggered: bool
    evicted: int = 0


@_event(EventType.L1_ALLOCATION_FAILED)
class L1AllocationFailed(Event):
    keys: Sequence[ObjectKey]
    during: str = "l1_store"
    model_name: str = ""


@_event(EventType.L1_READ_FAILED)
class L1ReadFailed(Event):
    keys: Sequence[ObjectKey]
    during: str = "l1_retrieve"
    reason: str = "not_found"
    model_name: str = ""


# ---- L2 (published by the L2 controllers) -----------------------------------------------------


@_event(EventType.L2_STORE_SUBMITTED)
class L2StoreSubmitted(Event):
    adapter_index: int
    task_id: int
    l2_name: str
    key_count: int
    total_bytes: int


@_event(EventType.L2_STORE_COMPLETED)
class L2StoreCompleted(Event):
    adapter_index: int
    task_id: int
    l2_name: str
    bytes_transferred: int
    succeeded_count: int
    failed_count: int = 0


@_event(EventType.L2_LOAD_TASK_SUBMITTED)
class L2LoadSubmitted(Event):
    request_id: int
    adapter_index: int
    task_id: int
    l2_name: str
    key_count: int
    total_bytes: int


@_event(EventType.L2_LOAD_TASK_COMPLETED)
class L2LoadCompleted(Event):
    request_id: int
    adapter_index: int
    task_id: int
    l2_name: str
    loaded_count: int = 0
    failed_count: int = 0


@_event(EventType.L2_KEYS_EVICTED)
class L2KeysEvicted(Event):
    key_count: int
    l2_name: str = ""


@_event(EventType.L2_PREFETCH_FAILED)
class L2PrefetchFailed(Event):
    """``reason``: l1_oom, l1_contended, not_found, timeout (kvhive), error (kvhive), corrupt
    (kvhive: the object failed its integrity check, e.g. another key's object under this
    key's name, and was removed from L2)."""

    reason: str
    key_count: int
    model_name: str = ""
    l2_name: str = ""


@_event(EventType.L2_KEYS_PRESENT)
class L2KeysPresent(Event):
    """Keys now held by an L2 tier (the KV-event log's STORAGE "stored" records).
    ``reason``: ``stored`` (this node's store completed) or ``discovered`` (a lookup found
    an object this node never stored nor saw before: another node wrote it to a shared
    tier).  Published only while someone subscribes (``--kv-events-l2``)."""

    keys: Sequence[ObjectKey]
    l2_name: str
    adapter_index: int
    reason: str = "stored"


@_event(EventType.L2_KEYS_GONE)
class L2KeysGone(Event):
    """Keys an L2 tier no longer holds (STORAGE "removed" records).  ``reason``:
    ``evicted`` (kvhive's L2 eviction), ``deleted`` (a delete request) or ``vanished``
    (a lookup or load found a known object missing).  Published only while someone
    subscribes (``--kv-events-l2``)."""

    keys: Sequence[ObjectKey]
    l2_name: str
    adapter_index: int
    reason: str = "deleted"


@_event(EventType.TIMEOUT_RAISED)
class TimeoutRaised(Event):
    message: str
    exception_type: str
    stacktrace: str = ""


def salt_counts(keys: Sequence[ObjectKey]) -> dict[str, int]:
    """Number of keys per cache salt (for per-salt metric labels)."""
    counts: dict[str, int] = {}
    for key in keys:
        counts[key.cache_salt] = counts.get(key.cache_salt, 0) + 1
    return counts
