"""HostPinner: its bookkeeping against a stand-in CUDA runtime (no GPU here), and, on a GPU
machine, real cudaHostRegister of an L1 arena checked through torch."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from kvhive.storage.l1.arena import Arena
from kvhive.transfer.cuda.pinning import HOST_REGISTER_PORTABLE, HostPinner, PinnedRange

MiB = 1 << 20


class MockCudaHostRuntime:
    """Named as a mock: no GPU here.  Records cudaHostRegister/Unregister calls like the
    runtime would see them and answers with the error codes a test sets (0: success);
    refuses a second registration of an overlapping range like CUDA (712)."""

    def __init__(self, fail_codes: list[int] | None = None) -> None:
        self.fail_codes = list(fail_codes or [])  # returned by the next register calls
        self.registered: dict[int, int] = {}
        self.calls: list[tuple[str, int, int, int]] = []
        self._mu = threading.Lock()

    def host_register(self, addr: int, nbytes: int, flags: int) -> int:
        with self._mu:
            self.calls.append(("register", addr, nbytes, flags))
            if self.fail_codes:
                return self.fail_codes.pop(0)
            if any(a < addr + nbytes and addr < a + n for a, n in self.registered.items()):
                return 712
            self.registered[addr] = nbytes
            return 0

    def host_unregister(self, addr: int) -> int:
        with self._mu:
            self.calls.append(("unregister", addr, 0, 0))
            return 0 if self.registered.pop(addr, None) is not None else 713

    def registers(self) -> int:
        return sum(1 for c in self.calls if c[0] == "register")


def test_pin_records_the_range_with_portable_flags() -> None:
    rt = MockCudaHostRuntime()
    p = HostPinner(rt)
    assert p.pin(0x10000, 4 * MiB)
    assert rt.calls == [("register", 0x10000, 4 * MiB, HOST_REGISTER_PORTABLE)]
    assert p.pinned() == [PinnedRange(0x10000, 4 * MiB)]
    assert p.pinned_bytes == 4 * MiB and p.failures == 0


def test_pin_is_idempotent_per_range_and_inside_a_range() -> None:
    rt = MockCudaHostRuntime()
    p = HostPinner(rt)
    assert p.pin(0x10000, 4 * MiB)
    assert p.pin(0x10000, 4 * MiB)
    assert p.pin(0x10000 + MiB, MiB)  # inside: already pinned
    assert rt.registers() == 1
    with pytest.raises(ValueError, match="overlaps"):
        p.pin(0x10000 + MiB, 8 * MiB)
    assert rt.registers() == 1


def test_concurrent_pins_of_one_range_register_once() -> None:
    rt = MockCudaHostRuntime()
    p = HostPinner(rt)
    results: list[bool] = []
    threads = [
        threading.Thread(target=lambda: results.append(p.pin(0x10000, MiB))) for _ in range(8)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * 8 and rt.registers() == 1


def test_refused_pin_is_counted_not_recorded_and_not_fatal() -> None:
    rt = MockCudaHostRuntime(fail_codes=[2])  # cudaErrorMemoryAllocation
    p = HostPinner(rt)
    assert not p.pin(0x10000, MiB)
    assert p.failures == 1 and p.pinned() == []
    assert p.pin(0x10000, MiB)  # a later try may succeed
    assert p.pinned_bytes == MiB


def test_a_runtime_that_cannot_start_counts_as_a_failure() -> None:
    class BrokenRuntime(MockCudaHostRuntime):
        def host_register(self, addr: int, nbytes: int, flags: int) -> int:
            raise RuntimeError("no CUDA device")

    p = HostPinner(BrokenRuntime())
    assert not p.pin(0x10000, MiB)
    assert p.failures == 1


def test_unpin_and_close_unregister_everything_once() -> None:
    rt = MockCudaHostRuntime()
    p = HostPinner(rt)
    for i in range(3):
        assert p.pin(0x100000 * (i + 1), MiB // 2)
    assert p.unpin(0x100000)
    assert not p.unpin(0x100000)  # no longer pinned
    assert not p.unpin(0x123)  # never pinned
    p.close()
    assert rt.registered == {} and p.pinned() == []
    p.close()
    assert sum(1 for c in rt.calls if c[0] == "unregister") == 3
    with pytest.raises(RuntimeError, match="closed"):
        p.pin(0x10000, MiB)


def test_bad_ranges_are_rejected() -> None:
    p = HostPinner(MockCudaHostRuntime())
    with pytest.raises(ValueError):
        p.pin(0x10000, 0)
    with pytest.raises(ValueError):
        p.pin(0, MiB)


def test_importing_and_creating_a_pinner_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "from kvhive.transfer.cuda.pinning import HostPinner\n"
        "import kvhive.storage.l1, kvhive.server\n"
        "HostPinner()\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr


# -- a real GPU -----------------------------------------------------------------------------


def _cuda() -> bool:
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


@pytest.mark.skipif(not _cuda(), reason="needs torch with a CUDA device")
def test_real_cudahostregister_pins_an_arena_and_unpins_it() -> None:
    import torch

    with Arena(64 * MiB, align=2 * MiB) as arena, HostPinner(device=0) as pinner:
        view = torch.from_numpy(arena.array[: 8 * MiB])
        assert not view.is_pinned()
        assert pinner.pin(arena.base_address, arena.size_bytes)
        assert view.is_pinned()
        assert torch.from_numpy(arena.array[40 * MiB : 41 * MiB]).is_pinned()
        # A pinned range really serves an async copy from the device.
        src = torch.arange(MiB, dtype=torch.uint8, device="cuda:0")
        view[:MiB].copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        assert np.array_equal(arena.array[:MiB], src.cpu().numpy())
        assert pinner.unpin(arena.base_address)
        assert not view.is_pinned()
        del view
