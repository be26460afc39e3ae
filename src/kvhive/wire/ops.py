"""Operation table: legacy ids, argument types, result types and soft-failure values.

The ids are frozen by the protocol (protocol.md §3); new kvhive operations travel
by name only and never take a number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from types import MappingProxyType
from typing import Any

from kvhive.wire import types as t

LEGACY_IDS = MappingProxyType(
    {
        1: "register_kv_cache",
        2: "unregister_kv_cache",
        3: "register_q_cache",
        4: "unregister_q_cache",
        5: "store_q",
        6: "store",
        7: "retrieve",
        8: "lookup",
        9: "query_prefetch_status",
        10: "wait_prefetch_status",
        # 11 is retired and must never be reused.
        12: "free_lookup_locks",
        13: "end_session",
        14: "register_kv_cache_engine_driven_context",
        15: "unregister_kv_cache_engine_driven_context",
        16: "prepare_store",
        17: "commit_store",
        18: "prepare_retrieve",
        19: "commit_retrieve",
        20: "clear",
        21: "get_chunk_size",
        22: "ping",
        23: "report_block_allocation",
        24: "noop",
        25: "cb_register_rope",
        26: "cb_unregister_rope",
        27: "cb_retrieve_pre_computed",
        28: "cb_unified_lookup",
        29: "p2p_lookup_and_lock",
        30: "p2p_query_lookup_results",
        31: "p2p_unlock_objects",
        32: "get_experimental",
        33: "cb_protocol_handshake",
    }
)


class Pool(Enum):
    """Where a handler runs.  INLINE handlers are O(1) and run on the loop thread, so
    ``ping`` never queues behind slow work; AFFINITY keeps per-connection FIFO order."""

    INLINE = "inline"
    AFFINITY = "affinity"
    CPU = "cpu"


# About 16 chunks of 256 tokens: hashing and locking them takes less than a pool round trip.
SMALL_LOOKUP_BYTES = 12 * 1024


@dataclass(frozen=True, slots=True)
class AfterReply:
    """A handler result with work left: ``value`` is the reply, ``then`` the rest.  Inline,
    the reply goes out first and ``then`` runs while it travels (the next request from that
    client cannot arrive sooner); on a pool ``then`` runs before the reply, so a client that
    polls for the outcome does not spin."""

    value: Any
    then: Callable[[], None]


# Sentinel for handlers whose reply is the empty acknowledgement.
NONE: Any = None
TRANSFER_OK = (b"", True)
SOFT_TRANSFER_FAILURE = (b"", False)


@dataclass(frozen=True, slots=True)
class OpSpec:
    """One operation's contract: argument types in frame order, the soft value sent
    when the request decoded but cannot be served, and the pool it runs on."""

    name: str
    args: tuple[Any, ...]
    pool: Pool
    soft: Any = None
    has_soft: bool = True
    # A pooled op whose argument frames total at most this many bytes runs inline: its
    # work is as small as the decode, and two thread hand-offs would cost more than both.
    inline_max_bytes: int = 0
    # The connection is done with the server after this op (it unregistered): the
    # server may forget what it keeps per connection once its queued work has run.
    farewell: bool = False


_SPECS = [
    OpSpec(
        "register_kv_cache",
        (int, "descriptors", str, int, str, dict, list[t.EngineGroupInfo]),
        Pool.AFFINITY,
        has_soft=False,
    ),
    OpSpec("unregister_kv_cache", (int,), Pool.AFFINITY, farewell=True),
    OpSpec(
        "store", (t.CacheKey, int, list[list[int]], bytes), Pool.AFFINITY, SOFT_TRANSFER_FAILURE
    ),
    OpSpec(
        "retrieve",
        (t.CacheKey, int, list[list[int]], bytes, int),
        Pool.AFFINITY,
        SOFT_TRANSFER_FAILURE,
    ),
    OpSpec("lookup", (t.CacheKey, int), Pool.CPU, inline_max_bytes=SMALL_LOOKUP_BYTES),
    # The job it reads is published before the lookup is acknowledged: O(1), never waits.
    OpSpec("query_prefetch_status", (str,), Pool.INLINE, 0),
    OpSpec("wait_prefetch_status", (str, float), Pool.CPU, 0),
    OpSpec("free_lookup_locks", (t.CacheKey, int), Pool.CPU),
    OpSpec("end_session", (str,), Pool.CPU),
    OpSpec(
        "register_kv_cache_engine_driven_context",
        (t.EngineDrivenPayload,),
        Pool.AFFINITY,
        has_soft=False,
    ),
    OpSpec("unregister_kv_cache_engine_driven_context", (int,), Pool.AFFINITY, farewell=True),
    OpSpec("prepare_store", (t.CacheKey, int), Pool.AFFINITY, t.PrepareStoreResponse()),
    OpSpec("commit_store", (t.CacheKey, int, bytes), Pool.AFFINITY, False),
    OpSpec(
        "prepare_retrieve",
        (t.CacheKey, int),
        Pool.AFFINITY,
        t.PrepareRetrieveResponse(success=False),
    ),
    OpSpec("commit_retrieve", (t.CacheKey, int), Pool.AFFINITY, False),
    OpSpec("clear", (bool,), Pool.CPU),
    OpSpec("get_chunk_size", (), Pool.INLINE, has_soft=False),
    OpSpec("ping", (int | None,), Pool.INLINE, True),
    OpSpec("report_block_allocation", (int, str, list[t.BlockAllocationRecord]), Pool.CPU),
    OpSpec("noop", (), Pool.INLINE, "OK"),
    OpSpec("get_experimental", (), Pool.INLINE, []),
]

OPS: MappingProxyType[str, OpSpec] = MappingProxyType({s.name: s for s in _SPECS})
