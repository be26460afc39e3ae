"""Worker pools: per-connection affinity threads and a shared CPU pool.

Affinity: each ZMQ connection (routing identity ~ one engine worker) is bound on
first sight to slot ``n % N``; its store/retrieve/prepare/commit/registration run
strictly in arrival order on that slot's single thread, so per-instance state
needs no locks.  Copies release the GIL (numpy), so N threads copy in parallel.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

log = logging.getLogger(__name__)


class AffinityPool:
    def __init__(self, workers: int, name: str = "kvhive-aff") -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._slots = [
            ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"{name}{i}")
            for i in range(workers)
        ]
        self._bindings: dict[bytes, int] = {}
        self._next = 0
        self._lock = threading.Lock()
        self._warned = False

    def slot_of(self, identity: bytes) -> int:
        slot = self._bindings.get(identity)
        if slot is None:
            with self._lock:
                slot = self._bindings.get(identity)
                if slot is None:
                    slot = self._next % len(self._slots)
                    self._next += 1
                    self._bindings[identity] = slot
                    if len(self._bindings) > len(self._slots) and not self._warned:
                        self._warned = True
                        log.warning(
                            "%d connections share %d transfer thread(s); raise "
                            "--max-gpu-workers to copy for them in parallel",
                            len(self._bindings),
                            len(self._slots),
                        )
        return slot

    def forget(self, identity: bytes) -> None:
        with self._lock:
            self._bindings.pop(identity, None)

    def submit(self, identity: bytes, fn: Callable[[], None]) -> Future[None]:
        return self._slots[self.slot_of(identity)].submit(fn)

    def shutdown(self, wait: bool = True) -> None:
        for ex in self._slots:
            ex.shutdown(wait=wait, cancel_futures=not wait)


class CpuPool:
    def __init__(self, workers: int, name: str = "kvhive-cpu") -> None:
        if workers < 1:
            raise ValueError("workers must be >= 1")
        self._ex = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name)

    def submit(self, identity: bytes, fn: Callable[[], None]) -> Future[None]:
        return self._ex.submit(fn)

    def shutdown(self, wait: bool = True) -> None:
        self._ex.shutdown(wait=wait, cancel_futures=not wait)
