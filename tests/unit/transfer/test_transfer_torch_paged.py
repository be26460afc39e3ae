"""TorchPagedKV against PagedKV: the same KV cache, the same bytes, for every layout.

Each case builds a fake engine KV cache with the PagedKV tests' builders (real POSIX shared
memory, every supported layout) and a byte-identical copy of every segment as a torch CPU
tensor, described by the same descriptors (``storage_kind="device"``, as the CUDA opener
makes them).  Both backends store and retrieve the same random block tables; objects and
pages must agree byte for byte.  Torch CPU tensors stand in for device tensors (no GPU
here); the CUDA round trip at the end runs only where CUDA is available.
"""

from __future__ import annotations

import dataclasses
import pathlib
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from test_transfer_paged import BS, CASES, NB, B, C, Engine, Segment, build  # noqa: E402

from kvhive.errors import BadRequest, LayoutError, RegistrationError  # noqa: E402
from kvhive.transfer.backend import (  # noqa: E402
    DONE,
    AsyncCopyBackend,
    CopyBackend,
    gather_batch,
    scatter_batch,
)
from kvhive.transfer.descriptors import TensorDesc  # noqa: E402
from kvhive.transfer.paged import PagedKV  # noqa: E402
from kvhive.transfer.torch_paged import TorchPagedKV  # noqa: E402
from support.descriptors import contiguous_strides  # noqa: E402
from support.paths import env_with_src  # noqa: E402

SKIPS = [0, 1, BS - 1, BS, BS + 1, C - 1, C, C + 5]


@dataclass(frozen=True, slots=True)
class FakeOpenedLayer:
    """What the CUDA opener hands over: a descriptor and the tensor it describes."""

    desc: TensorDesc
    tensor: Any


@dataclass
class TorchTwin:
    """A byte-identical copy of an Engine's segments as torch CPU tensors."""

    storages: dict[str, Any]  # segment name -> flat uint8 tensor
    layers: list[FakeOpenedLayer]

    def pages(self) -> dict[str, bytes]:
        return {name: s.numpy().tobytes() for name, s in self.storages.items()}


def segment_bytes(name: str) -> bytes:
    return pathlib.Path(f"/dev/shm/{name}").read_bytes()


def twin_of(e: Engine) -> TorchTwin:
    storages: dict[str, Any] = {}
    layers = []
    for k, d in enumerate(e.descs):
        if d.shm_name not in storages:
            storages[d.shm_name] = torch.frombuffer(
                bytearray(segment_bytes(d.shm_name)), dtype=torch.uint8
            )
        u8 = storages[d.shm_name]
        typed = u8[: len(u8) // d.itemsize * d.itemsize].view(getattr(torch, d.dtype))
        tensor = torch.as_strided(typed, d.shape, d.stride, d.storage_offset)
        desc = dataclasses.replace(d, storage_kind="device", shm_name=f"cpu:0/{k}")
        layers.append(FakeOpenedLayer(desc, tensor))
    return TorchTwin(storages, layers)


def paged_pages(e: Engine, twin: TorchTwin) -> dict[str, bytes]:
    return {name: segment_bytes(name)[: len(s)] for name, s in twin.storages.items()}


def make(e: Engine, twin: TorchTwin, **kw: Any) -> TorchPagedKV:
    return TorchPagedKV.from_layers(twin.layers, e.hints, [], C, **kw)


def random_tables(rng: np.random.Generator, n: int) -> list[list[int]]:
    """``n`` chunks' block ids, repeats within and across chunks included."""
    return [[int(x) for x in rng.integers(0, NB, B)] for _ in range(n)]


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(11)


def test_backend_protocols(shm_segment: Segment) -> None:
    e = build("nhd", shm_segment)
    twin = twin_of(e)
    with make(e, twin) as kv, PagedKV.from_descriptors(e.descs, e.hints, [], C) as ref:
        assert isinstance(kv, CopyBackend) and isinstance(kv, AsyncCopyBackend)
        assert (kv.object_shape, kv.object_nbytes, kv.dtype, kv.blocks_per_chunk) == (
            ref.object_shape,
            ref.object_nbytes,
            ref.dtype,
            ref.blocks_per_chunk,
        )
        assert (kv.kv_format, kv.num_blocks, kv.block_size) == (ref.kv_format, NB, BS)
        assert kv.segment_owners == () and kv.device == "cpu"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [1, 16])
