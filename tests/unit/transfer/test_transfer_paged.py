"""PagedKV against slow per-token reference copies, for every supported layout.

Each case allocates a fake engine KV cache in real POSIX shared memory, fills
it with random bytes and describes it the way a worker would.  ``access``
says, independently of kvhive's tables, where the vector of (kv, block, slot,
head) lives in the physical arrays.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest
from transfer_testlib import maps_of

from kvhive.errors import BadRequest, LayoutError, RegistrationError
from kvhive.transfer import paged
from kvhive.transfer.descriptors import TensorDesc
from kvhive.transfer.layouts import KVFormat
from kvhive.transfer.paged import PagedKV
from support.descriptors import contiguous_strides
from support.shm import ShmSegment

NB, BS, NH, HS, NL, C = 7, 4, 2, 3, 3, 8
B = C // BS
Segment = Callable[[int], ShmSegment]
Access = Callable[[int, int, int, int, int], np.ndarray]  # (layer, kv, block, slot, head)


@dataclass
class Engine:
    descs: list[TensorDesc]
    hints: dict[str, str]
    fmt: KVFormat
    kv_size: int
    hidden: int
    access: Access
    memory_order: list[np.ndarray]  # per layer, memory-order view (checksums)
    block_axis: int
    arrays: list[np.ndarray]  # keep-alive of the physical arrays


UDT = {1: np.uint8, 2: np.dtype("<u2"), 4: np.dtype("<u4")}
SIZES = {"bfloat16": 2, "float16": 2, "float32": 4, "float8_e4m3fn": 1}


def per_layer(
    seg: Segment, dtype: str, phys: tuple[int, ...]
) -> tuple[list[TensorDesc], list[np.ndarray]]:
    isz = SIZES[dtype]
    descs, arrays = [], []
    for _ in range(NL):
        n = math.prod(phys) * isz
        s = seg(n)
        descs.append(TensorDesc(dtype, phys, contiguous_strides(phys), 0, s.name, n))
        arrays.append(np.frombuffer(s.buf, UDT[isz])[: math.prod(phys)].reshape(phys))
    return descs, arrays


def build(case: str, seg: Segment, dtype: str = "bfloat16") -> Engine:
    isz = SIZES[dtype]
    if case in ("nhd", "hnd", "flashinfer_nhd", "flashinfer_hnd", "mla", "fused_hnd", "fused_nhd"):
        phys, hint, fmt, kv, hidden, acc, axis = {
            "nhd": (
                (2, NB, BS, NH, HS),
                "NHD",
                KVFormat.NHD,
                2,
                NH * HS,
                lambda p, k, b, s, h: p[k, b, s, h],
                1,
            ),
            "hnd": (
                (2, NB, NH, BS, HS),
                "HND",
                KVFormat.HND,
                2,
                NH * HS,
                lambda p, k, b, s, h: p[k, b, h, s],
                1,
            ),
            "flashinfer_nhd": (
                (NB, 2, BS, NH, HS),
                "NHD",
                KVFormat.FLASHINFER_NHD,
                2,
                NH * HS,
                lambda p, k, b, s, h: p[b, k, s, h],
                0,
            ),
            "flashinfer_hnd": (
                (NB, 2, NH, BS, HS),
                "HND",
                KVFormat.FLASHINFER_HND,
                2,
                NH * HS,
                lambda p, k, b, s, h: p[b, k, h, s],
                0,
            ),
            "mla": ((NB, BS, 5), "NHD", KVFormat.MLA, 1, 5, lambda p, k, b, s, h: p[b, s], 0),
            "fused_hnd": (
                (NB, NH, BS, 2 * HS),
                "HND",
                KVFormat.FUSED_HND,
                1,
                NH * 2 * HS,
                lambda p, k, b, s, h: p[b, h, s],
                0,
            ),
            "fused_nhd": (
                (NB, BS, NH, 2 * HS),
                "NHD",
                KVFormat.FUSED_NHD,
                1,
                NH * 2 * HS,
                lambda p, k, b, s, h: p[b, s, h],
                0,
            ),
        }[case]
        descs, arrays = per_layer(seg, dtype, phys)
        return Engine(
            descs,
            {"kv_layout": hint},
            fmt,
            kv,
            hidden,
            lambda li, k, b, s, h: acc(arrays[li], k, b, s, h),
            arrays,
            axis,
            arrays,
        )
    if case == "hnd_permuted_view":
        # vLLM <= 0.25 under HND: physical [2, NB, NH, BS, HS], registered as the
        # logical NHD view (a permute): the descriptor is non-contiguous.
        descs, arrays = per_layer(seg, dtype, (2, NB, NH, BS, HS))
        st = contiguous_strides((2, NB, NH, BS, HS))
        descs = [
            TensorDesc(
                dtype,
                (2, NB, BS, NH, HS),
                (st[0], st[1], st[3], st[2], st[4]),
                0,
                d.shm_name,
                d.nbytes,
            )
            for d in descs
        ]
        return Engine(
            descs,
            {"kv_layout": "HND"},
            KVFormat.HND,
            2,
            NH * HS,
            lambda li, k, b, s, h: arrays[li][k, b, h, s],
            arrays,
            1,
            arrays,
        )
    if case in ("siblings", "siblings_odd_offset"):
        # One segment holds every layer; views differ by storage_offset.
        pad = 3 if case == "siblings_odd_offset" else 0
        per = 2 * NB * BS * NH * HS
        n = (pad + NL * per) * isz
        s = seg(n)
        flat = np.frombuffer(s.buf, UDT[isz])[: pad + NL * per]
        pool = flat[pad:].reshape(NL, 2, NB, BS, NH, HS)
        shape = (2, NB, BS, NH, HS)
        descs = [
            TensorDesc(dtype, shape, contiguous_strides(shape), pad + li * per, s.name, n)
            for li in range(NL)
        ]
        layers = [pool[li] for li in range(NL)]
        return Engine(
            descs,
            {"kv_layout": "NHD"},
            KVFormat.NHD,
            2,
            NH * HS,
            lambda li, k, b, s_, h: pool[li, k, b, s_, h],
            layers,
            1,
            [flat],
        )
    if case == "blocks_first_padded":
        # Cross-layer blocks-first pool [NB, NL, 2, BS, NH, HS]; each layer is a
        # strided view whose block stride spans all layers (dim-0 padding).
        n = NB * NL * 2 * BS * NH * HS * isz
        s = seg(n)
        pool = np.frombuffer(s.buf, UDT[isz])[: n // isz].reshape(NB, NL, 2, BS, NH, HS)
        st = contiguous_strides(pool.shape)
        descs = [
            TensorDesc(
                dtype,
                (2, NB, BS, NH, HS),
                (st[2], st[0], st[3], st[4], st[5]),
                li * st[1],
                s.name,
                n,
            )
            for li in range(NL)
        ]
        return Engine(
            descs,
            {"kv_layout": "NHD"},
            KVFormat.FLASHINFER_NHD,
            2,
            NH * HS,
            lambda li, k, b, s_, h: pool[b, li, k, s_, h],
            [pool[:, li] for li in range(NL)],
            0,
            [pool],
        )
    raise AssertionError(case)


CASES = [
    "nhd",
    "hnd",
    "hnd_permuted_view",
    "flashinfer_nhd",
    "flashinfer_hnd",
    "mla",
    "fused_hnd",
    "fused_nhd",
    "siblings",
    "siblings_odd_offset",
    "blocks_first_padded",
]


def ref_gather(e: Engine, ids: list[int], dt: np.dtype) -> np.ndarray:
    nh = 1 if e.fmt is KVFormat.MLA else NH
    width = e.hidden // nh
    obj = np.zeros((e.kv_size, NL, C, e.hidden), dt)
    for k in range(e.kv_size):
        for li in range(NL):
            for t in range(C):
                for h in range(nh):
                    obj[k, li, t, h * width : (h + 1) * width] = e.access(
                        li, k, ids[t // BS], t % BS, h
                    )
    return obj


def ref_scatter(e: Engine, obj: np.ndarray, ids: list[int], skip_tokens: int) -> None:
    nh = 1 if e.fmt is KVFormat.MLA else NH
    width = e.hidden // nh
    first = (skip_tokens // BS) * BS
    for k in range(e.kv_size):
        for li in range(NL):
            for t in range(first, C):
                for h in range(nh):
                    e.access(li, k, ids[t // BS], t % BS, h)[...] = obj[
                        k, li, t, h * width : (h + 1) * width
                    ]


def snapshot(e: Engine) -> list[bytes]:
    return [np.ascontiguousarray(a).tobytes() for a in e.arrays]


def restore(e: Engine, snap: list[bytes]) -> None:
    for a, b in zip(e.arrays, snap, strict=True):
        a[...] = np.frombuffer(b, a.dtype).reshape(a.shape)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(7)


@pytest.mark.parametrize("case", CASES)
def test_geometry(case: str, shm_segment: Segment) -> None:
    e = build(case, shm_segment)
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        assert kv.kv_format is e.fmt
        assert kv.object_shape == (e.kv_size, NL, C, e.hidden)
        assert kv.object_nbytes == e.kv_size * NL * C * e.hidden * 2
        assert (kv.block_size, kv.blocks_per_chunk, kv.num_blocks, kv.dtype) == (
            BS,
            B,
            NB,
            "bfloat16",
        )


@pytest.mark.parametrize("case", CASES)
def test_gather_matches_reference(
    case: str, shm_segment: Segment, rng: np.random.Generator
) -> None:
    e = build(case, shm_segment)
    dt = np.dtype("<u2")
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        for ids in ([int(x) for x in rng.permutation(NB)[:B]], [3, 3], [0] * B, [NB - 1, 0]):
            out = np.zeros(kv.object_nbytes, np.uint8)
            kv.gather(ids, out)
            assert np.array_equal(out.view(dt).reshape(kv.object_shape), ref_gather(e, ids, dt)), (
                ids
            )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("cap", [2, 4, 6])
def test_gather_with_rows_cut_short(
    case: str,
    cap: int,
    shm_segment: Segment,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Gather rows are cut to GATHER_ROW_CAP bytes; any cut must give the same bytes."""
    monkeypatch.setattr(paged, "GATHER_ROW_CAP", cap)
    e = build(case, shm_segment)
    dt = np.dtype("<u2")
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        assert all(p.row_bytes <= cap for p in kv._gather_plans)
        ids = [int(x) for x in rng.permutation(NB)[:B]]
        out = np.zeros(kv.object_nbytes, np.uint8)
        kv.gather(ids, out)
        assert np.array_equal(out.view(dt).reshape(kv.object_shape), ref_gather(e, ids, dt))


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("skip", [0, 1, BS - 1, BS, BS + 1, C - 1, C, C + 5])
def test_scatter_matches_reference(
    case: str, skip: int, shm_segment: Segment, rng: np.random.Generator
) -> None:
    e = build(case, shm_segment)
    dt = np.dtype("<u2")
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        src = rng.integers(0, 256, kv.object_nbytes, dtype=np.uint8)
        ids = [int(x) for x in rng.permutation(NB)[:B]]
        before = snapshot(e)
        ref_scatter(e, src.view(dt).reshape(kv.object_shape), ids, skip)
        expected = snapshot(e)
        restore(e, before)
        kv.scatter(src, ids, skip_tokens=skip)
        assert snapshot(e) == expected
        if skip < BS:  # everything written: a gather reads the object back
            out = np.zeros_like(src)
            kv.gather(ids, out)
            assert np.array_equal(out, src)


