"""One NIXL agent per adapter: loading the library, starting a backend, registering memory and
files, and moving bytes with a deadline.  Shared by ``nixl_store`` and ``nixl_store_dynamic``.

NIXL comes from the ``nixl-cu12`` wheel, imported as ``nixl_cu12._api`` directly: the ``nixl``
meta package would import torch to choose a build and prefers ``nixl-cu13``, whose OBJ plugin
cannot load without NVIDIA libraries.  No GPU is needed for POSIX (files) or OBJ (S3).

Memory model: the L1 arena (:class:`HostRegion`) is registered once as one DRAM region when the
agent starts (instant, and nothing is touched or pinned: a lazy 100 GiB arena costs nothing).
Each transfer then names its exact byte ranges (``initialize_xfer`` with descriptor lists
built for it, ~30 µs), so objects need no page table of the arena and may start anywhere.
A buffer outside the arena (tests, the bench) is registered for the one transfer.

Threads: the agent runs in NIXL's ``RW`` sync mode, so transfers may be started and polled on
several threads at once while registrations take the agent exclusively.
"""

from __future__ import annotations

import contextlib
import logging
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from kvhive.config.l2_adapters import FLAG
from kvhive.errors import ConfigError, L2Error
from kvhive.storage.l2.base import HostRegion

log = logging.getLogger(__name__)

Op = Literal["READ", "WRITE"]
INSTALL = "pip install --no-deps nixl-cu12==1.5.1  (or: pip install 'kvhive[nixl]')"
NEEDS_GPU = {
    "GDS": "GPUDirect Storage needs an NVIDIA GPU with the CUDA runtime and cuFile",
    "GDS_MT": "GPUDirect Storage needs an NVIDIA GPU with the CUDA runtime and cuFile",
    "HF3FS": "the HF3FS plugin is not part of the nixl-cu12 wheel",
    "IBM_SCALE": "the IBM_SCALE plugin is not part of the nixl-cu12 wheel",
}
_SPIN = 20  # state checks before the first sleep: small transfers finish within them


def load_api(kind: str) -> Any:
    """The NIXL Python API (``nixl_cu12._api``, else ``nixl._api``); a :class:`ConfigError`
    naming the install line when neither imports."""
    try:
        import nixl_cu12._api as api  # type: ignore[import-not-found,import-untyped,unused-ignore]
    except ImportError as first:
        try:
            import nixl._api as api  # type: ignore[import-not-found,import-untyped,no-redef,unused-ignore]
        except ImportError:
            raise ConfigError(FLAG, f"type '{kind}' needs NIXL ({first}): {INSTALL}") from None
    return api


@dataclass(frozen=True, slots=True)
class Span:
    """``nbytes`` at ``address`` in host memory."""

    address: int
    nbytes: int


@dataclass(frozen=True, slots=True)
class Extent:
    """``nbytes`` at ``offset`` of storage item ``dev_id`` (a file descriptor for file
    backends, an object index for OBJ)."""

    offset: int
    nbytes: int
    dev_id: int


DIRECT_ALIGN = 4096
"""O_DIRECT granularity: file offset, length and memory address must all be multiples."""


def address_of(part: memoryview) -> int:
    """Address of a contiguous buffer (read-only ones too: ``bytes``, read-only views)."""
    return int(np.frombuffer(part, np.uint8).ctypes.data) if part.nbytes else 0


def pair_up(parts: Sequence[memoryview], storage: Sequence[Extent],
            direct: Mapping[int, int] | None = None) -> tuple[list[Span], list[Extent]]:  # fmt: skip
    """Lay the concatenation of ``parts`` onto the concatenation of ``storage`` extents:
    pairwise host spans and storage extents of equal sizes, split where either side ends.

    ``direct`` maps a storage dev_id (a buffered file descriptor) to an ``O_DIRECT``
    descriptor of the same file: pieces whose memory address, file offset and length are
    multiples of :data:`DIRECT_ALIGN` go through it, and a piece aligned at its start has its
    aligned body sent direct and its remainder buffered.  Raises ValueError when the parts
    need more bytes than the extents hold.
    """
    spans: list[Span] = []
    extents: list[Extent] = []
    it = iter(storage)
    ext: Extent | None = None
    ext_used = 0
    for part in parts:
        addr, left = address_of(part), part.nbytes
        while left:
            if ext is None or ext_used == ext.nbytes:
                ext = next(it, None)
                ext_used = 0
                if ext is None:
                    raise ValueError("object larger than its storage extents")
            n = min(left, ext.nbytes - ext_used)
            _emit(spans, extents, Span(addr, n), Extent(ext.offset + ext_used, n, ext.dev_id),
                  direct)  # fmt: skip
            addr += n
            left -= n
            ext_used += n
    return spans, extents


def slice_extents(extents: Sequence[Extent], start: int, end: int) -> list[Extent]:
    """The storage extents holding bytes ``[start, end)`` of the concatenation of
    ``extents``."""
    out: list[Extent] = []
    at = 0
    for ext in extents:
        lo, hi = max(start, at), min(end, at + ext.nbytes)
        if lo < hi:
            out.append(Extent(ext.offset + lo - at, hi - lo, ext.dev_id))
        at += ext.nbytes
    return out


