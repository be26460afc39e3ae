"""torch and the CUDA runtime, loaded only when a CUDA descriptor arrives.

The server runs without torch; a registration that carries ``cuda``/``cuda_raw``/
``cuda_vmm`` wrappers is the first thing that needs it.  :func:`load_torch_cuda` imports
it then and refuses the registration (:class:`~kvhive.errors.RegistrationError`, naming
:data:`CUDA_EXTRA`) when torch is missing, is a CPU-only build, or sees no device.

Device identity.  The worker names its GPU by ``metadata.device_uuid``, the string form
of ``torch.cuda.get_device_properties(i).uuid`` in the worker (a bare 8-4-4-4-12 hex
UUID; ``nvidia-smi`` prints the same UUID with a ``GPU-`` prefix, which is accepted too).
Indices are per process (``CUDA_VISIBLE_DEVICES`` renumbers them), UUIDs are not, so the
server maps the UUID to *its* ordinal through a :class:`DeviceTable` built once per
process from the same torch call; the worker's own index (element 0 of a ``cuda``
handle) is never used.

:class:`TorchCudaRuntime` is the real runtime :mod:`.ipc_open` drives: torch's storage
rebuild for ``cuda`` descriptors, ``cudaIpcOpenMemHandle``/``cudaIpcCloseMemHandle`` on
the CUDA runtime library torch itself loaded (found in ``/proc/self/maps``, else torch's
``nvidia`` wheel, else by soname) for ``cuda_raw``, and the driver's VMM calls
(``libcuda.so.1``) for ``cuda_vmm`` allocations whose POSIX fd has been delivered.
Device memory it did not allocate is wrapped as a tensor without a copy through
``__cuda_array_interface__`` (torch keeps the wrapper object alive with the tensor).
"""

from __future__ import annotations

import ctypes
import glob
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from kvhive.errors import RegistrationError

CUDA_EXTRA = "pip install 'kvhive[cuda]'"
"""How to install what CUDA descriptors need (torch with CUDA)."""

CUDA_IPC_HANDLE_BYTES = 64
_IPC_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess
_CU_MEM_HANDLE_TYPE_POSIX_FD = 1  # CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_ACCESS_FLAGS_PROT_READWRITE = 3


def load_torch_cuda() -> Any:
    """The torch module, with CUDA usable in this process.

    Raises RegistrationError naming :data:`CUDA_EXTRA` -- with a different message for
    each cause -- when torch is not installed, is a build without CUDA, or sees no
    device.
    """
    try:
        import torch
    except ImportError:
        raise RegistrationError(
            f"CUDA IPC descriptors need torch with CUDA, and torch is not installed: {CUDA_EXTRA}"
        ) from None
    if getattr(torch.version, "cuda", None) is None and getattr(torch.version, "hip", None) is None:
        raise RegistrationError(
            f"CUDA IPC descriptors need torch with CUDA, but torch {torch.__version__} is a "
            f"build without CUDA: install a CUDA build ({CUDA_EXTRA})"
        )
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        raise RegistrationError(
            "CUDA IPC descriptors need a CUDA device, and torch sees none in this process "
            f"(CUDA_VISIBLE_DEVICES={visible!r}); the server must run on the workers' "
            f"machine with their GPUs visible ({CUDA_EXTRA})"
        )
    return torch


def normalize_uuid(device_uuid: str) -> str:
    """The comparable form of a device UUID: lower case, without ``GPU-``/``MIG-``."""
    bare = device_uuid.strip().lower()
    for prefix in ("gpu-", "mig-"):
        if bare.startswith(prefix):
            return bare[len(prefix) :]
    return bare


