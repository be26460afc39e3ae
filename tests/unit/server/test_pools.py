"""AffinityPool and CpuPool: per-connection order, bindings that do not grow forever,
least-loaded slots, and shutdowns with a deadline."""

from __future__ import annotations

import threading
import time

from kvhive.server.pools import AffinityPool, CpuPool


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def wait_for(cond, timeout: float = 2.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def test_one_connections_jobs_run_in_order_on_one_thread():
    pool = AffinityPool(3)
    seen: list[tuple[int, str]] = []
    for i in range(50):
        pool.submit(b"a", lambda i=i: seen.append((i, threading.current_thread().name)))
    assert wait_for(lambda: len(seen) == 50)
    assert [i for i, _ in seen] == list(range(50))
    assert len({name for _, name in seen}) == 1
    assert pool.shutdown(timeout=2)


def test_new_connections_go_to_the_least_loaded_slot():
    pool = AffinityPool(2)
    done = threading.Event()
    pool.submit(b"a", done.wait)
    pool.submit(b"b", lambda: None)
    assert {pool.slot_of(b"a"), pool.slot_of(b"b")} == {0, 1}
    pool.forget(b"b")
    assert wait_for(lambda: pool.slot_of(b"b") is None)
    pool.submit(b"c", lambda: None)
    assert pool.slot_of(b"c") != pool.slot_of(b"a")  # b's freed slot, not a's busy one
    done.set()
    assert pool.shutdown(timeout=2)


def test_forget_waits_for_queued_jobs_so_order_holds():
    pool = AffinityPool(2)
    gate = threading.Event()
    order: list[str] = []
    pool.submit(b"a", lambda: (gate.wait(2), order.append("first")))
    pool.forget(b"a")  # a job is still pending: the binding stays until it ran
    assert pool.slot_of(b"a") is not None
    slot = pool.slot_of(b"a")
    pool.submit(b"a", lambda: order.append("second"))
    assert pool.slot_of(b"a") == slot  # same slot: the second job cannot overtake
    gate.set()
    assert wait_for(lambda: order == ["first", "second"])
    assert wait_for(lambda: pool.slot_of(b"a") is None)
    assert len(pool) == 0
    assert pool.shutdown(timeout=2)


def test_idle_bindings_are_pruned():
    clock = Clock()
    pool = AffinityPool(2, idle_forget_s=60, clock=clock)
    for i in range(100):
        pool.submit(f"conn{i}".encode(), lambda: None)
    assert wait_for(lambda: all(b.pending == 0 for b in list(pool._bindings.values())))
    assert len(pool) == 100
    clock.now = 61.0
    pool.submit(b"newcomer", lambda: None)  # a new binding sweeps the idle ones
    assert len(pool) == 1
    assert pool.shutdown(timeout=2)


def test_shutdown_has_a_deadline_even_with_a_stuck_job():
    pool, cpu = AffinityPool(1), CpuPool(1)
    stuck = threading.Event()
    pool.submit(b"a", lambda: stuck.wait(30))
    cpu.submit(b"a", lambda: stuck.wait(30))
    t0 = time.monotonic()
    assert pool.shutdown(timeout=0.2) is False
    assert cpu.shutdown(timeout=0.2) is False
    assert time.monotonic() - t0 < 2
    stuck.set()


def test_a_failing_job_does_not_kill_its_thread():
    pool = AffinityPool(1)
    ran = threading.Event()

    def boom() -> None:
        raise RuntimeError("job failed")

    pool.submit(b"a", boom)
    pool.submit(b"a", ran.set)
    assert ran.wait(2)
    assert pool.shutdown(timeout=2)
