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
* The table populates each new mapping's page tables in the background
  (:mod:`kvhive.transfer.populate`), so copies into blocks the server has never
  touched do not fault page by page on the request path.
* Nothing is ever unlinked on a guess.  A registration records, per segment, the
  proof :class:`SegmentOwner`: the creator named in ``lmcache_kv_<pid>_<n>`` is visible
  here, maps this very segment (device and inode, from ``/proc/<pid>/maps``) and
  started at a given time.  :class:`SegmentReaper` unlinks a dropped registration's
  segment only once that process is gone (or its pid was reused) and the name still
  holds the same inode.  A creator kvhive cannot see -- an engine in another PID
  namespace, the common container deployment -- is never proven, so its segments are
  left to it.
* :func:`cleanup_stale_segments` (start-up) has no such records, so by default it only
  reports; the old pid-visibility rule deletes live segments of engines in other PID
  namespaces and runs only when the caller asserts one shared namespace.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import stat
import threading
from collections.abc import Callable, Container, Iterable
from dataclasses import dataclass, field

import numpy as np

from kvhive.errors import RegistrationError
from kvhive.transfer.descriptors import TensorDesc, validate_shm_name
from kvhive.transfer.populate import (
    PopulateStats,
    Prefaulter,
    populate_read,
    populate_supported,
    read_touch,
)

try:  # CPython's own binding of shm_open(3); present on every POSIX build
    import _posixshmem
except ImportError:  # pragma: no cover - non-CPython
    _posixshmem = None

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PROC_DIR = "/proc"


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
    dev: int = 0  # the segment's identity when mapped (st_dev, st_ino)
    ino: int = 0

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
        return cls(bare, nbytes, mm, np.frombuffer(mm, dtype=np.uint8), st.st_dev, st.st_ino)

    @property
    def closed(self) -> bool:
        return self._mm is None

    @property
    def address(self) -> int:
        """Address of byte 0 of the mapping (0 once closed)."""
        return int(self.array.__array_interface__["data"][0]) if self._mm is not None else 0

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

    With ``populate`` (the default) every new mapping's pages are populated by one
    background thread per table (:class:`~kvhive.transfer.populate.Prefaulter`);
    ``release`` and ``close`` cancel that work, waiting for at most one piece, before they
    unmap.
    """

    def __init__(self, *, populate: bool = True) -> None:
        self._lock = threading.Lock()
        self._maps: dict[str, ShmMapping] = {}
        self._refs: dict[str, int] = {}
        self._owners: dict[str, SegmentOwner] = {}
        self._prefaulter = (
            Prefaulter(0, "kvhive-segment-populate", _fill_segment(), self._populated)
            if populate
            else None
        )

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
                if self._prefaulter is not None:
                    self._prefaulter.submit(m.address, m.address + m.nbytes)
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
        if self._prefaulter is not None:
            self._prefaulter.cancel(m.address, m.address + m.nbytes)
        m.close()

    def close(self) -> None:
        """Stop populating, then unmap every segment (idempotent)."""
        if self._prefaulter is not None:
            self._prefaulter.stop()
        with self._lock:
            maps = list(self._maps.values())
            self._maps.clear()
            self._refs.clear()
        for m in maps:
            m.close()

    def wait_populated(self, timeout: float | None = None) -> bool:
        """Block until every mapping so far is populated; True when done (tests, benches)."""
        return self._prefaulter is None or self._prefaulter.wait_idle(timeout)

    def populate_stats(self) -> PopulateStats:
        """Bytes populated, seconds spent and failed pieces so far."""
        if self._prefaulter is None:
            return PopulateStats(0, 0.0, 0)
        return self._prefaulter.stats()

    def _populated(self, stats: PopulateStats) -> None:
        with self._lock:
            names = sorted(self._maps)
        if not names:  # everything was released before it was populated: nothing to say
            return
        log.info(
            "populated %.1f MiB of engine segment pages in %.3f s (%d failed piece(s)): %s",
            stats.bytes_done / 2**20, stats.seconds, stats.failures, ", ".join(names[:4])
            + (f" and {len(names) - 4} more" if len(names) > 4 else ""),
        )  # fmt: skip

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

    def record_owners(self, *, proc: str = PROC_DIR) -> None:
        """Prove, now, who created each mapped segment (:func:`prove_owners`); kept by
        :meth:`owners` until the table is closed and after."""
        with self._lock:
            maps = list(self._maps.values())
        found = prove_owners(((m.name, m.dev, m.ino) for m in maps), proc=proc)
        with self._lock:
            self._owners.update(found)

    def owners(self) -> tuple[SegmentOwner, ...]:
        """The proven creators of this table's segments (see :meth:`record_owners`)."""
        with self._lock:
            return tuple(self._owners[n] for n in sorted(self._owners))

    def __len__(self) -> int:
        with self._lock:
            return len(self._maps)


