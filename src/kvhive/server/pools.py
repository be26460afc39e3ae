"""Worker pools: per-connection affinity threads and a shared CPU pool.

Affinity: each ZMQ connection (routing identity ~ one engine worker) is bound on first
sight to the slot with the fewest bound connections; its store/retrieve/prepare/commit/
registration run strictly in arrival order on that slot's single thread, so per-instance
state needs no locks.  Copies release the GIL (numpy), so N threads copy in parallel.

A binding is dropped when nothing of its connection is queued or running any more and
either the connection said goodbye (:meth:`AffinityPool.forget`, after an unregister) or it
has been idle for ``idle_forget_s`` (a worker that died without unregistering).  Dropping
only idle bindings keeps the per-connection order: a later request can go to another slot
only when nothing earlier is still waiting on the old one.

Both pools run daemon threads of their own rather than a ``ThreadPoolExecutor``: shutdown
has a deadline (``shutdown(timeout)``) and a copy stuck in a misbehaving engine's memory
must not keep the process from exiting (the executor's threads are joined at exit).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

Job = Callable[[], None]
_STOP = None


class _Threads:
    """``n`` daemon threads taking jobs from one queue until they get the stop marker."""

    def __init__(self, jobs: queue.SimpleQueue[Job | None], n: int, name: str) -> None:
        self.jobs = jobs
        self.threads = [
            threading.Thread(target=self._loop, name=f"{name}{i}", daemon=True) for i in range(n)
        ]
        for th in self.threads:
            th.start()

    def _loop(self) -> None:
        while (job := self.jobs.get()) is not _STOP:
            try:
                job()
            except BaseException:
                log.exception("pool job failed")

    def stop(self, deadline: float) -> bool:
        """Let queued jobs finish, then stop; wait until ``deadline`` (monotonic).  True
        when every thread ended in time."""
        for _ in self.threads:
            self.jobs.put(_STOP)
        for th in self.threads:
            th.join(max(0.0, deadline - time.monotonic()))
        return not any(th.is_alive() for th in self.threads)


@dataclass(slots=True)
class _Binding:
    slot: int
    pending: int = 0  # jobs queued or running
    last_used: float = 0.0
    farewell: bool = False  # forget() asked while jobs were pending


class AffinityPool:
    """N single-thread slots; one connection's jobs always run on its slot, in order."""

    def __init__(
        self,
        workers: int,
        name: str = "kvhive-aff",
        *,
        idle_forget_s: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._slots = [_Threads(queue.SimpleQueue(), 1, f"{name}{i}-") for i in range(workers)]
        self._load = [0] * workers  # bindings per slot
        self._bindings: dict[bytes, _Binding] = {}
        self._lock = threading.Lock()
        self._clock = clock
        self._idle_forget_s = idle_forget_s
        self._next_prune = clock() + idle_forget_s
        self._warned = False

    def submit(self, identity: bytes, fn: Job) -> None:
        """Queue ``fn`` on ``identity``'s slot (binding it on first sight)."""
        now = self._clock()
        with self._lock:
            b = self._bindings.get(identity)
            if b is None:
                b = self._bind(identity, now)
            b.pending += 1
            b.last_used = now
            slot = b.slot
        self._slots[slot].jobs.put(lambda: self._run(identity, b, fn))

    def _run(self, identity: bytes, b: _Binding, fn: Job) -> None:
        try:
            fn()
        finally:
            with self._lock:
                b.pending -= 1
                if b.farewell and not b.pending:
                    self._unbind(identity, b)

    def _bind(self, identity: bytes, now: float) -> _Binding:
        if now >= self._next_prune:
            self._next_prune = now + self._idle_forget_s
            for ident, old in list(self._bindings.items()):
                if not old.pending and now - old.last_used > self._idle_forget_s:
                    self._unbind(ident, old)
        slot = min(range(len(self._slots)), key=self._load.__getitem__)
        self._load[slot] += 1
        b = self._bindings[identity] = _Binding(slot)
        if len(self._bindings) > len(self._slots) and not self._warned:
            self._warned = True
            log.warning(
                "%d connections share %d transfer thread(s); raise "
                "--max-gpu-workers to copy for them in parallel",
                len(self._bindings),
                len(self._slots),
            )
        return b

    def _unbind(self, identity: bytes, b: _Binding) -> None:
        if self._bindings.get(identity) is b:
            del self._bindings[identity]
            self._load[b.slot] -= 1

    def slot_of(self, identity: bytes) -> int | None:
        """The slot ``identity`` is bound to, None when unbound."""
        with self._lock:
            b = self._bindings.get(identity)
            return None if b is None else b.slot

    def forget(self, identity: bytes) -> None:
        """The connection is done (it unregistered): drop its binding once its queued
        jobs have run."""
        with self._lock:
            b = self._bindings.get(identity)
            if b is None:
                return
            if b.pending:
                b.farewell = True
            else:
                self._unbind(identity, b)

    def __len__(self) -> int:
        """Connections currently bound."""
        return len(self._bindings)

    def shutdown(self, timeout: float) -> bool:
        """Run what is queued, then stop, within ``timeout`` seconds; False (and a log
        line) when a job is still running then: its daemon thread is abandoned."""
        deadline = time.monotonic() + timeout
        stopped = all([slot.stop(deadline) for slot in self._slots])
        if not stopped:
            log.warning("transfer threads still busy after %.1f s; not waiting", timeout)
        return stopped


class CpuPool:
    """A shared pool for lookups, session ops and clears (no ordering guarantee)."""

    def __init__(self, workers: int, name: str = "kvhive-cpu") -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._threads = _Threads(queue.SimpleQueue(), workers, name)

    def submit(self, identity: bytes, fn: Job) -> None:
        self._threads.jobs.put(fn)

    def shutdown(self, timeout: float) -> bool:
        """As :meth:`AffinityPool.shutdown`."""
        stopped = self._threads.stop(time.monotonic() + timeout)
        if not stopped:
            log.warning("CPU pool threads still busy after %.1f s; not waiting", timeout)
        return stopped
