"""POSIX shared-memory segments of ``cpu_shm`` registrations.

A worker copies its KV cache into segments named ``lmcache_kv_<pid>_<n>``
and keeps writing there; we map the same pages and copy to/from them.

* We only **attach**: the segment belongs to the worker, which unlinks it.
  ``multiprocessing.shared_memory`` is deliberately not used, because before
  Python 3.13 attaching registers the segment with ``resource_tracker``,
  which then warns about a "leak" and unlinks the worker's segment when we
  exit.  We ``shm_open`` + ``mmap`` directly, so the tracker never hears of it.
* Each registration maps each segment once (:class:`SegmentTable`), however
  many sibling views it holds, and unmaps explicitly on close (the reference
  leaks these mappings, defect 7).
* :func:`cleanup_stale_segments` removes segments whose creating process is
  gone (defect 8).
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import stat
import threading
from collections.abc import Container
from dataclasses import dataclass, field

import numpy as np

from kvhive.errors import RegistrationError
from kvhive.transfer.descriptors import TensorDesc, validate_shm_name

try:  # CPython's own binding of shm_open(3); present on every POSIX build
    import _posixshmem
except ImportError:  # pragma: no cover - non-CPython
    _posixshmem = None

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"


def _open_fd(bare_name: str) -> int:
    if _posixshmem is not None:
        return _posixshmem.shm_open("/" + bare_name, os.O_RDWR, mode=0o600)
    return os.open(os.path.join(SHM_DIR, bare_name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)


@dataclass(eq=False)
class ShmMapping:
    """One read-write ``MAP_SHARED`` mapping of the first ``nbytes`` of a segment.

    ``array`` is a flat ``uint8`` view of the whole mapping.  ``close`` unmaps;
    if some caller still holds a numpy view, unmapping is deferred until the
    last view is garbage-collected (the mmap object outlives its exports).
    """

    name: str
    nbytes: int
    _mm: mmap.mmap | None = field(repr=False)
    array: np.ndarray = field(repr=False)

    @classmethod
    def open(cls, name: str, nbytes: int) -> ShmMapping:
        """Open segment ``name`` (with or without leading ``/``) and map ``nbytes``.

        Raises RegistrationError when the segment is missing, not a regular
        shared-memory object, inaccessible, or shorter than ``nbytes`` (touching
        pages past its end would SIGBUS the whole server).
        """
        bare = validate_shm_name(name)
        if nbytes <= 0:
            raise RegistrationError(f"cannot map {nbytes} bytes of {bare!r}")
        try:
            fd = _open_fd(bare)
        except FileNotFoundError:
            raise RegistrationError(f"shared-memory segment {bare!r} does not exist") from None
        except OSError as exc:
            raise RegistrationError(f"cannot open segment {bare!r}: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise RegistrationError(f"segment {bare!r} is not a shared-memory object")
            if st.st_size < nbytes:
                raise RegistrationError(
                    f"segment {bare!r} has {st.st_size} bytes, descriptor declares {nbytes}"
                )
            try:
                mm = mmap.mmap(
                    fd, nbytes, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ | mmap.PROT_WRITE
                )
            except (OSError, ValueError, OverflowError) as exc:
                raise RegistrationError(f"cannot map segment {bare!r}: {exc}") from None
        finally:
            os.close(fd)  # the mapping keeps the pages; the fd is not needed
        return cls(bare, nbytes, mm, np.frombuffer(mm, dtype=np.uint8))

    @property
    def closed(self) -> bool:
        return self._mm is None

    def close(self) -> None:
        """Unmap (idempotent)."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        self.array = np.empty(0, np.uint8)  # drop our own export first
        try:
            mm.close()
        except BufferError:
            # Someone still holds a view: the pages stay mapped until that view
            # dies, then the mmap object unmaps on deallocation.
            log.debug("segment %s still has live views; unmap deferred", self.name)


