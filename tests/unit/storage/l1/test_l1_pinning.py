"""L1 pinning for DMA (``L1Manager.pin_host_memory``) against a stand-in CUDA runtime (no GPU
here): what is mapped is pinned at the call, later lazy growth too, in regions; idempotent;
unpinned at close; a refused region is counted and L1 keeps working.  And a CPU-only
registration never imports torch."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from kvhive.storage.l1 import pins
from kvhive.storage.l1.arena import Arena
from kvhive.storage.l1.pins import NOT_PINNED
from kvhive.storage.owners import WriterOwner
from kvhive.transfer.cuda.pinning import HostPinner

KiB, MiB = 1 << 10, 1 << 20
OWNER = WriterOwner(1)
TESTS = Path(__file__).resolve().parents[3]


class MockCudaHostRuntime:
    """Named as a mock: no GPU here.  Keeps the registered ranges as cudaHostRegister would
    and answers the error codes a test queues (0: success)."""

    def __init__(self, fail_codes: list[int] | None = None) -> None:
        self.fail_codes = list(fail_codes or [])
        self.registered: dict[int, int] = {}
        self.register_calls = 0
        self._mu = threading.Lock()

    def host_register(self, addr: int, nbytes: int, flags: int) -> int:
        with self._mu:
            self.register_calls += 1
            if self.fail_codes:
                return self.fail_codes.pop(0)
            self.registered[addr] = nbytes
            return 0

    def host_unregister(self, addr: int) -> int:
        with self._mu:
            return 0 if self.registered.pop(addr, None) is not None else 713

    def offsets(self, base: int) -> list[tuple[int, int]]:
        with self._mu:
            return sorted((a - base, n) for a, n in self.registered.items())


def pin(l1, rt: MockCudaHostRuntime) -> HostPinner:
    pinner = HostPinner(rt)
    l1.pin_host_memory(pinner)
    assert l1.arena.wait_pinned(timeout=30)
    return pinner


def test_a_cpu_only_l1_pins_nothing(make_l1) -> None:
    l1 = make_l1()
    assert l1.arena.pin_status() == NOT_PINNED
    st = l1.stats()
    assert (st.pinned_bytes, st.pin_pending_bytes, st.pin_failures) == (0, 0, 0)
    assert {"pinned_bytes", "pin_failures"} <= set(st.to_dict())


def test_mapped_memory_is_pinned_at_the_call(make_l1) -> None:
    l1 = make_l1()
    rt = MockCudaHostRuntime()
    pin(l1, rt)
    size = l1.arena.size_bytes
    assert rt.offsets(l1.arena.base_address) == [(0, size)]
    st = l1.stats()
    assert (st.pinned_bytes, st.pin_pending_bytes, st.pin_failures) == (size, 0, 0)


def test_pinning_goes_in_regions_not_pages(make_l1, monkeypatch) -> None:
    monkeypatch.setattr(pins, "PIN_REGION_BYTES", 64 * KiB)
    l1 = make_l1()  # 256 KiB
    rt = MockCudaHostRuntime()
    pin(l1, rt)
    assert rt.offsets(l1.arena.base_address) == [(i * 64 * KiB, 64 * KiB) for i in range(4)]


def test_lazy_growth_is_pinned_as_it_comes(make_l1, keys) -> None:
    arena = Arena(
        8 * MiB, align=4096, lazy=True, init_bytes=1, granule_bytes=MiB, grow_step_bytes=2 * MiB
    )
    l1 = make_l1(size_bytes=8 * MiB, lazy=True, init_bytes=1, arena=arena)
    rt = MockCudaHostRuntime()
    pin(l1, rt)
    assert rt.offsets(arena.base_address) == [(0, MiB)]  # the heap mapped so far
    slots = l1.reserve(keys(4), 512 * KiB, OWNER)  # 2 MiB: the arena grows
    assert all(slots) and arena.heap_bytes == 3 * MiB
    assert arena.wait_pinned(timeout=30)
    assert rt.offsets(arena.base_address) == [(0, MiB), (MiB, 2 * MiB)]
    assert l1.stats().pinned_bytes == 3 * MiB


def test_a_second_engine_pins_nothing_more(make_l1) -> None:
    l1 = make_l1()
    rt, rt2 = MockCudaHostRuntime(), MockCudaHostRuntime()
    pin(l1, rt)
    pin(l1, rt2)
    assert rt.register_calls == 1 and rt2.register_calls == 0


def test_close_unpins_every_region(make_l1, monkeypatch) -> None:
    monkeypatch.setattr(pins, "PIN_REGION_BYTES", 64 * KiB)
    l1 = make_l1()
    rt = MockCudaHostRuntime()
    pin(l1, rt)
    assert len(rt.registered) == 4
    l1.close()
    assert rt.registered == {}


def test_a_refused_region_is_counted_and_l1_keeps_working(make_l1, keys, monkeypatch) -> None:
    monkeypatch.setattr(pins, "PIN_REGION_BYTES", 64 * KiB)
    l1 = make_l1()
    rt = MockCudaHostRuntime(fail_codes=[2])  # the first region: cudaErrorMemoryAllocation
    pin(l1, rt)
    assert rt.offsets(l1.arena.base_address) == [(i * 64 * KiB, 64 * KiB) for i in range(1, 4)]
    st = l1.stats()
    assert (st.pinned_bytes, st.pin_failures) == (192 * KiB, 1)
    ks = keys(2)
    slots = l1.reserve(ks, 4096, OWNER)
    for s in slots:
        l1.view(s)[:] = 7
    assert l1.commit(slots) == [True, True]
    assert l1.contains(ks) == [True, True]


def test_pinning_a_closed_l1_raises(make_l1) -> None:
    l1 = make_l1()
    l1.close()
    with pytest.raises(RuntimeError, match="closed"):
        l1.pin_host_memory(HostPinner(MockCudaHostRuntime()))


# A real CacheEngine registering a cpu_shm KV cache and storing through it, in a fresh
# interpreter (this one may have imported torch for other tests).
NO_TORCH = """
import sys
sys.path[:0] = [{tests!r}, {engine!r}]
import numpy as np
from conftest import GEOMETRY, FakeClock, build_engine, register
from support.shm import make_shm_kv

eng = build_engine(FakeClock())
kv = make_shm_kv(np.random.default_rng(1), prefix="kvhive_pin_test_", geometry=GEOMETRY)
try:
    register(eng, kv)
    eng.status() if hasattr(eng, "status") else None
    eng.l1.stats()
finally:
    eng.registry.close()
    eng.l1.close()
    kv.destroy()
assert "torch" not in sys.modules, "a cpu_shm registration imported torch"
"""


def test_a_cpu_shm_registration_never_imports_torch() -> None:
    code = NO_TORCH.format(tests=str(TESTS), engine=str(TESTS / "unit" / "engine"))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