def _emit(spans: list[Span], extents: list[Extent], span: Span, ext: Extent,
          direct: Mapping[int, int] | None) -> None:  # fmt: skip
    fd = direct.get(ext.dev_id) if direct else None
    body = span.nbytes - span.nbytes % DIRECT_ALIGN
    if fd is None or body == 0 or span.address % DIRECT_ALIGN or ext.offset % DIRECT_ALIGN:
        spans.append(span)
        extents.append(ext)
        return
    spans.append(Span(span.address, body))
    extents.append(Extent(ext.offset, body, fd))
    if body < span.nbytes:
        spans.append(Span(span.address + body, span.nbytes - body))
        extents.append(Extent(ext.offset + body, span.nbytes - body, ext.dev_id))


class NixlAgent:
    """A NIXL agent with one storage backend started (module docstring).

    ``backend_params`` go to the backend verbatim.  Raises :class:`ConfigError` (exit 2 at
    start) when NIXL is missing, the backend's plugin is absent or cannot start here.
    """

    def __init__(self, kind: str, backend: str, backend_params: dict[str, str],
                 host: HostRegion | None) -> None:  # fmt: skip
        api = load_api(kind)
        self._api = api
        self.backend = backend
        cfg = api.nixl_agent_config(
            enable_prog_thread=False,
            backends=[],
            sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_RW,
        )
        self.agent = api.nixl_agent(f"kvhive-{uuid.uuid4().hex[:12]}", cfg)
        self.name: str = self.agent.name
        where = f"type '{kind}' backend {backend}"
        if backend not in self.agent.get_plugin_list():
            why = NEEDS_GPU.get(backend, "its plugin is not installed")
            raise ConfigError(FLAG, f"{where} is not available here: {why}")
        try:
            self.agent.create_backend(backend, backend_params)
        except Exception as exc:  # noqa: BLE001 - NIXL raises its own error types
            why = NEEDS_GPU.get(backend, "check backend_params")
            raise ConfigError(FLAG, f"{where} could not start ({exc}): {why}") from None
        self.host = host
        self._host_reg = None
        if host is not None:
            self._host_reg = self.agent.register_memory([(host.base, host.size, 0, "")], "DRAM")

    # -- registrations ---------------------------------------------------------------------

    def register(self, items: Sequence[tuple[int, int, int, str]], kind: str) -> Any:
        """Register storage: ``(offset, size, dev_id, meta)`` entries of ``kind`` ("FILE":
        dev_id a file descriptor; "OBJ": an index, meta the object key).  Returns the handle
        for :meth:`deregister`."""
        return self.agent.register_memory(list(items), kind)

    def deregister(self, handle: Any) -> None:
        self.agent.deregister_memory(handle)

    @contextlib.contextmanager
    def local(self, spans: Sequence[Span]) -> Iterator[None]:
        """Make ``spans`` transferable for the duration: those outside the registered arena
        are registered now and deregistered at exit."""
        host = self.host
        foreign = [s for s in spans if host is None or not host.holds(s.address, s.nbytes)]
        handle = None
        if foreign:
            handle = self.agent.register_memory([(s.address, s.nbytes, 0, "") for s in foreign],
                                                "DRAM")  # fmt: skip
        try:
            yield
        finally:
            if handle is not None:
                self.agent.deregister_memory(handle)

    # -- transfers -------------------------------------------------------------------------

    def transfer(self, op: Op, local: Sequence[Span], remote: Sequence[Extent], kind: str,
                 deadline: float) -> None:  # fmt: skip
        """Move bytes between ``local`` host spans and ``remote`` storage extents, pairwise
        (equal counts and sizes): WRITE stores, READ loads.  Polls until done or until
        ``deadline`` (a ``time.monotonic`` value).  Raises :class:`L2Error` on any failure,
        including a read past the end of a file (NIXL reports it, it is never short)."""
        local_d = self.agent.get_xfer_descs([(s.address, s.nbytes, 0) for s in local], "DRAM")
        remote_d = self.agent.get_xfer_descs([(e.offset, e.nbytes, e.dev_id) for e in remote],
                                             kind)  # fmt: skip
        try:
            handle = self.agent.initialize_xfer(op, local_d, remote_d, self.name)
        except Exception as exc:  # noqa: BLE001 - nixlNotFoundError etc.: bad ranges
            raise L2Error(f"NIXL {op} could not start: {exc}") from None
        try:
            self._run(handle, op, deadline)
        finally:
            try:
                self.agent.release_xfer_handle(handle)
            except Exception:
                log.exception("NIXL %s handle could not be released (leaked)", op)

    def _run(self, handle: Any, op: Op, deadline: float) -> None:
        try:
            state = self.agent.transfer(handle)
            spins = 0
            pause = 0.0001
            while state != "DONE":
                if state == "ERR":
                    raise L2Error(f"NIXL {op} failed")
                spins += 1
                if spins > _SPIN:
                    if time.monotonic() > deadline:
                        raise L2Error(f"NIXL {op} did not finish before its deadline")
                    time.sleep(pause)
                    pause = min(pause * 2, 0.001)
                state = self.agent.check_xfer_state(handle)
        except L2Error:
            raise
        except Exception as exc:  # noqa: BLE001 - nixlBackendError: an I/O failed or was short
            raise L2Error(f"NIXL {op} failed: {exc}") from None

    # -- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Deregister the arena (storage handles are the caller's to deregister first)."""
        if self._host_reg is not None:
            with contextlib.suppress(Exception):
                self.agent.deregister_memory(self._host_reg)
            self._host_reg = None
