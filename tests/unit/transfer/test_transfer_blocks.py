"""The native block copy (``safecopy.copy_blocks``) and how PagedKV deals batches to threads.

``copy_blocks`` is the paged-KV fast path: a plan per registration (per plane: segment,
block step, object offset, row offsets in block 0) plus one request's block ids; C
computes and checks every row address.  These tests hold it to a numpy reference for
every specialised row size, to its bounds checks (nothing moves on a bad plan) and to the
SIGBUS contract.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import numpy as np
import pytest

from kvhive.errors import TransferFailed
from kvhive.transfer import paged, safecopy
from kvhive.transfer.shm import ShmMapping
from support.shm import ShmSegment, truncate

Segment = Callable[[int], ShmSegment]
PAGE = os.sysconf("SC_PAGE_SIZE")


class Plan:
    """A random plan over two segments: P planes, Q rows of ``rb`` bytes per block."""

    def __init__(self, rng: np.random.Generator, rb: int, nq: int = 3, nbpc: int = 4) -> None:
        self.rb, self.nq, self.nbpc, self.nb = rb, nq, nbpc, 6
        self.block = nq * rb + 8  # engine bytes per block (a little padding)
        self.segs = tuple(
            rng.integers(0, 256, self.nb * self.block * 2, dtype=np.uint8) for _ in range(2)
        )
        self.planes = 3
        self.plane_seg = np.array([0, 1, 0], np.int64)
        self.plane_step = np.full(3, self.block, np.int64)
        self.plane_obj = np.arange(3, dtype=np.int64) * nbpc * nq * rb
        # rows permuted within a block; plane 2 in the second half of segment 0
        rows = np.stack([rng.permutation(nq) * rb for _ in range(3)]).astype(np.int64)
        rows[2] += self.nb * self.block
        self.statics = np.ascontiguousarray(rows.reshape(-1))
        self.obj_bytes = 3 * nbpc * nq * rb

    def args(self, obj: np.ndarray, ids: np.ndarray, first: int, to_engine: bool) -> tuple:
        units = self.planes * ids.size
        return (
            obj,
            self.segs,
            self.plane_seg,
            self.plane_step,
            self.plane_obj,
            self.statics,
            ids,
            first,
            self.nbpc,
            self.rb,
            to_engine,
            0,
            units,
        )

    def rows(self, ids: np.ndarray, first: int) -> list[tuple[int, int, int]]:
        """(segment, engine offset, object offset) of every row, the slow way."""
        out = []
        for p in range(self.planes):
            for b, bid in enumerate(ids):
                for q in range(self.nq):
                    eng = int(bid) * self.block + int(self.statics[p * self.nq + q])
                    obj = int(self.plane_obj[p]) + ((first + b) * self.nq + q) * self.rb
                    out.append((int(self.plane_seg[p]), eng, obj))
        return out


@pytest.mark.parametrize("rb", [16, 32, 48, 64, 128, 256, 512, 1024, 2048, 6, 1])
@pytest.mark.parametrize("first", [0, 1])
def test_copy_blocks_follows_the_plan(rb: int, first: int) -> None:
    check_plan(Plan(np.random.default_rng(rb), rb), rb, first)


@pytest.mark.parametrize("rb", [64, 256, 1024, 48])
def test_large_copies_use_streaming_stores_and_follow_the_plan(rb: int) -> None:
    """A call moving 1 MiB or more writes with non-temporal stores (aligned rows; the
    engine side here is misaligned by 8 bytes for odd block ids, so both paths run)."""
    plan = Plan(np.random.default_rng(rb), rb, nq=(3 << 20) // (9 * rb) + 1)
    assert 9 * plan.nq * rb >= 1 << 20  # 3 planes x 3 blocks per call
    check_plan(plan, rb, 1)


def check_plan(plan: Plan, rb: int, first: int) -> None:
    rng = np.random.default_rng(rb + 1)
    ids = np.array([5, 0, 5][: plan.nbpc - first], np.int64)
    obj = np.zeros(plan.obj_bytes, np.uint8)
    safecopy.copy_blocks(*plan.args(obj, ids, first, False), where=str)
    want = np.zeros_like(obj)
    for s, e, o in plan.rows(ids, first):
        want[o : o + rb] = plan.segs[s][e : e + rb]
    np.testing.assert_array_equal(obj, want)

    src = rng.integers(0, 256, plan.obj_bytes, dtype=np.uint8)
    ids = np.array([4, 1, 2][: plan.nbpc - first], np.int64)  # distinct: no row overwritten
    expect = [s.copy() for s in plan.segs]
    for s, e, o in plan.rows(ids, first):
        expect[s][e : e + rb] = src[o : o + rb]
    safecopy.copy_blocks(*plan.args(src, ids, first, True), where=str)
    for got, exp in zip(plan.segs, expect, strict=True):
        np.testing.assert_array_equal(got, exp)


def test_copy_blocks_copies_a_unit_range_only() -> None:
    plan = Plan(np.random.default_rng(0), 64)
    ids = np.array([3, 1], np.int64)
    whole = np.zeros(plan.obj_bytes, np.uint8)
    safecopy.copy_blocks(*plan.args(whole, ids, 0, False), where=str)
    parts = np.zeros_like(whole)
    args = list(plan.args(parts, ids, 0, False))
    for u0, u1 in ((0, 1), (1, 4), (4, 4), (4, 6)):
        args[11], args[12] = u0, u1
        safecopy.copy_blocks(*args, where=str)
    np.testing.assert_array_equal(parts, whole)


BAD: list[tuple[str, int, object, str]] = [
    ("segment index", 2, np.array([0, 2, 0], np.int64), "names segment"),
    ("negative id", 6, np.array([-1, 0], np.int64), "negative"),
    ("id past the segment", 6, np.array([0, 12], np.int64), "outside the"),
    ("negative row offset", 5, None, "outside the"),
    ("int32 ids", 6, np.array([0, 1], np.int32), "int64"),
    ("object plane past the end", 4, np.array([0, 0, 10**6], np.int64), "outside the"),
    ("more blocks than the chunk", 6, np.array([0, 1, 2, 3, 4], np.int64), "outside the chunk"),
    ("unit range", 11, 7, "outside the chunk"),
    ("first", 7, 3, "outside the chunk"),
    ("segments not a tuple", 1, [np.zeros(8, np.uint8)], "tuple"),
    ("plane arrays differ in length", 3, np.zeros(2, np.int64), "expected 3"),
]


@pytest.mark.parametrize(("what", "index", "value", "message"), BAD, ids=[b[0] for b in BAD])
def test_copy_blocks_checks_before_copying(
    what: str, index: int, value: object, message: str
) -> None:
    plan = Plan(np.random.default_rng(1), 64)
    obj = np.zeros(plan.obj_bytes, np.uint8)
    args = list(plan.args(obj, np.array([0, 1], np.int64), 0, False))
    if what == "negative row offset":
        st = plan.statics.copy()
        st[4] = -8
        args[index] = st
    elif what == "first":
        args[7] = 3  # 3 + 2 blocks > 4 per chunk
    else:
        args[index] = value
    with pytest.raises((ValueError, TypeError), match=message):
        safecopy.copy_blocks(*args, where=str)
    assert not obj.any()


def test_copy_blocks_needs_a_writable_side() -> None:
    plan = Plan(np.random.default_rng(2), 64)
    obj = np.zeros(plan.obj_bytes, np.uint8)
    obj.flags.writeable = False
    with pytest.raises((ValueError, BufferError, TypeError)):
        safecopy.copy_blocks(*plan.args(obj, np.array([0], np.int64), 0, False), where=str)
    safecopy.copy_blocks(*plan.args(obj, np.array([0], np.int64), 0, True), where=str)


@pytest.mark.parametrize("to_engine", [False, True])
def test_copy_blocks_survives_a_truncated_segment(shm_segment: Segment, to_engine: bool) -> None:
    seg = shm_segment(16 * PAGE)
    m = ShmMapping.open(seg.name, 16 * PAGE)
    try:
        obj = np.zeros(4 * PAGE, np.uint8)
        one = np.zeros(1, np.int64)
        args = [obj, (m.array,), one, np.array([PAGE], np.int64), one, np.zeros(4, np.int64)]
        args[5] = np.arange(4, dtype=np.int64) * 512  # 4 rows of 512 bytes per block
        tail = [4, 512, to_engine, 0, 4]
        ids = np.array([1, 3, 12, 2], np.int64)
        safecopy.copy_blocks(*args, ids, 0, *tail, where=lambda a: "seg")
        truncate(seg.name, 4 * PAGE)
        with pytest.raises(TransferFailed, match="'seg' no longer backs"):
            safecopy.copy_blocks(*args, ids, 0, *tail, where=lambda a: "seg")
        truncate(seg.name, 16 * PAGE)
        safecopy.copy_blocks(*args, ids, 0, *tail, where=lambda a: "seg")
    finally:
        m.close()


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("sizes", [[(5, 10)], [(3, 7), (4, 7), (1, 7)], [(1, 1)], [(7, 2), (2, 9)]])
def test_deal_covers_every_unit_once_in_balanced_parts(
    k: int, sizes: list[tuple[int, int]]
) -> None:
    """Parts hold consecutive unit ranges of the jobs, every unit exactly once, each part
    within one unit of its share of the bytes."""
    jobs = []
    for units, unit_bytes in sizes:
        plan = paged._BlockPlan(
            (),
            (),
            np.zeros(units, np.int64),
            np.zeros(units, np.int64),
            np.zeros(units, np.int64),
            np.zeros(units * unit_bytes, np.int64),
            unit_bytes,
            1,
        )
        jobs.append(paged._Job(plan, np.zeros(0, np.uint8), np.zeros(1, np.int64), 0, 1))
    parts = paged._deal(jobs, k)
    assert 1 <= len(parts) <= k
    flat = [(id(j), u0, u1) for part in parts for j, u0, u1 in part]
    want_cursor = {id(j): 0 for j in jobs}
    order = [id(j) for j in jobs]
    assert [f[0] for f in flat] == sorted((f[0] for f in flat), key=order.index)
    for jid, u0, u1 in flat:
        assert u0 == want_cursor[jid] and u1 > u0
        want_cursor[jid] = u1
    assert all(want_cursor[id(j)] == j.units for j in jobs)
    total = sum(j.units * j.unit_bytes for j in jobs)
    biggest = max(j.unit_bytes for j in jobs)
    for part in parts:
        got = sum((u1 - u0) * j.unit_bytes for j, u0, u1 in part)
        assert got <= total / k + biggest
