"""``nixl_store``: a fixed pool of NIXL storage pages (files, or objects of an S3 bucket).

Storage: ``pool_size`` items.  File backends (POSIX here; GDS, GDS_MT, HF3FS, IBM_SCALE where
their plugins run) use files ``obj_<i>_<4 hex>.bin`` of ``backend_params.file_size`` bytes
(default: the L1 alignment, as in the reference; a multiple of it) in
``backend_params.file_path``, each cut into pages of the L1 alignment.  ``OBJ`` uses objects
``obj_<i>_<4 hex>`` of the bucket, one page each (``file_size`` bytes, default the alignment),
every object written whole.  Capacity = pages x page size.

An object (its logical bytes, then the integrity trailer kvhive adds by default) takes
⌈bytes / page⌉ pages, found as one contiguous run where possible (one descriptor per run).
The key -> pages map lives in memory only, so **nothing survives a restart**: the pool files
do (their names are kept in ``kvhive-nixl-pool.json``) and the next start reuses them, so disk
use stays ``pool_size x file_size`` however often the server restarts (the reference creates
``pool_size`` new, randomly named files at every start and never removes them).  With
``persist_enabled: false`` the files are removed at close.  A lock file keeps a second server
off the same pool.  Files left by the reference are not touched.

Transfers go through :class:`kvhive.storage.l2.nixl_runtime.NixlAgent` (the L1 arena
registered once, descriptors per transfer).  With ``use_direct_io`` each file is opened twice,
``O_DIRECT`` for page-aligned bodies and buffered for the unaligned tail and trailer.

Concurrency: ``put``/``get``/``exists``/``delete`` run on the PooledAdapter's threads.  The
page map and allocator are guarded by one lock; a ``get`` holds a read reference on its pages,
and a ``delete`` (or a re-store of the key) of pages being read frees them only when the last
reader is done, so a page is never rewritten under a reader.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvhive.config.l2_adapters import FLAG, NIXL_FILE_BACKENDS, NixlStoreAdapterConfig
from kvhive.errors import CapacityExceeded, ConfigError, ObjectMissing
from kvhive.keys import ObjectKey
from kvhive.storage.l2.base import HostRegion, L2Adapter, ObjectStore
from kvhive.storage.l2.fileio import STREAM_PIECE, slice_views
from kvhive.storage.l2.integrity import TRAILER_BYTES
from kvhive.storage.l2.nixl_runtime import (
    Extent,
    NixlAgent,
    Span,
    address_of,
    pair_up,
    slice_extents,
)
from kvhive.storage.l2.pooled import PooledAdapter

log = logging.getLogger(__name__)

MANIFEST = "kvhive-nixl-pool.json"
LOCK = ".kvhive-nixl-pool.lock"
DEFAULT_PAGE = 4096
"""Page size when the adapter runs without an L1 arena (bench, tests)."""


@dataclass(frozen=True, slots=True)
class PageRun:
    """``count`` consecutive pages from page ``start``."""

    start: int
    count: int


class PageAllocator:
    """Pages ``0..n-1`` as a byte map (0 = free), searched in C by ``bytearray.find``.

    Not thread-safe: the store calls it under its lock.
    """

    def __init__(self, pages: int) -> None:
        self._map = bytearray(pages)
        self.free = pages

    def take(self, n: int) -> list[PageRun] | None:
        """``n`` free pages: one run when a long enough one exists, else the first free
        runs in page order; None when fewer than ``n`` are free."""
        if n > self.free:
            return None
        start = self._map.find(bytes(n))
        if start >= 0:
            runs = [PageRun(start, n)]
        else:
            runs, at, left = [], 0, n
            while left:
                at = self._map.find(b"\x00", at)
                end = self._map.find(b"\x01", at)
                count = min(left, (len(self._map) if end < 0 else end) - at)
                runs.append(PageRun(at, count))
                at += count
                left -= count
        for run in runs:
            self._map[run.start : run.start + run.count] = b"\x01" * run.count
        self.free -= n
        return runs

    def give(self, runs: Sequence[PageRun]) -> None:
        for run in runs:
            self._map[run.start : run.start + run.count] = bytes(run.count)
            self.free += run.count


@dataclass(slots=True)
class Placement:
    """Where one stored object lives: its ``pages`` and stored ``length`` in bytes.
    ``readers`` counts gets in progress; ``doomed`` frees the pages when they end."""

    pages: list[PageRun]
    length: int
    readers: int = 0
    doomed: bool = field(default=False)


class PoolFiles:
    """The pool's files in ``directory``: created once, reused at every start (module
    docstring).  Holds an exclusive ``flock`` on the directory's lock file while open."""

    def __init__(self, directory: str, count: int, size: int, direct: bool) -> None:
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self._lock_fd = os.open(os.path.join(directory, LOCK), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            raise ConfigError(
                FLAG, f"nixl_store: {directory} is in use by another kvhive server"
            ) from None
        self.names = self._names(count)
        self.fds: list[int] = []
        self.direct_fds: list[int] = []
        for name in self.names:
            path = os.path.join(directory, name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            self.fds.append(fd)
            if os.fstat(fd).st_size != size:
                os.ftruncate(fd, size)
            with contextlib.suppress(OSError):  # blocks now, not on the first store
                os.posix_fallocate(fd, 0, size)
            if direct:
                self.direct_fds.append(os.open(path, os.O_RDWR | getattr(os, "O_DIRECT", 0)))
        self._write_manifest()

    def _names(self, count: int) -> list[str]:
        old: list[str] = []
        manifest = os.path.join(self.directory, MANIFEST)
        with contextlib.suppress(FileNotFoundError, ValueError, KeyError, TypeError), \
                open(manifest) as f:  # fmt: skip
            old = [n for n in json.load(f)["files"] if _is_pool_name(str(n))]
        for extra in old[count:]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, extra))
        names = old[:count]
        names += [f"obj_{i}_{uuid.uuid4().hex[:4]}.bin" for i in range(len(names), count)]
        return names

    def _write_manifest(self) -> None:
        tmp = os.path.join(self.directory, f"{MANIFEST}.tmp")
        with open(tmp, "w") as f:
            json.dump({"files": self.names}, f)
        os.replace(tmp, os.path.join(self.directory, MANIFEST))

    def close(self, remove: bool) -> None:
        for fd in self.fds + self.direct_fds:
            os.close(fd)
        if remove:
            for name in [*self.names, MANIFEST]:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.directory, name))
        os.close(self._lock_fd)
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(self.directory, LOCK))


