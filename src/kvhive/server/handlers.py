"""The op → handler table: one explicit mapping, built in one place.

Each route names the engine method that serves an operation and how its domain result
becomes the reply value that ``wire/ops.py`` declares (most results already are one).
Dispatch checks that every operation of the table in ``wire/ops.py`` has exactly one route.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from kvhive.engine.engine import CacheEngine
from kvhive.server.modules import ServerModules
from kvhive.wire.ops import TRANSFER_OK

Handler = Callable[..., Any]


def _same(result: Any) -> Any:
    return result


def _transfer_ack(result: object) -> tuple[bytes, bool]:
    """A store/retrieve that returned (rather than raised) is acknowledged: with the copy's
    event handle when a device copy is still in flight (the worker waits on it), else
    ``b""`` (the copy already completed)."""
    event = getattr(result, "event", b"")
    return (event, True) if event else TRANSFER_OK


@dataclass(frozen=True, slots=True)
class Route:
    """``call`` serves the op; ``reply`` turns its result into the wire result value."""

    call: Handler
    reply: Callable[[Any], Any] = _same


def build_routes(engine: CacheEngine, modules: ServerModules | None = None) -> Mapping[str, Route]:
    """Every protocol operation kvhive serves, and what serves it (``modules``: the loaded
    ``--server-module`` handlers; none loaded when omitted)."""
    lk, tx, ed = engine.lookups, engine.transfers, engine.engine_driven
    mods = modules if modules is not None else ServerModules()
    return MappingProxyType(
        {
            # registration and lmcache-driven transfers (affinity threads)
            "register_kv_cache": Route(tx.register_kv_cache),
            "unregister_kv_cache": Route(tx.unregister_kv_cache),
            "store": Route(tx.store, _transfer_ack),
            "retrieve": Route(tx.retrieve, _transfer_ack),
            # lookups and sessions: acknowledged once the job is published, run after
            "lookup": Route(lk.start_lookup),
            "query_prefetch_status": Route(lk.query_prefetch_status),
            "wait_prefetch_status": Route(lk.wait_prefetch_status),
            "free_lookup_locks": Route(lk.free_lookup_locks),
            "end_session": Route(lk.end_session),
            # engine-driven transfers
            "register_kv_cache_engine_driven_context": Route(
                ed.register_kv_cache_engine_driven_context
            ),
            "unregister_kv_cache_engine_driven_context": Route(
                ed.unregister_kv_cache_engine_driven_context
            ),
            "prepare_store": Route(ed.prepare_store),
            "commit_store": Route(ed.commit_store),
            "prepare_retrieve": Route(ed.prepare_retrieve),
            "commit_retrieve": Route(ed.commit_retrieve),
            # small ops
            "clear": Route(engine.clear),
            "get_chunk_size": Route(engine.get_chunk_size),
            "negotiate_chunk_size": Route(engine.negotiate_chunk_size),
            "ping": Route(engine.ping),
            "report_block_allocation": Route(engine.report_block_allocation),
            "noop": Route(engine.noop),
            "get_experimental": Route(engine.get_experimental),
            # a server-push stream (the loop's stream manager sends its batches)
            "subscribe_kv_events": Route(engine.subscribe_kv_events),
            # server modules (--server-module)
            "server_module_call": Route(mods.call),
            "server_module_affinity_call": Route(mods.affinity_call),
        }
    )
