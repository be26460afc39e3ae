"""The L2 adapter contract: what a storage backend implements to become an L2 tier.

Two ways to write an adapter, both registered by ``type`` (see ``registry.py``) or loaded
with ``{"type": "plugin", "module_path": ..., "class_name": ...}``:

1. :class:`ObjectStore` — the easy one.  Implement synchronous, per-object ``put``, ``get``,
   ``exists`` and ``delete``; kvhive runs them on a worker pool (``PooledAdapter``) and adds
   batching, completion futures, integrity trailers (``integrity.py``), per-salt usage,
   capacity, eviction, timeouts and retries.  Calls arrive on several threads at once, so
   the store must be thread-safe.

2. :class:`L2Adapter` — the asynchronous batch contract the controllers use.  Implement it
   directly when the backend has its own async engine.

Contract of :class:`L2Adapter` (every ``submit_*`` returns at once and must never block):

* ``submit_store(keys, buffers)`` persists ``buffers[i]`` (read-only views of the objects'
  logical bytes, valid until the future completes) under ``keys[i]``.
* ``submit_lookup(keys)`` answers which keys exist.
* ``submit_load(keys, buffers)`` fills ``buffers[i]`` (writable, exactly the object's
  logical size) with the object's bytes.  A key whose object is missing, short, long or
  corrupt is ``False``; its buffer content is then undefined.  Never report ``True`` for
  bytes you did not verify.
* ``submit_delete(keys)`` removes objects; ``True`` where something was removed.
* Each future resolves to one ``bool`` per key, in key order.  A failed key may instead be
  a ``futures.Miss`` (an ``int`` equal to ``False``) saying why: ``MISSING``, ``CORRUPT``
  (the object failed a check and was removed) or ``ERROR``; the prefetch failure metric is
  labelled with it.  A future that raises counts as ``ERROR`` for every key.
* A loaded object must be verified *for its key*: an object of another key stored under
  this key's name (a copied file, a restored backup) is corrupt, not data.  The integrity
  trailer (``ObjectStore``s that frame) and the slot identity (raw_block, dax) do this.  A future that never resolves costs the caller a timeout:
  kvhive puts a deadline on every task, so an adapter cannot hang a request.
* ``scan()`` (optional) lists ``(key, stored bytes)`` already in the backend so usage and
  eviction survive a restart; ``status()`` returns JSON-safe details; ``close()`` releases
  everything and is called once, after all tasks were given up or finished.

Usage per ``cache_salt``, capacity and eviction order are kept by kvhive around the adapter
(``tracker.py``) from what it stored, loaded and deleted, so adapters do I/O only.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, ClassVar

from kvhive.keys import ObjectKey

Results = Future  # Future[list[bool]]: one outcome per key, in key order


@dataclass(frozen=True, slots=True)
class HostRegion:
    """The L1 arena as an adapter that registers host memory with its backend sees it (NIXL:
    one registration of the whole range at start).  ``base`` is the arena's address, ``size``
    its reserved bytes (a lazy arena's pages are not all backed), ``align`` the L1 alignment.
    Buffers the adapter receives usually lie inside it; an adapter must still accept one that
    does not (tests, benchmarks) and register that one for the transfer alone."""

    base: int
    size: int
    align: int

    def holds(self, address: int, nbytes: int) -> bool:
        """Whether ``[address, address + nbytes)`` lies inside the region."""
        return self.base <= address and address + nbytes <= self.base + self.size


class L2Adapter(ABC):
    """The asynchronous, batch-oriented adapter contract (module docstring)."""

    durable: bool = False
    """True when objects survive a server restart (informational; shown in /status).  A class
    constant for most adapters; wrappers copy it from the adapter they wrap."""

    @abstractmethod
    def submit_store(self, keys: Sequence[ObjectKey], buffers: Sequence[memoryview]) -> Results:
        """Persist ``buffers[i]`` under ``keys[i]``."""

    @abstractmethod
    def submit_lookup(self, keys: Sequence[ObjectKey]) -> Results:
        """Which ``keys`` exist."""

    @abstractmethod
    def submit_load(self, keys: Sequence[ObjectKey], buffers: Sequence[memoryview]) -> Results:
        """Fill ``buffers[i]`` with the object of ``keys[i]``, verified."""

    @abstractmethod
    def submit_delete(self, keys: Sequence[ObjectKey]) -> Results:
        """Remove the objects of ``keys``."""

    def scan(self) -> Iterator[tuple[ObjectKey, int]]:
        """``(key, stored bytes)`` of objects already present (for usage after a restart)."""
        return iter(())

    @property
    def capacity_bytes(self) -> int:
        """Fixed capacity of the backend in bytes (slots x slot size), 0 when unbounded."""
        return 0

    def footprint(self, nbytes: int) -> int:
        """Stored bytes of an object of ``nbytes`` logical bytes (for usage accounting)."""
        return nbytes

    def status(self) -> dict[str, Any]:
        """JSON-safe details for ``/status``."""
        return {}

    @abstractmethod
    def close(self) -> None:
        """Release every resource (called once)."""


class ObjectStore(ABC):
    """Synchronous per-object I/O, run by kvhive on a worker pool (module docstring).

    Errors: raise :class:`kvhive.errors.ObjectMissing` for an absent object,
    :class:`kvhive.errors.CorruptObject` for one that fails a check, and
    :class:`kvhive.errors.L2Error` (or ``OSError``) for anything else.
    """

    frames: ClassVar[bool] = True
    """True: kvhive appends and checks the integrity trailer (``integrity.py``, bound to the
    key) around ``put``/``get``.  False: the store verifies objects, and that they belong to
    the key asked for, itself (slot headers)."""

    durable: ClassVar[bool] = False

    @abstractmethod
    def put(self, key: ObjectKey, parts: Sequence[memoryview]) -> None:
        """Store the concatenation of ``parts`` under ``key`` (atomically where possible)."""

    @abstractmethod
    def get(self, key: ObjectKey, parts: Sequence[memoryview]) -> int:
        """Fill ``parts`` in order from the start of the object; return its stored length.

        Bytes beyond the object's end are left untouched; the caller checks the length.
        """

    def get_streamed(self, key: ObjectKey, parts: Sequence[memoryview],
                     landed: Callable[[int], None]) -> int:  # fmt: skip
        """:meth:`get`, calling ``landed(n)`` (``n`` increasing) whenever the object's first
        ``n`` bytes are in ``parts``, on the calling thread, so kvhive checks each piece
        while the next is read.  Override in stores that read in pieces; this default reads
        everything, then reports it all."""
        total = self.get(key, parts)
        landed(min(total, sum(p.nbytes for p in parts)))
        return total

    @abstractmethod
    def exists(self, key: ObjectKey) -> bool:
        """Whether an object is stored under ``key``."""

    @abstractmethod
    def delete(self, key: ObjectKey) -> bool:
        """Remove ``key``'s object; False when there was none."""

    def exists_many(self, keys: Sequence[ObjectKey]) -> list[bool]:
        """Batched ``exists``; override when the backend can pipeline."""
        return [self.exists(key) for key in keys]

    def scan(self) -> Iterator[tuple[ObjectKey, int]]:
        return iter(())

    capacity_bytes: int = 0

    def footprint(self, nbytes: int) -> int:
        """Stored bytes of an object of ``nbytes`` logical bytes, before framing."""
        return nbytes

    def status(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        return None
