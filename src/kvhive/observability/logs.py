"""Logging subscribers: one DEBUG line per server, L1 and L2 event; timeouts at WARNING.

They log on the bus thread, so the request path never formats a log line.  Skipped entirely
with ``--disable-logging``; when DEBUG is off for ``kvhive.events`` the callbacks return at
once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from kvhive.observability import events as ev
from kvhive.observability.events import EventType

log = logging.getLogger("kvhive.events")

_KEYED = (
    EventType.L1_READ_FINISHED,
    EventType.L1_WRITE_FINISHED,
    EventType.L1_KEYS_EVICTED,
    EventType.L1_ALLOCATION_FAILED,
    EventType.L1_READ_FAILED,
)
_PLAIN = (
    EventType.MP_LOOKUP_PREFETCH_START,
    EventType.MP_STORE_SUBMITTED,
    EventType.MP_STORE_START,
    EventType.MP_RETRIEVE_SUBMITTED,
    EventType.MP_RETRIEVE_START,
    EventType.MP_REQUEST_END,
    EventType.MP_INSTANCE_REGISTERED,
    EventType.MP_INSTANCE_DROPPED,
    EventType.MP_SESSIONS_EXPIRED,
    EventType.L1_EVICTION_LOOP_TICK,
    EventType.L2_STORE_SUBMITTED,
    EventType.L2_STORE_COMPLETED,
    EventType.L2_LOAD_TASK_SUBMITTED,
    EventType.L2_LOAD_TASK_COMPLETED,
    EventType.L2_KEYS_EVICTED,
    EventType.L2_PREFETCH_FAILED,
)


class LoggingSubscriber:
    """Formats events into ``kvhive.events`` log lines."""

    name = "logging"

    def subscriptions(self) -> Mapping[EventType, Callable[[Any], None]]:
        subs: dict[EventType, Callable[[Any], None]] = {t: self._keyed for t in _KEYED}
        subs.update({t: self._plain for t in _PLAIN})
        subs[EventType.MP_STORE_END] = self._store_end
        subs[EventType.MP_RETRIEVE_END] = self._retrieve_end
        subs[EventType.MP_LOOKUP_PREFETCH_END] = self._lookup_end
        subs[EventType.MP_VLLM_BLOCK_ALLOCATION] = self._plain
        subs[EventType.TIMEOUT_RAISED] = self._timeout
        return subs

    def _plain(self, e: ev.Event) -> None:
        if log.isEnabledFor(logging.DEBUG):
            fields = " ".join(f"{k}={v}" for k, v in e.metadata().items())
            log.debug("%s session=%s %s", e.TYPE.value, e.session_id or "-", fields)

    def _keyed(self, e: Any) -> None:
        if log.isEnabledFor(logging.DEBUG):
            extra = {k: v for k, v in e.metadata().items() if k != "keys"}
            fields = " ".join(f"{k}={v}" for k, v in extra.items())
            log.debug("%s keys=%d %s", e.TYPE.value, len(e.keys), fields)

    def _store_end(self, e: ev.StoreEnd) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "store end session=%s engine=%d stored=%d skipped=%d dropped=%d bytes=%d in %.3f ms",
                e.session_id, e.engine_id, e.stored_count, e.skipped_count, e.dropped_count,
                e.total_bytes, e.elapsed_seconds * 1e3,
            )  # fmt: skip

    def _retrieve_end(self, e: ev.RetrieveEnd) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "retrieve end session=%s engine=%d retrieved=%d ok=%s bytes=%d in %.3f ms",
                e.session_id, e.engine_id, e.retrieved_count, e.success, e.total_bytes,
                e.elapsed_seconds * 1e3,
            )  # fmt: skip

    def _lookup_end(self, e: ev.LookupEnd) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "lookup end session=%s found=%d chunks, hit %d/%d tokens (L1 %d, L2 %d)%s",
                e.session_id, e.found_count, e.hit_tokens, e.requested_tokens, e.l1_hit_tokens,
                e.l2_hit_tokens, f" early exit: {e.early_exit_reason}" if e.early_exit_reason else "",
            )  # fmt: skip

    def _timeout(self, e: ev.TimeoutRaised) -> None:
        log.warning(
            "timeout (%s) session=%s: %s\n%s",
            e.exception_type,
            e.session_id or "-",
            e.message,
            e.stacktrace,
        )
