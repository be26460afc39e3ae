"""``mooncake_store``: objects in a Mooncake Store cluster (``MooncakeDistributedStore``).

Key: ``naming.flat_name`` (``<model>@<rank:08x>@<group>@<hash>[@<salt>]``, the reference's).
Value: the logical bytes, then kvhive's integrity trailer bound to the key (``integrity.py``);
``integrity: "raw"`` stores the bare bytes (the reference's format).  Data moves without
copies: every batch is one ``batch_put_from_multi_buffers`` / ``batch_get_into_multi_buffers``
call on the raw addresses of the L1 views the adapter is handed, with the trailer as a second
buffer of each object.  Lookups are ``batch_is_exist``, deletes ``batch_remove(force=True)``
(a read leaves a lease on the object that a plain remove would respect).

Threads: one :class:`~kvhive.storage.l2.pooled.WorkerPool` per lane (``lookup``, ``retrieve``,
``store``, ``delete``; ``per_op_workers``, else ``num_workers``).  A batch is cut into
``min(workers, n)`` slices, one library call each, all on the one shared client (it is
thread-safe and releases the GIL during transfers).  Any exception in a slice fails that
slice's keys as ``ERROR``; no call escapes a worker.

Loads are verified for their key.  A load that returns the expected length is checked
(trailer: length, version, key-bound CRC).  Any other answer is classified with
``get_size``: ``OBJECT_NOT_FOUND`` (-704) is a miss; an object of the other accepted layout
(bare when framing, framed when raw) is read again in that layout and checked; any other
length (truncated, too long, another key's object) is ``CORRUPT``: counted, logged and
removed, so later lookups stop finding it.  The rest (``RPC_FAIL`` -900 when the master is
down, about 4 s per call) is ``ERROR``.

Re-store: Mooncake's ``put`` on an existing key answers 0 and **keeps the old value**.  kvhive
keeps that (the reference's ``batch_put_from`` behaves the same): a key names the chunk's
content, so the old value is the same bytes, an ``upsert`` would rewrite the whole object for
nothing, and the library has no multi-buffer upsert (the trailer would cost a copy).  A stale
or damaged old value fails its check at the next load, is removed, and the next store
writes afresh.

Durability (``durable = False``): objects live in the memory segments that Mooncake clients
mount (this server mounts ``global_segment_size`` bytes of its own).  When kvhive closes,
its segment is unmounted and the master drops what lived there, so a restarted kvhive finds
none of its own objects; objects placed in segments of other clients (another server, a
``mooncake_client``) remain.  A master restart forgets every object (misses follow; calls
fail with -900 while it is down and recover when it is back).  Mooncake may also evict
objects itself when its segments fill up: kvhive's usage figures (``tracker.py``) then
overcount until those keys are deleted or looked up in vain; ``max_capacity_gb`` +
``eviction`` keep kvhive below Mooncake's own limits.
"""

from __future__ import annotations

import importlib
import logging
import socket
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvhive.config.l2_adapters import FLAG, MOONCAKE_LANES, MooncakeStoreAdapterConfig
from kvhive.errors import ConfigError, CorruptObject
from kvhive.keys import ObjectKey
from kvhive.storage.l2.base import L2Adapter
from kvhive.storage.l2.futures import CORRUPT, ERROR, MISSING, Outcome, gather, resolved
from kvhive.storage.l2.integrity import TRAILER_BYTES, key_digest, make_trailer, verify
from kvhive.storage.l2.naming import flat_name
from kvhive.storage.l2.pooled import CLOSE_DEADLINE_S, WorkerPool

log = logging.getLogger(__name__)

INSTALL = "pip install 'kvhive[mooncake]'"
INSTALL_IBVERBS = "apt-get install -y libibverbs1"
DEFAULT_MASTER = "127.0.0.1:50051"
"""Where Mooncake dials when ``master_server_addr`` is not given."""
OBJECT_NOT_FOUND = -704
_SIZE_MISMATCH = (-600, -800)  # INVALID_PARAMS (object too long), TRANSFER_FAIL (too short)


def load_store_class() -> Any:
    """``mooncake.store.MooncakeDistributedStore``; ConfigError saying what to install."""
    try:
        module = importlib.import_module("mooncake.store")
    except ImportError as exc:
        if "libibverbs" in str(exc):
            raise ConfigError(
                FLAG, f"mooncake_store: Mooncake needs libibverbs.so.1 ({exc}): {INSTALL_IBVERBS}"
            ) from exc
        raise ConfigError(
            FLAG, f"mooncake_store needs the Mooncake library ({exc}): {INSTALL}"
        ) from exc
    return module.MooncakeDistributedStore


