"""The KV-event log: sequenced CPU-tier store and removal records for ``subscribe_kv_events``.

LMCache 0.5.6's vLLM adapter subscribes to these records (0.5.7's always does) and turns them
into the ``BlockStored``/``BlockRemoved`` events vLLM publishes to routers; without them a
router never learns that kvhive evicted a chunk.

Feeds, all delivered on the bus dispatcher thread::

    mp.tokens          token bindings: chunk hash -> (its tokens, its parent's hash), kept
                       for the last BINDING_CACHE_SIZE hashes (halved when full)
    l1.write.finished  a "stored" record per committed chunk hash and model, if bound; a
                       commit without a binding is only counted (``unbound_stores``)
    l1.keys.evicted    a "removed" record per event and model listing its chunk hashes
                       (policy evictions, deletes and clears alike)
    bus drops          a loss marker: the log may have missed something

With ``l2=True`` (``--kv-events-l2``) the same records with medium "STORAGE" come from the
L2 tiers (``storage/l2/presence.py``)::

    l2.keys.present    a "stored" record per key set and model, if bound: this node's
                       store completed, or a lookup discovered an object another node
                       wrote to a shared tier (lookups that go on to L2 bind tokens too)
    l2.keys.gone       a "removed" record: L2 eviction, delete, or an object found missing

LMCache clients skip records whose medium is not "CPU" (0.5.6 and 0.5.7 alike), so the
STORAGE records share the log safely.  Readers over every model (the direct publisher,
``kv_publisher.py``) use :meth:`KVEventLog.read_all` and :meth:`KVEventLog.add_listener`.

The log is a ring of ``capacity`` records with one global sequence (1, 2, ...).  A read for
model ``m`` after cursor ``c`` (:meth:`KVEventLog.read`) follows the reference exactly:

- it returns up to ``max_events`` records of ``m`` with ``seq > c``; ``next_cursor`` is the
  last sequence it examined (records of other models are passed over, not returned);
- ``lost`` when ``c`` is older than the retained window (``c + 1 < first``) or newer than
  the newest record (``c > last``: a cursor from another incarnation), or when the read
  passes a loss marker, in which case the records before the marker are dropped;
- ``incarnation`` is the log's creation time in ns (a restart changes it);
- a disabled log (``capacity == 0`` or the event bus disabled) answers ``enabled=False``.

Records are encoded once, when they are appended (``msgspec.Raw``): a read is a scan and
one concatenation, cheap enough for the ZMQ loop thread that pumps the streams.

Subscriptions (:meth:`KVEventLog.subscribe`): one per ``instance_id``, a new one closes the
old; reaping the instance closes it (:meth:`KVEventLog.close_instance`).  A subscription is
the stream source the server's stream manager pumps: its first poll returns a batch at once
(the status), later polls only when there are records for it, a loss, or a disabled log (and
then the stream ends).  It is read and advanced on one thread (the loop); the log calls its
``wake`` hook from the bus thread when something new arrives.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import msgspec

from kvhive.errors import BadRequest
from kvhive.observability import events as ev
from kvhive.observability.bus import EventBus
from kvhive.observability.events import EventType
from kvhive.wire import types as t

log = logging.getLogger(__name__)

DEFAULT_LOG_SIZE = 32768  # the reference's --kv-event-log-size default
MAX_EVENTS_PER_READ = 1024  # subscribe_kv_events: 0 < max_events <= 1024
BINDING_CACHE_SIZE = 65536  # token bindings kept (the reference's figure)
_LOST = "lost"  # the kind of a loss marker (never sent)
MEDIUM_STORAGE = "STORAGE"  # L2 records (--kv-events-l2); CPU is t.KV_EVENT_MEDIUM_CPU

_ENCODER = msgspec.msgpack.Encoder()
_BATCH_DECODER = msgspec.msgpack.Decoder(t.KVEventBatch)


class _RecordOut(msgspec.Struct):
    """:class:`~kvhive.wire.types.KVEventRecord` with its token list pre-encoded (the same
    fields in the same order, so the same bytes)."""

    seq: int
    kind: str
    medium: str
    model_name: str
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: msgspec.Raw


class _BatchOut(msgspec.Struct):
    """:class:`~kvhive.wire.types.KVEventBatch` over pre-encoded records."""

    enabled: bool
    incarnation: int
    next_cursor: int
    lost: bool
    events: list[msgspec.Raw]


_NO_TOKENS = msgspec.Raw(_ENCODER.encode([]))


@dataclass(frozen=True, slots=True)
class Record:
    """One log record.  ``tokens`` is the msgpack-encoded token list (a "stored" record's
    chunk tokens; an empty list otherwise); ``raw`` the encoded ``KVEventRecord`` (empty for
    a loss marker)."""

    seq: int
    kind: str
    medium: str
    model_name: str
    hashes: tuple[bytes, ...]
    parent: bytes | None
    tokens: msgspec.Raw
    raw: msgspec.Raw


@dataclass(frozen=True, slots=True)
class AllPage:
    """One :meth:`KVEventLog.read_all`: records of every model after a cursor.  ``lost``:
    records between the cursor and ``records`` are gone (ring overrun, or a loss marker:
    the bus dropped events); ``next_cursor`` is the last sequence examined."""

    records: list[Record]
    next_cursor: int
    lost: bool


@dataclass(frozen=True, slots=True)
class Page:
    """One read: the batch's header fields and its records, encoded."""

    enabled: bool
    incarnation: int
    next_cursor: int
    lost: bool
    events: list[msgspec.Raw]

    def encode(self) -> bytes:
        """The msgpack ``KVEventBatch`` (the payload frame of a stream message)."""
        return _ENCODER.encode(
            _BatchOut(self.enabled, self.incarnation, self.next_cursor, self.lost, self.events)
        )

    def decode(self) -> t.KVEventBatch:
        return _BATCH_DECODER.decode(self.encode())


