"""Fixed-slot object stores on one device or file: the core of ``raw_block`` and ``dax``.

Layout (raw_block's on-device format; dax uses the same with its own sizes)::

    [0, meta_total)        two metadata checkpoint copies, written alternately; a copy is
                           a header block (little-endian: magic 8s, version u32, sequence
                           u64, payload length u64, CRC-32 u32) and a JSON payload with the
                           layout, next_slot and entries {index string: {offset, size}}
    [meta_total, ...)      slots of ``stride`` bytes; a slot starts with a header of
                           ``header_bytes`` (magic b"LMCBLK01", slot identity u64, payload
                           length u64, then kvhive's CRC-32 of the payload u32 + tag b"KVC1",
                           zeros) followed by the payload

The slot identity is BLAKE2b-64 of the object's index string (``naming.block_name``), so a
read verifies that the slot still holds that key; a CRC tag (absent in slots written by the
reference) makes flipped payload bits a detected corruption.  The index lives in memory and
is checkpointed every ``checkpoint_interval`` seconds when it changed, and at close; at
start-up the newest valid checkpoint is loaded and, with ``verify_on_load``, entries whose
slot header does not match are dropped.  A slot being read is freed only after the read.
"""

from __future__ import annotations

import json
import logging
import struct
import threading
import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

from kvhive.errors import CapacityExceeded, CorruptObject, ObjectMissing
from kvhive.keys import ObjectKey
from kvhive.storage.l2.base import ObjectStore
from kvhive.storage.l2.integrity import fast_check
from kvhive.storage.l2.naming import block_name, parse_block_name, slot_identity

log = logging.getLogger(__name__)

SLOT_MAGIC = b"LMCBLK01"
CRC_TAG = b"KVC1"  # check field: CRC-32 of the payload (kvhive before XXH3; read only)
XXH_TAG = b"KVX3"  # check field: low 32 bits of XXH3-64 of the payload (integrity.fast_check)
_SLOT = struct.Struct("<8sQQI4s")
_META = struct.Struct("<8sIQQI")


class SlotIO(Protocol):
    """Positional I/O on the device (pread/pwrite or a memory mapping)."""

    def size(self) -> int: ...
    def write(self, offset: int, parts: Sequence[memoryview]) -> None: ...
    def read(self, offset: int, parts: Sequence[memoryview], limit: int) -> int: ...
    def sync(self) -> None: ...
    def close(self) -> None: ...