class SegmentTable:
    """Refcounted mappings of one registration, one per segment name.

    Sibling views of one segment share a single mapping::

        acquire("a", n) -> map        acquire("a", n) -> same map (refs=2)
        release("a")    -> refs=1     release("a")    -> unmapped
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._maps: dict[str, ShmMapping] = {}
        self._refs: dict[str, int] = {}

    def acquire(self, name: str, nbytes: int) -> ShmMapping:
        """Return the mapping of ``name``, mapping ``nbytes`` on first use.

        A later ``nbytes`` larger than the existing mapping is refused
        (RegistrationError): the views of one segment must agree on its size.
        """
        bare = validate_shm_name(name)
        with self._lock:
            m = self._maps.get(bare)
            if m is None:
                m = ShmMapping.open(bare, nbytes)
                self._maps[bare] = m
                self._refs[bare] = 0
            elif nbytes > m.nbytes:
                raise RegistrationError(
                    f"segment {bare!r} declared with {nbytes} bytes, earlier with {m.nbytes}"
                )
            self._refs[bare] += 1
            return m

    def release(self, name: str) -> None:
        """Drop one reference; unmap when the last one goes."""
        bare = validate_shm_name(name)
        with self._lock:
            if bare not in self._refs:
                return
            self._refs[bare] -= 1
            if self._refs[bare] > 0:
                return
            del self._refs[bare]
            m = self._maps.pop(bare)
        m.close()

    def close(self) -> None:
        """Unmap every segment (idempotent)."""
        with self._lock:
            maps = list(self._maps.values())
            self._maps.clear()
            self._refs.clear()
        for m in maps:
            m.close()

    def get(self, name: str) -> ShmMapping:
        """The current mapping of ``name`` (no new reference); RegistrationError if unmapped."""
        bare = validate_shm_name(name)
        with self._lock:
            m = self._maps.get(bare)
        if m is None:
            raise RegistrationError(f"segment {bare!r} is not mapped")
        return m

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._maps)

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)


def uint_dtype(size: int) -> np.dtype:
    """Numpy dtype used to move elements of ``size`` bytes (numpy has no bf16/fp8)."""
    if size in (1, 2, 4, 8):
        return np.dtype(f"<u{size}")
    return np.dtype(f"V{size}")


def tensor_view(mapping: ShmMapping, desc: TensorDesc) -> np.ndarray:
    """The strided view ``desc`` describes, over ``mapping``, as unsigned integers.

    The result aliases the shared pages (writes go to the engine's KV cache)
    and has ``desc.shape``; element strides become byte strides::

        byte address of [i0, i1, ...] = (storage_offset + sum(ik * stride[k])) * itemsize
    """
    dt = uint_dtype(desc.itemsize)
    if desc.numel == 0:
        return np.empty(desc.shape, dt)
    if mapping.closed:
        raise RegistrationError(f"segment {mapping.name!r} is closed")
    if desc.shm_name != mapping.name:
        raise RegistrationError(f"view of {desc.shm_name!r} built on segment {mapping.name!r}")
    if desc.byte_span() > mapping.nbytes:
        raise RegistrationError(
            f"view of {desc.shm_name!r} ends at byte {desc.byte_span()} beyond the "
            f"{mapping.nbytes}-byte mapping"
        )
    isz = desc.itemsize
    # The span check above is what makes this safe: as_strided checks nothing.
    # The span minus the offset is a whole number of elements, so .view works.
    base = mapping.array[desc.storage_offset * isz : desc.byte_span()].view(dt)
    return np.lib.stride_tricks.as_strided(
        base, shape=desc.shape, strides=tuple(s * isz for s in desc.stride)
    )


_STALE_RE_TMPL = r"^{prefix}(\d+)_(\d+)$"


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return True  # never treat nonsense as "dead": leave such names alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def cleanup_stale_segments(
    prefix: str = "lmcache_kv_",
    *,
    shm_dir: str = SHM_DIR,
    keep: Container[str] = (),
    dry_run: bool = False,
) -> list[str]:
    """Unlink ``<prefix><pid>_<n>`` segments whose creating process is gone.

    Only names of exactly that form are considered; a segment is removed
    when ``pid`` does not exist in our PID namespace, is not our own pid, and
    its name is not in ``keep`` (e.g. segments mapped by live registrations).
    Returns the names removed (or, with ``dry_run``, that would be).

    Caveat: a worker in another PID namespace (a separate container sharing
    ``/dev/shm``) looks dead from here; do not run this in such deployments.
    """
    pattern = re.compile(_STALE_RE_TMPL.format(prefix=re.escape(prefix)))
    try:
        entries = os.listdir(shm_dir)
    except OSError as exc:
        log.warning("cannot list %s: %s", shm_dir, exc)
        return []
    removed: list[str] = []
    for name in sorted(entries):
        m = pattern.match(name)
        if m is None or name in keep:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _pid_alive(pid):
            continue
        path = os.path.join(shm_dir, name)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if not stat.S_ISREG(st.st_mode):
            continue
        if not dry_run:
            try:
                os.unlink(path)
            except FileNotFoundError:
                continue  # someone else cleaned it first
            except OSError as exc:
                log.warning("cannot unlink stale segment %s: %s", name, exc)
                continue
        log.info("removed stale shared-memory segment %s (pid %d is gone)", name, pid)
        removed.append(name)
    return removed