def _fill_segment() -> Callable[[int, int], bool]:
    """How segment pages are populated here: ``MADV_POPULATE_READ`` when the kernel has it,
    else a SIGBUS-safe read of one byte per page (never a write: the pages are the
    engine's).  Either leaves tmpfs pages mapped writable (``kvhive.transfer.populate``)."""
    return populate_read if populate_supported() else read_touch


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


# -- who may unlink what ----------------------------------------------------------------

# The name the lmcache client gives the segments it creates: lmcache_kv_<its pid>_<n>.
_CREATOR_RE = re.compile(r"^lmcache_kv_(\d+)_(\d+)$")
_DEAD_STATES = frozenset({"Z", "X", "x"})  # zombie or dead: the process has exited


@dataclass(frozen=True, slots=True)
class SegmentOwner:
    """Proof, taken at registration, of which visible process created a segment.

    ``pid`` is the creator the name ``lmcache_kv_<pid>_<n>`` names; when recorded it was
    visible in ``/proc``, had started at ``start_ticks`` (field 22 of
    ``/proc/<pid>/stat``) and mapped the very segment whose identity was ``(dev, ino)``.
    A pid that names an unrelated process (an engine in another PID namespace whose pid
    happens to exist here) maps no such inode, so it proves nothing.
    """

    name: str
    dev: int
    ino: int
    pid: int
    start_ticks: int