def test_store_matches_paged(
    case: str, n: int, shm_segment: Segment, rng: np.random.Generator
) -> None:
    e = build(case, shm_segment)
    twin = twin_of(e)
    with make(e, twin) as kv, PagedKV.from_descriptors(e.descs, e.hints, [], C) as ref:
        tables = random_tables(rng, n)
        want = [np.zeros(ref.object_nbytes, np.uint8) for _ in tables]
        got = [np.full(kv.object_nbytes, 0xAA, np.uint8) for _ in tables]
        ref.gather_many(list(zip(tables, want, strict=True)))
        kv.gather_many(list(zip(tables, got, strict=True)))
        for ids, w, g in zip(tables, want, got, strict=True):
            assert np.array_equal(w, g), ids
        one = np.zeros(kv.object_nbytes, np.uint8)
        kv.gather(tables[0], one)
        assert np.array_equal(one, want[0])
        assert paged_pages(e, twin) == twin.pages()  # a store changes no page


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("n", [1, 16])
def test_retrieve_matches_paged(
    case: str, n: int, shm_segment: Segment, rng: np.random.Generator
) -> None:
    e = build(case, shm_segment)
    twin = twin_of(e)
    with make(e, twin) as kv, PagedKV.from_descriptors(e.descs, e.hints, [], C) as ref:
        for skips in ([int(s) for s in rng.choice(SKIPS, n)], [0] * n):
            tables = random_tables(rng, n)
            srcs = [rng.integers(0, 256, kv.object_nbytes, dtype=np.uint8) for _ in tables]
            batch = list(zip(srcs, tables, skips, strict=True))
            before = twin.pages()
            ref.scatter_many(batch)
            kv.scatter_many(batch)
            after = twin.pages()
            assert paged_pages(e, twin) == after, skips
            assert (after != before) == any(s < C for s in skips)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("skip", SKIPS)
def test_single_retrieve_with_skip(
    case: str, skip: int, shm_segment: Segment, rng: np.random.Generator
) -> None:
    e = build(case, shm_segment)
    twin = twin_of(e)
    with make(e, twin) as kv, PagedKV.from_descriptors(e.descs, e.hints, [], C) as ref:
        src = rng.integers(0, 256, kv.object_nbytes, dtype=np.uint8)
        ids = [int(x) for x in rng.permutation(NB)[:B]]
        before = twin.pages()
        ref.scatter(src, ids, skip_tokens=skip)
        kv.scatter(src, ids, skip_tokens=skip)
        assert paged_pages(e, twin) == twin.pages()
        assert (twin.pages() == before) == (skip >= C)


@pytest.mark.parametrize("dtype", ["float32", "float8_e4m3fn", "float16"])
@pytest.mark.parametrize("case", ["hnd_permuted_view", "fused_hnd", "siblings_odd_offset", "mla"])
def test_other_element_sizes(
    case: str, dtype: str, shm_segment: Segment, rng: np.random.Generator
) -> None:
    e = build(case, shm_segment, dtype)
    twin = twin_of(e)
    with make(e, twin) as kv, PagedKV.from_descriptors(e.descs, e.hints, [], C) as ref:
        assert kv.dtype == dtype and kv.object_nbytes == ref.object_nbytes
        tables = random_tables(rng, 4)
        want = [np.zeros(ref.object_nbytes, np.uint8) for _ in tables]
        got = [np.zeros(kv.object_nbytes, np.uint8) for _ in tables]
        ref.gather_many(list(zip(tables, want, strict=True)))
        kv.gather_many(list(zip(tables, got, strict=True)))
        assert all(np.array_equal(w, g) for w, g in zip(want, got, strict=True))
        # random bytes: NaN payloads and signalling NaNs must survive (bit copies)
        srcs = [rng.integers(0, 256, kv.object_nbytes, dtype=np.uint8) for _ in tables]
        batch = list(zip(srcs, tables, [0, BS, 1, C - 1], strict=True))
        ref.scatter_many(batch)
        kv.scatter_many(batch)
        assert paged_pages(e, twin) == twin.pages()


