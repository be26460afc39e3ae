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
try:
    from kvhive.transfer import _safecopy
except ImportError as exc:  # not built: see require()
    _native, _MISSING = None, str(exc)
else:
    _native, _MISSING = _safecopy.copy_rows, ""


def available() -> bool:
    """True when the native copy helper is built."""
    return _native is not None


def require() -> None:
    """Raise RegistrationError when the native copy helper is not built."""
    if _native is None:
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
