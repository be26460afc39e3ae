"""Per-request sessions: cached chunk-hash chains and lookup results.

A session caches the token list and its rolling chunk hashes so store and
retrieve of a long prompt hash each chunk once.  Unlike the reference, the cache
is checked against every new token list (a rewritten list rehashes, §23 item 14),
the TTL counts from last use (item 15), and a second lookup for the same request
releases the locks of the first instead of orphaning them (item 16).

Memory is bounded (issue 10, fault 8): the cached tokens are kept as big-endian uint32
words (4 bytes per token, not a list of Python ints at ~38: a 0.5.7 key's own bytes, a
view of its request frame, or one array converted from a 0.5.6 list), and the table holds
at most ``max_sessions`` sessions (:data:`MAX_SESSIONS` by default).  Creating one more
evicts the least recently used session; the eviction listener (the
:class:`~kvhive.engine.lookups.LookupService`) ends it as ``end_session`` would, releasing
its locks, and counts it (``sessions_evicted``).  A flood of requests that never end their
sessions therefore costs at most ``max_sessions`` token lists, not one per request until
the session TTL.
"""

from __future__ import annotations

import array
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from kvhive.errors import BadRequest
from kvhive.hashing import U32_MAX, TokenHasher
from kvhive.keys import ChunkHash, ObjectKey
from kvhive.wire.types import PackedTokens

MAX_SESSIONS = 8192
"""Most request sessions kept at once (kvhive's bound; the reference keeps every session
until its TTL).  A session lives from a request's first call to its ``end_session``, so
this is the number of requests in flight across all engines that kvhive tracks; beyond
it the least recently used session is ended early (its locks go back, a later retrieve of
it fails cleanly and is recomputed).  Memory: about 4.6 bytes per token of each session's
longest token list (tokens, chunk hashes and lookup keys)."""

_U32 = next(code for code in "IL" if array.array(code).itemsize == 4)
_SWAP = sys.byteorder == "little"
_NO_TOKENS = PackedTokens(b"")


def compact_tokens(tokens: Sequence[int], n: int) -> PackedTokens:
    """The first ``n`` token ids as big-endian uint32 words -- the bytes blake3 hashes and
    a 0.5.7 key carries.  Packed tokens are a zero-copy view of the request's own bytes; a
    list is converted once, in C (``array``, then a byte swap in place), never kept as
    Python ints.  BadRequest for a token that is not an integer in 0..2**32-1 (the
    hasher's rule)."""
    if isinstance(tokens, PackedTokens):
        return tokens[:n] if len(tokens) > n else tokens
    try:
        words = array.array(_U32, tokens[:n] if len(tokens) > n else tokens)
    except (OverflowError, TypeError, ValueError):
        raise BadRequest(f"token ids must be integers in 0..{U32_MAX}") from None
    if _SWAP:
        words.byteswap()
    return PackedTokens(memoryview(words))


@dataclass(slots=True)
class LookupState:
    """What a finished lookup locked: chunks ``first_chunk .. hit_chunks-1`` for every
    rank (``first_chunk`` > 0 only for a 0.5.7 lookup that starts past the engine's own
    prefix-cache hit: those chunks are reported as hits but not locked).  ``keys[rank]``
    are that rank's object keys for ``hashes`` (kept to release and touch them without
    building them again)."""

    model_name: str
    world_size: int
    cache_salt: str
    num_readers: int
    hashes: list[ChunkHash]
    hit_chunks: int
    keys: dict[int, list[ObjectKey]] = field(default_factory=dict)
    first_chunk: int = 0


@dataclass(slots=True)
class RetiredLookup:
    """A reported lookup that a newer lookup of the same request replaced (0.5.7 calls it
    abandoned): its locks on chunks ``state.first_chunk .. held_end-1`` are still held
    until the client names its range in ``free_lookup_locks``' ``extra_ranges`` (or the
    session ends).  ``held_end`` starts at ``state.hit_chunks`` and only moves down."""

    state: LookupState
    held_end: int


_EVENT_LOCK = threading.Lock()


@dataclass(slots=True)
class LookupJob:
    """One lookup: running until :meth:`finish`, then reported to the client once.
    An ``orphaned`` job was replaced by a newer lookup; whoever finishes it frees its locks.

    Most jobs finish before anyone asks, so the Event a blocking waiter needs is only
    made when one waits (an Event costs more to build than the rest of a small lookup).
    """

    state: LookupState
    orphaned: bool = False
    _done: bool = False
    _event: threading.Event | None = None

    def finish(self) -> None:
        self._done = True
        event = self._event
        if event is not None:
            event.set()

    def is_done(self) -> bool:
        return self._done

    def wait(self, timeout: float) -> bool:
        """Block until finished or ``timeout`` seconds passed; True when finished."""
        if self._done:
            return True
        with _EVENT_LOCK:
            if self._event is None:
                self._event = threading.Event()
            event = self._event
        # finish() sets _done before it reads _event: one of the two sees the other.
        return self._done or event.wait(timeout)