@dataclass(frozen=True, slots=True)
class DeviceTable:
    """This process's visible devices: normalized UUID -> ordinal (read-only)."""

    ordinals: Mapping[str, int]

    @classmethod
    def from_uuids(cls, uuids: Sequence[str]) -> DeviceTable:
        """The table of devices ``0..n-1`` whose UUIDs are ``uuids``, in ordinal order."""
        return cls(MappingProxyType({normalize_uuid(u): i for i, u in enumerate(uuids)}))

    @classmethod
    def from_torch(cls, torch: Any) -> DeviceTable:
        n = torch.cuda.device_count()
        return cls.from_uuids([str(torch.cuda.get_device_properties(i).uuid) for i in range(n)])

    def ordinal(self, device_uuid: str) -> int:
        """This process's ordinal of ``device_uuid``; RegistrationError when not visible."""
        if not isinstance(device_uuid, str) or not device_uuid.strip():
            raise RegistrationError(f"device_uuid must be a non-empty string, got {device_uuid!r}")
        found = self.ordinals.get(normalize_uuid(device_uuid))
        if found is None:
            raise RegistrationError(
                f"device {device_uuid!r} is not visible to the server (it sees "
                f"{len(self.ordinals)} device(s): {sorted(self.ordinals)}); run the server "
                "where the worker's GPU is visible (check CUDA_VISIBLE_DEVICES)"
            )
        return found


_TABLE_LOCK = threading.Lock()
_TABLE: DeviceTable | None = None


def device_table() -> DeviceTable:
    """The process's :class:`DeviceTable`, built on first use (devices do not come and go
    under a running process; CUDA fixes its device list at initialisation)."""
    global _TABLE
    with _TABLE_LOCK:
        if _TABLE is None:
            _TABLE = DeviceTable.from_torch(load_torch_cuda())
        return _TABLE


def device_ordinal(device_uuid: str, *, table: DeviceTable | None = None) -> int:
    """This process's ordinal of the worker's ``device_uuid`` (RegistrationError if not
    visible).  ``table`` defaults to :func:`device_table`."""
    return (table if table is not None else device_table()).ordinal(device_uuid)


# ---- libraries --------------------------------------------------------------------------------


class _IpcMemHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * CUDA_IPC_HANDLE_BYTES)]


class _MemLocation(ctypes.Structure):
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class _MemAccessDesc(ctypes.Structure):
    _fields_ = [("location", _MemLocation), ("flags", ctypes.c_int)]


