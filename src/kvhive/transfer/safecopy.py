"""Copies that touch an engine's shared memory, safe against a segment shrunk under us.

A worker owns its ``cpu_shm`` segments: it may ``ftruncate`` one after registering it,
and then every page of our mapping past the new end raises SIGBUS when touched.  A SIGBUS
in numpy's copy loop would kill the whole server, so no copy reads or writes an engine
page through numpy.  Every such copy is a batch of fixed-length rows run by the native
helper ``_safecopy`` (``_safecopy.c``): numpy computes the plan -- one byte offset per row
on each side -- and C copies the rows with ``memcpy`` under a per-thread
``sigsetjmp``/``siglongjmp`` recovery point, without the GIL::

    copy_rows(dst, dst_offsets | None, src, src_offsets | None, row_bytes)
        row i: dst[dst_offsets[i] : +row_bytes] = src[src_offsets[i] : +row_bytes]
        None = rows back to back (offset i * row_bytes)

A fault becomes :class:`~kvhive.errors.TransferFailed` (the store or retrieve gets its
soft-failure answer; the rows before the fault are copied).  Why not the alternatives
(``benchmarks/safe_copy_bench.py`` measures them): checking the segment's size before each
copy races with the worker's ``ftruncate``; ``preadv``/``pwritev`` on the segment's file
descriptor cannot fault, but costs a system call per contiguous run (one 256-byte head row
per call for HND layouts) and a ``pwrite`` past a shrunk end silently grows the segment
back.

The helper is built by ``pip install -e .`` (setuptools, a C compiler and the Python
headers); without a compiler the install fails.  A tree used without building it has no
safe copy: :func:`require` then refuses ``cpu_shm`` registrations with a
``RegistrationError`` naming the fix, instead of serving copies that could crash.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from kvhive.errors import RegistrationError, TransferFailed

_native: Callable[..., int | None] | None
_native_blocks: Callable[..., int | None] | None
try:
    from kvhive.transfer import _safecopy
except ImportError as exc:  # not built: see require()
    _native, _native_blocks, _MISSING = None, None, str(exc)
else:
    _native, _native_blocks, _MISSING = _safecopy.copy_rows, _safecopy.copy_blocks, ""


def available() -> bool:
    """True when the native copy helper is built."""
    return _native is not None


def require() -> None:
    """Raise RegistrationError when the native copy helper is not built."""
    if _native is None or _native_blocks is None:
        raise RegistrationError(
            "cpu_shm copies need kvhive's native copy helper (kvhive.transfer._safecopy), "
            f"which is not built ({_MISSING}); reinstall with `pip install -e .` "
            "(needs a C compiler and the Python headers)"
        )


def copy_rows(
    dst: np.ndarray,
    dst_offsets: np.ndarray | None,
    src: np.ndarray,
    src_offsets: np.ndarray | None,
    row_bytes: int,
    *,
    segment: str,
) -> None:
    """Copy rows of ``row_bytes`` bytes from ``src`` to ``dst`` (flat ``uint8`` arrays) at
    the given ``int64`` byte offsets (None: back to back), without the GIL.

    ``segment`` names the engine segment on either side, for the error.  Raises
    TransferFailed when a page of it raised SIGBUS (the segment shrank), ValueError for an
    offset outside its buffer (checked before any byte moves).
    """
    if _native is None:
        require()
    assert _native is not None
    fault = _native(dst, dst_offsets, src, src_offsets, row_bytes)
    if fault is not None:
        raise TransferFailed(
            f"shared-memory segment {segment!r} no longer backs its registered size "
            f"(SIGBUS at {fault:#x}): the worker truncated or shrank it"
        )


def copy_blocks(
    obj: np.ndarray,
    segments: tuple[np.ndarray, ...],
    plane_seg: np.ndarray,
    plane_step: np.ndarray,
    plane_obj: np.ndarray,
    statics: np.ndarray,
    ids: np.ndarray,
    first: int,
    blocks_per_chunk: int,
    row_bytes: int,
    to_engine: bool,
    u0: int,
    u1: int,
    *,
    where: Callable[[int], str],
) -> None:
    """Copy units ``u0 <= u < u1`` of a paged-KV chunk between the object ``obj`` and the
    engine ``segments`` (flat ``uint8`` arrays), without the GIL; unit ``u`` is (plane
    ``u // len(ids)``, block ``u % len(ids)``) and its rows are at::

        engine: segments[plane_seg[p]] + ids[b] * plane_step[p] + statics[p * Q + q]
        object: obj + plane_obj[p] + ((first + b) * Q + q) * row_bytes

    (``Q = len(statics) // len(plane_seg)``; engine -> object, or object -> engine when
    ``to_engine``).  All arrays but ``obj``/``segments`` are C-contiguous ``int64``.
    Every address is checked before any byte moves (ValueError).  Raises TransferFailed
    when a page raised SIGBUS (the segment ``where(address)`` names shrank).
    """
    if _native_blocks is None:
        require()
    assert _native_blocks is not None
    fault = _native_blocks(
        obj,
        segments,
        plane_seg,
        plane_step,
        plane_obj,
        statics,
        ids,
        first,
        blocks_per_chunk,
        row_bytes,
        to_engine,
        u0,
        u1,
    )
    if fault is not None:
        raise TransferFailed(
            f"shared-memory segment {where(fault)!r} no longer backs its registered size "
            f"(SIGBUS at {fault:#x}): the worker truncated or shrank it"
        )
