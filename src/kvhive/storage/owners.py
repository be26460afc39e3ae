"""Who holds an L1 lock: one frozen record per kind of owner.

Every read lock and write reservation in L1 belongs to an owner (``locks.TTLLockTable``).
The kinds, who creates them and who gives them back::

    owner            taken by                          given back by
    ---------------  --------------------------------  ---------------------------------------
    LookupOwner      lookup: ``num_kv_readers`` read   each retrieve/prepare_retrieve of that
      (request,      locks per chunk, one owner per     rank (one lock), free_lookup_locks,
       model, rank)  KV rank; the L2 prefetch too      end_session, the session reaper, a
                                                       replaced lookup, the reaper of a dead
                                                       worker whose rank nobody else serves
    WriterOwner      store / prepare_store / pickle     commit or abort of the same request;
      (instance)     commit: write reservations         unregister / reaping of the instance
    CopyPin          retrieve, for the length of its    the same retrieve (``finally``)
      (thread)       scatter: one read lock per chunk
    WorkerCopyPin    engine-driven prepare_retrieve:    commit_retrieve (shared pool), the same
      (instance)     the worker copies from L1 itself   call (pickle), unregister / reaping
    PrefetchOwner    L2 prefetch: reservations of       the prefetch (commit or abort)
      (prefetch id)  the objects it loads
    L2StoreOwner     write-behind: read locks while     the store task's completion; close()
      (lane, task)   an L2 store task reads the object  releases unfinished tasks

Owners compare by kind and fields (a ``LookupOwner`` never equals a ``WriterOwner`` with
the same values), are hashable and immutable, so they key the lock table directly.  Match
them with ``isinstance`` and attributes, never by position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeAlias

from kvhive.keys import InstanceId, RequestId


@dataclass(frozen=True, slots=True)
class LookupOwner:
    """Read locks a lookup took for one request on one KV rank's objects.  The rank is
    part of the owner so that a dead worker's share can be released without the others'."""

    request_id: RequestId
    model_name: str
    kv_rank: int


@dataclass(frozen=True, slots=True)
class WriterOwner:
    """Write reservations of one registered engine worker (store in progress)."""

    instance_id: InstanceId


@dataclass(frozen=True, slots=True)
class CopyPin:
    """Read locks held by one server thread for the length of one copy out of L1, so the
    objects stay in place even if the lookup's own locks expire meanwhile."""

    thread_id: int


@dataclass(frozen=True, slots=True)
class WorkerCopyPin:
    """Read locks held while an engine-driven worker copies out of L1 itself."""

    instance_id: InstanceId


@dataclass(frozen=True, slots=True)
class PrefetchOwner:
    """Write reservations of one L2 prefetch (objects being loaded into L1)."""

    prefetch_id: int


@dataclass(frozen=True, slots=True)
class L2StoreOwner:
    """Read locks of one write-behind task of one L2 lane."""

    lane: int
    task: int


Owner: TypeAlias = (
    LookupOwner | WriterOwner | CopyPin | WorkerCopyPin | PrefetchOwner | L2StoreOwner
)