@pytest.mark.parametrize("dtype", ["float32", "float8_e4m3fn", "float16"])
@pytest.mark.parametrize("case", ["hnd_permuted_view", "fused_hnd", "siblings_odd_offset"])
def test_other_element_sizes(
    case: str, dtype: str, shm_segment: Segment, rng: np.random.Generator
) -> None:
    e = build(case, shm_segment, dtype)
    dt = np.dtype(UDT[SIZES[dtype]])
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        assert (
            kv.dtype == dtype and kv.object_nbytes == e.kv_size * NL * C * e.hidden * SIZES[dtype]
        )
        ids = [int(x) for x in rng.permutation(NB)[:B]]
        out = np.zeros(kv.object_nbytes, np.uint8)
        kv.gather(ids, out)
        assert np.array_equal(out.view(dt).reshape(kv.object_shape), ref_gather(e, ids, dt))
        src = rng.integers(0, 256, kv.object_nbytes, dtype=np.uint8)
        before = snapshot(e)
        ref_scatter(e, src.view(dt).reshape(kv.object_shape), ids[::-1], BS)
        expected = snapshot(e)
        restore(e, before)
        kv.scatter(src, ids[::-1], skip_tokens=BS)
        assert snapshot(e) == expected


def test_all_null_chunk(shm_segment: Segment) -> None:
    e = build("nhd", shm_segment)
    dt = np.dtype("<u2")
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        null = [0] * B
        assert PagedKV.is_null_chunk(null) and not PagedKV.is_null_chunk([0, 1])
        assert PagedKV.is_null_chunk([5, 5], null_block_id=5)
        out = np.zeros(kv.object_nbytes, np.uint8)
        kv.gather(null, out)
        assert np.array_equal(out.view(dt).reshape(kv.object_shape), ref_gather(e, null, dt))
        # Scattering onto repeated ids must not fault; the last block written wins.
        src = np.arange(kv.object_nbytes, dtype=np.uint64).astype(np.uint8)
        kv.scatter(src, null)
        obj = src.view(dt).reshape(kv.object_shape)
        for k in range(2):
            for li in range(NL):
                assert np.array_equal(
                    e.arrays[li][k, 0].reshape(BS, -1), obj[k, li, (B - 1) * BS :]
                )