class SlotStore(ObjectStore):
    """Objects in equal slots with a checkpointed index (module docstring)."""

    frames = False
    durable = True

    def __init__(
        self,
        io: SlotIO,
        *,
        device_path: str,
        stride: int,
        header_bytes: int,
        block_align: int,
        meta_total_bytes: int,
        meta_magic: bytes,
        meta_version: int,
        checkpoint_interval: float,
        periodic: bool,
        load_checkpoint: bool,
        verify_on_load: bool,
    ) -> None:
        self.io, self.path = io, device_path
        self.stride, self.header, self.align = stride, header_bytes, block_align
        self.meta_total, self.magic, self.version = meta_total_bytes, meta_magic, meta_version
        self.container = (meta_total_bytes // 2) // block_align * block_align
        self.slots = (io.size() - meta_total_bytes) // stride
        self.capacity_bytes = self.slots * stride  # fixed: slots x slot size
        if self.container <= block_align or self.slots <= 0:
            raise CapacityExceeded(f"{device_path}: too small for metadata and one slot")
        self._lock = threading.Lock()
        self._index: dict[str, tuple[int, int]] = {}
        self._free: list[int] = []
        self._next = 0
        self._busy: set[str] = set()
        self._readers: dict[int, int] = {}
        self._doomed: set[int] = set()
        self._seq = 0
        self._dirty = False
        if load_checkpoint:
            self._load(verify_on_load)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if periodic:
            self._thread = threading.Thread(
                target=self._checkpoint_loop, args=(checkpoint_interval,), daemon=True,
                name="l2-slot-checkpoint",
            )  # fmt: skip
            self._thread.start()

    def _offset(self, slot: int) -> int:
        return self.meta_total + slot * self.stride

    # -- objects ------------------------------------------------------------------------

    def put(self, key: ObjectKey, parts: Sequence[memoryview]) -> None:
        name = block_name(key)
        n = sum(p.nbytes for p in parts)
        if n > self.stride - self.header:
            raise CapacityExceeded(f"{n} bytes exceed the slot payload {self.stride - self.header}")
        with self._lock:
            if name in self._index or name in self._busy:
                return
            slot = self._allocate()
            self._busy.add(name)
        try:
            check = fast_check(parts) & 0xFFFFFFFF
            head = _SLOT.pack(SLOT_MAGIC, slot_identity(name), n, check, XXH_TAG)
            self.io.write(self._offset(slot), [memoryview(head.ljust(self.header, b"\0")), *parts])
        except BaseException:
            with self._lock:
                self._busy.discard(name)
                self._free.append(slot)
            raise
        with self._lock:
            self._busy.discard(name)
            self._index[name] = (slot, n)
            self._dirty = True

    def get(self, key: ObjectKey, parts: Sequence[memoryview]) -> int:
        name = block_name(key)
        with self._lock:
            entry = self._index.get(name)
            if entry is None:
                raise ObjectMissing(name)
            slot, n = entry
            self._readers[slot] = self._readers.get(slot, 0) + 1
        try:
            self._read_slot(slot, name, n, parts)
            return n
        finally:
            self._release_reader(slot)

    def _read_slot(self, slot: int, name: str, n: int, parts: Sequence[memoryview]) -> None:
        off = self._offset(slot)
        head = memoryview(bytearray(_SLOT.size))
        self.io.read(off, [head], off + _SLOT.size)
        magic, ident, length, crc, tag = _SLOT.unpack(head)
        if magic != SLOT_MAGIC or ident != slot_identity(name) or length != n:
            raise CorruptObject(f"slot {slot} header does not match {name}")
        want = sum(p.nbytes for p in parts)
        if want != n:
            raise CorruptObject(f"slot {slot} holds {n} bytes, expected {want}")
        self.io.read(off + self.header, parts, off + self.header + n)
        if tag == XXH_TAG:
            if fast_check(parts) & 0xFFFFFFFF != crc:
                raise CorruptObject(f"slot {slot} checksum mismatch")
        elif tag == CRC_TAG:
            got = 0
            for part in parts:
                got = zlib.crc32(part, got)
            if got != crc:
                raise CorruptObject(f"slot {slot} checksum mismatch")

    def exists(self, key: ObjectKey) -> bool:
        with self._lock:
            return block_name(key) in self._index

    def delete(self, key: ObjectKey) -> bool:
        with self._lock:
            entry = self._index.pop(block_name(key), None)
            if entry is None:
                return False
            slot = entry[0]
            if self._readers.get(slot):
                self._doomed.add(slot)
            else:
                self._free.append(slot)
            self._dirty = True
            return True

    def scan(self) -> Iterator[tuple[ObjectKey, int]]:
        with self._lock:
            names = list(self._index)
        for name in names:
            key = parse_block_name(name)
            if key is not None:
                yield key, self.stride

    def footprint(self, nbytes: int) -> int:
        return self.stride

    def status(self) -> dict[str, Any]:
        with self._lock:
            return {"device_path": self.path, "slots": self.slots, "used_slots": len(self._index),
                    "slot_bytes": self.stride, "checkpoint_seq": self._seq}  # fmt: skip

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.checkpoint()
        self.io.close()

    # -- slots (lock held) --------------------------------------------------------------

    def _allocate(self) -> int:
        if self._free:
            return self._free.pop()
        if self._next < self.slots:
            self._next += 1
            return self._next - 1
        raise CapacityExceeded(f"{self.path}: all {self.slots} slots are in use")

    def _release_reader(self, slot: int) -> None:
        with self._lock:
            left = self._readers[slot] - 1
            if left:
                self._readers[slot] = left
                return
            del self._readers[slot]
            if slot in self._doomed:
                self._doomed.discard(slot)
                self._free.append(slot)

    # -- checkpoints ----------------------------------------------------------------------

    def checkpoint(self) -> bool:
        """Write the index if it changed; returns whether a checkpoint was written."""
        with self._lock:
            if not self._dirty:
                return False
            entries = {
                n: {"offset": self._offset(s), "size": size} for n, (s, size) in self._index.items()
            }
            state = {**self._layout(), "next_slot": self._next, "entries": entries}
            self._dirty = False
            seq = self._seq = self._seq + 1
        payload = json.dumps(state, separators=(",", ":")).encode()
        if len(payload) > self.container - self.align:
            log.warning(
                "%s: index of %d entries exceeds the metadata area", self.path, len(entries)
            )
            return False
        base = ((seq - 1) % 2) * self.container
        head = _META.pack(self.magic, self.version, seq, len(payload), zlib.crc32(payload))
        self.io.write(base + self.align, [memoryview(payload)])
        self.io.write(base, [memoryview(head.ljust(self.align, b"\0"))])
        self.io.sync()
        return True

    def _layout(self) -> dict[str, Any]:
        return {"version": 1, "device_path": self.path, "capacity_bytes": self.io.size(),
                "block_align": self.align, "header_bytes": self.header, "slot_bytes": self.stride,
                "meta_total_bytes": self.meta_total, "meta_magic": self.magic.decode(),
                "meta_version": self.version, "data_base_offset": self.meta_total}  # fmt: skip

    def _newest(self) -> dict[str, Any] | None:
        best: tuple[int, dict[str, Any]] | None = None
        for base in (0, self.container):
            head = memoryview(bytearray(_META.size))
            self.io.read(base, [head], base + _META.size)
            magic, version, seq, length, crc = _META.unpack(head)
            if (
                magic != self.magic
                or version != self.version
                or not 0 < length <= self.container - self.align
            ):
                continue
            payload = memoryview(bytearray(length))
            self.io.read(base + self.align, [payload], base + self.align + length)
            if zlib.crc32(payload) != crc:
                continue
            try:
                state = json.loads(bytes(payload))
            except ValueError:
                continue
            if best is None or seq > best[0]:
                best = (seq, state)
        if best is not None:
            self._seq = best[0]
            return best[1]
        return None

    def _load(self, verify: bool) -> None:
        state = self._newest()
        if state is None:
            return
        layout = self._layout()
        if any(
            state.get(k) != layout[k]
            for k in ("slot_bytes", "header_bytes", "block_align", "meta_total_bytes")
        ):
            log.warning(
                "%s: checkpoint layout differs from the configuration; ignoring it", self.path
            )
            return
        used: set[int] = set()
        for name, entry in state.get("entries", {}).items():
            slot, rem = divmod(int(entry["offset"]) - self.meta_total, self.stride)
            size = int(entry["size"])
            if rem or not 0 <= slot < self.slots or not 0 < size <= self.stride - self.header:
                continue
            if verify and not self._header_matches(slot, name, size):
                continue
            self._index[name] = (slot, size)
            used.add(slot)
        self._next = min(self.slots, max(int(state.get("next_slot", 0)), max(used, default=-1) + 1))
        self._free = [s for s in range(self._next) if s not in used]
        log.info(
            "%s: recovered %d objects from checkpoint %d", self.path, len(self._index), self._seq
        )

    def _header_matches(self, slot: int, name: str, size: int) -> bool:
        head = memoryview(bytearray(_SLOT.size))
        off = self._offset(slot)
        self.io.read(off, [head], off + _SLOT.size)
        magic, ident, length, _, _ = _SLOT.unpack(head)
        return magic == SLOT_MAGIC and ident == slot_identity(name) and length == size

    def _checkpoint_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.checkpoint()
            except Exception:  # task boundary: the next tick tries again
                log.exception("%s: checkpoint failed", self.path)
