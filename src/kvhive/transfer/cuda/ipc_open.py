"""Opening a registration's CUDA IPC descriptors into strided device tensors.

What the lmcache 0.5.6 worker sends, per layer (protocol §4.3; facts read from its
``platform/base/ipc_wire.py`` and ``platform/devices/cuda/ipc_wrapper.py``):

``cuda`` (the default)
    ``handle`` is the 8-tuple torch's ``UntypedStorage._share_cuda_()`` returns for the
    layer's storage: worker device index, the allocator's shareable memory handle, the
    storage's size in bytes, its byte offset inside the allocator block, the name and
    slot of torch's shared-memory IPC reference counter, an IPC event handle and whether
    the opener must wait on it.  The worker reopens nothing; the server calls
    ``UntypedStorage._new_shared_cuda`` with the last seven values and *its own* ordinal
    in place of the first (found from ``device_uuid``), then ``set_`` s a tensor onto the
    storage with the metadata's shape/stride/offset.  torch maps the block once per
    process, waits on the event itself when asked, and decrements the worker's reference
    counter when the rebuilt storage is freed (until then the worker keeps the block).
    The view must fit in ``storage_size_bytes``.

``cuda_raw`` (``isolated_ipc``)
    ``ipc_handle`` is the ``cudaIpcMemHandle_t`` of the *whole* allocation the tensor
    lives in; ``alloc_offset`` is the tensor's first byte relative to the allocation's
    base and ``nbytes`` the tensor's bytes (the worker requires a contiguous tensor, so
    the metadata's ``storage_offset`` is 0 and its span must fit in ``nbytes``).  It is
    opened with ``cudaIpcOpenMemHandle(..., cudaIpcMemLazyEnablePeerAccess)``, which
    yields the allocation's base; the driver keeps one mapping per process and
    allocation and one ``cudaIpcCloseMemHandle`` unmaps it for every user, so openings
    are reference-counted per handle across all registrations of this process (the
    table below) and closed when the last user closes.

``cuda_vmm`` (``use_vmm_api``)
    One physical chunk of a VMM allocation: ``alloc_size`` bytes, the tensor at
    ``[alloc_offset, alloc_offset + nbytes)``.  ``kind="fabric"`` carries a 64-byte
    fabric handle (needs an IMEX channel; not supported here).  ``kind="posix_fd"``
    carries only a 16-byte ``export_id``: the fd itself is meant to travel out of band
    over a Unix socket (``SCM_RIGHTS``) and be looked up by that id on the receiving
    side -- but the 0.5.6 worker has no such channel (nothing in its mp adapter or
    transport ever sends the fd it exported), so a 0.5.6 ``cuda_vmm`` registration
    reaches the server without its fd and is refused with a RegistrationError saying
    so.  A caller that does receive the fds passes them as :class:`VmmFd` records; the
    allocation is then imported (``cuMemImportFromShareableHandle``), mapped
    (``cuMemAddressReserve``/``cuMemMap``/``cuMemSetAccess``) once per export id and
    released on close.

Every view is rebuilt from its dtype, shape, stride and offset; contiguity is never
assumed.  Each opened layer is described by a :class:`~kvhive.transfer.descriptors.
TensorDesc` with ``storage_kind="device"``: its ``shm_name`` is a label
``"cuda:<ordinal>/<n>"`` shared by all views of one storage (``cuda``) or allocation
(``cuda_raw``/``cuda_vmm``), ``storage_offset`` counts from that storage's or
allocation's start (the tensor's own ``storage_offset()`` is the same), and ``nbytes``
is its size: ``storage_size_bytes``; ``alloc_size``; for ``cuda_raw`` (whose allocation
size is not sent) the furthest byte any view of the handle declares.

This module imports no torch; the runtime (default :class:`~.runtime.TorchCudaRuntime`)
does.  Descriptors are taken structurally (the ``kvhive.wire.types`` CUDA structs fit
the protocols below), since ``transfer`` may not import ``wire``.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Protocol

from kvhive.errors import RegistrationError
from kvhive.transfer.descriptors import TensorDesc, itemsize

log = logging.getLogger(__name__)


class ViewMetadata(Protocol):
    @property
    def dtype(self) -> str: ...
    @property
    def shape(self) -> Sequence[int]: ...
    @property
    def stride(self) -> Sequence[int]: ...
    @property
    def storage_offset(self) -> int: ...
    @property
    def device_uuid(self) -> str: ...


class IpcDescriptor(Protocol):
    """Any CUDA descriptor: its ``type`` tag and view metadata (the other fields are
    read by kind: ``handle``; ``ipc_handle``/``alloc_offset``/``nbytes``; ``export_id``/
    ``kind``/``alloc_size``/``alloc_offset``/``nbytes``)."""

    @property
    def type(self) -> str: ...
    @property
    def metadata(self) -> ViewMetadata: ...


class IpcRuntime(Protocol):
    """The CUDA operations this module needs (real: :class:`~.runtime.TorchCudaRuntime`)."""

    def device_ordinal(self, device_uuid: str) -> int: ...
    def open_shared_storage(self, ordinal: int, handle: Any) -> Any: ...
    def view_storage(
        self,
        storage: Any,
        ordinal: int,
        dtype: str,
        shape: Sequence[int],
        stride: Sequence[int],
        storage_offset: int,
    ) -> Any: ...
    def ipc_open_mem_handle(self, ordinal: int, handle: bytes) -> int: ...
    def ipc_close_mem_handle(self, ordinal: int, ptr: int) -> None: ...
    def wrap_pointer(self, ordinal: int, ptr: int, nbytes: int) -> Any: ...
    def typed_view(
        self, flat: Any, dtype: str, shape: Sequence[int], stride: Sequence[int], offset: int
    ) -> Any: ...
    def empty_view(
        self, ordinal: int, dtype: str, shape: Sequence[int], stride: Sequence[int]
    ) -> Any: ...
    def vmm_import(self, ordinal: int, fd: int, alloc_size: int) -> Any: ...
    def vmm_release(self, ordinal: int, mapping: Any) -> None: ...


@dataclass(frozen=True, slots=True)
class VmmFd:
    """A POSIX fd of a ``cuda_vmm`` allocation, received out of band, and the
    ``export_id`` its descriptor names.  :func:`open_device_kv` takes ownership."""

    export_id: bytes
    fd: int


@dataclass(frozen=True, slots=True)
class OpenedLayer:
    """One opened layer: its validated description and the strided device tensor (valid
    until the owning :class:`DeviceKV` is closed)."""

    desc: TensorDesc
    tensor: Any


# ---- the process-wide cuda_raw mapping table ---------------------------------------------------


@dataclass(slots=True)
class _RawMapping:
    ordinal: int
    ptr: int
    refs: int
    runtime: IpcRuntime


class RawMappingTable:
    """``cudaIpcOpenMemHandle`` mappings of this process, one per handle, counted.

    Contract: :meth:`acquire` and :meth:`release` pair up (one release per acquire);
    the mapping is closed with the runtime that opened it when the count reaches 0.
    ``_lock`` guards the table and is held across the open and close calls, so a handle
    is never opened twice or closed while being reopened."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: dict[bytes, _RawMapping] = {}

    def acquire(self, runtime: IpcRuntime, ordinal: int, handle: bytes) -> int:
        with self._lock:
            entry = self._entries.get(handle)
            if entry is None:
                ptr = runtime.ipc_open_mem_handle(ordinal, handle)
                entry = self._entries[handle] = _RawMapping(ordinal, ptr, 0, runtime)
            elif entry.ordinal != ordinal:
                raise RegistrationError(
                    f"cuda_raw handle already opened on cuda:{entry.ordinal}, now named "
                    f"on cuda:{ordinal}"
                )
            entry.refs += 1
            return entry.ptr

    def release(self, handle: bytes) -> None:
        with self._lock:
            entry = self._entries.get(handle)
            if entry is None:
                return
            entry.refs -= 1
            if entry.refs > 0:
                return
            del self._entries[handle]
            entry.runtime.ipc_close_mem_handle(entry.ordinal, entry.ptr)

    def refs(self, handle: bytes) -> int:
        """Open references on ``handle`` (0 when not mapped)."""
        with self._lock:
            entry = self._entries.get(handle)
            return entry.refs if entry is not None else 0


