"""Per-request sessions: cached chunk-hash chains and lookup results.

A session caches the token list and its rolling chunk hashes so store and
retrieve of a long prompt hash each chunk once.  Unlike the reference, the cache
is checked against every new token list (a rewritten list rehashes, §23 item 14),
the TTL counts from last use (item 15), and a second lookup for the same request
releases the locks of the first instead of orphaning them (item 16).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

from kvhive.errors import BadRequest
from kvhive.hashing import TokenHasher
from kvhive.keys import ChunkHash, ObjectKey


@dataclass(slots=True)
class LookupState:
    """What a finished lookup locked: ``hit_chunks`` prefix chunks for every rank.
    ``keys[rank]`` are that rank's object keys for ``hashes`` (kept to release and touch
    them without building them again)."""

    model_name: str
    world_size: int
    cache_salt: str
    num_readers: int
    hashes: list[ChunkHash]
    hit_chunks: int
    keys: dict[int, list[ObjectKey]] = field(default_factory=dict)


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
    tokens: list[int] = field(default_factory=list)
    hashes: list[ChunkHash] = field(default_factory=list)
    last_used: float = 0.0
    lookup: LookupState | None = None  # consumed result (hit length known)
    job: LookupJob | None = None  # running, or finished but not yet reported


class Sessions:
    def __init__(
        self, hasher: TokenHasher, *, ttl: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._hasher = hasher
        self._ttl = ttl
        self._clock = clock
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    @property
    def chunk_size(self) -> int:
        return self._hasher.chunk_size

    def get(self, request_id: str, create: bool = True) -> Session | None:
        with self._lock:
            s = self._sessions.get(request_id)
            if s is None and create:
                s = self._sessions[request_id] = Session(request_id)
            if s is not None:
                s.last_used = self._clock()
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
        usable = min(len(cached), n_chunks)
        if usable:
            head = seen if usable == len(cached) else seen[: usable * c]
            if tokens[: usable * c] != head:  # the request's token list was rewritten
                usable = 0
        if usable == n_chunks:
            return cached[:n_chunks]
        known = cached[:usable]
        # The hasher's digests are this server's chunk hashes.
        fresh = known + cast(list[ChunkHash], self._hasher.extend(known, tokens, n_chunks))
        kept = tokens[: n_chunks * c]
        with self._lock:
            if session.hashes is cached or len(fresh) > len(session.hashes):
                session.hashes = fresh
                session.tokens = kept if isinstance(kept, list) else list(kept)
        return fresh

    def expired(self) -> list[Session]:
        """Remove and return sessions idle longer than the TTL."""
        limit = self._clock() - self._ttl
        with self._lock:
            dead = [s for s in self._sessions.values() if s.last_used < limit]
            for s in dead:
                del self._sessions[s.request_id]
        return dead