def _is_pool_name(name: str) -> bool:
    parts = name.removesuffix(".bin").split("_")
    return (name.endswith(".bin") and len(parts) == 3 and parts[0] == "obj"
            and parts[1].isdigit() and "/" not in name)  # fmt: skip


class NixlPoolStore(ObjectStore):
    """Objects on a fixed pool of NIXL pages (module docstring)."""

    durable = False

    def __init__(self, cfg: NixlStoreAdapterConfig, host: HostRegion | None) -> None:
        align = host.align if host is not None else DEFAULT_PAGE
        params = cfg.params
        size = int(params.get("file_size", align))
        if size % align:
            raise cfg.fail(f"backend_params.file_size ({size}) must be a multiple of the "
                           f"L1 alignment ({align}, --l1-align-bytes)")  # fmt: skip
        self.cfg = cfg
        self._trailer = TRAILER_BYTES if cfg.integrity == "checksum" else 0
        self._agent = NixlAgent("nixl_store", cfg.backend, params, host)
        self._files: PoolFiles | None = None
        self._direct: dict[int, int] = {}
        try:
            if cfg.backend in NIXL_FILE_BACKENDS:
                self.kind, self.page, per_item = "FILE", align, size // align
                files = self._files = PoolFiles(params["file_path"], cfg.pool_size, size,
                                                cfg.direct_io)  # fmt: skip
                self._devs = files.fds
                self._direct = dict(zip(files.fds, files.direct_fds, strict=False))
                items = [(0, size, fd, "") for fd in files.fds + files.direct_fds]
            else:  # OBJ, AZURE_BLOB: one object per page, written whole
                self.kind, self.page, per_item = "OBJ", size, 1
                self._devs = list(range(cfg.pool_size))
                tag = uuid.uuid4().hex[:4]
                items = [(0, size, i, f"obj_{i}_{tag}") for i in self._devs]
            self._per_item = per_item
            self._reg = self._agent.register(items, self.kind)
        except BaseException:
            self._close_files(remove=False)
            self._agent.close()
            raise
        self._alloc = PageAllocator(cfg.pool_size * per_item)
        self._index: dict[ObjectKey, Placement] = {}
        self._mu = threading.Lock()
        self.capacity_bytes = cfg.pool_size * per_item * self.page

    # -- geometry --------------------------------------------------------------------------

    def _pages(self, nbytes: int) -> int:
        return -(-nbytes // self.page)

    def footprint(self, nbytes: int) -> int:
        """Whole pages of the object and its trailer, less the trailer PooledAdapter adds."""
        return self._pages(nbytes + self._trailer) * self.page - self._trailer

    def _extents(self, runs: Sequence[PageRun], length: int) -> list[Extent]:
        """Storage extents of the first ``length`` bytes of ``runs``: one per run and item
        (file), or one per page for objects (each written whole)."""
        out: list[Extent] = []
        left, per, size = length, self._per_item, self.page
        for run in runs:
            page, end = run.start, run.start + run.count
            while page < end and left > 0:
                item = page // per
                stop = end if self.kind == "FILE" else page + 1
                stop = min(stop, (item + 1) * per)
                n = min(left, (stop - page) * size)
                out.append(Extent((page - item * per) * size, n, self._devs[item]))
                left -= n
                page = stop
        return out

    # -- ObjectStore -----------------------------------------------------------------------

    def put(self, key: ObjectKey, parts: Sequence[memoryview]) -> None:
        length = sum(p.nbytes for p in parts)
        with self._mu:
            pages = self._alloc.take(self._pages(length))
        if pages is None:
            raise CapacityExceeded(f"nixl_store: no {self._pages(length)} free pages")
        try:
            self._move("WRITE", parts, self._extents(pages, length), self.cfg.store_timeout_s)
        except BaseException:
            with self._mu:
                self._alloc.give(pages)
            raise
        with self._mu:
            old = self._index.get(key)
            self._index[key] = Placement(pages, length)
            if old is not None:
                self._drop(old)

    def get(self, key: ObjectKey, parts: Sequence[memoryview]) -> int:
        return self.get_streamed(key, parts, _ignore)

    def get_streamed(self, key: ObjectKey, parts: Sequence[memoryview],
                     landed: Callable[[int], None]) -> int:  # fmt: skip
        """Read in ``fileio.STREAM_PIECE`` transfers, reporting each (``base.py``)."""
        with self._mu:
            place = self._index.get(key)
            if place is None:
                raise ObjectMissing(key)
            place.readers += 1
        try:
            want = min(place.length, sum(p.nbytes for p in parts))
            extents = self._extents(place.pages, want)
            step = STREAM_PIECE if self.kind == "FILE" else max(1, want)  # objects: whole
            for start in range(0, want, step):
                end = min(want, start + step)
                self._move("READ", slice_views(parts, start, end),
                           slice_extents(extents, start, end), self.cfg.timeout_s)  # fmt: skip
                landed(end)
            return place.length
        finally:
            with self._mu:
                place.readers -= 1
                if place.doomed and place.readers == 0:
                    self._alloc.give(place.pages)

    def exists(self, key: ObjectKey) -> bool:
        with self._mu:
            return key in self._index

    def exists_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        with self._mu:
            return [k in self._index for k in keys]

    def delete(self, key: ObjectKey) -> bool:
        with self._mu:
            place = self._index.pop(key, None)
            if place is not None:
                self._drop(place)
        return place is not None

    def _drop(self, place: Placement) -> None:  # _mu held
        if place.readers:
            place.doomed = True
        else:
            self._alloc.give(place.pages)

    def _move(self, op: str, parts: Sequence[memoryview], extents: Sequence[Extent],
              timeout: float) -> None:  # fmt: skip
        spans, storage = pair_up(parts, extents, self._direct)
        staged: list[Staged] = []
        if self.kind == "OBJ":  # an object is written whole: one descriptor each
            spans, storage, staged = whole_objects(spans, storage)
        local = [Span(address_of(p), p.nbytes) for p in parts if p.nbytes]
        local += [Span(int(st.buffer.ctypes.data), st.buffer.nbytes) for st in staged]
        if op == "WRITE":
            for st in staged:
                st.gather()
        with self._agent.local(local):
            self._agent.transfer(op, spans, storage, self.kind,  # type: ignore[arg-type]
                                 time.monotonic() + timeout)  # fmt: skip
        if op == "READ":
            for st in staged:
                st.scatter()

    # -- status and lifecycle --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._mu:
            free, objects = self._alloc.free, len(self._index)
        return {
            "backend": self.cfg.backend,
            "pool_size": self.cfg.pool_size,
            "page_bytes": self.page,
            "pages_free": free,
            "objects": objects,
            "path": self._files.directory if self._files else None,
            "direct_io": bool(self._direct),
        }

    def close(self) -> None:
        try:
            self._agent.deregister(self._reg)
        finally:
            self._agent.close()
            self._close_files(remove=not self.cfg.persist_enabled)

    def _close_files(self, remove: bool) -> None:
        if self._files is not None:
            self._files.close(remove)
            self._files = None


@dataclass(frozen=True, slots=True)
class Staged:
    """Host ``pieces`` that share one storage object, staged in ``buffer`` (consecutive)."""

    buffer: np.ndarray
    pieces: tuple[Span, ...]

    def gather(self) -> None:
        at = int(self.buffer.ctypes.data)
        for piece in self.pieces:
            ctypes.memmove(at, piece.address, piece.nbytes)
            at += piece.nbytes

    def scatter(self) -> None:
        at = int(self.buffer.ctypes.data)
        for piece in self.pieces:
            ctypes.memmove(piece.address, at, piece.nbytes)
            at += piece.nbytes


def whole_objects(spans: Sequence[Span], storage: Sequence[Extent]
                  ) -> tuple[list[Span], list[Extent], list[Staged]]:  # fmt: skip
    """Merge pairs that land in the same object into one pair through a staging buffer (an
    object's tail and the trailer come from different buffers; objects are written whole)."""
    out_s: list[Span] = []
    out_e: list[Extent] = []
    staged: list[Staged] = []
    i = 0
    while i < len(spans):
        j = i + 1
        while j < len(spans) and storage[j].dev_id == storage[i].dev_id:
            j += 1
        if j - i == 1:
            out_s.append(spans[i])
            out_e.append(storage[i])
        else:
            total = sum(s.nbytes for s in spans[i:j])
            st = Staged(np.empty(total, np.uint8), tuple(spans[i:j]))
            staged.append(st)
            out_s.append(Span(int(st.buffer.ctypes.data), total))
            out_e.append(Extent(storage[i].offset, total, storage[i].dev_id))
        i = j
    return out_s, out_e, staged


def _ignore(n: int) -> None:
    """A ``landed`` callback for plain reads."""


def build(cfg: NixlStoreAdapterConfig, *, host: HostRegion | None = None) -> L2Adapter:
    """``nixl_store``: a :class:`NixlPoolStore` on ``transfer_threads`` threads; ``host`` is
    the L1 arena (registered once; its alignment is the page size)."""
    store = NixlPoolStore(cfg, host)
    return PooledAdapter(store, workers=cfg.transfer_threads, integrity=cfg.integrity,
                         name=cfg.label)  # fmt: skip