RAW_MAPPINGS = RawMappingTable()


# ---- DeviceKV ---------------------------------------------------------------------------------


@dataclass(eq=False)
class DeviceKV:
    """Every IPC resource of one registration, and its opened layers (in descriptor order).

    Contract: :meth:`close` (idempotent; also on leaving a ``with`` block) releases what
    was opened -- rebuilt storages, raw-handle references, VMM mappings -- after which
    the layers' tensors must not be touched (``cuda_raw``/``cuda_vmm`` tensors would
    point at unmapped memory).  The caller makes sure no copy is still running on them.
    A failure of one release is logged and the others still run."""

    device: int
    layers: tuple[OpenedLayer, ...]
    _releases: list[Callable[[], None]] = field(default_factory=list, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    closed: bool = False

    def close(self) -> None:
        with self._lock:
            if self.closed:
                return
            self.closed = True
            releases, self._releases = self._releases, []
            self.layers = ()
        _run_releases(releases)

    def __enter__(self) -> DeviceKV:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _run_releases(releases: list[Callable[[], None]]) -> None:
    """Run releases newest first; each failure is logged, none stops the rest."""
    for release in reversed(releases):
        try:
            release()
        except Exception:  # teardown: log it and release the rest
            log.warning("releasing a CUDA IPC resource failed", exc_info=True)


# ---- opening ----------------------------------------------------------------------------------


class _Opener:
    """Opens one registration's descriptors; owns what it opened until handed over."""

    def __init__(
        self,
        runtime: IpcRuntime,
        fds: Sequence[VmmFd],
        table: RawMappingTable,
        raw_extents: dict[bytes, int],
    ) -> None:
        self.rt = runtime
        self.table = table
        self.fds = {f.export_id: f.fd for f in fds}
        self.raw_extents = raw_extents
        self.releases: list[Callable[[], None]] = []
        self.labels: dict[tuple[Any, ...], str] = {}
        self.flats: dict[tuple[Any, ...], Any] = {}
        self.ordinal: int | None = None

    def _ordinal(self, meta: ViewMetadata) -> int:
        ordinal = self.rt.device_ordinal(meta.device_uuid)
        if self.ordinal is None:
            self.ordinal = ordinal
        elif ordinal != self.ordinal:
            raise RegistrationError(
                f"a registration's layers must share one device: cuda:{self.ordinal} and "
                f"cuda:{ordinal} ({meta.device_uuid!r})"
            )
        return ordinal

    def _label(self, key: tuple[Any, ...], ordinal: int) -> str:
        label = self.labels.get(key)
        if label is None:
            label = self.labels[key] = f"cuda:{ordinal}/{len(self.labels)}"
        return label

    def open(self, d: Any, i: int) -> OpenedLayer:
        kind = getattr(d, "type", type(d).__name__)
        if kind == "cuda":
            return self._cuda(d)
        if kind == "cuda_raw":
            return self._raw(d)
        if kind == "cuda_vmm":
            return self._vmm(d)
        raise RegistrationError(f"layer {i}: {kind!r} is not a CUDA IPC descriptor")

    def _cuda(self, d: Any) -> OpenedLayer:
        m, h = d.metadata, d.handle
        ordinal = self._ordinal(m)
        if h.mem_handle is None:
            if 0 not in m.shape:
                raise RegistrationError(
                    "cuda descriptor without a memory handle for a non-empty view"
                )
            desc = TensorDesc(m.dtype, m.shape, m.stride, m.storage_offset, "", 0, "device")
            return OpenedLayer(desc, self.rt.empty_view(ordinal, desc.dtype, m.shape, m.stride))
        label = self._label(("cuda", h.mem_handle, h.storage_offset_bytes), ordinal)
        desc = TensorDesc(
            m.dtype, m.shape, m.stride, m.storage_offset, label, h.storage_size_bytes, "device"
        )
        # no release entry: the storage lives as long as the tensor, and freeing it
        # returns the worker's reference (torch's counter in the worker's shared memory)
        storage = self.rt.open_shared_storage(ordinal, h)
        tensor = self.rt.view_storage(
            storage, ordinal, desc.dtype, desc.shape, desc.stride, desc.storage_offset
        )
        return OpenedLayer(desc, tensor)

    def _flat(
        self, key: tuple[Any, ...], ordinal: int, opener: Callable[[], int], size: int
    ) -> Any:
        """The allocation of ``key`` as one flat uint8 tensor, opened once per registration."""
        flat = self.flats.get(key)
        if flat is None:
            base = opener()
            flat = self.flats[key] = self.rt.wrap_pointer(ordinal, base, size)
        return flat

    def _byte_range_view(
        self, d: Any, key: tuple[Any, ...], ordinal: int, size: int, opener: Callable[[], int]
    ) -> OpenedLayer:
        """A view whose bytes start ``d.alloc_offset`` into an allocation of ``size``."""
        m = d.metadata
        label = self._label(key, ordinal)
        # the view must lie in its declared byte range [alloc_offset, alloc_offset + nbytes)
        local = TensorDesc(m.dtype, m.shape, m.stride, m.storage_offset, label, d.nbytes, "device")
        isz = itemsize(local.dtype)
        if d.alloc_offset % isz:
            raise RegistrationError(
                f"{d.type}: alloc_offset {d.alloc_offset} is not a multiple of the "
                f"{local.dtype} element size {isz}"
            )
        offset = d.alloc_offset // isz + m.storage_offset
        desc = TensorDesc(local.dtype, local.shape, local.stride, offset, label, size, "device")
        if not desc.numel:
            return OpenedLayer(desc, self.rt.empty_view(ordinal, desc.dtype, m.shape, m.stride))
        flat = self._flat(key, ordinal, opener, size)
        whole = flat[: size - size % isz]
        tensor = self.rt.typed_view(whole, desc.dtype, desc.shape, desc.stride, offset)
        return OpenedLayer(desc, tensor)

    def _raw(self, d: Any) -> OpenedLayer:
        ordinal = self._ordinal(d.metadata)
        handle = bytes(d.ipc_handle)
        key = ("raw", handle)

        def opener() -> int:
            ptr = self.table.acquire(self.rt, ordinal, handle)
            self.releases.append(lambda: self.table.release(handle))
            return ptr

        return self._byte_range_view(d, key, ordinal, self.raw_extents[handle], opener)

    def _vmm(self, d: Any) -> OpenedLayer:
        ordinal = self._ordinal(d.metadata)
        if d.kind == "fabric":
            raise RegistrationError(
                "cuda_vmm with a fabric handle is not supported by this server (importing it "
                "needs an IMEX channel); register with use_vmm_api off"
            )
        export_id = bytes(d.export_id)
        fd = self.fds.get(export_id)
        if fd is None:
            raise RegistrationError(
                f"cuda_vmm (posix_fd) allocation {export_id.hex()}: its file descriptor was "
                "not delivered. The descriptor carries only an export id; lmcache 0.5.6 "
                "workers have no channel that sends the fd (SCM_RIGHTS) to the server, so "
                "this registration cannot be served: register with use_vmm_api off"
            )
        size = d.alloc_size

        def opener() -> int:
            mapping = self.rt.vmm_import(ordinal, fd, size)
            self.releases.append(lambda: self.rt.vmm_release(ordinal, mapping))
            return int(mapping.base_ptr)

        return self._byte_range_view(d, ("vmm", export_id), ordinal, size, opener)


def _raw_extents(descriptors: Sequence[Any]) -> dict[bytes, int]:
    """Per ``cuda_raw`` handle, the furthest byte any of its views declares."""
    out: dict[bytes, int] = {}
    for d in descriptors:
        if getattr(d, "type", None) == "cuda_raw":
            h = bytes(d.ipc_handle)
            out[h] = max(out.get(h, 0), d.alloc_offset + d.nbytes)
    return out


def _vmm_sizes_agree(descriptors: Sequence[Any]) -> None:
    sizes: dict[bytes, int] = {}
    for d in descriptors:
        if getattr(d, "type", None) == "cuda_vmm":
            size = sizes.setdefault(bytes(d.export_id), d.alloc_size)
            if size != d.alloc_size:
                raise RegistrationError(
                    f"cuda_vmm allocation {bytes(d.export_id).hex()} declared with sizes "
                    f"{size} and {d.alloc_size}"
                )


def open_device_kv(
    descriptors: Sequence[IpcDescriptor],
    *,
    fds: Sequence[VmmFd] = (),
    runtime: IpcRuntime | None = None,
    table: RawMappingTable | None = None,
) -> DeviceKV:
    """Open every layer of one registration (``cuda``/``cuda_raw``/``cuda_vmm``).

    ``fds`` are ``cuda_vmm`` fds received out of band; they are closed before this
    returns, used or not (an import holds its own reference to the allocation).
    ``runtime`` defaults to :class:`~.runtime.TorchCudaRuntime` (loading torch; refusing
    with the install hint when CUDA is unusable); ``table`` to the process's
    :data:`RAW_MAPPINGS`.  Raises RegistrationError; whatever was opened before the
    failure is released first.
    """
    try:
        if not descriptors:
            raise RegistrationError("a CUDA registration needs at least one layer descriptor")
        if runtime is None:
            from kvhive.transfer.cuda.runtime import TorchCudaRuntime

            runtime = TorchCudaRuntime()
        _vmm_sizes_agree(descriptors)
        opener = _Opener(
            runtime, fds, table if table is not None else RAW_MAPPINGS, _raw_extents(descriptors)
        )
        layers: list[OpenedLayer] = []
        try:
            for i, d in enumerate(descriptors):
                layers.append(opener.open(d, i))
        except BaseException:
            layers.clear()
            opener.flats.clear()
            _run_releases(opener.releases)
            raise
        assert opener.ordinal is not None
        return DeviceKV(opener.ordinal, tuple(layers), opener.releases)
    finally:
        for f in fds:
            try:
                os.close(f.fd)
            except OSError:
                log.warning("closing cuda_vmm fd %d failed", f.fd)
