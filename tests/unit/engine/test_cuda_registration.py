"""The engine's CUDA registration path, end to end on CPU.

There is no GPU here: ``MockCudaRuntime`` (tests/support/mock_cuda.py, named as a mock) makes
"device memory" of CPU tensors, so a registration carrying ``cuda`` and ``cuda_raw``
descriptors goes through the real opening code (``transfer/cuda/ipc_open.py``), the real
torch copy backend (``TorchPagedKV`` on CPU tensors) and the real engine (L1 reserve/commit,
lookups, locks).  The refusals run against a real server: this machine's torch has no CUDA.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import C, key

from kvhive.errors import RegistrationError
from kvhive.transfer.cuda.attach import open_cuda_backend
from kvhive.transfer.cuda.runtime import CUDA_EXTRA
from kvhive.wire import types as t
from support.mock_cuda import U1, MockCudaRuntime, cuda_desc, meta, raw_desc

LAYERS, NB, BS, H, D = 3, 24, 16, 2, 8  # NHD: [2, NB, BS, H, D] per layer, float16
TOKENS = list(range(1, 3 * C + 1))  # 3 chunks of C tokens, C // BS blocks each
PER = C // BS
SHAPE = [2, NB, BS, H, D]
STRIDE = [NB * BS * H * D, BS * H * D, H * D, D, 1]
LAYER_BYTES = 2 * NB * BS * H * D * 2


class Worker:
    """One engine worker's KV cache in mock device memory: ``kind`` "cuda" shares one
    storage for all layers (sibling views at offsets), "cuda_raw" one allocation too."""

    def __init__(self, rt: MockCudaRuntime, handle: bytes, kind: str) -> None:
        self.mem = rt.allocation(handle, LAYERS * LAYER_BYTES)
        self.mem.copy_(torch.randint(0, 256, self.mem.shape, dtype=torch.uint8))
        elems = LAYER_BYTES // 2
        size = LAYERS * LAYER_BYTES
        if kind == "cuda":
            self.descs = [
                cuda_desc(handle, size, 0, meta("float16", SHAPE, STRIDE, i * elems))
                for i in range(LAYERS)
            ]
        else:  # one allocation; each layer's range starts at its own offset
            self.descs = [
                raw_desc(handle, i * LAYER_BYTES, LAYER_BYTES, meta("float16", SHAPE, STRIDE, 0))
                for i in range(LAYERS)
            ]

    def blocks(self, ids: list[int]) -> np.ndarray:
        """The bytes of blocks ``ids`` of every layer, K and V: [layer, kv, block, ...]."""
        kv = self.mem.numpy().reshape(LAYERS, 2, NB, BS * H * D * 2)
        return kv[:, :, ids].copy()


@pytest.fixture
def rt(engine) -> MockCudaRuntime:
    runtime = MockCudaRuntime()
    engine.transfers.device_opener = lambda d, hints, groups, chunk: open_cuda_backend(
        d, hints, groups, chunk, runtime=runtime
    )
    return runtime


def register(engine, worker: Worker, iid: int) -> None:
    group = {"engine_group_id": 0, "layer_indices": list(range(LAYERS)), "tokens_per_block": BS}
    engine.transfers.register_kv_cache(
        iid, worker.descs, "m", 1, "vllm", {"kv_layout": "NHD"}, [t.EngineGroupInfo(**group)]
    )


@pytest.mark.parametrize("kind", ["cuda", "cuda_raw"])
def test_a_cuda_registration_stores_and_retrieves_byte_exact(engine, rt, kind):
    a, b = Worker(rt, b"A" * 64, kind), Worker(rt, b"B" * 64, kind)
    register(engine, a, 1)
    register(engine, b, 2)
    src, dst = [3, 4, 9, 10, 1, 2], [20, 5, 7, 8, 11, 15]
    assert type(engine.registry.get(1).mapping).__name__ == "TorchPagedKV"
    assert not np.array_equal(a.blocks(src), b.blocks(dst))
    stored = engine.transfers.store(key(TOKENS, 0, 3 * C), 1, [src], b"")
    assert (stored.stored, stored.event) == (3, b"")  # CPU tensors copy before the reply
    engine.lookups.lookup(key(TOKENS, 0, 3 * C, rid="q", worker=None), 1)
    assert engine.lookups.query_prefetch_status("q") == 3
    got = engine.transfers.retrieve(key(TOKENS, 0, 3 * C, rid="q"), 2, [dst], b"", 0)
    assert got.chunks == 3
    np.testing.assert_array_equal(a.blocks(src), b.blocks(dst))
    assert engine.l1.stats().read_locked_objects == 0


def test_unregister_and_replacement_release_the_ipc_mappings(engine, rt):
    w = Worker(rt, b"R" * 64, "cuda_raw")
    register(engine, w, 7)
    assert len(rt.ipc_opens) == 1 and not rt.ipc_closes  # one mapping for all layers
    register(engine, Worker(rt, b"S" * 64, "cuda_raw"), 7)  # re-registration replaces it
    assert len(rt.ipc_closes) == 1 and engine.registry.get(7) is not None
    engine.transfers.unregister_kv_cache(7)
    assert len(rt.ipc_closes) == 2 and not rt.mapped


def test_layers_on_another_device_or_mixed_with_cpu_shm_are_refused(engine, rt, make_kv):
    w = Worker(rt, b"M" * 64, "cuda")
    other = cuda_desc(b"M" * 64, LAYERS * LAYER_BYTES, 0, meta("float16", SHAPE, STRIDE, 0, U1))
    with pytest.raises(RegistrationError):
        engine.transfers.register_kv_cache(
            3, [*w.descs[:-1], other], "m", 1, "vllm", {"kv_layout": "NHD"}, []
        )
    with pytest.raises(RegistrationError, match="cpu_shm layers or CUDA"):
        engine.transfers.register_kv_cache(
            4, [w.descs[0], *make_kv().descriptors()], "m", 1, "vllm", {}, []
        )
    assert engine.registry.get(3) is None and engine.registry.get(4) is None
    assert not rt.mapped  # nothing left open


def test_without_cuda_the_registration_names_the_extra(engine):
    """The real opener on this CPU-only torch: refused with the install hint."""
    w = Worker(MockCudaRuntime(), b"N" * 64, "cuda")
    with pytest.raises(RegistrationError) as err:
        engine.transfers.register_kv_cache(5, w.descs, "m", 1, "vllm", {"kv_layout": "NHD"}, [])
    assert CUDA_EXTRA in str(err.value)
    assert engine.registry.get(5) is None