@pytest.mark.parametrize("objects", [1, 3])
@pytest.mark.parametrize("case", ["hnd", "flashinfer_nhd", "mla", "blocks_first_padded"])
def test_staging_smaller_than_the_batch(
    case: str, objects: int, shm_segment: Segment, rng: np.random.Generator
) -> None:
    e = build(case, shm_segment)
    twin = twin_of(e)
    with PagedKV.from_descriptors(e.descs, e.hints, [], C) as ref:
        staging = objects * ref.object_nbytes + ref.object_nbytes // 2  # not a whole number
        with make(e, twin, staging_bytes=staging) as kv:
            assert kv._pipe is not None and kv._pipe.capacity == objects
            tables = random_tables(rng, 16)
            want = [np.zeros(ref.object_nbytes, np.uint8) for _ in tables]
            got = [np.zeros(kv.object_nbytes, np.uint8) for _ in tables]
            ref.gather_many(list(zip(tables, want, strict=True)))
            kv.gather_many(list(zip(tables, got, strict=True)))
            assert all(np.array_equal(w, g) for w, g in zip(want, got, strict=True))
            srcs = [rng.integers(0, 256, kv.object_nbytes, dtype=np.uint8) for _ in tables]
            skips = [int(s) for s in rng.choice(SKIPS, 16)]
            batch = list(zip(srcs, tables, skips, strict=True))
            ref.scatter_many(batch)
            kv.scatter_many(batch)
            assert paged_pages(e, twin) == twin.pages()
    with make(e, twin, staging_bytes=1) as kv:  # always room for one object
        assert kv._pipe is not None and kv._pipe.capacity == 1


def test_repeated_ids_last_write_wins(shm_segment: Segment) -> None:
    e = build("nhd", shm_segment)
    twin = twin_of(e)
    with make(e, twin) as kv, PagedKV.from_descriptors(e.descs, e.hints, [], C) as ref:
        srcs = [np.full(kv.object_nbytes, v, np.uint8) for v in (1, 2, 3)]
        batch = [(srcs[0], [0, 0], 0), (srcs[1], [5, 0], 0), (srcs[2], [0, 5], BS)]
        ref.scatter_many(batch)
        kv.scatter_many(batch)
        assert paged_pages(e, twin) == twin.pages()
        layer0 = e.descs[0].shm_name
        k_block0 = twin.storages[layer0][: BS * 6 * 2]  # kv 0, block 0 (NHD, bf16)
        assert set(k_block0.tolist()) == {2}  # chunk 1, block 1 was the last to write block 0


def test_layer_subset_from_group_info(shm_segment: Segment, rng: np.random.Generator) -> None:
    e = build("hnd", shm_segment)
    twin = twin_of(e)
    groups = [
        {
            "engine_group_id": 0,
            "layer_indices": [2, 0],
            "tokens_per_block": BS,
            "sw_size_tokens": -1,
        }
    ]
    with (
        TorchPagedKV.from_layers(twin.layers, e.hints, groups, C) as kv,
        PagedKV.from_descriptors(e.descs, e.hints, groups, C) as ref,
    ):
        assert kv.object_shape == ref.object_shape == (2, 2, C, 6)
        tables = random_tables(rng, 3)
        want = [np.zeros(ref.object_nbytes, np.uint8) for _ in tables]
        got = [np.zeros(kv.object_nbytes, np.uint8) for _ in tables]
        ref.gather_many(list(zip(tables, want, strict=True)))
        kv.gather_many(list(zip(tables, got, strict=True)))
        assert all(np.array_equal(w, g) for w, g in zip(want, got, strict=True))
        batch = [(rng.integers(0, 256, kv.object_nbytes, dtype=np.uint8), t, 0) for t in tables]
        ref.scatter_many(batch)
        kv.scatter_many(batch)
        assert paged_pages(e, twin) == twin.pages()


def test_default_kv_layout_is_the_gpu_servers(shm_segment: Segment) -> None:
    e = build("fused_nhd", shm_segment)
    twin = twin_of(e)
    with TorchPagedKV.from_layers(twin.layers, {}, [], C) as kv:
        assert kv.kv_format.name == "FUSED_NHD"
    with TorchPagedKV.from_layers(twin.layers, {}, [], C, default_kv_layout="HND") as kv:
        assert kv.kv_format.name == "FUSED_HND"


