"""Replaced lookups whose result was reported: kept so that 0.5.7's ``extra_ranges`` can
give their locks back (see :mod:`kvhive.engine.lookups`).

At most ``MAX_RETIRED`` per session; an older one is forgotten (its locks go back at
``end_session``).  Each chunk of a retired lookup is released at most once: ``take`` hands a
range out and moves the record's held end below it.  Called on CPU-pool threads; the
records are guarded by one lock.
"""

from __future__ import annotations

import logging
import threading

from kvhive.engine.sessions import LookupState, RetiredLookup, Session

log = logging.getLogger(__name__)

MAX_RETIRED = 4


class RetiredLookups:
    """The retired-lookup records of every session (module docstring)."""

    def __init__(self, chunk_size: int) -> None:
        self.chunk_size = chunk_size
        self._lock = threading.Lock()

    def retire(self, session: Session, state: LookupState) -> None:
        """Keep a replaced reported lookup for ``extra_ranges`` (bounded)."""
        if state.hit_chunks <= state.first_chunk:
            return  # it locked nothing
        with self._lock:
            session.retired.append(RetiredLookup(state, state.hit_chunks))
            if len(session.retired) > MAX_RETIRED:
                dropped = session.retired.pop(0)
                log.debug(
                    "%s: forgetting an abandoned lookup of %d chunks (its locks go back at "
                    "end_session)",
                    session.request_id,
                    dropped.held_end - dropped.state.first_chunk,
                )

    def take(self, session: Session, start: int, end: int) -> tuple[LookupState, int, int] | None:
        """The lookup state and chunk range ``[lo, hi)`` whose locks the extra range
        ``[start, end)`` (tokens) gives back, or None when it names nothing still held."""
        c = self.chunk_size
        if start >= end:
            return None
        hit_end = end // c
        with self._lock:
            rec = next(
                (
                    r
                    for r in reversed(session.retired)
                    if r.state.hit_chunks == hit_end
                    and r.held_end > max(start // c, r.state.first_chunk)
                ),
                None,
            )
            if rec is None:
                log.debug(
                    "free_lookup_locks %s: extra range [%d, %d) matches no abandoned lookup "
                    "holding locks; nothing to release",
                    session.request_id,
                    start,
                    end,
                )
                return None
            lo, hi = max(start // c, rec.state.first_chunk), rec.held_end
            rec.held_end = lo
            if lo <= rec.state.first_chunk:
                session.retired.remove(rec)
        return rec.state, lo, hi