@dataclass(slots=True)
class Session:
    request_id: str
    tokens: PackedTokens = field(default_factory=lambda: _NO_TOKENS)  # ``compact_tokens``
    hashes: list[ChunkHash] = field(default_factory=list)
    last_used: float = 0.0
    lookup: LookupState | None = None  # consumed result (hit length known)
    job: LookupJob | None = None  # running, or finished but not yet reported
    retired: list[RetiredLookup] = field(default_factory=list)  # replaced reported lookups


class Sessions:
    """The session table: LRU ordered, bounded, with an idle TTL (module docstring).

    Thread-safe.  ``get`` may evict; the listener runs on the caller's thread after the
    table lock is released.
    """

    def __init__(
        self,
        hasher: TokenHasher,
        *,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        max_sessions: int = MAX_SESSIONS,
    ) -> None:
        if max_sessions < 1:
            raise ValueError(f"max_sessions must be >= 1, got {max_sessions}")
        self._hasher = hasher
        self._ttl = ttl
        self._clock = clock
        self._max = max_sessions
        self._sessions: OrderedDict[str, Session] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self._on_evict: Callable[[Session], None] = lambda session: None

    @property
    def chunk_size(self) -> int:
        return self._hasher.chunk_size

    @property
    def max_sessions(self) -> int:
        return self._max

    def on_evict(self, listener: Callable[[Session], None]) -> None:
        """Call ``listener(session)`` for each session evicted to make room (it must end
        the session: release its locks).  Runs outside the table lock."""
        self._on_evict = listener

    def get(self, request_id: str, create: bool = True) -> Session | None:
        """The request's session (created when ``create``), marked as just used."""
        evicted: list[Session] = []
        with self._lock:
            s = self._sessions.get(request_id)
            if s is not None:
                self._sessions.move_to_end(request_id)
            elif create:
                s = self._sessions[request_id] = Session(request_id)
                while len(self._sessions) > self._max:
                    evicted.append(self._sessions.popitem(last=False)[1])
            if s is not None:
                s.last_used = self._clock()
        for old in evicted:
            self._on_evict(old)
        return s

    def pop(self, request_id: str) -> Session | None:
        with self._lock:
            return self._sessions.pop(request_id, None)

    def __len__(self) -> int:
        return len(self._sessions)

    def snapshot(self) -> list[Session]:
        """The live sessions (a copy of the table; the sessions themselves are shared)."""
        with self._lock:
            return list(self._sessions.values())

    def hashes(self, session: Session, tokens: Sequence[int], n_chunks: int) -> list[ChunkHash]:
        """Chunk hashes 0..n_chunks-1 of ``tokens``, reusing the session's chain when its
        tokens are still a prefix of the new list.  Hashing runs outside the table lock."""
        c = self._hasher.chunk_size
        if n_chunks * c > len(tokens):
            raise BadRequest(f"range ends at token {n_chunks * c} beyond {len(tokens)} tokens")
        with self._lock:
            cached, seen = session.hashes, session.tokens
        if n_chunks == 0:
            return []
        usable = min(len(cached), n_chunks)
        # One C-level conversion for a list (none for packed tokens), reused below.
        words = compact_tokens(tokens, n_chunks * c)
        if usable and not seen.same_prefix(words, usable * c):  # the list was rewritten
            usable = 0
        if usable == n_chunks:
            return cached[:n_chunks]
        known = cached[:usable]
        # The hasher's digests are this server's chunk hashes.
        fresh = known + cast(list[ChunkHash], self._hasher.extend(known, words, n_chunks))
        with self._lock:
            if session.hashes is cached or len(fresh) > len(session.hashes):
                session.hashes = fresh
                session.tokens = words
        return fresh

    def expired(self) -> list[Session]:
        """Remove and return sessions idle longer than the TTL (the oldest are first)."""
        limit = self._clock() - self._ttl
        dead: list[Session] = []
        with self._lock:
            for s in self._sessions.values():
                if s.last_used >= limit:
                    break
                dead.append(s)
            for s in dead:
                del self._sessions[s.request_id]
        return dead
