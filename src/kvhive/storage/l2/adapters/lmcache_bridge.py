"""Run a class written for LMCache's L2 adapter interface as a kvhive :class:`L2Adapter`.

LMCache's ``L2AdapterInterface`` (0.5.6: ``lmcache/v1/distributed/l2_adapters/base.py``) is
task-based: ``submit_*_task`` returns a task id, completion is signalled on one eventfd per
operation kind (store, lookup-and-lock, load), and the caller collects results with
``pop_completed_store_tasks`` (task-level ``L2StoreResult``) or ``query_*_result(task_id)``
(a per-key ``Bitmap``, returned once).  ``delete`` is synchronous and reports what it removed
only to registered listeners.  The ``plugin`` type (``plugin.py``) wraps such a class here:

====================  ===========================================================
kvhive                LMCache
====================  ===========================================================
``ObjectKey``         ``lmcache.v1.distributed.api.ObjectKey``, same five fields
buffer (memoryview)   ``TensorMemoryObj`` over the same bytes (a flat uint8 tensor,
                      no copy; ``byte_array``, ``tensor``, ``metadata`` as LMCache's)
``submit_store``      ``submit_store_task``; its task result applies to every key
``submit_lookup``     ``submit_lookup_and_lock_task``, then ``submit_unlock`` of the
                      hits at once (kvhive holds no L2 lock across lookup and load)
``submit_load``       ``submit_load_task``; the bitmap gives each key's outcome
``submit_delete``     ``delete`` on a worker thread; keys its listener saw deleted
``scan``              ``list_l2_keys`` pages, where the adapter implements it
====================  ===========================================================

One poller thread per bridged adapter waits on the three eventfds (and a wake fd kvhive
signals after each submit, so a task that completed before its id was recorded is still
collected) and resolves the futures, as LMCache's store and prefetch controllers do.

Objects keep LMCache's own format (the ``fs`` adapter's files are readable by
``lmcache server``), so kvhive's integrity trailer is not added: a load is as verified as
the LMCache adapter makes it (``fs``: the exact length, the key in the file name).
LMCache is imported only here, and only when such a class is configured.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib
import logging
import os
import select
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import Any

import numpy as np

from kvhive.keys import ObjectKey
from kvhive.storage.l2.base import L2Adapter, Results
from kvhive.storage.l2.futures import ERROR, MISSING, Outcome, failed

log = logging.getLogger(__name__)

LMCACHE_BASE = ("lmcache.v1.distributed.l2_adapters.base", "L2AdapterInterface")
"""Module and name of LMCache's adapter base class (0.5.6 and 0.5.7)."""
_POLL_MS = 200  # a safety net only: every completion signals an eventfd
_Pending = tuple[Future, list[Any], tuple[Any, ...]]


def is_lmcache_adapter(cls: type) -> bool:
    """Whether ``cls`` derives from LMCache's ``L2AdapterInterface`` (no lmcache import:
    a class that does has already imported it)."""
    return any((base.__module__, base.__qualname__) == LMCACHE_BASE for base in cls.__mro__)


def construct(
    module: ModuleType, class_name: str, params: dict[str, Any], config_name: str | None
) -> Any:
    """Build ``module.class_name`` as LMCache's ``plugin`` factory does: the first of
    ``config_name``, ``<class_name>Config`` and the class's ``config_class_name`` attribute
    that names a subclass of LMCache's ``L2AdapterConfigBase`` in ``module`` builds the
    config with ``from_dict(params)``; without one the class receives the raw ``params``
    dict.  (kvhive has no L1 memory descriptor to pass as ``l1_memory_desc``.)"""
    cls = getattr(module, class_name)
    config_base = _lmc("v1.distributed.l2_adapters.config").L2AdapterConfigBase
    for name in (config_name, class_name + "Config", getattr(cls, "config_class_name", None)):
        found = getattr(module, name, None) if name else None
        if isinstance(found, type) and issubclass(found, config_base):
            config: Any = found
            return cls(config.from_dict(params))
    return cls(params)


def _lmc(name: str) -> Any:
    return importlib.import_module(f"lmcache.{name}")


@functools.lru_cache(maxsize=64)
def _bytes_type(n: int) -> Any:
    """``c_ubyte * n``, cached: ctypes builds a new heap type for every ``*``."""
    return ctypes.c_ubyte * n