class KVEventLog:
    """See the module docstring.  Thread-safe: the bus thread appends, the loop reads."""

    name = "kv_events"

    def __init__(
        self,
        bus: EventBus,
        capacity: int = DEFAULT_LOG_SIZE,
        *,
        binding_cache_size: int = BINDING_CACHE_SIZE,
        l2: bool = False,
    ) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.enabled = capacity > 0 and bus.enabled
        self.incarnation = time.time_ns()
        self._bus = bus
        self._lock = threading.Lock()
        self.l2 = l2
        self._ring: list[Record | None] = [None] * capacity
        self._next_seq = 1
        self._bindings: OrderedDict[bytes, tuple[msgspec.Raw, bytes | None]] = OrderedDict()
        self._binding_cache_size = binding_cache_size
        self._subs: dict[int, KVEventSubscription] = {}
        self._dropped_seen = 0
        self.lost_markers = 0
        self.unbound_stores = 0
        self._listeners: list[Callable[[], None]] = []
        if self.enabled:
            bus.register(self)
            bus.on_drops(self._on_drops)

    # ---- bus side --------------------------------------------------------------------------

    def subscriptions(self) -> Mapping[EventType, Callable[[Any], None]]:
        subs: dict[EventType, Callable[[Any], None]] = {
            EventType.MP_TOKENS: self._on_tokens,
            EventType.L1_WRITE_FINISHED: self._on_stored,
            EventType.L1_KEYS_EVICTED: self._on_removed,
        }
        if self.l2:
            subs[EventType.L2_KEYS_PRESENT] = self._on_l2_present
            subs[EventType.L2_KEYS_GONE] = self._on_l2_gone
        return subs

    def _on_tokens(self, e: ev.TokenBindings) -> None:
        c, tokens = e.chunk_size, e.tokens
        parent = e.parent_hash
        fresh: list[tuple[bytes, tuple[msgspec.Raw, bytes | None]]] = []
        for i, chunk_hash in enumerate(e.chunk_hashes):
            start = e.first_token + i * c
            chunk = tokens[start : start + c]
            raw = msgspec.Raw(_ENCODER.encode(chunk if isinstance(chunk, list) else list(chunk)))
            fresh.append((chunk_hash, (raw, parent)))
            parent = chunk_hash
        with self._lock:
            bindings = self._bindings
            for chunk_hash, binding in fresh:
                bindings[chunk_hash] = binding
                bindings.move_to_end(chunk_hash)
            if len(bindings) > self._binding_cache_size:
                while len(bindings) > self._binding_cache_size // 2:
                    bindings.popitem(last=False)

    def _on_stored(
        self, e: ev.L1WriteFinished | ev.L2KeysPresent, medium: str = t.KV_EVENT_MEDIUM_CPU
    ) -> None:
        with self._lock:
            for model, hashes in _by_model(e.keys).items():
                for chunk_hash in hashes:
                    binding = self._bindings.get(chunk_hash)
                    if binding is None:
                        self.unbound_stores += 1
                        continue
                    tokens, parent = binding
                    self._append(
                        t.KV_EVENT_KIND_STORED, model, [chunk_hash], parent, tokens, medium
                    )
        self._wake_all()

    def _on_removed(
        self, e: ev.L1KeysEvicted | ev.L2KeysGone, medium: str = t.KV_EVENT_MEDIUM_CPU
    ) -> None:
        with self._lock:
            for model, hashes in _by_model(e.keys).items():
                self._append(t.KV_EVENT_KIND_REMOVED, model, list(hashes), None, _NO_TOKENS, medium)
        self._wake_all()

    def _on_l2_present(self, e: ev.L2KeysPresent) -> None:
        self._on_stored(e, MEDIUM_STORAGE)

    def _on_l2_gone(self, e: ev.L2KeysGone) -> None:
        self._on_removed(e, MEDIUM_STORAGE)

    def _on_drops(self, total: int) -> None:
        """The bus dropped events since the last drain: some records may be missing."""
        with self._lock:
            if total <= self._dropped_seen:
                return
            self._dropped_seen = total
            self.lost_markers += 1
            self._append(_LOST, "", [], None, _NO_TOKENS)
        self._wake_all()

    def _append(
        self,
        kind: str,
        model: str,
        hashes: list[bytes],
        parent: bytes | None,
        tokens: msgspec.Raw,
        medium: str = t.KV_EVENT_MEDIUM_CPU,
    ) -> None:
        """Append one record (lock held)."""
        seq = self._next_seq
        raw = (
            msgspec.Raw(b"")
            if kind == _LOST
            else msgspec.Raw(
                _ENCODER.encode(_RecordOut(seq, kind, medium, model, hashes, parent, tokens))
            )
        )
        self._ring[seq % self.capacity] = Record(
            seq, kind, medium, model, tuple(hashes), parent, tokens, raw
        )
        self._next_seq = seq + 1

    def add_listener(self, wake: Callable[[], None]) -> None:
        """``wake()`` runs (bus thread, after the lock is released) whenever records are
        appended; it must not block (the publisher's wake is a pipe write)."""
        self._listeners.append(wake)

    def _wake_all(self) -> None:
        for sub in list(self._subs.values()):
            sub.wake()
        for wake in self._listeners:
            wake()

    def shutdown(self) -> None:
        """The bus stops: close every subscription (their streams end)."""
        self.close()

    # ---- readers ---------------------------------------------------------------------------

    def read(self, model_name: str, cursor: int, max_events: int) -> Page:
        """Up to ``max_events`` records of ``model_name`` after ``cursor`` (module
        docstring); BadRequest for a negative cursor or a non-positive page size."""
        if cursor < 0 or max_events <= 0:
            raise BadRequest("cursor must be >= 0 and max_events must be positive")
        if not self.enabled:
            return Page(False, self.incarnation, 0, False, [])
        events: list[msgspec.Raw] = []
        with self._lock:
            nxt, ring, cap = self._next_seq, self._ring, self.capacity
            last = nxt - 1
            first = max(1, nxt - cap)  # oldest retained; last + 1 when the log is empty
            lost = cursor + 1 < first or cursor > last
            next_cursor = min(cursor, last)
            for seq in range(max(cursor + 1, first), nxt):
                rec = ring[seq % cap]
                assert rec is not None and rec.seq == seq
                next_cursor = seq
                if rec.kind == _LOST:
                    lost = True
                    events.clear()
                elif rec.model_name == model_name:
                    events.append(rec.raw)
                    if len(events) == max_events:
                        break
        return Page(True, self.incarnation, next_cursor, lost, events)

    def read_all(self, cursor: int, max_records: int) -> AllPage:
        """Up to ``max_records`` records of every model after ``cursor``.  Loss markers are
        not returned: a marker (or a cursor older than the ring) before the first record
        returned sets ``lost``; a page stops before a marker that follows its records."""
        out: list[Record] = []
        with self._lock:
            nxt, ring, cap = self._next_seq, self._ring, self.capacity
            first = max(1, nxt - cap)
            lost = cursor + 1 < first
            next_cursor = min(cursor, nxt - 1)
            for seq in range(max(cursor + 1, first), nxt):
                rec = ring[seq % cap]
                assert rec is not None and rec.seq == seq
                if rec.kind == _LOST:
                    if out:  # the loss comes after these: the next read reports it
                        break
                    lost = True
                else:
                    out.append(rec)
                next_cursor = seq
                if len(out) == max_records:
                    break
        return AllPage(out, next_cursor, lost)

    def subscribe(
        self, instance_id: int, model_name: str, cursor: int, max_events: int
    ) -> KVEventSubscription:
        """A subscription for ``instance_id`` (closing its previous one); BadRequest unless
        ``cursor >= 0`` and ``0 < max_events <= 1024``."""
        if cursor < 0 or not 0 < max_events <= MAX_EVENTS_PER_READ:
            raise BadRequest(
                f"cursor must be >= 0 and max_events in [1, {MAX_EVENTS_PER_READ}] "
                f"(got cursor={cursor}, max_events={max_events})"
            )
        sub = KVEventSubscription(self, instance_id, model_name, cursor, max_events)
        with self._lock:
            old = self._subs.get(instance_id)
            self._subs[instance_id] = sub
        if old is not None:
            old.end()
        return sub

    def close_instance(self, instance_id: int) -> None:
        """Close ``instance_id``'s subscription (the instance was reaped)."""
        with self._lock:
            sub = self._subs.get(instance_id)
        if sub is not None:
            sub.end()

    def close(self) -> None:
        """Close every subscription."""
        with self._lock:
            subs = list(self._subs.values())
        for sub in subs:
            sub.end()

    def forget(self, sub: KVEventSubscription) -> None:
        """Drop ``sub`` from the table if it is still the current one (its stream is gone)."""
        with self._lock:
            if self._subs.get(sub.instance_id) is sub:
                del self._subs[sub.instance_id]

    def status(self) -> dict[str, Any]:
        with self._lock:
            nxt = self._next_seq
            return {
                "enabled": self.enabled,
                "l2": self.l2,
                "incarnation": self.incarnation,
                "log_depth": min(nxt - 1, self.capacity),
                "log_capacity": self.capacity,
                "next_seq": nxt,
                "lost_markers": self.lost_markers,
                "unbound_stores": self.unbound_stores,
                "token_bindings": len(self._bindings),
                "subscribers": len(self._subs),
            }


