"""Page-locking host memory for DMA: ``cudaHostRegister`` / ``cudaHostUnregister``.

An async copy between a device tensor and host memory runs at PCIe/NVLink speed only when the
host pages are page-locked and known to the driver; from pageable memory the driver stages
it through its own pinned buffer (correct, but slower, and synchronous for the host).  kvhive's
L1 arena is plain ``mmap`` memory, so once a CUDA engine registers, the engine asks L1 to pin
it (``L1Manager.pin_host_memory``), and L1 pins its regions through a :class:`HostPinner`.

:class:`HostPinner` is the bookkeeping: which ranges it pinned, idempotent per range,
thread-safe, ``close`` unpins all.  The CUDA calls go through a :class:`CudaHostRuntime`:
:class:`TorchCudaHostRuntime` (``torch.cuda.cudart()``, present in torch 2.11-2.13 as
``cudaHostRegister(ptr, size, flags)`` / ``cudaHostUnregister(ptr)``, each returning a
``cudaError`` enum, ``int()`` of which is the CUDA error code, 0 on success) or, in tests,
a stand-in.  torch is imported only when the torch runtime is first needed.
"""

from __future__ import annotations

import importlib
import logging
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

log = logging.getLogger(__name__)

#: ``cudaHostRegister`` flags (CUDA runtime API, ``cudaHostRegister*``).
HOST_REGISTER_DEFAULT = 0
#: pinned for every CUDA context, not only the current one: engines on several devices
#: copy to and from the same L1 memory.
HOST_REGISTER_PORTABLE = 1
#: also map the range into the device address space (zero-copy kernels); not needed for
#: ``cudaMemcpyAsync``, and with unified addressing a registered range is usable by copies
#: either way.
HOST_REGISTER_MAPPED = 2

#: CUDA error codes worth naming in logs.
CUDA_ERRORS = {
    0: "cudaSuccess",
    1: "cudaErrorInvalidValue",
    2: "cudaErrorMemoryAllocation",
    3: "cudaErrorInitializationError",
    35: "cudaErrorInsufficientDriver",
    100: "cudaErrorNoDevice",
    712: "cudaErrorHostMemoryAlreadyRegistered",
    713: "cudaErrorHostMemoryNotRegistered",
    801: "cudaErrorNotSupported",
}


def cuda_error_name(code: int) -> str:
    return CUDA_ERRORS.get(code, f"cudaError {code}")


class CudaHostRuntime(Protocol):
    """The two CUDA runtime calls pinning needs; each returns the CUDA error code (0: ok)."""

    def host_register(self, addr: int, nbytes: int, flags: int) -> int: ...

    def host_unregister(self, addr: int) -> int: ...


class TorchCudaHostRuntime:
    """``cudaHostRegister`` / ``cudaHostUnregister`` through ``torch.cuda.cudart()``.

    Constructing it imports torch and initialises CUDA; raises RuntimeError when torch has
    no usable CUDA device or lacks the two calls.  With ``device`` the calls run with that
    device current (the runtime needs a context; without it device 0's primary context is
    created, which costs that device memory on a multi-GPU host).  torch releases the GIL
    during both calls.
    """

    def __init__(self, device: int | None = None) -> None:
        torch: Any = importlib.import_module("torch")
        if not torch.cuda.is_available():
            raise RuntimeError("torch has no usable CUDA device")
        torch.cuda.init()
        cudart = torch.cuda.cudart()
        for name in ("cudaHostRegister", "cudaHostUnregister"):
            if not callable(getattr(cudart, name, None)):
                raise RuntimeError(f"torch {torch.__version__}: torch.cuda.cudart() has no {name}")
        self._torch = torch
        self._cudart = cudart
        self._device = device

    def _current(self) -> AbstractContextManager[Any]:
        if self._device is None:
            return nullcontext()
        ctx: AbstractContextManager[Any] = self._torch.cuda.device(self._device)
        return ctx

    def host_register(self, addr: int, nbytes: int, flags: int) -> int:
        with self._current():
            return int(self._cudart.cudaHostRegister(addr, nbytes, flags))

    def host_unregister(self, addr: int) -> int:
        with self._current():
            return int(self._cudart.cudaHostUnregister(addr))


@dataclass(frozen=True, slots=True)
class PinnedRange:
    """One registered host range: ``nbytes`` bytes at address ``addr``."""

    addr: int
    nbytes: int

    @property
    def end(self) -> int:
        return self.addr + self.nbytes


