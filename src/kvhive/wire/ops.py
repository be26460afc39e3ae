"""Operation table: legacy ids, argument types, soft-failure values, pools and the
request limits checked before a frame is decoded (sizes, array entry counts).

The ids are frozen by the protocol (protocol.md §3); new kvhive operations travel
by name only and never take a number.

Both protocol versions are served from this one table: 0.5.7 appended arguments to two
ops (``free_lookup_locks``' ``extra_ranges``, ``prepare_store``'s ``skipped_chunks``) and
its client always sends them, while a 0.5.6 client never does.  Such trailing arguments
are declared with their defaults (``OpSpec.defaults``), so either frame count decodes.
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

# ---- request limits, checked on the frames before anything is decoded -------------------
# An op frame is a legacy id or a name: a few bytes.  Anything longer is refused undecoded.
MAX_OP_FRAME_BYTES = 64
# The most argument bytes an INLINE op may carry: the loop thread decodes them, so they
# must be tiny (ping's instance id, a request id); every INLINE op declares its own cap.
MAX_INLINE_ARG_BYTES = 4096
# A string argument naming a request or session (vLLM's ids are ~40 characters).
_ID_BYTES = 4096
# One registration maps one descriptor per KV layer; the largest models have a few hundred
# layers.  10,000 layers held a transfer thread for 2.8 s; 4096 is generous and bounded.
MAX_REGISTRATION_LAYERS = 4096
# A registration's frames: 4096 descriptors of ~250 bytes are 1 MiB; group infos are small.
_REGISTRATION_BYTES = 8 * 1024 * 1024
# LMCache groups of one worker (0.5.7's tensor envelopes carry at most 64).
MAX_GROUPS = 64
# Abandoned lookups' lock ranges in one free_lookup_locks (a client adds one per shrunk
# prefix-cache hit of a request; a handful at most).
MAX_EXTRA_RANGES = 1024


@dataclass(frozen=True, slots=True)
class ItemCap:
    """At most ``limit`` entries in the msgpack array of argument ``arg`` (0-based),
    read from the array's header before its entries are decoded.  ``what`` names an
    entry in the error reply."""

    arg: int
    limit: int
    what: str


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
    # All argument frames together may carry at most this many bytes (None: no cap, for
    # ops carrying token lists or KV data).  Checked before decoding; every INLINE op has one.
    max_arg_bytes: int | None = None
    # Array arguments with a cap on their entry count (checked before decoding).
    item_caps: tuple[ItemCap, ...] = ()
    # Limits inside decoded arguments: returns why they are over one, None when within.
    over_limit: Callable[[list[Any]], str | None] | None = None
    # A server-push stream (protocol.md §2.4): the handler returns a stream source and the
    # loop sends one batch per client credit; the op runs INLINE (stream state is the loop's).
    streaming: bool = False
    # Values of the LAST len(defaults) arguments when the client did not send their frames
    # (arguments a later protocol version appended): a request may carry from
    # ``min_args`` to ``len(args)`` argument frames.
    defaults: tuple[Any, ...] = ()

    @property
    def min_args(self) -> int:
        return len(self.args) - len(self.defaults)


def _registration_over_limit(args: list[Any]) -> str | None:
    """A ``register_kv_cache`` engine group naming more layers than a registration may have."""
    groups: list[t.EngineGroupInfo] = args[6]
    for g in groups:
        if len(g.layer_indices) > MAX_REGISTRATION_LAYERS:
            return (
                f"an engine group lists {len(g.layer_indices)} layers; at most "
                f"{MAX_REGISTRATION_LAYERS} per registration"
            )
    return None


_SPECS = [
    OpSpec(
        "register_kv_cache",
        (int, "descriptors", str, int, str, dict, list[t.EngineGroupInfo]),
        Pool.AFFINITY,
        has_soft=False,
        max_arg_bytes=_REGISTRATION_BYTES,
        item_caps=(
            ItemCap(1, MAX_REGISTRATION_LAYERS, "KV cache layers (descriptors)"),
            ItemCap(6, MAX_REGISTRATION_LAYERS, "engine groups"),
        ),
        over_limit=_registration_over_limit,
    ),
    OpSpec("unregister_kv_cache", (int,), Pool.AFFINITY, farewell=True, max_arg_bytes=16),
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
    OpSpec("query_prefetch_status", (str,), Pool.INLINE, 0, max_arg_bytes=_ID_BYTES),
    OpSpec("wait_prefetch_status", (str, float), Pool.CPU, 0, max_arg_bytes=_ID_BYTES + 16),
    # 0.5.7 appends extra_ranges: (start, hit_end) token pairs of the request's abandoned
    # earlier lookups, released with this call.
    OpSpec(
        "free_lookup_locks",
        (t.CacheKey, int, list[tuple[int, int]]),
        Pool.CPU,
        defaults=((),),
        item_caps=(ItemCap(2, MAX_EXTRA_RANGES, "extra lock ranges"),),
    ),
    OpSpec("end_session", (str,), Pool.CPU, max_arg_bytes=_ID_BYTES),
    OpSpec(
        "register_kv_cache_engine_driven_context",
        (t.EngineDrivenPayload,),
        Pool.AFFINITY,
        has_soft=False,
        max_arg_bytes=64 * 1024,
    ),
    OpSpec(
        "unregister_kv_cache_engine_driven_context",
        (int,),
        Pool.AFFINITY,
        farewell=True,
        max_arg_bytes=16,
    ),
    # 0.5.7 appends skipped_chunks: per LMCache group, chunk positions not to reserve.
    OpSpec(
        "prepare_store",
        (t.CacheKey, int, list[list[int]]),
        Pool.AFFINITY,
        t.PrepareStoreResponse(),
        defaults=((),),
        item_caps=(ItemCap(2, MAX_GROUPS, "groups of skipped chunks"),),
    ),
    OpSpec("commit_store", (t.CacheKey, int, bytes), Pool.AFFINITY, False),
    OpSpec(
        "prepare_retrieve",
        (t.CacheKey, int),
        Pool.AFFINITY,
        t.PrepareRetrieveResponse(success=False),
    ),
    OpSpec("commit_retrieve", (t.CacheKey, int), Pool.AFFINITY, False),
    OpSpec("clear", (bool,), Pool.CPU, max_arg_bytes=16),
    OpSpec("get_chunk_size", (), Pool.INLINE, has_soft=False, max_arg_bytes=0),
    # By name only (0.5.7): the configured chunk size, or an error reply when it is not a
    # multiple of the engine's required alignment (kvhive cannot change it at runtime).
    OpSpec("negotiate_chunk_size", (int,), Pool.INLINE, has_soft=False, max_arg_bytes=16),
    OpSpec("ping", (int | None,), Pool.INLINE, True, max_arg_bytes=16),
    OpSpec("report_block_allocation", (int, str, list[t.BlockAllocationRecord]), Pool.CPU),
    OpSpec("noop", (), Pool.INLINE, "OK", max_arg_bytes=0),
    OpSpec("get_experimental", (), Pool.INLINE, [], max_arg_bytes=0),
    # By name only (no legacy id).  A stream of KVEventBatch; bad arguments get an error reply.
    OpSpec(
        "subscribe_kv_events",
        (int, str, int, int),
        Pool.INLINE,
        has_soft=False,
        max_arg_bytes=MAX_INLINE_ARG_BYTES,
        streaming=True,
    ),
    # Server modules (--server-module): by name only, no legacy id.  The affinity variant
    # (0.5.7) runs in order with the caller's store/retrieve.
    OpSpec("server_module_call", (t.ServerModuleCallRequest,), Pool.CPU, has_soft=False),
    OpSpec(
        "server_module_affinity_call",
        (t.ServerModuleCallRequest,),
        Pool.AFFINITY,
        has_soft=False,
    ),
]


def _check_inline_caps(specs: list[OpSpec]) -> None:
    """The loop thread decodes INLINE ops' arguments: each must be capped small."""
    for s in specs:
        if s.pool is Pool.INLINE and (
            s.max_arg_bytes is None or s.max_arg_bytes > MAX_INLINE_ARG_BYTES
        ):
            raise ValueError(f"INLINE op {s.name} needs max_arg_bytes <= {MAX_INLINE_ARG_BYTES}")
        if s.streaming and s.pool is not Pool.INLINE:
            raise ValueError(f"streaming op {s.name} must be INLINE (streams are the loop's)")
        if len(s.defaults) > len(s.args):
            raise ValueError(f"op {s.name} declares more defaults than arguments")


_check_inline_caps(_SPECS)

OPS: MappingProxyType[str, OpSpec] = MappingProxyType({s.name: s for s in _SPECS})