BAD_IDS: list[tuple[object, str]] = [
    ([1], "expected 2 block ids"),
    ([1, 2, 3], "expected 2 block ids"),
    ([], "expected 2 block ids"),
    ([0, NB], f"block id {NB} outside"),
    ([-1, 0], "block id -1 outside"),
    ([0.5, 1.0], "integers"),
    ([True, False], "integers"),
    ([[0], [1]], "integers"),
]


def test_bad_requests_move_no_byte(shm_segment: Segment) -> None:
    e = build("hnd", shm_segment)
    twin = twin_of(e)
    with make(e, twin) as kv:
        good = np.zeros(kv.object_nbytes, np.uint8)
        before = twin.pages()
        for bad, match in BAD_IDS:
            with pytest.raises(BadRequest, match=match):
                kv.gather_many([([0, 1], good), (bad, np.zeros_like(good))])  # type: ignore[list-item]
            with pytest.raises(BadRequest, match=match):
                kv.scatter_many([(good + 1, [0, 1], 0), (good, bad, 0)])  # type: ignore[list-item]
            with pytest.raises(BadRequest, match=match):
                kv.gather_async([(bad, good)], b"")  # type: ignore[list-item]
        assert not good.any() and twin.pages() == before
        for skip in (-1, 1.5, True):
            with pytest.raises(BadRequest, match="skip_tokens"):
                kv.scatter_many([(good + 1, [0, 1], 0), (good, [0, 1], skip)])  # type: ignore[list-item]
        assert twin.pages() == before
        with pytest.raises(ValueError, match="bytes"):
            kv.gather([0, 1], np.zeros(kv.object_nbytes - 1, np.uint8))
        with pytest.raises(ValueError, match="uint8"):
            kv.gather([0, 1], np.zeros(kv.object_nbytes // 2, np.uint16))
        with pytest.raises(ValueError, match="contiguous"):
            kv.gather([0, 1], np.zeros(2 * kv.object_nbytes, np.uint8)[::2])
        ro = np.ones(kv.object_nbytes, np.uint8)
        ro.flags.writeable = False
        with pytest.raises(ValueError, match="writable"):
            kv.gather([0, 1], ro)
        kv.scatter(ro, [0, 1])  # read-only sources are fine
        kv.gather(np.array([1, 2], dtype=np.uint32), good)  # numpy ids are fine
        assert gather_batch(kv, [], b"") is DONE and scatter_batch(kv, [], b"") is DONE
        assert scatter_batch(kv, [(good, [0, 1], C)], b"") is DONE  # every block skipped


def test_async_entry_points_on_cpu_complete_at_once(
    shm_segment: Segment, rng: np.random.Generator
) -> None:
    e = build("nhd", shm_segment)
    twin = twin_of(e)
    with make(e, twin) as kv, PagedKV.from_descriptors(e.descs, e.hints, [], C) as ref:
        out, want = np.zeros(kv.object_nbytes, np.uint8), np.zeros(kv.object_nbytes, np.uint8)
        ticket = gather_batch(kv, [([3, 4], out)], b"stub_ipc_handle")
        assert ticket.handle == b""
        ticket.wait(0)
        ref.gather([3, 4], want)
        assert np.array_equal(out, want)
        src = rng.integers(0, 256, kv.object_nbytes, dtype=np.uint8)
        assert scatter_batch(kv, [(src, [3, 4], 1)], b"stub_ipc_handle").handle == b""
        ref.scatter(src, [3, 4], 1)
        assert paged_pages(e, twin) == twin.pages()


class MockCopyEvents:
    """Stand-in for the CUDA event helper (named as a mock: no GPU here).

    ``record`` returns a :class:`MockRecordedEvent` the test completes by hand; waits on
    worker handles are logged.
    """

    def __init__(self) -> None:
        self.waited: list[bytes] = []
        self.recorded: list[MockRecordedEvent] = []

    def wait_for_worker(self, handle: bytes, stream: Any) -> None:
        self.waited.append(handle)

    def record(self, stream: Any) -> MockRecordedEvent:
        ev = MockRecordedEvent(f"event-{len(self.recorded)}".encode())
        self.recorded.append(ev)
        return ev


class MockRecordedEvent:
    """Stand-in for a recorded interprocess CUDA event (named as a mock: no GPU here)."""

    def __init__(self, handle: bytes) -> None:
        self.handle = handle
        self.fired = threading.Event()

    def synchronize(self) -> None:
        assert self.fired.wait(10), "the test never completed this event"

    def query(self) -> bool:
        return self.fired.is_set()


class Owner:
    """Records closes (the IPC mappings' owner)."""

    def __init__(self) -> None:
        self.closes = 0

    def close(self) -> None:
        self.closes += 1


def test_ticket_path_with_stand_in_events(shm_segment: Segment) -> None:
    """The asynchronous path on CPU tensors: the worker's event is waited on, the ticket
    carries the recorded event's handle and finishes when that event completes; close()
    waits for the batch in flight, then closes the owner once."""
    e = build("hnd", shm_segment)
    twin = twin_of(e)
    events, owner = MockCopyEvents(), Owner()
    kv = make(e, twin, events=events, owner=owner, async_completion=True)
    out = np.zeros(kv.object_nbytes, np.uint8)
    seen: list[BaseException | None] = []
    ticket = gather_batch(kv, [([1, 2], out)], b"worker-event")
    ticket.add_done_callback(seen.append)
    assert events.waited == [b"worker-event"] and ticket.handle == b"event-0"
    with pytest.raises(TimeoutError):
        ticket.wait(0.05)
    closer = threading.Thread(target=kv.close)
    closer.start()
    time.sleep(0.1)
    assert closer.is_alive() and owner.closes == 0  # waits for the copy in flight
    with pytest.raises(RegistrationError, match="closed"):
        kv.gather_async([([1, 2], out)], b"")  # no new batch once close began
    events.recorded[0].fired.set()
    closer.join(10)
    assert not closer.is_alive() and owner.closes == 1
    ticket.wait(10)
    assert seen == [None]
    kv.close()
    assert owner.closes == 1
    assert kv._done is not None and kv._done.join(10)


def test_async_needs_an_event_helper(shm_segment: Segment) -> None:
    e = build("nhd", shm_segment)
    owner = Owner()
    with pytest.raises(RegistrationError, match="event helper"):
        make(e, twin_of(e), async_completion=True, owner=owner)
    assert owner.closes == 1  # a failed registration closes what it was handed


def test_closed_backend(shm_segment: Segment) -> None:
    e = build("siblings", shm_segment)
    twin = twin_of(e)
    owner = Owner()
    kv = make(e, twin, owner=owner)
    out = np.zeros(kv.object_nbytes, np.uint8)
    kv.gather([1, 2], out)
    kv.close()
    assert kv.closed and owner.closes == 1
    kv.close()
    assert owner.closes == 1
    with pytest.raises(RegistrationError, match="closed"):
        kv.gather([1, 2], out)
    with pytest.raises(RegistrationError, match="closed"):
        kv.scatter_many([(out, [1, 2], 0)])
    with pytest.raises(BadRequest):  # validation still comes first
        kv.gather([1, NB], out)


def test_close_races_with_copies(shm_segment: Segment) -> None:
    e = build("hnd", shm_segment)
    kv = make(e, twin_of(e))
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


def test_registration_errors(shm_segment: Segment) -> None:
    e = build("nhd", shm_segment)
    twin = twin_of(e)
    with pytest.raises(LayoutError, match="multiple of the block size"):
        make_with_chunk(e, twin, BS + 1)
    with pytest.raises(LayoutError, match="positive"):
        make_with_chunk(e, twin, 0)
    wrong = list(twin.layers)
    wrong[1] = FakeOpenedLayer(wrong[1].desc, wrong[1].tensor.transpose(2, 3))
    with pytest.raises(RegistrationError, match="does not match its descriptor"):
        TorchPagedKV.from_layers(wrong, e.hints, [], C)
    other = list(twin.layers)
    other[0] = FakeOpenedLayer(other[0].desc, other[0].tensor.to(torch.float32))
    with pytest.raises(RegistrationError, match="4-byte elements, not bfloat16"):
        TorchPagedKV.from_layers(other, e.hints, [], C)
    other[0] = FakeOpenedLayer(other[0].desc, twin.layers[0].tensor.view(torch.float16))
    TorchPagedKV.from_layers(other, e.hints, [], C).close()  # same width: a bit copy


def make_with_chunk(e: Engine, twin: TorchTwin, chunk: int) -> TorchPagedKV:
    return TorchPagedKV.from_layers(twin.layers, e.hints, [], chunk)


def test_a_smollm2_sized_batch_is_not_slow(rng: np.random.Generator) -> None:
    """SmolLM2-135M geometry (30 layers, 3 KV heads of 64, bf16, vLLM blocks of 16): a
    16-chunk request both ways well under a second each (CPU tensors, no GPU timing)."""
    nl, nb, bs, nh, hs, chunk = 30, 320, 16, 3, 64, 256
    shape = (2, nb, bs, nh, hs)
    layers = []
    for i in range(nl):
        t = torch.from_numpy(rng.integers(-(2**15), 2**15, shape, dtype=np.int16)).view(
            torch.bfloat16
        )
        desc = TensorDesc(
            "bfloat16", shape, contiguous_strides(shape), 0, f"cpu:0/{i}", t.numel() * 2, "device"
        )
        layers.append(FakeOpenedLayer(desc, t))
    with TorchPagedKV.from_layers(layers, {"kv_layout": "NHD"}, [], chunk) as kv:
        assert kv.object_nbytes == 2 * nl * chunk * nh * hs * 2
        tables = [[int(x) for x in rng.permutation(nb)[: chunk // bs]] for _ in range(16)]
        outs = [np.empty(kv.object_nbytes, np.uint8) for _ in tables]
        kv.gather_many(list(zip(tables, outs, strict=True)))  # warm-up
        t0 = time.perf_counter()
        kv.gather_many(list(zip(tables, outs, strict=True)))
        store = time.perf_counter() - t0
        t0 = time.perf_counter()
        kv.scatter_many([(o, t, 0) for o, t in zip(outs, tables, strict=True)])
        retrieve = time.perf_counter() - t0
    assert store < 1.0 and retrieve < 1.0, (store, retrieve)
    # spot check one token: object [kv, layer, t, h*hs + d] = layer[kv, block, slot, h, d]
    obj = outs[3].view(np.int16).reshape(2, nl, chunk, nh * hs)
    block = tables[3][37 // bs]
    engine = layers[7].tensor.view(torch.int16).numpy()
    assert np.array_equal(obj[1, 7, 37], engine[1, block, 37 % bs].reshape(-1))


@pytest.mark.parametrize(
    "code",
    [
        "import sys, kvhive.cli.serve, kvhive.server, kvhive.engine, kvhive.transfer\n"
        "assert 'kvhive.transfer.torch_paged' not in sys.modules, 'imported at start'\n",
        "import sys, kvhive.transfer.torch_paged\n"
        "assert 'torch' not in sys.modules, 'torch imported with the module'\n",
    ],
    ids=["server-start", "module-import"],
)
def test_torch_is_imported_only_when_a_device_registration_arrives(code: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env=env_with_src(),
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]


# -- CUDA (skipped without a GPU) ------------------------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


class TrivialCudaEvents:
    """The event helper reduced to one process: records interprocess events; a worker
    handle names an event this process recorded (both sides are this test)."""

    def __init__(self) -> None:
        self.by_handle: dict[bytes, Any] = {}

    def wait_for_worker(self, handle: bytes, stream: Any) -> None:
        stream.wait_event(self.by_handle[handle].event)

    def record(self, stream: Any) -> Any:
        ev = torch.cuda.Event(interprocess=True)
        ev.record(stream)
        rec = RecordedCudaEvent(ev, bytes(ev.ipc_handle()))
        self.by_handle[rec.handle] = rec
        return rec


@dataclass
class RecordedCudaEvent:
    event: Any
    handle: bytes

    def synchronize(self) -> None:
        self.event.synchronize()

    def query(self) -> bool:
        return bool(self.event.query())


@cuda
@pytest.mark.parametrize("case", CASES)
def test_cuda_round_trip_matches_paged(
    case: str, shm_segment: Segment, rng: np.random.Generator
) -> None:
    e = build(case, shm_segment)
    twin = twin_of(e)
    dev = torch.device("cuda", 0)
    on_dev = {name: s.to(dev) for name, s in twin.storages.items()}
    layers = []
    for layer, d in zip(twin.layers, e.descs, strict=True):
        store = on_dev[d.shm_name]
        typed = store[: len(store) // d.itemsize * d.itemsize].view(getattr(torch, d.dtype))
        layers.append(
            FakeOpenedLayer(
                layer.desc, torch.as_strided(typed, d.shape, d.stride, d.storage_offset)
            )
        )
    events = TrivialCudaEvents()
    worker = torch.cuda.Event(interprocess=True)
    worker.record(torch.cuda.current_stream(dev))
    events.by_handle[b"worker"] = RecordedCudaEvent(worker, b"worker")
    with (
        TorchPagedKV.from_layers(
            layers, e.hints, [], C, events=events, staging_bytes=3 * 1024
        ) as kv,
        PagedKV.from_descriptors(e.descs, e.hints, [], C) as ref,
    ):
        tables = random_tables(rng, 16)
        want = [np.zeros(ref.object_nbytes, np.uint8) for _ in tables]
        got = [torch.zeros(kv.object_nbytes, dtype=torch.uint8).pin_memory() for _ in tables]
        ref.gather_many(list(zip(tables, want, strict=True)))
        ticket = kv.gather_async(
            [(t, g.numpy()) for t, g in zip(tables, got, strict=True)], b"worker"
        )
        assert len(ticket.handle) == 64
        ticket.wait(60)
        assert all(np.array_equal(w, g.numpy()) for w, g in zip(want, got, strict=True))
        srcs = [rng.integers(0, 256, kv.object_nbytes, dtype=np.uint8) for _ in tables]
        skips = [int(s) for s in rng.choice(SKIPS, 16)]
        batch = list(zip(srcs, tables, skips, strict=True))
        ref.scatter_many(batch)
        kv.scatter_async(batch, b"worker").wait(60)
        for name, s in on_dev.items():
            assert s.cpu().numpy().tobytes() == segment_bytes(name)[: len(s)], name


def test_threads_sharing_one_backend_get_their_own_bytes(
    shm_segment: Segment, rng: np.random.Generator
) -> None:
    """Batches from several threads share the staging buffer; none sees another's bytes."""
    e = build("flashinfer_hnd", shm_segment)
    twin = twin_of(e)
    with (
        make(e, twin, staging_bytes=1) as kv,
        PagedKV.from_descriptors(e.descs, e.hints, [], C) as ref,
    ):
        tables = [random_tables(rng, 5) for _ in range(3)]
        want = []
        for t in tables:
            outs = [np.zeros(ref.object_nbytes, np.uint8) for _ in t]
            ref.gather_many(list(zip(t, outs, strict=True)))
            want.append(outs)
        errors: list[str] = []

        def worker(k: int) -> None:
            for _ in range(30):
                outs = [np.zeros(kv.object_nbytes, np.uint8) for _ in tables[k]]
                kv.gather_many(list(zip(tables[k], outs, strict=True)))
                if not all(np.array_equal(a, b) for a, b in zip(outs, want[k], strict=True)):
                    errors.append(f"thread {k} got foreign bytes")

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(30)
        assert errors == []


class MockRefusingEvents(MockCopyEvents):
    """Stand-in event helper refusing the worker's handle (named as a mock: no GPU here)."""

    def wait_for_worker(self, handle: bytes, stream: Any) -> None:
        raise BadRequest(f"event handle of {len(handle)} bytes")


def test_a_refused_worker_event_is_a_bad_request(shm_segment: Segment) -> None:
    e = build("nhd", shm_segment)
    twin = twin_of(e)
    events = MockRefusingEvents()
    kv = make(e, twin, events=events, async_completion=True)
    out = np.zeros(kv.object_nbytes, np.uint8)
    with pytest.raises(BadRequest, match="event handle of 3 bytes"):
        kv.gather_async([([1, 2], out)], b"bad")
    assert events.recorded == [] and not out.any()
    kv.close()  # nothing left in flight
    assert kv.closed