def test_layer_subset_from_group_info(shm_segment: Segment, rng: np.random.Generator) -> None:
    e = build("hnd", shm_segment)
    groups = [
        {
            "engine_group_id": 0,
            "layer_indices": [2, 0],
            "tokens_per_block": BS,
            "sw_size_tokens": -1,
        }
    ]
    with PagedKV.from_descriptors(e.descs, e.hints, groups, C) as kv:
        assert kv.object_shape == (2, 2, C, NH * HS)
        ids = [int(x) for x in rng.permutation(NB)[:B]]
        out = np.zeros(kv.object_nbytes, np.uint8)
        kv.gather(ids, out)
        full = ref_gather(e, ids, np.dtype("<u2"))
        assert np.array_equal(out.view("<u2").reshape(kv.object_shape), full[:, [0, 2]])


def test_block_id_validation(shm_segment: Segment) -> None:
    e = build("nhd", shm_segment)
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        out = np.zeros(kv.object_nbytes, np.uint8)
        for bad, match in [
            ([1], "expected 2 block ids"),
            ([1, 2, 3], "expected 2 block ids"),
            ([], "expected 2 block ids"),
            ([0, NB], f"block id {NB} outside"),
            ([-1, 0], "block id -1 outside"),
            ([0.5, 1.0], "integers"),
            ([True, False], "integers"),
            ([[0], [1]], "integers"),
        ]:
            with pytest.raises(BadRequest, match=match):
                kv.gather(bad, out)  # type: ignore[arg-type]
            with pytest.raises(BadRequest, match=match):
                kv.scatter(out, bad)  # type: ignore[arg-type]
        kv.gather(np.array([1, 2], dtype=np.uint32), out)  # numpy ids are fine
        with pytest.raises(BadRequest, match="skip_tokens"):
            kv.scatter(out, [0, 1], skip_tokens=-1)