def connect(cfg: MooncakeStoreAdapterConfig, store_class: Any = None) -> Any:
    """A set-up store, ``setup(cfg.setup)`` bounded by ``cfg.setup_timeout_s``.

    Mooncake's ``setup`` retries an absent master for ~90 s **holding the GIL** (measured:
    a thread joined with a 2 s timeout came back after 90 s), so no Python-side timer can cut
    it short.  The bound is therefore a reachability probe first: the master's RPC port (and
    an ``http://`` metadata server's) must accept a TCP connection within the timeout.  Then
    ``setup`` runs on a daemon thread joined for what is left of the timeout (abandoned if it
    does not end; it ends with the process).  A failed probe, a timeout or rc != 0 raises
    ConfigError naming ``master_server_addr``.
    """
    cls = store_class if store_class is not None else load_store_class()
    master = cfg.setup.get("master_server_addr", DEFAULT_MASTER)
    where = f"{cfg.label}: Mooncake setup against master_server_addr {master}"
    deadline = time.monotonic() + cfg.setup_timeout_s
    endpoints = [("master_server_addr", master)]
    meta = cfg.setup.get("metadata_server", "")
    if meta.startswith("http://"):
        endpoints.append(("metadata_server", urllib.parse.urlsplit(meta).netloc))
    for what, hostport in endpoints:
        error = _wait_reachable(hostport, deadline)
        if error:
            raise ConfigError(
                FLAG,
                f"{where}: {what} {hostport} not reachable within {cfg.setup_timeout_s:g} s "
                f"({error}); is it running?",
            )
    store = cls()
    box: list[Any] = []

    def run() -> None:
        try:
            box.append(store.setup(cfg.setup))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            box.append(exc)

    thread = threading.Thread(target=run, name="l2-mooncake-setup", daemon=True)
    thread.start()
    thread.join(max(0.0, deadline - time.monotonic()))
    if not box:
        raise ConfigError(FLAG, f"{where} did not finish within {cfg.setup_timeout_s:g} s")
    if isinstance(box[0], BaseException):
        raise ConfigError(FLAG, f"{where} failed: {box[0]}") from box[0]
    if box[0] != 0:
        raise ConfigError(FLAG, f"{where} returned {box[0]} (see Mooncake's log above)")
    return store


def _wait_reachable(hostport: str, deadline: float) -> str:
    """An empty string once ``host:port`` accepts a TCP connection before ``deadline``, else
    the last error (retried every 0.1 s: a master may be starting)."""
    host, _, port = hostport.rpartition(":")
    host = host.strip("[]")
    error = f"bad address {hostport!r}"
    while port.isdigit():
        try:
            left = max(0.05, min(1.0, deadline - time.monotonic()))
            with socket.create_connection((host, int(port)), timeout=left):
                return ""
        except OSError as exc:
            error = str(exc) or type(exc).__name__
        if time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    return error


def address(buf: memoryview | bytes) -> int:
    """The address of a contiguous buffer's first byte (read-only views too)."""
    return int(np.frombuffer(buf, np.uint8).ctypes.data)


@dataclass(frozen=True, slots=True)
class Layout:
    """How one object is read or written: the buffers' addresses and sizes, in order."""

    ptrs: list[int]
    sizes: list[int]

    @property
    def total(self) -> int:
        return sum(self.sizes)


@dataclass(frozen=True, slots=True)
class LoadSlot:
    """One key of a load slice: its name, the caller's buffer and the trailer's space."""

    key: ObjectKey
    name: str
    buf: memoryview
    tail: memoryview

    def layout(self, framed: bool) -> Layout:
        n = self.buf.nbytes
        if framed:
            return Layout([address(self.buf), address(self.tail)], [n, TRAILER_BYTES])
        return Layout([address(self.buf)], [n])