class HostPinner:
    """Pins host ranges for DMA and remembers them; thread-safe.

    * ``pin(addr, nbytes)``: True once the range is pinned (now, or already: a range equal
      to or inside a pinned one is a no-op).  False when CUDA refused it (or the runtime
      could not be created): logged, counted in ``failures``, and the range stays pageable;
      copies from it remain correct, only slower.  A range that partly overlaps a pinned one
      raises ValueError (CUDA would refuse it; the caller's bookkeeping is wrong).
    * ``unpin(addr)``: unregisters the range pinned at exactly ``addr``; False when nothing
      is pinned there or CUDA refused (logged; the record is dropped either way).
    * ``close()``: unpins everything still pinned (idempotent); ``pin`` afterwards raises.

    ``runtime`` None: a :class:`TorchCudaHostRuntime` for ``device`` is created on the first
    ``pin`` (that is when torch is imported).  The lock is held during the CUDA calls, so
    pins and unpins are serialised (a registration of 1 GiB takes ~0.1-0.5 s); callers that
    must not wait (the L1 request path) pin from a background thread.  The caller owns the
    memory: it must stay mapped until its range is unpinned.
    """

    def __init__(
        self,
        runtime: CudaHostRuntime | None = None,
        *,
        flags: int = HOST_REGISTER_PORTABLE,
        device: int | None = None,
    ) -> None:
        self._runtime = runtime
        self._flags = flags
        self._device = device
        self._mu = threading.Lock()
        self._ranges: dict[int, PinnedRange] = {}
        self._failures = 0
        self._closed = False

    # -- pinning ---------------------------------------------------------------------------

    def pin(self, addr: int, nbytes: int) -> bool:
        if nbytes <= 0 or addr <= 0:
            raise ValueError(f"bad host range {addr:#x} + {nbytes}")
        with self._mu:
            if self._closed:
                raise RuntimeError("HostPinner is closed")
            for r in self._ranges.values():
                if r.addr <= addr and addr + nbytes <= r.end:
                    return True
                if r.addr < addr + nbytes and addr < r.end:
                    raise ValueError(
                        f"host range {addr:#x}+{nbytes} partly overlaps pinned {r.addr:#x}+{r.nbytes}"
                    )
            try:
                code = self._runtime_locked().host_register(addr, nbytes, self._flags)
            except Exception as exc:  # noqa: BLE001 - no CUDA runtime: stay pageable, say so
                self._failures += 1
                log.warning("pinning %d MiB of host memory failed: %s", nbytes >> 20, exc)
                return False
            if code != 0:
                self._failures += 1
                log.warning(
                    "cudaHostRegister(%#x, %d MiB) failed: %s; the range stays pageable "
                    "(copies are correct but slower)",
                    addr,
                    nbytes >> 20,
                    cuda_error_name(code),
                )
                return False
            self._ranges[addr] = PinnedRange(addr, nbytes)
            return True

    def unpin(self, addr: int) -> bool:
        with self._mu:
            return self._unpin_locked(addr)

    def close(self) -> None:
        with self._mu:
            if self._closed:
                return
            self._closed = True
            for addr in list(self._ranges):
                self._unpin_locked(addr)

    def __enter__(self) -> HostPinner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- observation -----------------------------------------------------------------------

    def pinned(self) -> list[PinnedRange]:
        """The ranges pinned now, by address."""
        with self._mu:
            return sorted(self._ranges.values(), key=lambda r: r.addr)

    def __iter__(self) -> Iterator[PinnedRange]:
        return iter(self.pinned())

    @property
    def pinned_bytes(self) -> int:
        with self._mu:
            return sum(r.nbytes for r in self._ranges.values())

    @property
    def failures(self) -> int:
        """Pins that CUDA refused (or could not be attempted) so far."""
        with self._mu:
            return self._failures

    # -- internals -------------------------------------------------------------------------

    def _runtime_locked(self) -> CudaHostRuntime:
        if self._runtime is None:
            self._runtime = TorchCudaHostRuntime(self._device)
        return self._runtime

    def _unpin_locked(self, addr: int) -> bool:
        r = self._ranges.pop(addr, None)
        if r is None or self._runtime is None:
            return False
        try:
            code = self._runtime.host_unregister(addr)
        except Exception as exc:  # noqa: BLE001 - the record goes either way; say so
            log.warning("cudaHostUnregister(%#x) raised: %s", addr, exc)
            return False
        if code != 0:
            log.warning("cudaHostUnregister(%#x) failed: %s", addr, cuda_error_name(code))
            return False
        return True
