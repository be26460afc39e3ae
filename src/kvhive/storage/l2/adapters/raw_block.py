"""``raw_block`` and ``dax``: fixed-slot stores on a block/DAX device or a regular file.

``raw_block`` moves slots with pread/pwrite (O_DIRECT for aligned spans with
``use_odirect``) on a device or a file of fixed size (``capacity_bytes`` limits the used
part; a missing regular file is created with that size).  ``dax`` memory-maps each device
(or a regular file standing in for one) and copies slots with memcpy; each device is its
own slot store with a small metadata area, so the index survives a restart on dax too
(the reference keeps it in memory only).  Layout and checks: ``slots.py``.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from kvhive.config.l2_adapters import DaxAdapterConfig, RawBlockAdapterConfig
from kvhive.errors import CapacityExceeded, ObjectMissing
from kvhive.keys import ObjectKey
from kvhive.storage.l2 import fileio
from kvhive.storage.l2.adapters.mock import copy_out
from kvhive.storage.l2.adapters.slots import SlotStore
from kvhive.storage.l2.base import L2Adapter, ObjectStore
from kvhive.storage.l2.pooled import PooledAdapter
from kvhive.transfer.populate import Prefaulter, populate_supported

GiB = 1 << 30
DAX_HEADER = 4096
DAX_ALIGN = 4096
DAX_META_MAGIC = b"LMCIDX01"
DAX_CHECKPOINT_S = 10.0


def _open_sized(path: str, size: int) -> int:
    """Open a device, or a regular file grown to ``size`` bytes; returns its usable size."""
    if not os.path.exists(path):
        if size <= 0:
            raise CapacityExceeded(f"{path} does not exist and no size was given to create it")
        with open(path, "wb") as f:
            os.posix_fallocate(f.fileno(), 0, size)  # real blocks: no faults on first write
    with open(path, "rb") as f:
        end = f.seek(0, os.SEEK_END)
    if size > end and os.path.isfile(path):
        os.truncate(path, size)
        end = size
    return min(size, end) if size > 0 else end


class FileIO:
    """pread/pwrite on a device or file (``fileio``), limited to ``size`` bytes."""

    def __init__(self, path: str, size: int, *, direct: bool, align: int) -> None:
        self._size = _open_sized(path, size)
        self.fds = fileio.open_fds(path, os.O_RDWR, direct=direct, align=align)

    def size(self) -> int:
        return self._size

    def write(self, offset: int, parts: Sequence[memoryview]) -> None:
        fileio.write_at(self.fds, offset, parts)

    def read(self, offset: int, parts: Sequence[memoryview], limit: int) -> int:
        return fileio.read_at(self.fds, offset, parts, min(limit, self._size))

    def sync(self) -> None:
        os.fsync(self.fds.buffered)

    def close(self) -> None:
        fileio.close_fds(self.fds)


class MmapIO:
    """memcpy on a shared mapping of a DAX device or regular file.

    The mapping's page tables are filled in the background (``MADV_POPULATE_WRITE``, the
    L1 arena's Prefaulter): without it the first write to each 4 KiB page of the device
    faults (8,192 faults per 32 MiB slot; writes ran at 0.16x memcpy), and a sparse file on
    a full tmpfs would SIGBUS the server at first write instead of failing at start.
    """

    def __init__(self, path: str, size: int) -> None:
        self._size = _open_sized(path, size)
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            self._map = mmap.mmap(fd, self._size, mmap.MAP_SHARED)
        finally:
            os.close(fd)
        self._view = memoryview(self._map)
        self._prefaulter: Prefaulter | None = None
        if populate_supported() and self._size:
            base = int(np.frombuffer(self._map, np.uint8, 1).ctypes.data)
            self._prefaulter = Prefaulter(base, "kvhive-dax-populate")
            self._prefaulter.submit(0, self._size)

    def size(self) -> int:
        return self._size

    def write(self, offset: int, parts: Sequence[memoryview]) -> None:
        for part in parts:
            self._view[offset : offset + part.nbytes] = part.cast("B")
            offset += part.nbytes

    def read(self, offset: int, parts: Sequence[memoryview], limit: int) -> int:
        return copy_out(self._view[offset : min(limit, self._size)], parts)

    def sync(self) -> None:
        self._map.flush()

    def close(self) -> None:
        if self._prefaulter is not None:
            self._prefaulter.stop()  # before the unmap (its contract)
        self._view.release()
        self._map.close()


class MultiSlotStore(ObjectStore):
    """Several slot stores (dax ``devices``): a put goes to the first with a free slot."""

    frames = False
    durable = True

    def __init__(self, stores: list[SlotStore]) -> None:
        self.stores = stores
        self.capacity_bytes = sum(s.capacity_bytes for s in stores)

    def _holder(self, key: ObjectKey) -> SlotStore:
        for store in self.stores:
            if store.exists(key):
                return store
        raise ObjectMissing(str(key))

    def put(self, key: ObjectKey, parts: Sequence[memoryview]) -> None:
        if any(s.exists(key) for s in self.stores):
            return
        for store in self.stores:
            try:
                return store.put(key, parts)
            except CapacityExceeded:
                continue
        raise CapacityExceeded("every DAX device is full")

    def get(self, key: ObjectKey, parts: Sequence[memoryview]) -> int:
        return self._holder(key).get(key, parts)

    def exists(self, key: ObjectKey) -> bool:
        return any(s.exists(key) for s in self.stores)

    def delete(self, key: ObjectKey) -> bool:
        return any(s.delete(key) for s in self.stores)

    def scan(self) -> Iterator[tuple[ObjectKey, int]]:
        for store in self.stores:
            yield from store.scan()

    def footprint(self, nbytes: int) -> int:
        return self.stores[0].stride

    def status(self) -> dict[str, Any]:
        return {"devices": [s.status() for s in self.stores]}

    def close(self) -> None:
        for store in self.stores:
            store.close()


def _raw_block(cfg: RawBlockAdapterConfig) -> SlotStore:
    """The slot store on ``cfg.device_path``.  A device or file that cannot be opened, or is
    too small for the metadata area and one slot, is a ConfigError naming the adapter and the
    field (``kvhive server`` exits 2), not a traceback."""
    try:
        io = FileIO(
            cfg.device_path, cfg.capacity_bytes, direct=cfg.use_odirect, align=cfg.block_align
        )
    except CapacityExceeded as exc:  # a missing file and no capacity_bytes to create it
        raise cfg.fail(f"field 'capacity_bytes': {exc}") from None
    except OSError as exc:
        raise cfg.fail(f"field 'device_path': cannot open {cfg.device_path!r}: {exc}") from None
    need = cfg.meta_total_bytes + cfg.slot_bytes
    if io.size() < need:
        io.close()
        raise cfg.fail(
            f"field 'meta_total_bytes' ({cfg.meta_total_bytes}) and one slot of slot_bytes "
            f"({cfg.slot_bytes}) need {need} bytes, but {cfg.device_path!r} holds {io.size()} "
            "(raise capacity_bytes or lower meta_total_bytes)"
        )
    try:
        return _slot_store(cfg, io)
    except CapacityExceeded as exc:  # e.g. a metadata area too small for its two copies
        io.close()
        raise cfg.fail(f"field 'meta_total_bytes': {exc}") from None


def _slot_store(cfg: RawBlockAdapterConfig, io: FileIO) -> SlotStore:
    return SlotStore(
        io,
        device_path=cfg.device_path,
        stride=cfg.slot_bytes,
        header_bytes=cfg.header_bytes,
        block_align=cfg.block_align,
        meta_total_bytes=cfg.meta_total_bytes,
        meta_magic=cfg.meta_magic.encode(),
        meta_version=cfg.meta_version,
        checkpoint_interval=cfg.meta_checkpoint_interval_sec,
        periodic=cfg.meta_enable_periodic,
        load_checkpoint=cfg.load_checkpoint_on_init,
        verify_on_load=cfg.meta_verify_on_load,
    )


def _dax_device(path: str, size_gb: float, slot_bytes: int) -> SlotStore:
    """One DAX device of ``size_gb`` GiB: slots of ``slot_bytes`` payload plus a 4 KiB
    header, 4 KiB aligned, and an index area sized for that many slots (kvhive's layout)."""
    size = int(size_gb * GiB)
    stride = -(-(slot_bytes + DAX_HEADER) // DAX_ALIGN) * DAX_ALIGN
    meta = 2 * (-(-(8192 + 256 * max(1, size // stride)) // DAX_ALIGN) * DAX_ALIGN)  # 2 copies
    io = MmapIO(path, size)
    return SlotStore(
        io,
        device_path=path,
        stride=stride,
        header_bytes=DAX_HEADER,
        block_align=DAX_ALIGN,
        meta_total_bytes=meta,
        meta_magic=DAX_META_MAGIC,
        meta_version=1,
        checkpoint_interval=DAX_CHECKPOINT_S,
        periodic=True,
        load_checkpoint=True,
        verify_on_load=True,
    )


def build_raw_block(cfg: RawBlockAdapterConfig) -> L2Adapter:
    """``raw_block``: one slot store, served by store + load workers."""
    workers = cfg.num_store_workers + cfg.num_load_workers
    return PooledAdapter(_raw_block(cfg), workers=workers, integrity="raw", name=cfg.label)


def build_dax(cfg: DaxAdapterConfig) -> L2Adapter:
    """``dax``: one slot store per device (several: a put takes the first with room)."""
    stores = [
        _dax_device(d.device_path, d.max_dax_size_gb, cfg.slot_bytes) for d in cfg.device_list
    ]
    store: ObjectStore = stores[0] if len(stores) == 1 else MultiSlotStore(stores)
    workers = cfg.num_store_workers + cfg.num_load_workers
    return PooledAdapter(store, workers=workers, integrity="raw", name=cfg.label)
