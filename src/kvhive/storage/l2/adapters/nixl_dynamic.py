"""``nixl_store_dynamic``: one file per object, moved by NIXL (POSIX here; GDS, GDS_MT, HF3FS,
IBM_SCALE where their plugins run), in LMCache's ``DynamicNixlStoreL2Adapter`` layout.

Files: ``backend_params.file_path``/[``<hash[0:2]>/<hash[2:4]>/``]``naming.nixl_name(key)``,
e.g. ``00/00/org--m_01000100_0_0000000000000000.bin`` with ``shard_dirs`` (models the
reference would name ambiguously are percent-escaped, ``naming.nixl_model``).  Content: the
logical bytes, then the integrity trailer bound to the key (kvhive adds and checks it), so a
file copied over another key's name, damaged or truncated is a counted miss and is removed.
Files the reference wrote (bare logical bytes) are read with only their length checked.

Store: ``<final>.tmp.<uuid4 hex>`` is created (``O_CREAT|O_EXCL``, mode 0600), sized,
registered with NIXL for this transfer, written, deregistered, closed, then renamed onto the
final name, so a reader never sees a partial file.  A final file already present is kept
(same key, same bytes).  With ``use_direct_io`` the file is opened a second time with
``O_DIRECT``: the 4 KiB-aligned body goes through it, the unaligned tail and the trailer
buffered (``nixl_runtime.pair_up``), so a file holds exactly payload + trailer.

Lookup: the in-memory index (key -> stored bytes) first, then ``stat`` on disk; a file found
there joins the index, so a restarted server (or a peer sharing the directory) serves what
is on disk.  ``scan`` lists the files at start for the usage figures.  Load: open read-only
(plus ``O_DIRECT`` on the same inode), register, READ ``min(file size, buffers)`` bytes,
deregister; the length check (``integrity.verify``) does the rest, so NIXL never reads past
the end of a file (an error there, never a short read).

Temporary files: names ``<a name this adapter parses>.tmp.<32 hex>`` (the reference's temp
pattern too) in its own tree (``file_path`` and two levels of two-hex-digit directories)
whose last change is older than ``store_timeout_s`` are removed at start and at close.  A
younger one may belong to a store in flight in another server sharing the directory (a store
unlinks its own temp file when it fails or passes its deadline); other files are never
touched.  ``persist_enabled: false`` removes the files this adapter wrote at close.

Threads: ``put``/``get``/``exists``/``delete``/``scan`` run on the PooledAdapter's worker
threads concurrently; the index is guarded by a lock, and file I/O happens outside it.
Buffers handed to ``put``/``get`` must stay valid until the call returns (the PooledAdapter
guarantees it); those inside the L1 arena (``host``) need no registration, others are
registered for their one transfer.  ``close`` runs once, after every job ended.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from kvhive.config.l2_adapters import NixlStoreDynamicAdapterConfig
from kvhive.errors import ObjectMissing
from kvhive.keys import ObjectKey
from kvhive.storage.l2.base import HostRegion, L2Adapter, ObjectStore
from kvhive.storage.l2.fileio import STREAM_PIECE, slice_views
from kvhive.storage.l2.naming import nixl_relpath, parse_nixl_name
from kvhive.storage.l2.nixl_runtime import (
    DIRECT_ALIGN,
    Extent,
    NixlAgent,
    Span,
    address_of,
    pair_up,
)
from kvhive.storage.l2.pooled import PooledAdapter

log = logging.getLogger(__name__)

GiB = 1 << 30
O_DIRECT = getattr(os, "O_DIRECT", 0)
TMP_MARK = ".tmp."
_TMP_HEX = 32  # uuid4().hex
_HEX = frozenset("0123456789abcdef")


@dataclass(frozen=True, slots=True)
class StoredFile:
    """A file of the layout found on disk: its ``key``, ``path`` and ``size`` in bytes."""

    key: ObjectKey
    path: str
    size: int


@dataclass(frozen=True, slots=True)
class OpenFile:
    """One object file opened for a transfer: ``fd`` buffered, ``direct`` the same inode
    opened with ``O_DIRECT`` (-1: none), ``size`` its registered length."""

    fd: int
    direct: int
    size: int

    def close(self) -> None:
        for fd in (self.fd, self.direct):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)


class FileLayout:
    """Where each key's file lives under ``root`` (module docstring), the temp names, and the
    walks over the tree (scan, temp sweep).  Thread-safe (no mutable state but a cache of
    created directories, whose races are harmless)."""

    def __init__(self, root: str, shard_dirs: bool) -> None:
        self.root = os.path.abspath(root)
        self.shard = shard_dirs
        os.makedirs(self.root, exist_ok=True)
        self._made: set[str] = set()

    def path(self, key: ObjectKey) -> str:
        return os.path.join(self.root, nixl_relpath(key, self.shard))

    @staticmethod
    def temp_path(final: str) -> str:
        return f"{final}{TMP_MARK}{uuid.uuid4().hex}"

    @staticmethod
    def is_temp(name: str) -> bool:
        """Whether ``name`` is a temp file of this layout (or the reference's)."""
        base, mark, tail = name.rpartition(TMP_MARK)
        return (bool(mark) and len(tail) == _TMP_HEX and set(tail) <= _HEX
                and parse_nixl_name(base) is not None)  # fmt: skip

    def create(self, path: str) -> int:
        """Create ``path`` exclusively (write-only, 0600), making its shard directories."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        parent = os.path.dirname(path)
        if parent not in self._made and parent != self.root:
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        try:
            return os.open(path, flags, 0o600)
        except FileNotFoundError:  # a shard directory was removed behind our back
            os.makedirs(parent, exist_ok=True)
            return os.open(path, flags, 0o600)

    def _files(self) -> Iterator[tuple[str, os.DirEntry[str]]]:
        """``(relative directory, entry)`` of the regular files at depth 0..2, descending only
        into two-hex-digit directories."""
        todo = [""]
        while todo:
            rel = todo.pop()
            try:
                with os.scandir(os.path.join(self.root, rel)) as entries:
                    for entry in entries:
                        if entry.is_file(follow_symlinks=False):
                            yield rel, entry
                        elif (rel.count("/") < 1 and len(entry.name) == 2
                              and set(entry.name) <= _HEX
                              and entry.is_dir(follow_symlinks=False)):  # fmt: skip
                            todo.append(f"{rel}/{entry.name}" if rel else entry.name)
            except FileNotFoundError:
                continue

    def scan(self) -> Iterator[StoredFile]:
        """The object files a lookup would find (this layout's path for their key)."""
        for rel, entry in self._files():
            key = parse_nixl_name(entry.name)
            if key is None or nixl_relpath(key, self.shard) != (
                f"{rel}/{entry.name}" if rel else entry.name
            ):
                continue
            try:
                yield StoredFile(key, entry.path, entry.stat(follow_symlinks=False).st_size)
            except FileNotFoundError:
                continue

    def sweep(self, min_age_s: float) -> int:
        """Remove temp files last changed more than ``min_age_s`` ago; returns how many."""
        cutoff = time.time() - min_age_s
        removed = 0
        for _, entry in self._files():
            if not self.is_temp(entry.name):
                continue
            try:
                if entry.stat(follow_symlinks=False).st_mtime > cutoff:
                    continue
                os.unlink(entry.path)
                removed += 1
            except FileNotFoundError:
                continue
            except OSError as exc:
                log.warning("nixl_store_dynamic: cannot remove temp file %s: %s", entry.path, exc)
        return removed


class NixlFileStore(ObjectStore):
    """One file per object, moved by NIXL (module docstring)."""

    durable = True

    def __init__(self, cfg: NixlStoreDynamicAdapterConfig, host: HostRegion | None) -> None:
        self.cfg = cfg
        params = cfg.params
        self.layout = FileLayout(params["file_path"], cfg.shard_dirs)
        self.direct = cfg.direct_io and bool(O_DIRECT)
        self.capacity_bytes = int(cfg.capacity_gb * GiB)
        self._grace = cfg.store_timeout_s
        swept = self.layout.sweep(self._grace)
        if swept:
            log.info("nixl_store_dynamic: removed %d leftover temp file(s) in %s", swept,
                     self.layout.root)  # fmt: skip
        self._agent = NixlAgent("nixl_store_dynamic", cfg.backend, params, host)
        self._mu = threading.Lock()
        self._index: dict[ObjectKey, int] = {}  # key -> stored bytes (file size)
        self._written: set[ObjectKey] = set()  # removed at close when not persisting

    # -- ObjectStore -----------------------------------------------------------------------

    def put(self, key: ObjectKey, parts: Sequence[memoryview]) -> None:
        final = self.layout.path(key)
        length = sum(p.nbytes for p in parts)
        if os.path.exists(final):  # same key, same bytes: keep it
            self._remember(key, length, written=False)
            return
        tmp = self.layout.temp_path(final)
        fd = self.layout.create(tmp)
        f = OpenFile(fd, -1, length)
        try:
            try:
                if self._wants_direct(length):
                    f = OpenFile(fd, self._open_direct(tmp, os.O_WRONLY), length)
                os.ftruncate(fd, length)  # in-place writes: O_DIRECT need not extend the file
                self._move("WRITE", parts, f, self.cfg.store_timeout_s)
            finally:
                f.close()
            os.rename(tmp, final)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        self._remember(key, length, written=True)

    def get(self, key: ObjectKey, parts: Sequence[memoryview]) -> int:
        return self.get_streamed(key, parts, _ignore)

    def get_streamed(self, key: ObjectKey, parts: Sequence[memoryview],
                     landed: Callable[[int], None]) -> int:  # fmt: skip
        """Read in ``fileio.STREAM_PIECE`` transfers, reporting each (``base.py``); the file
        is registered once for all of them."""
        path = self.layout.path(key)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            self._forget(key)
            raise ObjectMissing(path) from None
        f = OpenFile(fd, -1, 0)
        try:
            size = os.fstat(fd).st_size
            want = min(size, sum(p.nbytes for p in parts))
            direct = -1
            if self._wants_direct(want):
                direct = self._open_direct(f"/proc/self/fd/{fd}", os.O_RDONLY, path)
            f = OpenFile(fd, direct, size)
            pieces = [(a, min(want, a + STREAM_PIECE)) for a in range(0, want, STREAM_PIECE)]
            with self._registered(f):
                for a, b in pieces:
                    self._transfer("READ", slice_views(parts, a, b), f, self.cfg.timeout_s, a)
                    landed(b)
        finally:
            f.close()
        self._remember(key, size, written=False)
        return size

    def exists(self, key: ObjectKey) -> bool:
        with self._mu:
            if key in self._index:
                return True
        try:
            size = os.stat(self.layout.path(key)).st_size
        except FileNotFoundError:
            return False
        self._remember(key, size, written=False)
        return True

    def delete(self, key: ObjectKey) -> bool:
        self._forget(key)
        try:
            os.unlink(self.layout.path(key))
            return True
        except FileNotFoundError:
            return False

    def scan(self) -> Iterator[tuple[ObjectKey, int]]:
        for found in self.layout.scan():
            self._remember(found.key, found.size, written=False)
            yield found.key, found.size

    # -- helpers ---------------------------------------------------------------------------

    def _wants_direct(self, nbytes: int) -> bool:
        return self.direct and nbytes >= DIRECT_ALIGN

    def _open_direct(self, path: str, flags: int, fallback: str = "") -> int:
        """``path`` opened again with ``O_DIRECT`` (``fallback`` when ``path`` is missing:
        /proc/self/fd reopens the same inode, so a rename meanwhile cannot pair two files);
        -1, with direct I/O off from then on, where the file system refuses O_DIRECT."""
        try:
            try:
                return os.open(path, flags | O_DIRECT)
            except FileNotFoundError:
                if not fallback:
                    raise
                return os.open(fallback, flags | O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
            log.warning("nixl_store_dynamic: %s refuses O_DIRECT; using buffered I/O",
                        self.layout.root)  # fmt: skip
            self.direct = False
            return -1

    def _move(self, op: str, parts: Sequence[memoryview], f: OpenFile, timeout: float) -> None:
        """Register ``f`` (both descriptors), move ``parts`` from/to its start, deregister."""
        with self._registered(f):
            self._transfer(op, parts, f, timeout, 0)

    @contextlib.contextmanager
    def _registered(self, f: OpenFile) -> Iterator[None]:
        """``f``'s descriptors registered with NIXL for the duration."""
        fds = [f.fd] + ([f.direct] if f.direct >= 0 else [])
        reg = self._agent.register([(0, f.size, fd, "") for fd in fds], "FILE")
        try:
            yield
        finally:
            self._agent.deregister(reg)

    def _transfer(self, op: str, parts: Sequence[memoryview], f: OpenFile, timeout: float,
                  offset: int) -> None:  # fmt: skip
        """Move ``parts`` from/to ``f`` at byte ``offset`` (``f`` registered)."""
        parts = [p for p in parts if p.nbytes]
        if not parts:
            return
        direct = {f.fd: f.direct} if f.direct >= 0 else None
        spans, storage = pair_up(parts, [Extent(offset, f.size - offset, f.fd)], direct)
        with self._agent.local([Span(address_of(p), p.nbytes) for p in parts]):
            self._agent.transfer(op, spans, storage, "FILE",  # type: ignore[arg-type]
                                 time.monotonic() + timeout)  # fmt: skip

    def _remember(self, key: ObjectKey, size: int, *, written: bool) -> None:
        with self._mu:
            self._index[key] = size
            if written:
                self._written.add(key)

    def _forget(self, key: ObjectKey) -> None:
        with self._mu:
            self._index.pop(key, None)
            self._written.discard(key)

    # -- status and lifecycle --------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        with self._mu:
            indexed = len(self._index)
        return {
            "backend": self.cfg.backend,
            "path": self.layout.root,
            "direct_io": self.direct,
            "shard_dirs": self.layout.shard,
            "indexed_objects": indexed,
        }

    def close(self) -> None:
        """Remove this adapter's files when not persisting, sweep old temp files, stop NIXL."""
        try:
            if not self.cfg.persist_enabled:
                with self._mu:
                    mine = list(self._written)
                for key in mine:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.layout.path(key))
            self.layout.sweep(self._grace)
        finally:
            self._agent.close()


def _ignore(n: int) -> None:
    """A ``landed`` callback for plain reads."""


def build(cfg: NixlStoreDynamicAdapterConfig, *, host: HostRegion | None = None) -> L2Adapter:
    """``nixl_store_dynamic``: a :class:`NixlFileStore` on ``num_workers`` threads; ``host``
    is the L1 arena (registered with NIXL once), None outside a server."""
    store = NixlFileStore(cfg, host)
    return PooledAdapter(store, workers=cfg.num_workers, integrity=cfg.integrity, name=cfg.label)