def _loaded_library(stem: str) -> str | None:
    """Path of a library whose file name starts with ``stem`` mapped into this process."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                path = line.rsplit(" ", 1)[-1].strip()
                if os.path.basename(path).startswith(stem):
                    return path
    except OSError:
        return None
    return None


def load_cudart(torch: Any) -> ctypes.CDLL:
    """The CUDA runtime library torch uses (so its IPC calls share torch's context)."""
    torch.cuda.init()
    path = _loaded_library("libcudart.so")
    if path is None:
        base = os.path.dirname(os.path.dirname(torch.__file__))
        found = sorted(glob.glob(os.path.join(base, "nvidia", "cu*", "lib", "libcudart.so*")))
        found += sorted(
            glob.glob(os.path.join(base, "nvidia", "cuda_runtime", "lib", "libcudart.so*"))
        )
        path = found[0] if found else None
    names = [path] if path else ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    raise RegistrationError(
        f"cuda_raw descriptors need the CUDA runtime library torch uses, and none was found "
        f"(tried {names}; {CUDA_EXTRA})"
    )


class _DeviceBytes:
    """``nbytes`` bytes of device memory at ``ptr`` that this object does not own, shown
    to torch through ``__cuda_array_interface__`` (torch keeps it alive with the tensor)."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {
            "shape": (nbytes,),
            "typestr": "|u1",
            "data": (ptr, False),
            "strides": None,
            "version": 3,
        }


@dataclass(frozen=True, slots=True)
class VmmMapping:
    """One imported VMM allocation mapped into this process (released by
    :meth:`TorchCudaRuntime.vmm_release`)."""

    base_ptr: int
    size: int
    alloc_handle: int


class TorchCudaRuntime:
    """The real CUDA side of :mod:`.ipc_open` (construct only where CUDA is needed).

    Thread safety: the methods are safe to call from any thread; each switches to the
    target device for its calls and back (``torch.cuda.device``)."""

    def __init__(self, torch: Any | None = None, table: DeviceTable | None = None) -> None:
        self.torch = torch if torch is not None else load_torch_cuda()
        self._table = table
        self._cudart: ctypes.CDLL | None = None
        self._driver: ctypes.CDLL | None = None

    def device_ordinal(self, device_uuid: str) -> int:
        if self._table is None:
            self._table = device_table()
        return self._table.ordinal(device_uuid)

    # -- cuda: torch's shared storages --

    def open_shared_storage(self, ordinal: int, handle: Any) -> Any:
        """Rebuild a worker's shared storage on ``ordinal`` from the 8 values of a
        ``cuda`` handle (the worker's device index is replaced by ``ordinal``)."""
        torch = self.torch
        torch.cuda.init()
        with torch.cuda.device(ordinal):
            return torch.UntypedStorage._new_shared_cuda(
                ordinal,
                handle.mem_handle,
                handle.storage_size_bytes,
                handle.storage_offset_bytes,
                handle.ref_counter_handle,
                handle.ref_counter_offset,
                handle.event_handle,
                handle.event_sync_required,
            )

    def view_storage(
        self,
        storage: Any,
        ordinal: int,
        dtype: str,
        shape: Sequence[int],
        stride: Sequence[int],
        storage_offset: int,
    ) -> Any:
        torch = self.torch
        t = torch.empty((), device=f"cuda:{ordinal}", dtype=getattr(torch, dtype))
        t.set_(storage, storage_offset, tuple(shape), tuple(stride))
        return t

    # -- cuda_raw: driver IPC memory handles --

    def _runtime_lib(self) -> ctypes.CDLL:
        if self._cudart is None:
            lib = load_cudart(self.torch)
            lib.cudaIpcOpenMemHandle.argtypes = [
                ctypes.POINTER(ctypes.c_void_p),
                _IpcMemHandle,
                ctypes.c_uint,
            ]
            lib.cudaIpcOpenMemHandle.restype = ctypes.c_int
            lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
            lib.cudaIpcCloseMemHandle.restype = ctypes.c_int
            lib.cudaGetErrorString.argtypes = [ctypes.c_int]
            lib.cudaGetErrorString.restype = ctypes.c_char_p
            self._cudart = lib
        return self._cudart

    def _check(self, what: str, err: int) -> None:
        if err != 0:
            text = self._runtime_lib().cudaGetErrorString(err) or b"?"
            raise RegistrationError(f"{what} failed: CUDA error {err} ({text.decode()})")

    def ipc_open_mem_handle(self, ordinal: int, handle: bytes) -> int:
        """Map the allocation behind a 64-byte ``cudaIpcMemHandle_t``; its base pointer."""
        lib = self._runtime_lib()
        ptr = ctypes.c_void_p()
        raw = _IpcMemHandle()
        ctypes.memmove(ctypes.byref(raw), handle, CUDA_IPC_HANDLE_BYTES)
        with self.torch.cuda.device(ordinal):
            err = lib.cudaIpcOpenMemHandle(ctypes.byref(ptr), raw, _IPC_LAZY_ENABLE_PEER_ACCESS)
        self._check("cudaIpcOpenMemHandle", err)
        return int(ptr.value or 0)

    def ipc_close_mem_handle(self, ordinal: int, ptr: int) -> None:
        with self.torch.cuda.device(ordinal):
            err = self._runtime_lib().cudaIpcCloseMemHandle(ctypes.c_void_p(ptr))
        self._check("cudaIpcCloseMemHandle", err)

    def wrap_pointer(self, ordinal: int, ptr: int, nbytes: int) -> Any:
        """A flat uint8 tensor over ``nbytes`` bytes of device memory at ``ptr`` (no copy)."""
        t = self.torch.as_tensor(_DeviceBytes(ptr, nbytes), device=f"cuda:{ordinal}")
        if t.data_ptr() != ptr or t.device.index != ordinal:  # never a silent copy
            raise RegistrationError(
                f"wrapping device memory 0x{ptr:x} on cuda:{ordinal} produced a copy "
                f"(0x{t.data_ptr():x} on {t.device})"
            )
        return t

    def typed_view(
        self,
        flat: Any,
        dtype: str,
        shape: Sequence[int],
        stride: Sequence[int],
        storage_offset: int,
    ) -> Any:
        """``flat`` (uint8, 1-D, a whole number of ``dtype`` elements) as the strided view."""
        typed = flat.view(getattr(self.torch, dtype))
        return typed.as_strided(tuple(shape), tuple(stride), storage_offset)

    def empty_view(
        self, ordinal: int, dtype: str, shape: Sequence[int], stride: Sequence[int]
    ) -> Any:
        torch = self.torch
        return torch.empty_strided(
            tuple(shape), tuple(stride), dtype=getattr(torch, dtype), device=f"cuda:{ordinal}"
        )

    # -- cuda_vmm: driver VMM import of a delivered POSIX fd --

    def _driver_lib(self) -> ctypes.CDLL:
        if self._driver is None:
            lib = ctypes.CDLL("libcuda.so.1")
            u64, size = ctypes.c_uint64, ctypes.c_size_t
            lib.cuMemImportFromShareableHandle.argtypes = [
                ctypes.POINTER(u64),
                ctypes.c_void_p,
                ctypes.c_int,
            ]
            lib.cuMemAddressReserve.argtypes = [ctypes.POINTER(u64), size, size, u64, u64]
            lib.cuMemMap.argtypes = [u64, size, size, u64, u64]
            lib.cuMemSetAccess.argtypes = [u64, size, ctypes.POINTER(_MemAccessDesc), size]
            lib.cuMemUnmap.argtypes = [u64, size]
            lib.cuMemAddressFree.argtypes = [u64, size]
            lib.cuMemRelease.argtypes = [u64]
            self._driver = lib
        return self._driver

    def vmm_import(self, ordinal: int, fd: int, alloc_size: int) -> VmmMapping:
        """Import the VMM allocation behind ``fd`` (not closed here) and map all
        ``alloc_size`` bytes read-write on ``ordinal``; unwinds on failure."""
        drv = self._driver_lib()
        handle, base = ctypes.c_uint64(), ctypes.c_uint64()
        with self.torch.cuda.device(ordinal):
            self.torch.cuda.synchronize(ordinal)  # binds the primary context to this thread
            err = drv.cuMemImportFromShareableHandle(
                ctypes.byref(handle), ctypes.c_void_p(fd), _CU_MEM_HANDLE_TYPE_POSIX_FD
            )
            if err:
                raise RegistrationError(f"cuMemImportFromShareableHandle failed: CUresult {err}")
            undo = [lambda: drv.cuMemRelease(handle.value)]
            try:
                err = drv.cuMemAddressReserve(ctypes.byref(base), alloc_size, 0, 0, 0)
                if err:
                    raise RegistrationError(f"cuMemAddressReserve failed: CUresult {err}")
                undo.append(lambda: drv.cuMemAddressFree(base.value, alloc_size))
                err = drv.cuMemMap(base.value, alloc_size, 0, handle.value, 0)
                if err:
                    raise RegistrationError(f"cuMemMap failed: CUresult {err}")
                undo.append(lambda: drv.cuMemUnmap(base.value, alloc_size))
                access = _MemAccessDesc(
                    _MemLocation(_CU_MEM_LOCATION_TYPE_DEVICE, ordinal),
                    _CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
                )
                err = drv.cuMemSetAccess(base.value, alloc_size, ctypes.byref(access), 1)
                if err:
                    raise RegistrationError(f"cuMemSetAccess failed: CUresult {err}")
            except BaseException:
                for step in reversed(undo):
                    step()
                raise
        return VmmMapping(int(base.value), alloc_size, int(handle.value))

    def vmm_release(self, ordinal: int, mapping: VmmMapping) -> None:
        """Unmap, free the address range and release the imported handle (each step runs
        even if an earlier one fails; the first failure is raised at the end)."""
        drv = self._driver_lib()
        errors = []
        with self.torch.cuda.device(ordinal):
            for what, err in (
                ("cuMemUnmap", drv.cuMemUnmap(mapping.base_ptr, mapping.size)),
                ("cuMemAddressFree", drv.cuMemAddressFree(mapping.base_ptr, mapping.size)),
                ("cuMemRelease", drv.cuMemRelease(mapping.alloc_handle)),
            ):
                if err:
                    errors.append(f"{what}: CUresult {err}")
        if errors:
            raise RegistrationError("releasing a VMM mapping failed: " + ", ".join(errors))