def _proc_stat(pid: int, proc: str) -> tuple[int, str] | None:
    """(start time in clock ticks, state letter) of ``pid``; None when it is not visible."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name is in parentheses and may hold anything: count after the last ')'.
    fields = data[data.rfind(b")") + 1 :].split()
    try:  # fields[0] is field 3 (state), fields[19] field 22 (starttime)
        return int(fields[19]), fields[0].decode("ascii", "replace")
    except (IndexError, ValueError):
        return None


def _creator_alive(owner: SegmentOwner, proc: str) -> bool:
    now = _proc_stat(owner.pid, proc)
    return now is not None and now[0] == owner.start_ticks and now[1] not in _DEAD_STATES


def _mapped_files(pid: int, proc: str) -> set[tuple[int, int]] | None:
    """``(st_dev, st_ino)`` of every file ``pid`` maps; None when its maps are unreadable."""
    try:
        with open(f"{proc}/{pid}/maps", "rb") as f:
            data = f.read()
    except OSError:
        return None
    found: set[tuple[int, int]] = set()
    for line in data.splitlines():
        parts = line.split(None, 5)  # address perms offset dev inode [path]
        if len(parts) < 6 or parts[4] == b"0":
            continue
        major, _, minor = parts[3].partition(b":")
        try:
            found.add((os.makedev(int(major, 16), int(minor, 16)), int(parts[4])))
        except ValueError:
            continue
    return found


def prove_owners(
    segments: Iterable[tuple[str, int, int]], *, proc: str = PROC_DIR
) -> dict[str, SegmentOwner]:
    """The :class:`SegmentOwner` of each ``(name, st_dev, st_ino)`` whose creator can be
    proven now; segments not named ``lmcache_kv_<pid>_<n>``, named after this process or
    an invisible one, or not mapped by that process get none (and are never unlinked)."""
    by_pid: dict[int, list[tuple[str, int, int]]] = {}
    for name, dev, ino in segments:
        m = _CREATOR_RE.match(name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid > 0 and pid != os.getpid():
            by_pid.setdefault(pid, []).append((name, dev, ino))
    found: dict[str, SegmentOwner] = {}
    for pid, segs in by_pid.items():
        before = _proc_stat(pid, proc)
        if before is None or before[1] in _DEAD_STATES:
            continue
        mapped = _mapped_files(pid, proc)
        after = _proc_stat(pid, proc)
        if mapped is None or after is None or after[0] != before[0]:
            continue  # unreadable, or the pid changed hands while we read its maps
        for name, dev, ino in segs:
            if (dev, ino) in mapped:
                found[name] = SegmentOwner(name, dev, ino, pid, before[0])
    return found


class SegmentReaper:
    """Unlinks the segments of dropped registrations once their creator is proven dead.

    ::

        adopt(owners)  a registration that mapped these segments was dropped: unlink now
                       those whose creator is gone; watch the others
        poll()         (the registry's reaper tick) unlink watched segments whose creator
                       has gone since; forget those unlinked or replaced meanwhile

    A segment is unlinked only when (1) its creator was proven at registration
    (:class:`SegmentOwner`), (2) that process is gone -- not in ``/proc``, a zombie, or
    its pid now names a process that started at another time -- and (3) the name still
    holds the recorded inode (``lstat`` just before ``unlink``).  Thread-safe; at most
    ``limit`` segments are watched (the oldest are forgotten, never unlinked).
    """

    def __init__(self, *, shm_dir: str = SHM_DIR, proc: str = PROC_DIR, limit: int = 4096) -> None:
        self._shm_dir = shm_dir
        self._proc = proc
        self._limit = limit
        self._lock = threading.Lock()
        self._watched: dict[tuple[int, int], SegmentOwner] = {}
        self.removed = 0

    @property
    def watched(self) -> int:
        """Segments whose creator was alive when their registration was dropped."""
        with self._lock:
            return len(self._watched)

    def adopt(self, owners: Iterable[SegmentOwner]) -> list[str]:
        """Take over ``owners`` (their registration was dropped); returns the names
        unlinked now."""
        owners = list(owners)
        with self._lock:
            for o in owners:
                self._watched.pop((o.dev, o.ino), None)  # re-adopted: now the newest
                self._watched[(o.dev, o.ino)] = o
            while len(self._watched) > self._limit:
                old = self._watched.pop(next(iter(self._watched)))
                log.warning("no longer watching segment %s (more than %d)", old.name, self._limit)
        return self._sweep(owners)

    def poll(self) -> list[str]:
        """Check every watched segment again; returns the names unlinked."""
        with self._lock:
            owners = list(self._watched.values())
        return self._sweep(owners)

    def _sweep(self, owners: list[SegmentOwner]) -> list[str]:
        removed: list[str] = []
        for o in owners:
            alive = _creator_alive(o, self._proc)
            same = self._still_there(o)
            if alive and same:
                continue  # its creator may still use it
            with self._lock:
                self._watched.pop((o.dev, o.ino), None)
            if not alive and same and self._unlink(o):
                removed.append(o.name)
        return removed

    def _still_there(self, o: SegmentOwner) -> bool:
        try:
            st = os.lstat(os.path.join(self._shm_dir, o.name))
        except OSError:
            return False
        return stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) == (o.dev, o.ino)

    def _unlink(self, o: SegmentOwner) -> bool:
        try:
            os.unlink(os.path.join(self._shm_dir, o.name))
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.warning("cannot unlink segment %s of dead pid %d: %s", o.name, o.pid, exc)
            return False
        self.removed += 1
        log.info("unlinked segment %s: its creator (pid %d) is gone", o.name, o.pid)
        return True


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
    assume_shared_pid_namespace: bool = False,
) -> list[str]:
    """Start-up cleanup: unlink ``<prefix><pid>_<n>`` segments whose ``pid`` is not visible
    -- only with ``assume_shared_pid_namespace``.

    A process in another PID namespace (an engine in a separate container sharing
    ``/dev/shm``) is invisible here, so "pid not visible" does not prove "creator dead",
    and after a restart kvhive holds no :class:`SegmentOwner` records.  By default this
    therefore removes nothing: it logs how many such segments it left alone and returns
    ``[]``; :class:`SegmentReaper` frees the segments of clients that die while kvhive
    runs.  With ``assume_shared_pid_namespace`` (the caller asserts that every creator of
    such segments lives in this PID namespace), a segment is removed when ``pid`` does not
    exist, is not our own pid, and its name is not in ``keep``.  Returns the names removed
    (or, with ``dry_run``, that would be).
    """
    pattern = re.compile(_STALE_RE_TMPL.format(prefix=re.escape(prefix)))
    try:
        entries = os.listdir(shm_dir)
    except OSError as exc:
        log.warning("cannot list %s: %s", shm_dir, exc)
        return []
    removed: list[str] = []
    unproven = 0
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
        if not assume_shared_pid_namespace:
            unproven += 1
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
    if unproven:
        log.info(
            "left %d segment(s) %s<pid>_<n> in %s alone: their pid is not visible here, "
            "which does not prove their creator dead (it may run in another PID namespace)",
            unproven,
            prefix,
            shm_dir,
        )
    return removed
