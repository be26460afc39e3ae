"""A stand-in CUDA runtime for CPU tests of the CUDA data path (named as a mock: no GPU here).

"Device memory" is CPU tensors a test registers as a worker's allocations, so opening
``cuda``/``cuda_raw``/``cuda_vmm`` descriptors (``kvhive.transfer.cuda.ipc_open``), the views,
labels, reference counts and releases are all exercised for real; ``meta``/``cuda_desc``/
``raw_desc``/``vmm_desc`` build the wire records as the lmcache client's encoder fills them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from kvhive.errors import RegistrationError
from kvhive.transfer.cuda.runtime import DeviceTable, VmmMapping
from kvhive.wire import types as t

U0 = "58d9b2e1-0000-1111-2222-333344445555"
U1 = "aaaabbbb-cccc-dddd-eeee-ffff00001111"


class MockCudaRuntime:
    """Named as a mock: no GPU here.  Worker allocations are CPU uint8 tensors the test
    registers; every open/close/import/release is recorded so tests can count them."""

    def __init__(self) -> None:
        self.table = DeviceTable.from_uuids([U0, U1])
        # "device memory": numpy arrays, so that a wrapped range is a tensor whose storage
        # starts at the range (as torch's wrapping of a device pointer gives)
        self.allocations: dict[bytes, np.ndarray] = {}  # mem/ipc handle -> bytes
        self.vmm_by_fd: dict[int, np.ndarray] = {}
        self.mapped: dict[int, np.ndarray] = {}  # fake pointer -> bytes
        self.storage_opens: list[tuple[int, Any]] = []
        self.ipc_opens: list[bytes] = []
        self.ipc_closes: list[int] = []
        self.vmm_imports: list[int] = []
        self.vmm_releases: list[int] = []
        self.fail_open: set[bytes] = set()
        self.fail_close_once = False
        self.fail_wrap = False
        self._next_ptr = 0x1000

    def allocation(self, handle: bytes, nbytes: int) -> torch.Tensor:
        """A worker allocation of ``nbytes`` patterned bytes (the returned tensor aliases it)."""
        mem = np.arange(nbytes, dtype=np.int64).__mod__(251).astype(np.uint8)
        self.allocations[handle] = mem
        return torch.from_numpy(mem)

    def device_ordinal(self, device_uuid: str) -> int:
        return self.table.ordinal(device_uuid)

    def open_shared_storage(self, ordinal: int, handle: Any) -> Any:
        self.storage_opens.append((ordinal, handle))
        mem = self.allocations[handle.mem_handle]
        off = handle.storage_offset_bytes
        return torch.from_numpy(mem[off : off + handle.storage_size_bytes])

    def view_storage(
        self,
        storage: Any,
        ordinal: int,
        dtype: str,
        shape: Sequence[int],
        stride: Sequence[int],
        storage_offset: int,
    ) -> Any:
        isz = torch.empty((), dtype=getattr(torch, dtype)).element_size()
        whole = storage[: storage.numel() - storage.numel() % isz]
        return self.typed_view(whole, dtype, shape, stride, storage_offset)

    def _map(self, mem: np.ndarray) -> int:
        ptr, self._next_ptr = self._next_ptr, self._next_ptr + 0x1000
        self.mapped[ptr] = mem
        return ptr

    def ipc_open_mem_handle(self, ordinal: int, handle: bytes) -> int:
        if handle in self.fail_open:
            raise RegistrationError("cudaIpcOpenMemHandle failed: mock failure")
        self.ipc_opens.append(handle)
        return self._map(self.allocations[handle])

    def ipc_close_mem_handle(self, ordinal: int, ptr: int) -> None:
        self.ipc_closes.append(ptr)
        del self.mapped[ptr]
        if self.fail_close_once:
            self.fail_close_once = False
            raise RegistrationError("cudaIpcCloseMemHandle failed: mock failure")

    def wrap_pointer(self, ordinal: int, ptr: int, nbytes: int) -> Any:
        if self.fail_wrap:
            raise RegistrationError("wrapping failed: mock failure")
        mem = self.mapped[ptr]
        assert nbytes <= mem.size, "wrapped past the allocation"
        return torch.from_numpy(mem[:nbytes])

    def typed_view(
        self, flat: Any, dtype: str, shape: Sequence[int], stride: Sequence[int], offset: int
    ) -> Any:
        return flat.view(getattr(torch, dtype)).as_strided(tuple(shape), tuple(stride), offset)

    def empty_view(
        self, ordinal: int, dtype: str, shape: Sequence[int], stride: Sequence[int]
    ) -> Any:
        return torch.empty_strided(tuple(shape), tuple(stride), dtype=getattr(torch, dtype))

    def vmm_import(self, ordinal: int, fd: int, alloc_size: int) -> Any:
        os.fstat(fd)  # the fd must still be open while importing
        self.vmm_imports.append(fd)
        mem = self.vmm_by_fd[fd]
        assert mem.size == alloc_size
        return VmmMapping(self._map(mem), alloc_size, alloc_handle=fd)

    def vmm_release(self, ordinal: int, mapping: Any) -> None:
        self.vmm_releases.append(mapping.alloc_handle)
        del self.mapped[mapping.base_ptr]


def meta(dtype: str, shape: Sequence[int], stride: Sequence[int], offset: int, uuid: str = U0):
    return t.TensorMetadata(dtype, list(shape), list(stride), offset, uuid)


def cuda_desc(mem: bytes, size: int, off_bytes: int, m: t.TensorMetadata, device: int = 5):
    handle = t.CudaStorageHandle(device, mem, size, off_bytes, b"/torch_rc", 0, None, False)
    return t.CudaDescriptor(version=1, metadata=m, handle=handle)


def raw_desc(handle: bytes, alloc_offset: int, nbytes: int, m: t.TensorMetadata):
    return t.CudaRawDescriptor(
        version=1, metadata=m, ipc_handle=handle, alloc_offset=alloc_offset, nbytes=nbytes
    )


def vmm_desc(export_id: bytes, size: int, off: int, nbytes: int, m: t.TensorMetadata, **kw: Any):
    kind = kw.pop("kind", "posix_fd")
    return t.CudaVmmDescriptor(
        version=1,
        metadata=m,
        export_id=export_id,
        kind=kind,
        fabric_blob=kw.pop("fabric_blob", None),
        alloc_size=size,
        alloc_offset=off,
        nbytes=nbytes,
    )
