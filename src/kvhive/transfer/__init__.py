"""Data path between engine KV caches and chunk objects.

* :mod:`~kvhive.transfer.descriptors` -- :class:`TensorDesc`, one registered view.
* :mod:`~kvhive.transfer.shm` -- mapping ``cpu_shm`` segments; who may unlink them.
* :mod:`~kvhive.transfer.safecopy` -- SIGBUS-safe row copies over those segments.
* :mod:`~kvhive.transfer.layouts` -- engine KV format detection, object layout.
* :mod:`~kvhive.transfer.paged` -- :class:`PagedKV`, the gather/scatter/checksum engine.
* :mod:`~kvhive.transfer.pickle_codec` -- engine-driven pickle payloads (needs torch,
  imported lazily; nothing here imports torch at module level).
"""

from kvhive.transfer.descriptors import TensorDesc, itemsize
from kvhive.transfer.layouts import KVFormat, KVLayout, plan_layout
from kvhive.transfer.paged import PagedKV
from kvhive.transfer.shm import (
    SegmentOwner,
    SegmentReaper,
    SegmentTable,
    ShmMapping,
    cleanup_stale_segments,
    tensor_view,
)

__all__ = [
    "KVFormat",
    "KVLayout",
    "PagedKV",
    "SegmentOwner",
    "SegmentReaper",
    "SegmentTable",
    "ShmMapping",
    "TensorDesc",
    "cleanup_stale_segments",
    "itemsize",
    "plan_layout",
    "tensor_view",
]
