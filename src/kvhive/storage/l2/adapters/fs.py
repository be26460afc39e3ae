"""``fs`` and ``fs_native``: one file per object in ``base_path``, named as the reference does.

File name: ``naming.fs_name`` (``<model, / -> -SEP->@0x<rank>@<group>@<hash>[@<salt>].data``;
models the reference would name ambiguously are percent-escaped, so no two models share a
file), content: the logical bytes followed by the integrity trailer, bound to the key, so a
file copied over another key's name is a corrupt miss (``integrity: "raw"`` omits it).
Writes go to a temporary file (under ``relative_tmp_dir`` when set, else beside the final
name with a unique ``.tmp`` suffix) that is renamed into place, so readers never see a
partial object; an existing final file is left alone.  Existence is checked on disk each
time, so several servers may share a directory.  ``scan`` lists the files at start-up so
usage survives a restart.

``fs`` writes and reads each object with one ``pwrite``/``pread`` sequence.  ``fs_native``
cuts objects into ``stripe_bytes`` stripes moved in parallel on its own threads (the
reference ships this adapter as C++).  With ``use_odirect`` the 4 KiB-aligned body of an
object bypasses the page cache and the unaligned rest is written buffered, so files keep
their logical size and stay readable by ``fs`` (the reference's O_DIRECT files are padded;
kvhive reads those too).
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from kvhive.config.l2_adapters import FsAdapterConfig, FsNativeAdapterConfig
from kvhive.errors import ObjectMissing
from kvhive.keys import ObjectKey
from kvhive.storage.l2 import fileio
from kvhive.storage.l2.base import L2Adapter, ObjectStore
from kvhive.storage.l2.naming import fs_name, parse_fs_name
from kvhive.storage.l2.pooled import PooledAdapter

log = logging.getLogger(__name__)


class FsStore(ObjectStore):
    """Files in one directory (module docstring).

    ``relative_tmp_dir`` (None or "": beside the final files) is under ``base_path``;
    ``read_ahead_size`` (bytes, None: off) turns on sequential read-ahead advice.
    """

    durable = True

    def __init__(
        self,
        base_path: str,
        *,
        relative_tmp_dir: str | None,
        use_odirect: bool,
        read_ahead_size: int | None,
    ) -> None:
        self.base = os.path.abspath(base_path)
        os.makedirs(self.base, exist_ok=True)
        self.tmp_dir = os.path.join(self.base, relative_tmp_dir) if relative_tmp_dir else None
        if self.tmp_dir:
            os.makedirs(self.tmp_dir, exist_ok=True)
        self.direct = use_odirect and bool(fileio.O_DIRECT)
        self.read_ahead = read_ahead_size
        self.align = max(512, os.statvfs(self.base).f_bsize)

    def path(self, key: ObjectKey) -> str:
        return os.path.join(self.base, fs_name(key))

    def _tmp_path(self, key: ObjectKey) -> str:
        name = f"{fs_name(key)}.{uuid.uuid4().hex[:12]}.tmp"
        return os.path.join(self.tmp_dir or self.base, name)

    # -- I/O --------------------------------------------------------------------------

    def put(self, key: ObjectKey, parts: Sequence[memoryview]) -> None:
        final = self.path(key)
        if os.path.exists(final):
            return
        tmp = self._tmp_path(key)
        fds = fileio.open_fds(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, direct=self.direct, align=self.align
        )
        try:
            self._write(fds, parts)
        except BaseException:
            fileio.close_fds(fds)
            _unlink(tmp)
            raise
        fileio.close_fds(fds)
        os.replace(tmp, final)

    def get(self, key: ObjectKey, parts: Sequence[memoryview]) -> int:
        with self._opened(key) as (fds, size):
            self._read(fds, parts, size)
            return size

    def get_streamed(self, key: ObjectKey, parts: Sequence[memoryview],
                     landed: Callable[[int], None]) -> int:  # fmt: skip
        """:meth:`get` in ``fileio.STREAM_PIECE`` steps, reporting each (``base.py``)."""
        with self._opened(key) as (fds, size):
            want = min(size, sum(p.nbytes for p in parts))
            for start in range(0, want, fileio.STREAM_PIECE):
                end = min(want, start + fileio.STREAM_PIECE)
                got = fileio.read_at(fds, start, fileio.slice_views(parts, start, end), size)
                landed(start + got)
                if got < end - start:
                    break
            return size

    @contextlib.contextmanager
    def _opened(self, key: ObjectKey) -> Iterator[tuple[fileio.Fds, int]]:
        """``key``'s file open for reading, with its size; ObjectMissing when absent."""
        try:
            fds = fileio.open_fds(self.path(key), os.O_RDONLY, direct=self.direct, align=self.align)
        except FileNotFoundError:
            raise ObjectMissing(fs_name(key)) from None
        try:
            size = os.fstat(fds.buffered).st_size
            if self.read_ahead:
                os.posix_fadvise(fds.buffered, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            yield fds, size
        finally:
            fileio.close_fds(fds)

    def _write(self, fds: fileio.Fds, parts: Sequence[memoryview]) -> None:
        fileio.write_at(fds, 0, parts)

    def _read(self, fds: fileio.Fds, parts: Sequence[memoryview], size: int) -> None:
        fileio.read_at(fds, 0, parts, size)

    def exists(self, key: ObjectKey) -> bool:
        return os.path.exists(self.path(key))

    def delete(self, key: ObjectKey) -> bool:
        return _unlink(self.path(key))

    def scan(self) -> Iterator[tuple[ObjectKey, int]]:
        with os.scandir(self.base) as entries:
            for entry in entries:
                key = parse_fs_name(entry.name)
                if key is not None and entry.is_file(follow_symlinks=False):
                    try:
                        yield key, entry.stat().st_size
                    except FileNotFoundError:
                        continue

    def status(self) -> dict[str, Any]:
        return {"base_path": self.base, "o_direct": self.direct}


class FsNativeStore(FsStore):
    """``fs_native``: the fs format, objects moved in parallel stripes (module docstring)."""

    get_streamed = ObjectStore.get_streamed  # stripes land out of order: check after the read

    def __init__(
        self, base_path: str, *, num_workers: int, stripe_bytes: int, **kwargs: Any
    ) -> None:
        super().__init__(base_path, **kwargs)
        self.stripe = max(self.align, stripe_bytes - stripe_bytes % self.align)
        self._stripes = ThreadPoolExecutor(num_workers, thread_name_prefix="l2-fs-native")

    def _spans(self, parts: Sequence[memoryview]) -> list[tuple[int, memoryview]]:
        spans = []
        offset = 0
        for part in parts:
            for start in range(0, part.nbytes, self.stripe):
                spans.append((offset + start, part[start : start + self.stripe]))
            offset += part.nbytes
        return spans

    def _write(self, fds: fileio.Fds, parts: Sequence[memoryview]) -> None:
        spans = self._spans(parts)
        os.ftruncate(fds.buffered, spans[-1][0] + spans[-1][1].nbytes if spans else 0)
        jobs = [self._stripes.submit(fileio.write_at, fds, off, [buf]) for off, buf in spans]
        for job in jobs:
            job.result()

    def _read(self, fds: fileio.Fds, parts: Sequence[memoryview], size: int) -> None:
        spans = self._spans(parts)
        jobs = [self._stripes.submit(fileio.read_at, fds, off, [buf], size) for off, buf in spans]
        for job in jobs:
            job.result()

    def close(self) -> None:
        self._stripes.shutdown(wait=True)


def _unlink(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False


def build(cfg: FsAdapterConfig) -> L2Adapter:
    """``fs``: an :class:`FsStore` on ``num_workers`` threads."""
    store = FsStore(
        cfg.base_path,
        relative_tmp_dir=cfg.relative_tmp_dir,
        use_odirect=cfg.use_odirect,
        read_ahead_size=cfg.read_ahead_size,
    )
    return PooledAdapter(store, workers=cfg.num_workers, integrity=cfg.integrity, name=cfg.label)


def build_native(cfg: FsNativeAdapterConfig) -> L2Adapter:
    """``fs_native``: an :class:`FsNativeStore`; ``num_workers`` threads serve tasks and as
    many move stripes."""
    store = FsNativeStore(
        cfg.base_path,
        num_workers=cfg.num_workers,
        stripe_bytes=cfg.stripe_bytes,
        relative_tmp_dir=cfg.relative_tmp_dir or None,
        use_odirect=cfg.use_odirect,
        read_ahead_size=cfg.read_ahead_size,
    )
    return PooledAdapter(store, workers=cfg.num_workers, integrity=cfg.integrity, name=cfg.label)