def test_buffer_validation(shm_segment: Segment) -> None:
    e = build("nhd", shm_segment)
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        n = kv.object_nbytes
        with pytest.raises(ValueError, match="bytes"):
            kv.gather([0, 1], np.zeros(n - 1, np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            kv.gather([0, 1], np.zeros(n // 2, np.uint16))
        with pytest.raises(ValueError, match="contiguous"):
            kv.gather([0, 1], np.zeros(2 * n, np.uint8)[::2])
        ro = np.zeros(n, np.uint8)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="writable"):
            kv.gather([0, 1], ro)
        kv.scatter(ro, [0, 1])  # read-only sources are fine
        kv.gather([0, 1], np.zeros((2, n // 2), np.uint8))  # any C-contiguous shape


def test_chunk_size_must_be_whole_blocks(shm_segment: Segment) -> None:
    e = build("nhd", shm_segment)
    with pytest.raises(LayoutError, match="multiple of the block size"):
        PagedKV.from_descriptors(e.descs, e.hints, [], BS + 1)
    with pytest.raises(LayoutError, match="positive"):
        PagedKV.from_descriptors(e.descs, e.hints, [], 0)
    assert all(maps_of(d.shm_name) == 1 for d in e.descs)  # only the creator's mapping left


def test_missing_segment_fails_cleanly(shm_segment: Segment) -> None:
    e = build("nhd", shm_segment)
    descs = [
        *e.descs[:2],
        TensorDesc(
            "bfloat16",
            e.descs[0].shape,
            e.descs[0].stride,
            0,
            "kvhive_no_such_seg",
            e.descs[0].nbytes,
        ),
    ]
    with pytest.raises(RegistrationError, match="does not exist"):
        PagedKV.from_descriptors(descs, e.hints, [], C)
    assert all(maps_of(d.shm_name) == 1 for d in e.descs[:2])  # nothing left mapped


def test_close_unmaps_every_segment(shm_segment: Segment) -> None:
    e = build("siblings", shm_segment)
    f = build("hnd", shm_segment)
    name = e.descs[0].shm_name
    kv = PagedKV.from_descriptors(e.descs, e.hints, [], C)
    kv2 = PagedKV.from_descriptors(e.descs, e.hints, [], C)  # a second registration
    kv3 = PagedKV.from_descriptors(f.descs, f.hints, [], C)
    assert kv.segment_names == [name]
    assert maps_of(name) == 1 + 2  # creator + one mapping per registration, siblings shared
    assert all(maps_of(d.shm_name) == 2 for d in f.descs)
    kv.gather([1, 2], np.zeros(kv.object_nbytes, np.uint8))
    kv.close()
    assert maps_of(name) == 2 and kv.closed
    kv.close()  # idempotent
    with pytest.raises(RegistrationError, match="closed"):
        kv.gather([1, 2], np.zeros(kv.object_nbytes, np.uint8))
    with pytest.raises(RegistrationError, match="closed"):
        kv.checksums([1], 1)
    kv2.gather([1, 2], np.zeros(kv2.object_nbytes, np.uint8))  # unaffected
    kv2.close()
    kv3.close()
    assert maps_of(name) == 1 and all(maps_of(d.shm_name) == 1 for d in f.descs)


# -- checksums ---------------------------------------------------------------


def slow_bytes(arr: np.ndarray, bf16: bool) -> bytes:
    """C-order bytes, bf16 widened to fp32 bit by bit (as torch does)."""
    if not bf16:
        return np.ascontiguousarray(arr).tobytes()
    out = bytearray()
    for v in np.ascontiguousarray(arr).reshape(-1).tolist():
        out += (int(v) << 16).to_bytes(4, "little")
    return bytes(out)


def slow_checksums(e: Engine, ids: list[int], per: int, layerwise: bool, bf16: bool):
    import hashlib

    chunks = [ids[i : i + per] for i in range(0, len(ids), per)]

    def part(li: int, chunk: list[int]) -> bytes:
        m = e.memory_order[li]
        sel = np.stack([np.take(m, b, axis=e.block_axis) for b in chunk], axis=e.block_axis)
        return slow_bytes(sel, bf16)

    if layerwise:
        return {
            f"layer_{li}": [hashlib.md5(part(li, c)).hexdigest() for c in chunks]
            for li in range(NL)
        }
    out = []
    for c in chunks:
        h = hashlib.md5()
        for li in range(NL):
            h.update(part(li, c))
        out.append(h.hexdigest())
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("layerwise", [False, True])
def test_checksums_match_independent_md5(case: str, layerwise: bool, shm_segment: Segment) -> None:
    e = build(case, shm_segment)
    ids = [5, 0, 3, 3, 6, 1, 2]  # 7 blocks, chunks of 3: the last one is short
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        got = kv.checksums(ids, 3, layerwise)
        assert got == slow_checksums(e, ids, 3, layerwise, bf16=True)
        if layerwise:
            assert isinstance(got, dict) and sorted(got) == [f"layer_{li}" for li in range(NL)]
            assert all(len(v) == 3 for v in got.values())
        else:
            assert isinstance(got, list) and len(got) == 3


def test_checksums_float_dtype_hashes_raw_bytes(shm_segment: Segment) -> None:
    e = build("hnd", shm_segment, "float32")
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        assert kv.checksums([1, 2, 4], 2) == slow_checksums(e, [1, 2, 4], 2, False, bf16=False)


def test_checksums_track_scatter(shm_segment: Segment, rng: np.random.Generator) -> None:
    e = build("nhd", shm_segment)
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        obj = np.zeros(kv.object_nbytes, np.uint8)
        kv.gather([1, 2], obj)
        cold = kv.checksums([1, 2], B)
        kv.scatter(rng.integers(0, 256, kv.object_nbytes, dtype=np.uint8), [1, 2])
        assert kv.checksums([1, 2], B) != cold
        kv.scatter(obj, [1, 2])
        assert kv.checksums([1, 2], B) == cold


def test_checksum_validation(shm_segment: Segment) -> None:
    e = build("nhd", shm_segment)
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        with pytest.raises(BadRequest, match="block_ids is required"):
            kv.checksums([], 2)
        with pytest.raises(BadRequest, match="positive"):
            kv.checksums([1], 0)
        with pytest.raises(BadRequest, match="outside"):
            kv.checksums([1, NB], 2)
        with pytest.raises(BadRequest, match="integer"):
            kv.checksums([1], 1.5)  # type: ignore[arg-type]


def test_close_races_with_copies(shm_segment: Segment) -> None:
    """Unregistering while another thread copies: no fault, copies stop cleanly."""
    e = build("hnd", shm_segment)
    kv = PagedKV.from_descriptors(e.descs, e.hints, [], C)
    out = np.zeros(kv.object_nbytes, np.uint8)
    copies = [0]

    def worker() -> None:
        while True:
            try:
                kv.gather([1, 2], out)
                kv.scatter(out, [3, 4])
            except RegistrationError:
                return
            copies[0] += 1

    th = threading.Thread(target=worker)
    th.start()
    while copies[0] < 20:
        time.sleep(0.001)
    kv.close()
    th.join(timeout=10)
    assert not th.is_alive()
    assert all(maps_of(d.shm_name) == 1 for d in e.descs)


def test_default_kv_layout_without_hint(shm_segment: Segment) -> None:
    e = build("fused_nhd", shm_segment)
    with PagedKV.from_descriptors(e.descs, {}, [], C) as kv:
        assert kv.kv_format is KVFormat.FUSED_HND  # the reference CPU server's default
    with PagedKV.from_descriptors(e.descs, {}, [], C, default_kv_layout="NHD") as kv:
        assert kv.kv_format is KVFormat.FUSED_NHD


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("threads", [1, 2])
def test_many_chunks_in_one_batch_match_the_reference(
    case: str,
    threads: int,
    shm_segment: Segment,
    rng: np.random.Generator,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """gather_many/scatter_many (one request's chunks, dealt to the copy threads) move the
    same bytes as the per-chunk reference; skip_tokens applies per chunk."""
    monkeypatch.setattr(paged, "COPY_THREADS", threads)
    monkeypatch.setattr(paged, "PARALLEL_MIN_BYTES", 0)  # deal even tiny batches
    e = build(case, shm_segment)
    dt = np.dtype("<u2")
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        perm = [int(x) for x in rng.permutation(NB)]
        chunks = [perm[0:B], perm[B : 2 * B], [perm[-1]] * B]
        outs = [np.zeros(kv.object_nbytes, np.uint8) for _ in chunks]
        kv.gather_many(list(zip(chunks, outs, strict=True)))
        for ids, out in zip(chunks, outs, strict=True):
            assert np.array_equal(out.view(dt).reshape(kv.object_shape), ref_gather(e, ids, dt))

        srcs = [rng.integers(0, 256, kv.object_nbytes, dtype=np.uint8) for _ in chunks[:2]]
        skips = [BS + 1, 0]
        before = snapshot(e)
        for src, ids, skip in zip(srcs, chunks, skips, strict=False):
            ref_scatter(e, src.view(dt).reshape(kv.object_shape), ids, skip)
        expected = snapshot(e)
        restore(e, before)
        kv.scatter_many(list(zip(srcs, chunks, skips, strict=False)))
        assert snapshot(e) == expected


def test_a_helper_that_has_not_started_never_holds_the_batch_up(
    shm_segment: Segment, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The copy threads share a batch piece by piece: with the helper stuck elsewhere (a
    vCPU slow to wake), the caller copies every piece itself and returns without waiting
    for it; the helper's job, cancelled before it started, never touches the buffers."""
    from concurrent.futures import ThreadPoolExecutor

    monkeypatch.setattr(paged, "COPY_THREADS", 2)
    monkeypatch.setattr(paged, "PARALLEL_MIN_BYTES", 0)
    monkeypatch.setattr(paged, "SHARE_PIECE_BYTES", 1)  # a piece per unit
    stuck = ThreadPoolExecutor(max_workers=1)
    release = threading.Event()
    stuck.submit(release.wait, 10)  # the only helper thread is busy
    monkeypatch.setattr(paged, "_helper_pool", lambda: stuck)
    e = build("hnd", shm_segment)
    dt = np.dtype("<u2")
    try:
        with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
            ids = [int(x) for x in rng.permutation(NB)[:B]]
            out = np.zeros(kv.object_nbytes, np.uint8)
            t0 = time.monotonic()
            kv.gather_many([(ids, out)])
            assert time.monotonic() - t0 < 5  # did not wait for the stuck helper
            assert np.array_equal(out.view(dt).reshape(kv.object_shape), ref_gather(e, ids, dt))
            before = snapshot(e)
            out[:] = 0  # a cancelled job that still ran would copy into it again
            release.set()  # the helper's cancelled job must not run now
            stuck.shutdown(wait=True)
            assert not out.any()
            assert snapshot(e) == before
    finally:
        release.set()
        stuck.shutdown(wait=False)


def test_a_batch_is_checked_before_any_byte_moves(shm_segment: Segment) -> None:
    e = build("hnd", shm_segment)
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as kv:
        good = np.zeros(kv.object_nbytes, np.uint8)
        with pytest.raises(BadRequest):
            kv.gather_many([([0, 1], good), ([0, NB], np.zeros_like(good))])
        assert not good.any()
        before = snapshot(e)
        with pytest.raises(BadRequest):
            kv.scatter_many([(good + 1, [0, 1], 0), (good, [0, 1], -1)])
        assert snapshot(e) == before
        kv.gather_many([])  # nothing to do
        kv.scatter_many([(good, [0, 1], C)])  # every block skipped
        assert snapshot(e) == before