class KVEventSubscription:
    """One subscriber's stream source.  ``poll``/``sent`` run on one thread (the server's
    loop); ``end`` and ``wake`` may come from any thread.

    ``poll()`` gives the next encoded batch to send (None: nothing now); the batch counts as
    delivered only after ``sent()``, so a batch that could not be sent is read again, with
    whatever arrived since.  ``closed`` turns True when the stream must end: replaced by a
    newer subscription of the instance, the instance reaped, the log shut down, or the log
    is disabled and the first (status) batch was acknowledged.
    """

    def __init__(
        self, log: KVEventLog, instance_id: int, model_name: str, cursor: int, max_events: int
    ) -> None:
        self.instance_id = instance_id
        self.model_name = model_name
        self.cursor = cursor
        self.max_events = max_events
        self._log = log
        self._first = True
        self._pending: Page | None = None
        self._closed = False
        self._wake: Callable[[], None] | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def attach(self, wake: Callable[[], None]) -> None:
        """``wake()`` is called (any thread) when a poll may have something new."""
        self._wake = wake

    def wake(self) -> None:
        fn = self._wake
        if fn is not None:
            fn()

    def poll(self) -> bytes | None:
        if self._closed:
            return None
        page = self._log.read(self.model_name, self.cursor, self.max_events)
        if not self._first and not page.enabled:
            self.end()  # the status batch told the subscriber; the stream is over
            return None
        if self._first or page.events or page.lost or not page.enabled:
            self._pending = page
            return page.encode()
        self.cursor = page.next_cursor  # only other models' records: pass them over
        return None

    def sent(self) -> None:
        """The batch of the last ``poll`` reached the socket."""
        page, self._pending = self._pending, None
        if page is not None:
            self.cursor = page.next_cursor
            self._first = False

    def end(self) -> None:
        """End the stream (its manager sends the end frame and calls :meth:`close`)."""
        self._closed = True
        self.wake()

    def close(self) -> None:
        """The stream is gone: forget the subscription (idempotent)."""
        self._closed = True
        self._log.forget(self)


def _by_model(keys: Sequence[Any]) -> dict[str, dict[bytes, None]]:
    """Chunk hashes per model, each once, in first-seen order (ranks share a hash)."""
    out: dict[str, dict[bytes, None]] = {}
    for key in keys:
        out.setdefault(key.model_name, {})[key.chunk_hash] = None
    return out
