"""POSIX shared memory for tests: segments we create the way an engine worker does, and whole
vLLM-CPU KV caches built from them (one segment per layer)."""

from __future__ import annotations

import _posixshmem
import contextlib
import mmap
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass

import msgspec
import numpy as np

from kvhive.wire import types as t
from support.descriptors import cpu_shm_descriptor, cpu_shm_ext


def truncate(name: str, nbytes: int) -> None:
    """Resize segment ``name`` (no leading ``/``) the way a misbehaving worker would."""
    fd = _posixshmem.shm_open("/" + name, os.O_RDWR, mode=0o600)
    try:
        os.ftruncate(fd, nbytes)
    finally:
        os.close(fd)


class ShmSegment:
    """A POSIX shared-memory segment we create, like a worker does.

    Not ``multiprocessing.shared_memory``: its ``__del__`` raises BufferError
    when a test still holds a numpy view, which is noisy when a test fails.
    ``buf`` is the creator's own mapping (one entry in /proc/self/maps).
    ``name`` has no leading ``/``.
    """

    def __init__(self, size: int, name: str | None = None, *, prefix: str = "kvhive_t_") -> None:
        self.name = name or f"{prefix}{uuid.uuid4().hex[:12]}"
        self.size = size
        fd = _posixshmem.shm_open("/" + self.name, os.O_CREAT | os.O_EXCL | os.O_RDWR, mode=0o600)
        try:
            os.ftruncate(fd, size)
            self.buf = mmap.mmap(fd, size)
        finally:
            os.close(fd)

    def fill_random(self, rng: np.random.Generator) -> ShmSegment:
        """Overwrite every byte with ``rng``'s next ``size`` random bytes; returns self."""
        self.buf[:] = rng.integers(0, 256, self.size, dtype=np.uint8).tobytes()
        return self

    def destroy(self) -> None:
        """Unlink; unmap unless a view is still alive (then it unmaps with the view)."""
        with contextlib.suppress(FileNotFoundError):
            _posixshmem.shm_unlink("/" + self.name)
        with contextlib.suppress(BufferError):
            self.buf.close()


@dataclass(frozen=True)
class KVGeometry:
    """A small vLLM-CPU KV cache: per layer ``[blocks, heads, block_size, 2 * head_size]``
    float16 (K and V side by side in the last axis), registered with ``kv_layout`` HND."""

    blocks: int = 24
    heads: int = 2
    block_size: int = 16
    head_size: int = 8
    layers: int = 3

    @property
    def layer_shape(self) -> tuple[int, int, int, int]:
        return (self.blocks, self.heads, self.block_size, 2 * self.head_size)

    @property
    def layer_nbytes(self) -> int:
        return 2 * int(np.prod(self.layer_shape))  # float16


@dataclass
class ShmKV:
    """One worker's KV cache: a :class:`ShmSegment` per layer, laid out as :attr:`geometry`."""

    segments: list[ShmSegment]
    geometry: KVGeometry

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.segments]

    @property
    def layers(self) -> list[np.ndarray]:
        """Per-layer uint16 views (numpy has no bfloat16; the tests only compare bits)."""
        shape = self.geometry.layer_shape
        return [np.frombuffer(s.buf, dtype=np.uint16).reshape(shape) for s in self.segments]

    def descriptors(self) -> list[t.CpuShmDescriptor]:
        """Typed descriptors, for registering with an in-process engine."""
        shape = self.geometry.layer_shape
        return [cpu_shm_descriptor("/" + n, "float16", shape) for n in self.names]

    def wire_descriptors(self) -> list[msgspec.msgpack.Ext]:
        """The ext-1 ``cpu_shm`` wrappers a worker sends in ``register_kv_cache``."""
        shape = self.geometry.layer_shape
        return [cpu_shm_ext("/" + n, "float16", shape) for n in self.names]

    def token_rows(self, block_ids: list[int]) -> np.ndarray:
        """[layers, tokens, heads, 2 * head_size] view of the given blocks, token-major
        (for comparing what two caches hold)."""
        return np.stack(
            [np.concatenate([lay[b].transpose(1, 0, 2) for b in block_ids]) for lay in self.layers]
        )

    def destroy(self) -> None:
        for s in self.segments:
            s.destroy()


def make_shm_kv(
    rng: np.random.Generator, *, prefix: str = "kvhive_kv_", geometry: KVGeometry | None = None
) -> ShmKV:
    """A :class:`ShmKV` with every layer filled from ``rng`` (layer by layer).  The caller
    destroys it (or use :func:`shm_kv`)."""
    geometry = geometry or KVGeometry()
    segments: list[ShmSegment] = []
    try:
        for _ in range(geometry.layers):
            seg = ShmSegment(geometry.layer_nbytes, name=f"{prefix}{uuid.uuid4().hex[:10]}")
            segments.append(seg)
            seg.fill_random(rng)
    except BaseException:
        for seg in segments:
            seg.destroy()
        raise
    return ShmKV(segments, geometry)


@contextlib.contextmanager
def shm_kv(
    seed: int = 3, *, prefix: str = "kvhive_kv_", geometry: KVGeometry | None = None
) -> Iterator[ShmKV]:
    """:func:`make_shm_kv` with a fresh generator seeded ``seed``; destroyed on exit."""
    kv = make_shm_kv(np.random.default_rng(seed), prefix=prefix, geometry=geometry)
    try:
        yield kv
    finally:
        kv.destroy()
