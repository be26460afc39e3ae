"""One CUDA registration, opened end to end: IPC handles -> device views -> copy backend.

:func:`open_cuda_backend` is what the engine calls (lazily: importing this module imports
no torch) when ``register_kv_cache`` carries ``cuda``/``cuda_raw``/``cuda_vmm``
descriptors.  It opens every layer (:mod:`.ipc_open`, refusing with the ``kvhive[cuda]``
hint when this server has no usable CUDA), plans the copies with the same layout code as
the ``cpu_shm`` path (:class:`~kvhive.transfer.torch_paged.TorchPagedKV`), wires the
device's events (:class:`.events.DeviceEvents`), and hands back the host pinner the engine
gives to L1 (``L1Manager.pin_host_memory``) so copies to and from L1 run as DMA.

Ownership: the returned backend owns the :class:`.ipc_open.DeviceKV` (its ``close`` releases
every IPC mapping); the pinner belongs to L1 once handed over (L1 unpins at close).  If
anything fails, whatever was opened is released before the error propagates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kvhive.transfer.backend import CopyBackend
from kvhive.transfer.cuda.ipc_open import IpcRuntime, VmmFd, open_device_kv


@dataclass(frozen=True, slots=True)
class OpenedDevice:
    """A CUDA registration's copy backend, its device ordinal, and a pinner for L1
    (``None`` when the caller supplied its own runtime, as tests do)."""

    backend: CopyBackend
    device: int
    pinner: Any


def open_cuda_backend(
    descriptors: Sequence[Any],
    layout_hints: Mapping[str, Any] | None,
    group_infos: Sequence[Any],
    chunk_size: int,
    *,
    fds: Sequence[VmmFd] = (),
    runtime: IpcRuntime | None = None,
) -> OpenedDevice:
    """Open one registration's device KV cache and build its copy backend.

    ``runtime`` None: the real CUDA runtime (torch imported here).  Raises
    RegistrationError (with the install hint when CUDA is unusable) or LayoutError.
    """
    from kvhive.transfer.torch_paged import TorchPagedKV

    kv = open_device_kv(descriptors, fds=fds, runtime=runtime)
    try:
        events = pinner = None
        if runtime is None:
            from kvhive.transfer.cuda.events import DeviceEvents
            from kvhive.transfer.cuda.pinning import HostPinner

            events = DeviceEvents(kv.device)
            pinner = HostPinner(device=kv.device)
        backend = TorchPagedKV.from_layers(
            kv.layers, layout_hints, group_infos, chunk_size, events=events, owner=kv
        )
    except BaseException:
        kv.close()  # idempotent: from_layers may have closed it already
        raise
    return OpenedDevice(backend, kv.device, pinner)