class LMCacheBridge(L2Adapter):
    """An LMCache L2 adapter instance behind kvhive's contract (module docstring)."""

    def __init__(self, adapter: Any, *, name: str) -> None:
        self.adapter, self.name = adapter, name
        self._torch = importlib.import_module("torch")
        self._key_cls = _lmc("v1.distributed.api").ObjectKey
        mm = _lmc("v1.memory_management")
        self._obj_cls, self._meta_cls = mm.TensorMemoryObj, mm.MemoryObjMetadata
        self._consume = _lmc("v1.platform").consume_fd
        self.durable = bool(getattr(adapter, "durable", False))
        self._capacity = int(adapter.get_usage().total_capacity_bytes)
        self._lock = threading.Lock()
        # task id -> (future, LMCache keys, what must stay alive until it completes)
        self._stores: dict[int, _Pending] = {}
        self._lookups: dict[int, _Pending] = {}
        self._loads: dict[int, _Pending] = {}
        self._early: dict[int, Any] = {}  # store results popped before their id was recorded
        self._deleted: set[Any] = set()
        self._deleter = ThreadPoolExecutor(1, thread_name_prefix=f"l2-lmcache-{name}-delete")
        adapter.register_listener(self)  # on_l2_keys_* below
        self._wake = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._closed = threading.Event()
        self._fds = (adapter.get_store_event_fd(), adapter.get_lookup_and_lock_event_fd(),
                     adapter.get_load_event_fd())  # fmt: skip
        self._thread = threading.Thread(target=self._run, name=f"l2-lmcache-{name}", daemon=True)
        self._thread.start()

    # -- translation -------------------------------------------------------------------

    def _keys(self, keys: Sequence[ObjectKey]) -> list[Any]:
        return [self._key_cls(*key) for key in keys]  # same fields, same order

    def _obj(self, buf: memoryview) -> Any:
        """A ``TensorMemoryObj`` over ``buf``'s bytes (no copy; ``buf`` must outlive it)."""
        n = buf.nbytes
        torch = self._torch
        if n:
            addr = np.frombuffer(buf, dtype=np.uint8).ctypes.data
            raw = torch.frombuffer(_bytes_type(n).from_address(addr), dtype=torch.uint8)
        else:
            addr, raw = 0, torch.empty(0, dtype=torch.uint8)
        meta = self._meta_cls(shape=torch.Size([n]), dtype=torch.uint8, address=addr,
                              phy_size=n, ref_count=1)  # fmt: skip
        return self._obj_cls(raw, meta, None)

    # -- the contract ------------------------------------------------------------------

    def submit_store(self, keys: Sequence[ObjectKey], buffers: Sequence[memoryview]) -> Results:
        objs = [self._obj(b) for b in buffers]
        return self._submit(self._stores, keys, self.adapter.submit_store_task, objs, buffers)

    def submit_lookup(self, keys: Sequence[ObjectKey]) -> Results:
        return self._submit(self._lookups, keys, self.adapter.submit_lookup_and_lock_task, {})

    def submit_load(self, keys: Sequence[ObjectKey], buffers: Sequence[memoryview]) -> Results:
        objs = [self._obj(b) for b in buffers]
        return self._submit(self._loads, keys, self.adapter.submit_load_task, objs, buffers)

    def submit_delete(self, keys: Sequence[ObjectKey]) -> Results:
        if self._closed.is_set():
            return failed(RuntimeError(f"{self.name} is closed"))
        return self._deleter.submit(self._delete, self._keys(keys))

    def scan(self) -> Iterator[tuple[ObjectKey, int]]:
        cursor = None
        while True:
            try:
                page = self.adapter.list_l2_keys(page_size=500, cursor=cursor)
            except NotImplementedError:
                return
            for entry in page.entries:
                k = entry.key
                yield (ObjectKey(bytes.fromhex(k.chunk_hash_hex), k.model_name, k.kv_rank,
                                 k.object_group_id, k.cache_salt), int(entry.size_bytes))  # fmt: skip
            cursor = page.next_page_token
            if cursor is None:
                return

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def status(self) -> dict[str, Any]:
        cls = type(self.adapter)
        out: dict[str, Any] = {"lmcache_class": f"{cls.__module__}.{cls.__qualname__}"}
        with contextlib.suppress(Exception):
            report = self.adapter.report_status()
            out.update({str(k): v if isinstance(v, (bool, int, float, str)) or v is None
                        else repr(v) for k, v in report.items()})  # fmt: skip
        return out

    def close(self) -> None:
        self._closed.set()
        self._poke()
        self._thread.join()
        self._deleter.shutdown(wait=True)
        try:
            self.adapter.close()
        finally:
            os.close(self._wake)
            with self._lock:
                tables = (self._stores, self._lookups, self._loads)
                pending = [p for table in tables for p in table.values()]
                for table in tables:
                    table.clear()
            for fut, lkeys, _ in pending:
                fut.set_result([ERROR] * len(lkeys))

    # -- LMCache listener (deletions are reported only here) -----------------------------

    def on_l2_keys_stored(self, keys: list[Any], sizes: list[int]) -> None:
        return None

    def on_l2_keys_accessed(self, keys: list[Any]) -> None:
        return None

    def on_l2_keys_deleted(self, keys: list[Any]) -> None:
        with self._lock:
            self._deleted.update(keys)

    # -- internals ---------------------------------------------------------------------

    def _submit(self, table: dict[int, _Pending], keys: Sequence[ObjectKey],
                submit: Callable[[list[Any], Any], Any], arg: Any,
                keep: Any = None) -> Results:  # fmt: skip
        """``submit(lmcache_keys, arg)``; record the task (``arg`` and ``keep`` stay alive
        until it completes: the memory objects and the buffers under them); wake the poller."""
        fut: Future = Future()
        lkeys = self._keys(keys)
        try:
            task = int(submit(lkeys, arg))
        except Exception as exc:  # noqa: BLE001 - task boundary: the plugin's failure
            return failed(exc)
        early = None
        with self._lock:
            if table is self._stores:
                early = self._early.pop(task, None)
            if early is None:
                table[task] = (fut, lkeys, (arg, keep))
        if early is not None:
            fut.set_result(self._store_outcome(early, len(lkeys)))
        self._poke()
        return fut

    def _delete(self, lkeys: list[Any]) -> list[Outcome]:
        with self._lock:
            self._deleted.clear()
        self.adapter.delete(lkeys)
        with self._lock:
            gone, self._deleted = self._deleted, set()
        return [k in gone for k in lkeys]

    @staticmethod
    def _store_outcome(result: Any, n: int) -> list[Outcome]:
        return [True] * n if result.is_successful() else [ERROR] * n

    def _poke(self) -> None:
        with contextlib.suppress(OSError):
            os.eventfd_write(self._wake, 1)

    def _run(self) -> None:
        poller = select.poll()
        for fd in (*self._fds, self._wake):
            poller.register(fd, select.POLLIN)
        while not self._closed.is_set():
            for fd, _ in poller.poll(_POLL_MS):
                with contextlib.suppress(OSError):
                    self._consume(fd)
            try:
                self._drain()
            except Exception:  # the poller outlives a plugin's error (logged with its traceback)
                log.exception("L2 %s: collecting LMCache adapter results failed", self.name)

    def _drain(self) -> None:
        done: list[tuple[Future, list[Outcome]]] = []
        popped = self.adapter.pop_completed_store_tasks()
        with self._lock:
            for task, result in popped.items():
                entry = self._stores.pop(task, None)
                if entry is None:
                    self._early[task] = result
                else:
                    done.append((entry[0], self._store_outcome(result, len(entry[1]))))
            lookups, loads = list(self._lookups), list(self._loads)
        for task in lookups:
            bitmap = self.adapter.query_lookup_and_lock_result(task)
            if bitmap is not None:
                fut, lkeys, _ = self._pop(self._lookups, task)
                hits = set(bitmap.get_indices_list())
                if hits:
                    self.adapter.submit_unlock([lkeys[i] for i in sorted(hits)])
                done.append((fut, [True if i in hits else MISSING for i in range(len(lkeys))]))
        for task in loads:
            bitmap = self.adapter.query_load_result(task)
            if bitmap is not None:
                fut, lkeys, _ = self._pop(self._loads, task)
                hits = set(bitmap.get_indices_list())
                done.append((fut, [i in hits for i in range(len(lkeys))]))
        for fut, outcome in done:
            fut.set_result(outcome)

    def _pop(self, table: dict[int, _Pending], task: int) -> _Pending:
        with self._lock:
            return table.pop(task)
