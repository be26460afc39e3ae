"""StoreController: write-behind of committed L1 objects to every L2 adapter.

::

    L1 commit --"committed" listener--> lane 0 pending ─┐   one thread takes batches,
                                    --> lane 1 pending ─┤-> read-locks them in L1 and
                                    --> lane N pending ─┘   submits one store per lane

* One lane per adapter, all fed with every committed key (writes go to all adapters in
  parallel; adapter order only ranks reads).  Each lane runs at most ``max_tasks`` store
  tasks of at most ``batch_keys`` keys at once.  A lane's pending queue is bounded
  (``queue_keys``): when full, new keys are dropped for that lane and counted — except
  under ``skip_l1``, where every key must reach L2 before it may leave L1 (L1's own
  capacity bounds the queue there).
* While a task runs, its objects hold read locks of the owner ``L2StoreOwner(lane, task)``,
  refreshed every ``pin_refresh_s`` so a slow write cannot outlive its lock and read
  memory that eviction reused.  A task past its deadline (``store_timeout_s``) is counted
  as timed out but keeps its locks until the adapter really finishes.
* Failed keys are retried with exponential backoff: up to ``max_attempts`` under
  ``default``; under ``skip_l1`` for as long as the object stays in L1 (a failed write
  never loses data — the reference kept such objects forever without retrying).
* ``skip_l1``: once every lane has stored a key, its L1 copy is deleted (without force);
  a copy still read-locked by a reader is deleted on a later tick.
* Objects admitted by the prefetch controller are committed without "committed" events,
  so data loaded from L2 is never written back to it.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from kvhive.keys import ObjectKey
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.l2.futures import outcome
from kvhive.storage.l2.managed import ManagedAdapter
from kvhive.storage.owners import L2StoreOwner

log = logging.getLogger(__name__)

RETRY_BASE_S = 0.5
RETRY_CAP_S = 30.0


@dataclass(eq=False)
class _Task:
    keys: list[ObjectKey]
    attempts: list[int]
    owner: L2StoreOwner
    deadline: float
    locks: int = 1
    timed_out: bool = False


@dataclass(eq=False)
class _Lane:
    adapter: ManagedAdapter
    pending: deque[tuple[ObjectKey, int]] = field(default_factory=deque)
    retries: list[tuple[float, int, ObjectKey, int]] = field(default_factory=list)
    tasks: set[_Task] = field(default_factory=set)
    starting: int = 0  # batches taken but not yet submitted
    dropped: int = 0
    given_up: int = 0
    retried: int = 0
    evicted_first: int = 0


class StoreController:
    """Write-behind to all adapters (module docstring)."""

    def __init__(
        self,
        l1: L1Manager,
        adapters: Sequence[ManagedAdapter],
        *,
        skip_l1: bool,
        pin_refresh_s: float,
        batch_keys: int = 16,
        max_tasks: int = 4,
        queue_keys: int = 1 << 16,
        max_attempts: int = 3,
        clock: Any = time.monotonic,
    ) -> None:
        self.l1 = l1
        self.lanes = [_Lane(a) for a in adapters]
        self.skip_l1 = skip_l1
        self.batch_keys, self.max_tasks, self.queue_keys = batch_keys, max_tasks, queue_keys
        self.max_attempts = max_attempts
        self.pin_refresh_s = pin_refresh_s
        self._clock = clock
        self._cv = threading.Condition()
        self._ids = itertools.count()
        self._written: dict[ObjectKey, int] = {}  # skip_l1: lanes that stored the key
        self._free_later: set[ObjectKey] = set()
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="kvhive-l2-store", daemon=True)
        self.freed_from_l1 = 0

    # -- feeding ---------------------------------------------------------------------------

    def on_l1_event(self, event: str, keys: list[ObjectKey]) -> None:
        """L1 listener: queue committed keys for every lane (never blocks)."""
        if event == "removed":
            if self.skip_l1:
                with self._cv:
                    for key in keys:
                        self._written.pop(key, None)
                        self._free_later.discard(key)
            return
        if event != "committed":
            return
        with self._cv:
            for lane in self.lanes:
                room = len(keys) if self.skip_l1 else max(0, self.queue_keys - len(lane.pending))
                lane.pending.extend((k, 0) for k in keys[:room])
                lane.dropped += len(keys) - min(room, len(keys))
            self._cv.notify()

    def start(self) -> None:
        self._thread.start()

    # -- the controller thread -----------------------------------------------------------

    def _run(self) -> None:
        last_refresh = self._clock()
        while True:
            with self._cv:
                if self._stop:
                    return
                self._cv.wait(timeout=0.2)
                if self._stop:
                    return
                now = self._clock()
                batches = self._take_batches(now)
                expired = self._expire(now)
                free = list(self._free_later)
            for lane, batch in batches:
                self._submit(lane, batch)
            for lane, task in expired:
                log.warning("L2 %s: store of %d keys exceeded %.0f s", lane.adapter.name,
                            len(task.keys), lane.adapter.spec.store_timeout_s)  # fmt: skip
            if free:
                self._free(free)
            if now - last_refresh >= self.pin_refresh_s:
                self._refresh_pins()
                last_refresh = now

    def _take_batches(self, now: float) -> list[tuple[_Lane, list[tuple[ObjectKey, int]]]]:
        out = []
        for lane in self.lanes:
            while lane.retries and lane.retries[0][0] <= now:
                _, _, key, attempt = heapq.heappop(lane.retries)
                lane.pending.appendleft((key, attempt))
            while lane.pending and len(lane.tasks) + lane.starting < self.max_tasks:
                n = min(self.batch_keys, len(lane.pending))
                out.append((lane, [lane.pending.popleft() for _ in range(n)]))
                lane.starting += 1
        return out

    def _expire(self, now: float) -> list[tuple[_Lane, _Task]]:
        out = []
        for lane in self.lanes:
            for task in lane.tasks:
                if not task.timed_out and now > task.deadline:
                    task.timed_out = True
                    lane.adapter.count(store_timeouts=1)
                    out.append((lane, task))
        return out

    def _submit(self, lane: _Lane, batch: list[tuple[ObjectKey, int]]) -> None:
        owner = L2StoreOwner(lane.adapter.index, next(self._ids))
        slots = self.l1.read_lock([k for k, _ in batch], owner)
        live = [(k, a, s) for (k, a), s in zip(batch, slots, strict=True) if s is not None]
        task = _Task([k for k, _, _ in live], [a for _, a, _ in live], owner,
                     self._clock() + lane.adapter.spec.store_timeout_s)  # fmt: skip
        with self._cv:
            lane.starting -= 1
            lane.evicted_first += len(batch) - len(live)
            if not live:
                return
            lane.tasks.add(task)
        try:
            views = [self.l1.view(s).data for _, _, s in live]
            fut = lane.adapter.store(task.keys, views)
        except Exception as exc:  # noqa: BLE001 - task boundary: e.g. L1 closed under us
            log.warning("L2 %s: store submit failed: %s", lane.adapter.name, exc)
            fut = Future()
            fut.set_exception(exc)
        fut.add_done_callback(lambda f: self._done(lane, task, f))

    def _done(self, lane: _Lane, task: _Task, fut: Future) -> None:
        """Runs on the adapter's completion thread."""
        res = outcome(fut, len(task.keys))
        with self._cv:
            locks = task.locks
            lane.tasks.discard(task)
            now = self._clock()
            for key, attempt, ok in zip(task.keys, task.attempts, res, strict=True):
                if ok:
                    if self.skip_l1:
                        self._mark_written(lane, key)
                elif self.skip_l1 or attempt + 1 < self.max_attempts:
                    delay = min(RETRY_CAP_S, RETRY_BASE_S * 2**attempt)
                    heapq.heappush(lane.retries, (now + delay, next(self._ids), key, attempt + 1))
                    lane.retried += 1
                else:
                    lane.given_up += 1
            self._cv.notify()
        self.l1.unlock(task.keys, task.owner, locks)

    def _mark_written(self, lane: _Lane, key: ObjectKey) -> None:
        bits = self._written.get(key, 0) | (1 << self.lanes.index(lane))
        if bits == (1 << len(self.lanes)) - 1:
            self._written.pop(key, None)
            self._free_later.add(key)
        else:
            self._written[key] = bits

    def _free(self, keys: list[ObjectKey]) -> None:
        """skip_l1: delete copies every lane has stored; locked ones stay for later."""
        self.l1.delete(keys)
        still = {k for k, there in zip(keys, self.l1.contains(keys), strict=True) if there}
        with self._cv:
            self.freed_from_l1 += len(keys) - len(still)
            self._free_later.difference_update(k for k in keys if k not in still)

    def _refresh_pins(self) -> None:
        with self._cv:
            tasks = [t for lane in self.lanes for t in lane.tasks]
            for task in tasks:
                task.locks += 1
        for task in tasks:
            self.l1.read_lock(task.keys, task.owner)

    # -- shutdown and status ---------------------------------------------------------------

    def drain(self, timeout: float) -> bool:
        """Wait until nothing is pending or running (retries not yet due are left)."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while any(lane.pending or lane.tasks or lane.starting for lane in self.lanes):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cv.wait(min(left, 0.05))
            if self._free_later:
                free = list(self._free_later)
            else:
                return True
        self._free(free)
        return True

    def close(self, drain_timeout: float = 10.0) -> None:
        """Drain within ``drain_timeout``, stop, and release the locks of unfinished tasks."""
        if self._thread.is_alive():
            self.drain(drain_timeout)
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self.l1.release_owners(lambda o: isinstance(o, L2StoreOwner))

    def status(self) -> dict[str, Any]:
        with self._cv:
            lanes = {
                lane.adapter.name: {
                    "pending": len(lane.pending),
                    "running_tasks": len(lane.tasks),
                    "timed_out_tasks": sum(t.timed_out for t in lane.tasks),
                    "waiting_retries": len(lane.retries),
                    "retried": lane.retried,
                    "given_up": lane.given_up,
                    "dropped_queue_full": lane.dropped,
                    "evicted_before_store": lane.evicted_first,
                }
                for lane in self.lanes
            }
            return {"policy": "skip_l1" if self.skip_l1 else "default", "lanes": lanes,
                    "freed_from_l1": self.freed_from_l1,
                    "waiting_to_free": len(self._free_later)}  # fmt: skip
