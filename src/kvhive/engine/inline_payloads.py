"""Inline engine-driven payloads: chunk tensors carried inside ``commit_store`` and the
``prepare_retrieve`` reply when worker and server share no memory pool.

Two forms: 0.5.6's torch pickles (:mod:`kvhive.transfer.pickle_codec`, needs torch) and
0.5.7's msgpack tensor envelopes (:mod:`kvhive.transfer.tensor_envelope`, no torch), each
checked against the registered chunk layout.  A retrieve is answered in the form the
instance's commits use (or its registration implies).  Calls come from the instances'
affinity threads; the form table is guarded by one lock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvhive.engine import keys as k
from kvhive.engine.registry import Instance
from kvhive.engine.stats import TransferBrackets
from kvhive.engine.transfers import TransferService
from kvhive.errors import TransferFailed
from kvhive.keys import ObjectKey
from kvhive.storage.l1.manager import L1Manager
from kvhive.storage.owners import WriterOwner
from kvhive.transfer import pickle_codec, tensor_envelope
from kvhive.transfer.tensor_envelope import PayloadForm, TensorLayout
from kvhive.wire import types as t

log = logging.getLogger(__name__)


class InlinePayloads:
    """Decode, store and encode inline chunk payloads (module docstring)."""

    def __init__(
        self, *, l1: L1Manager, transfers: TransferService, brackets: TransferBrackets
    ) -> None:
        self.l1 = l1
        self.transfers = transfers
        self.brackets = brackets
        self._forms: dict[int, PayloadForm] = {}  # payload form per instance
        self._lock = threading.Lock()

    def commit(self, inst: Instance, key: t.CacheKey, data: bytes) -> bool:
        """Decode and store a commit_store payload (an envelope or a pickle, told apart by
        its first byte); True when every reserved chunk was committed."""
        form = tensor_envelope.payload_form(data)
        self._note_form(inst.instance_id, form)
        if form == "envelope":
            return self._commit_envelope(inst, key, data)
        return self._commit_pickle(inst, key, data)

    def encode(self, inst: Instance, views: list[np.ndarray]) -> bytes:
        """A prepare_retrieve payload of ``views`` in the form the instance uses (its last
        commit's form, else what its registration implies)."""
        with self._lock:
            form = self._forms.get(inst.instance_id, "pickle")
        if form == "envelope":
            return tensor_envelope.encode_tensors(views, self._layout(inst))
        g = inst.geometry
        return pickle_codec.encode_tensors(views, g.shape, g.dtype)

    def set_form(self, instance_id: int, form: PayloadForm) -> None:
        """The form a registration implies (before any commit)."""
        with self._lock:
            self._forms[instance_id] = form

    def forget(self, instance_id: int) -> None:
        with self._lock:
            self._forms.pop(instance_id, None)

    def _note_form(self, instance_id: int, form: PayloadForm) -> None:
        """Retrieves are answered in the form the instance's commits use."""
        with self._lock:
            old = self._forms.get(instance_id)
            self._forms[instance_id] = form
        if old is not None and old != form:
            log.info("engine-driven instance %d commits %s payloads now", instance_id, form)

    def _layout(self, inst: Instance) -> TensorLayout:
        return TensorLayout.of(inst.geometry.shape, inst.geometry.dtype)

    def _commit_envelope(self, inst: Instance, key: t.CacheKey, data: bytes) -> bool:
        """A 0.5.7 tensor envelope (flat, or grouped with the one registered group, whose
        ``chunk_indices`` name the chunks it carries), checked against the layout."""
        keys = self.transfers.chunk_keys(key, k.kv_rank_of(key))
        layout = self._layout(inst)
        if tensor_envelope.is_grouped(data):
            [(indices, tensors)] = tensor_envelope.decode_grouped(data, [(layout, len(keys))])
            return self._write(inst, key, [keys[i] for i in indices], tensors)
        tensors = tensor_envelope.decode_tensors(data, layout, len(keys))
        return self._write(inst, key, keys, tensors)

    def _commit_pickle(self, inst: Instance, key: t.CacheKey, data: bytes) -> bool:
        tensors = pickle_codec.decode_tensors(data)
        keys = self.transfers.chunk_keys(key, k.kv_rank_of(key))
        if len(tensors) != len(keys):
            raise TransferFailed(f"commit_store: {len(tensors)} tensors for {len(keys)} chunks")
        nbytes = inst.geometry.nbytes
        if any(a.nbytes != nbytes for a in tensors):
            raise TransferFailed(
                f"commit_store: chunk tensor size differs from the object layout ({nbytes})"
            )
        return self._write(inst, key, keys, tensors)

    def _write(
        self, inst: Instance, key: t.CacheKey, keys: list[ObjectKey], tensors: Sequence[Any]
    ) -> bool:
        """Reserve ``keys``, copy each one's tensor (``geometry.nbytes`` bytes) in, commit."""
        nbytes = inst.geometry.nbytes
        with self.brackets.storing(key, inst.instance_id, object_nbytes=nbytes) as tally:
            slots = self.l1.reserve(keys, nbytes, WriterOwner(inst.instance_id))
            taken = [s for s in slots if s is not None]
            try:
                for slot, arr in zip(slots, tensors, strict=True):
                    if slot is not None:
                        self.l1.view(slot)[:] = np.frombuffer(arr, np.uint8)
            except BaseException:
                self.l1.abort(taken)
                raise
            tally.stored = sum(self.l1.commit(taken))
            tally.skipped = len(slots) - len(taken)
        if tally.stored != len(taken):
            raise TransferFailed(f"{len(taken) - tally.stored} reservations expired before commit")
        return True
