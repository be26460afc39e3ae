"""The engine's side of asynchronous (device) copies, over real L1 and real shm KV caches.

A device backend returns a ticket whose event the reply carries; the commit (store) and the
unpin (retrieve) run when the copy completed.  There is no GPU here, so ``DeferredCopies``
stands in for one (named as a mock): it wraps the registration's real PagedKV and runs each
batch only when the test completes its ticket.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from conftest import BS, C, key, register

from kvhive.engine.transfers import RetrieveResult, StoreResult
from kvhive.errors import TransferFailed
from kvhive.transfer.backend import CopyBackend, PendingTicket

TOKENS = list(range(1, 2 * C + 1))  # 2 full chunks
BLOCKS_A = [1, 2, 3, 4]
BLOCKS_B = [10, 11, 12, 13]
HANDLE = b"E" * 64


class DeferredCopies:
    """Mock device backend (no GPU here): the real PagedKV's copies, run when the test
    finishes the ticket, as a CUDA stream would run them later."""

    def __init__(self, inner: CopyBackend) -> None:
        self.inner = inner
        self.pending: list[tuple[PendingTicket, object]] = []
        self.waited: list[bytes] = []

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def gather_async(self, chunks: Sequence, wait_event: bytes) -> PendingTicket:
        self.waited.append(wait_event)
        ticket = PendingTicket(HANDLE)
        self.pending.append((ticket, lambda: self.inner.gather_many(chunks)))
        return ticket

    def scatter_async(self, chunks: Sequence, wait_event: bytes) -> PendingTicket:
        self.waited.append(wait_event)
        ticket = PendingTicket(HANDLE)
        self.pending.append((ticket, lambda: self.inner.scatter_many(chunks)))
        return ticket

    def complete(self, error: BaseException | None = None) -> None:
        for ticket, run in self.pending:
            if error is None:
                run()  # type: ignore[operator]
            ticket.finish(error)
        self.pending.clear()


def deferred(engine, iid: int) -> DeferredCopies:
    inst = engine.registry.get(iid)
    wrapper = DeferredCopies(inst.mapping)
    inst.mapping = wrapper
    return wrapper


def hits(engine, rid: str) -> int:
    engine.lookups.lookup(key(TOKENS, 0, len(TOKENS), rid=rid, worker=None), 1)
    return engine.lookups.query_prefetch_status(rid)


def test_store_replies_with_the_event_and_commits_when_the_copy_completes(engine, make_kv):
    a = make_kv()
    register(engine, a, 1)
    dev = deferred(engine, 1)
    got = engine.transfers.store(key(TOKENS, 0, 2 * C), 1, [BLOCKS_A], b"W" * 64)
    assert got == StoreResult(2, 0, HANDLE)
    assert dev.waited == [b"W" * 64]  # the worker's event reached the copy
    assert hits(engine, "before") == 0  # reserved, not visible yet
    dev.complete()
    assert hits(engine, "after") == 2
    assert engine.l1.stats().objects == 2


def test_a_failed_store_copy_frees_its_reservations_and_is_counted(engine, make_kv):
    register(engine, make_kv(), 1)
    dev = deferred(engine, 1)
    engine.transfers.store(key(TOKENS, 0, 2 * C), 1, [BLOCKS_A], b"")
    dev.complete(TransferFailed("device copy failed (mock)"))
    assert hits(engine, "q") == 0
    assert engine.l1.stats().objects == 0
    assert engine.transfers.brackets.stats.snapshot()["store_copy_failures"] == 1
    # the same chunks can be stored again (nothing left reserved)
    inner = dev.inner
    engine.registry.get(1).mapping = inner
    assert engine.transfers.store(key(TOKENS, 0, 2 * C), 1, [BLOCKS_A], b"") == StoreResult(2, 0)


def test_retrieve_keeps_its_pin_until_the_copy_completes(engine, make_kv):
    a, b = make_kv(), make_kv()
    register(engine, a, 1)
    register(engine, b, 2)
    engine.transfers.store(key(TOKENS, 0, 2 * C), 1, [BLOCKS_A], b"")
    assert hits(engine, "q") == 2
    dev = deferred(engine, 2)
    got = engine.transfers.retrieve(key(TOKENS, 0, 2 * C, rid="q"), 2, [BLOCKS_B], b"", BS)
    assert got == RetrieveResult(2, HANDLE)
    # the lookup's locks are back, the copy's pin still holds both objects
    assert engine.l1.stats().read_locked_objects == 2
    assert not np.array_equal(a.token_rows(BLOCKS_A[1:]), b.token_rows(BLOCKS_B[1:]))
    dev.complete()
    assert engine.l1.stats().read_locked_objects == 0
    np.testing.assert_array_equal(a.token_rows(BLOCKS_A[1:]), b.token_rows(BLOCKS_B[1:]))
    assert not np.array_equal(a.token_rows(BLOCKS_A[:1]), b.token_rows(BLOCKS_B[:1]))  # skipped


def test_a_failed_retrieve_copy_unpins_and_is_counted(engine, make_kv):
    a, b = make_kv(), make_kv()
    register(engine, a, 1)
    register(engine, b, 2)
    engine.transfers.store(key(TOKENS, 0, 2 * C), 1, [BLOCKS_A], b"")
    hits(engine, "q")
    dev = deferred(engine, 2)
    engine.transfers.retrieve(key(TOKENS, 0, 2 * C, rid="q"), 2, [BLOCKS_B], b"", 0)
    dev.complete(TransferFailed("device copy failed (mock)"))
    assert engine.l1.stats().read_locked_objects == 0
    assert engine.transfers.brackets.stats.snapshot()["retrieve_copy_failures"] == 1


@pytest.mark.parametrize("op", ["store", "retrieve"])
def test_synchronous_backends_still_reply_with_an_empty_event(engine, make_kv, op):
    a, b = make_kv(), make_kv()
    register(engine, a, 1)
    register(engine, b, 2)
    stored = engine.transfers.store(key(TOKENS, 0, 2 * C), 1, [BLOCKS_A], b"stub_ipc_handle")
    assert stored.event == b""
    if op == "retrieve":
        hits(engine, "q")
        got = engine.transfers.retrieve(key(TOKENS, 0, 2 * C, rid="q"), 2, [BLOCKS_B], b"", 0)
        assert got.event == b""
        assert engine.l1.stats().read_locked_objects == 0