class MooncakeAdapter(L2Adapter):
    """The ``mooncake_store`` adapter on one set-up ``MooncakeDistributedStore`` (module
    docstring); ``workers`` maps each lane to its thread count."""

    durable = False

    def __init__(
        self,
        store: Any,
        *,
        workers: dict[str, int],
        framed: bool,
        master: str,
        name: str = "mooncake_store",
        close_deadline_s: float = CLOSE_DEADLINE_S,
    ) -> None:
        self.store = store
        self.name = name
        self.master = master
        self._framed = framed
        self._workers = {lane: max(1, workers.get(lane, 1)) for lane in MOONCAKE_LANES}
        self._pools = {
            lane: WorkerPool(n, name=f"l2-mooncake-{lane}") for lane, n in self._workers.items()
        }
        self._close_deadline = close_deadline_s
        self._lock = threading.Lock()
        self._closed = False
        self.counters = {"errors": 0, "corrupt": 0, "missing": 0}

    # -- contract --------------------------------------------------------------------------

    def submit_store(self, keys: Sequence[ObjectKey], buffers: Sequence[memoryview]) -> Future:
        return self._fan_out("store", self._store_slice, list(keys), list(buffers))

    def submit_lookup(self, keys: Sequence[ObjectKey]) -> Future:
        return self._fan_out("lookup", self._lookup_slice, list(keys), None)

    def submit_load(self, keys: Sequence[ObjectKey], buffers: Sequence[memoryview]) -> Future:
        return self._fan_out("retrieve", self._load_slice, list(keys), list(buffers))

    def submit_delete(self, keys: Sequence[ObjectKey]) -> Future:
        return self._fan_out("delete", self._delete_slice, list(keys), None)

    def footprint(self, nbytes: int) -> int:
        return nbytes + (TRAILER_BYTES if self._framed else 0)

    def status(self) -> dict[str, Any]:
        """Counters, the master's address and ``is_healthy`` (Mooncake's ``health_check``:
        0 healthy, 1 closed, 2 master unreachable)."""
        with self._lock:
            out: dict[str, Any] = dict(self.counters)
        try:
            health = int(self.store.health_check())
        except Exception as exc:  # noqa: BLE001 - status must answer; the error is the answer
            health, out["health_error"] = -1, str(exc)
        return {
            **out,
            "integrity": "checksum" if self._framed else "raw",
            "master_server_addr": self.master,
            "is_healthy": health == 0,
            "health_check": health,
            "workers": dict(self._workers),
        }

    def close(self) -> None:
        """Cancel queued jobs, wait up to ``close_deadline_s`` for running ones, then close
        the client (about 1 s: it unmounts its segment).  A job still running: logged, and
        the client is left open under it (process exit reclaims it).  Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        end = time.monotonic() + self._close_deadline
        stuck = sum(p.shutdown(max(0.0, end - time.monotonic())) for p in self._pools.values())
        if stuck:
            log.error(
                "L2 %s: %d job(s) still running after %.1f s; leaving the client open",
                self.name, stuck, self._close_deadline,
            )  # fmt: skip
            return
        self.store.close()

    # -- fan-out ---------------------------------------------------------------------------

    def _fan_out(
        self,
        lane: str,
        job: Callable[[list[ObjectKey], list[memoryview] | None], list[Outcome]],
        keys: list[ObjectKey],
        buffers: list[memoryview] | None,
    ) -> Future:
        if buffers is not None and len(buffers) != len(keys):
            raise ValueError(f"{len(keys)} keys but {len(buffers)} buffers")
        n = len(keys)
        if not n:
            return resolved([])
        parts = min(self._workers[lane], n)
        step = -(-n // parts)
        subs = []
        for lo in range(0, n, step):
            pos = range(lo, min(n, lo + step))
            bufs = None if buffers is None else buffers[lo : pos.stop]
            fut = self._pools[lane].submit(self._guard, job, keys[lo : pos.stop], bufs)
            subs.append((fut, pos))
        return gather(subs, n)

    def _guard(
        self,
        job: Callable[[list[ObjectKey], list[memoryview] | None], list[Outcome]],
        keys: list[ObjectKey],
        buffers: list[memoryview] | None,
    ) -> list[Outcome]:
        try:
            return job(keys, buffers)
        except Exception as exc:  # noqa: BLE001 - task boundary: the slice fails, counted
            self._count("errors", len(keys))
            log.warning("L2 %s: %s of %d keys failed: %s", self.name, job.__name__, len(keys), exc)
            return [ERROR] * len(keys)

    # -- slices (worker threads) -----------------------------------------------------------

    def _store_slice(
        self, keys: list[ObjectKey], buffers: list[memoryview] | None
    ) -> list[Outcome]:
        assert buffers is not None
        names = [flat_name(k) for k in keys]
        keep: list[bytes] = []  # trailers live until the call returns
        ptrs, sizes = [], []
        for key, buf in zip(keys, buffers, strict=True):
            if self._framed:
                keep.append(make_trailer(buf, key_digest(key)))
                ptrs.append([address(buf), address(keep[-1])])
                sizes.append([buf.nbytes, TRAILER_BYTES])
            else:
                ptrs.append([address(buf)])
                sizes.append([buf.nbytes])
        rcs = self.store.batch_put_from_multi_buffers(names, ptrs, sizes)
        bad = [(name, rc) for name, rc in zip(names, rcs, strict=True) if rc != 0]
        if bad:
            self._count("errors", len(bad))
            log.warning("L2 %s: %d of %d puts failed, e.g. %s -> %d",
                        self.name, len(bad), len(names), *bad[0])  # fmt: skip
        return [True if rc == 0 else ERROR for rc in rcs]

    def _lookup_slice(self, keys: list[ObjectKey], _: list[memoryview] | None) -> list[Outcome]:
        rcs = self.store.batch_is_exist([flat_name(k) for k in keys])
        errors = sum(rc not in (0, 1) for rc in rcs)
        if errors:
            self._count("errors", errors)
        return [True if rc == 1 else MISSING if rc == 0 else ERROR for rc in rcs]

    def _delete_slice(self, keys: list[ObjectKey], _: list[memoryview] | None) -> list[Outcome]:
        rcs = self.store.batch_remove([flat_name(k) for k in keys], True)
        return [True if rc == 0 else MISSING if rc == OBJECT_NOT_FOUND else ERROR for rc in rcs]

    def _load_slice(self, keys: list[ObjectKey], buffers: list[memoryview] | None) -> list[Outcome]:
        assert buffers is not None
        tails = memoryview(bytearray(TRAILER_BYTES * len(keys)))
        slots = [
            LoadSlot(k, flat_name(k), b, tails[i * TRAILER_BYTES : (i + 1) * TRAILER_BYTES])
            for i, (k, b) in enumerate(zip(keys, buffers, strict=True))
        ]
        layouts = [s.layout(self._framed) for s in slots]
        rcs = self.store.batch_get_into_multi_buffers(
            [s.name for s in slots], [lay.ptrs for lay in layouts], [lay.sizes for lay in layouts]
        )
        return [self._finish(slot, rc, self._framed) for slot, rc in zip(slots, rcs, strict=True)]

    def _finish(self, slot: LoadSlot, rc: int, framed: bool) -> Outcome:
        """One key's outcome from the library's answer ``rc`` (stored length or error)."""
        n = slot.buf.nbytes
        try:
            if rc == n + (TRAILER_BYTES if framed else 0):
                verify(slot.buf, rc, slot.tail, key_digest(slot.key))
                return True
            if rc == OBJECT_NOT_FOUND:
                self._count("missing")
                return MISSING
            if rc > 0 or rc in _SIZE_MISMATCH:
                return self._by_size(slot, rc, framed)
            self._count("errors")
            log.warning("L2 %s: load of %s failed: %d", self.name, slot.name, rc)
            return ERROR
        except CorruptObject as exc:
            self._count("corrupt")
            log.warning("L2 %s: corrupt object %s (%s); removing it", self.name, slot.name, exc)
            try:
                self.store.batch_remove([slot.name], True)
            except Exception as err:  # noqa: BLE001 - best effort: it stays a counted miss
                log.warning("L2 %s: could not remove corrupt %s: %s", self.name, slot.name, err)
            return CORRUPT

    def _by_size(self, slot: LoadSlot, rc: int, framed: bool) -> Outcome:
        """A load whose answer did not match the layout read: classify by the stored size
        and read the other accepted layout once; raises CorruptObject for any other size."""
        size = int(self.store.get_size(slot.name))
        n = slot.buf.nbytes
        if size == OBJECT_NOT_FOUND:
            self._count("missing")
            return MISSING
        if size < 0 or size == n + (TRAILER_BYTES if framed else 0):
            self._count("errors")  # the object has the right size: the transfer failed
            log.warning("L2 %s: load of %s failed: %d (size %d)", self.name, slot.name, rc, size)
            return ERROR
        if size in (n, n + TRAILER_BYTES):
            lay = slot.layout(not framed)
            got = self.store.batch_get_into_multi_buffers([slot.name], [lay.ptrs], [lay.sizes])[0]
            if got == lay.total:
                verify(slot.buf, got, slot.tail, key_digest(slot.key))
                return True
            return self._finish(slot, got, framed) if got == OBJECT_NOT_FOUND else ERROR
        raise CorruptObject(f"stored length {size} does not match the expected {n} bytes")

    def _count(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counters[name] += n


def build(cfg: MooncakeStoreAdapterConfig) -> L2Adapter:
    """Import Mooncake, ``setup`` within ``setup_timeout_s``, and serve (module docstring)."""
    store = connect(cfg)
    return MooncakeAdapter(
        store,
        workers={lane: cfg.workers(lane) for lane in MOONCAKE_LANES},
        framed=cfg.integrity == "checksum",
        master=cfg.setup.get("master_server_addr", DEFAULT_MASTER),
        name=cfg.label,
    )
