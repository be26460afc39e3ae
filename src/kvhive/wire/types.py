"""Wire structs of LMCache's multiprocess protocol, 0.5.6 and 0.5.7 (protocol.md §4, §8.3;
upstream-0.5.7.md §2.3).

Structs travel as msgpack maps keyed by field name; the decoder matches by name
and ignores unknown keys, so order does not matter on input.  Both protocol versions
share one decoder: where 0.5.7 changed a struct, what arrives decides (a key carries
``token_ids`` or ``token_bytes``; a registration carries ``group_layouts`` or not).
"""

from __future__ import annotations

import array
import sys
from collections.abc import Iterator, Sequence
from typing import Any, overload

import msgspec
import numpy as np

TOKEN_STRIDE = 4
"""Bytes per packed token id in a 0.5.7 key (big-endian uint32)."""
_U32 = next(code for code in "IL" if array.array(code).itemsize == TOKEN_STRIDE)
_SWAP = sys.byteorder == "little"


class PackedTokens(Sequence[int]):
    """Token ids as a 0.5.7 key packs them (``token_bytes``): big-endian uint32, one
    4-byte word per token -- the very bytes blake3 hashes, so the server hashes them as
    they are and never makes Python ints for them.  A read-only view over the request's
    frame: slicing is zero-copy (whole tokens, step 1); ints are made only for those who
    ask (:meth:`native`, iteration: the sha256_cbor/builtin hashers, the KV-event log).
    """

    __slots__ = ("_buf",)

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        buf = memoryview(data).cast("B")
        if len(buf) % TOKEN_STRIDE:
            raise ValueError(
                f"token_bytes: {len(buf)} bytes is not a whole number of "
                f"{TOKEN_STRIDE}-byte token ids"
            )
        self._buf = buf

    @property
    def data(self) -> memoryview:
        """The packed bytes (big-endian uint32 words)."""
        return self._buf

    def __len__(self) -> int:
        return len(self._buf) // TOKEN_STRIDE

    @overload
    def __getitem__(self, index: int) -> int: ...
    @overload
    def __getitem__(self, index: slice) -> PackedTokens: ...
    def __getitem__(self, index: int | slice) -> int | PackedTokens:
        n = len(self)
        if isinstance(index, slice):
            start, stop, step = index.indices(n)
            if step != 1:
                raise ValueError("PackedTokens slices take whole runs of tokens (step 1)")
            stop = max(start, stop)
            return PackedTokens(self._buf[start * TOKEN_STRIDE : stop * TOKEN_STRIDE])
        i = index + n if index < 0 else index
        if not 0 <= i < n:
            raise IndexError(f"token index {index} out of range for {n} tokens")
        return int.from_bytes(self._buf[i * TOKEN_STRIDE : (i + 1) * TOKEN_STRIDE], "big")

    def native(self) -> array.array[int]:
        """The tokens as one native uint32 array (a copy and a byte swap, both in C)."""
        out = array.array(_U32)
        out.frombytes(self._buf)
        if _SWAP:
            out.byteswap()
        return out

    def tolist(self) -> list[int]:
        return self.native().tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.native())

    def same_prefix(self, other: PackedTokens, n: int) -> bool:
        """Whether both hold at least ``n`` tokens and their first ``n`` are equal (one
        vectorised compare of the bytes, no copy)."""
        size = n * TOKEN_STRIDE
        if len(self._buf) < size or len(other._buf) < size:
            return False
        return _bytes_equal(self._buf[:size], other._buf[:size])

    def __eq__(self, other: object) -> bool:
        if isinstance(other, PackedTokens):
            return len(self._buf) == len(other._buf) and _bytes_equal(self._buf, other._buf)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # mutable-looking sequence, like list

    def __repr__(self) -> str:
        return f"PackedTokens({len(self)} tokens)"


def _bytes_equal(a: memoryview, b: memoryview) -> bool:
    """Equality of two equally long byte views: numpy compares in C without copying (a
    memoryview's own ``==`` unpacks item by item, ~30x slower on a long prompt)."""
    return bool(np.array_equal(np.frombuffer(a, np.uint8), np.frombuffer(b, np.uint8)))


def pack_tokens(token_ids: Sequence[int]) -> PackedTokens:
    """``token_ids`` packed as a 0.5.7 key carries them (for kvhive's own clients and tests)."""
    words = array.array(_U32, token_ids)
    if _SWAP:
        words.byteswap()
    return PackedTokens(words.tobytes())


class CacheKey(msgspec.Struct, frozen=True):
    """``IPCCacheServerKey``: a token range of one request, as the client sent it.

    ``token_ids`` holds the request's tokens in the form they arrived: a list of ints
    (0.5.6's ``token_ids``) or :class:`PackedTokens` (0.5.7's ``token_bytes``).  Both are
    sequences of ints; the hasher and the session cache take the packed form without
    making ints.  Requests are decoded through :class:`KeyFrame` (:func:`key_from_frame`).
    """

    model_name: str
    world_size: int
    worker_id: int | None
    token_ids: list[int] | PackedTokens
    start: int
    end: int
    request_id: str
    cache_salt: str = ""
    request_configs: dict[str, Any] | None = None
    num_kv_readers: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class KeyFrame(msgspec.Struct, frozen=True, kw_only=True):
    """A key as it travels: 0.5.6 sends ``token_ids`` (array of ints), 0.5.7 sends
    ``token_bytes`` (packed big-endian uint32, decoded zero-copy); exactly one of them.
    A 0.5.7 key's ``end`` may not pass its tokens.  Any violation fails the decode with
    a message naming the field (the request gets an error reply)."""

    model_name: str
    world_size: int
    worker_id: int | None
    token_ids: list[int] | None = None
    token_bytes: memoryview | None = None
    start: int
    end: int
    request_id: str
    cache_salt: str = ""
    request_configs: dict[str, Any] | None = None
    num_kv_readers: int = 0

    def __post_init__(self) -> None:
        if self.token_bytes is None:
            if self.token_ids is None:
                raise ValueError(
                    "the key carries no tokens: `token_ids` (0.5.6) or `token_bytes` "
                    "(0.5.7) is required"
                )
            return
        if self.token_ids is not None:
            raise ValueError("the key carries both `token_ids` and `token_bytes`; send one")
        n = len(self.token_bytes)
        if n % TOKEN_STRIDE:
            raise ValueError(
                f"`token_bytes` of {n} bytes is not a whole number of {TOKEN_STRIDE}-byte token ids"
            )
        if self.end > n // TOKEN_STRIDE:
            raise ValueError(
                f"`end` {self.end} is beyond the {n // TOKEN_STRIDE} tokens of `token_bytes`"
            )


def key_from_frame(frame: KeyFrame) -> CacheKey:
    """The decoded key of a :class:`KeyFrame` (already checked by its ``__post_init__``)."""
    tokens: list[int] | PackedTokens
    if frame.token_bytes is not None:
        tokens = PackedTokens(frame.token_bytes)
    else:
        assert frame.token_ids is not None  # __post_init__
        tokens = frame.token_ids
    return CacheKey(
        frame.model_name,
        frame.world_size,
        frame.worker_id,
        tokens,
        frame.start,
        frame.end,
        frame.request_id,
        frame.cache_salt,
        frame.request_configs,
        frame.num_kv_readers,
    )


class EngineGroupInfo(msgspec.Struct, frozen=True):
    engine_group_id: int
    layer_indices: list[int] = []
    tokens_per_block: int = 0
    sw_size_tokens: int = -1
    extra_object_group_tag: int = 0
    recurrent_state: bool = False


class GroupLayout(msgspec.Struct, frozen=True):
    """0.5.7 ``GroupLayout``: one LMCache group of a multi-group (hybrid-KV) worker.
    ``window_tokens`` 0 = the whole chunk; ``kv_size`` 0 = unreported (use the payload's
    ``use_mla``); ``window_chunks`` 0 = full attention (the whole prefix)."""

    num_layers: int
    hidden_dim_size: int
    dtype_str: str
    tokens_per_block: int
    window_tokens: int = 0
    kv_size: int = 0
    window_chunks: int = 0
    recurrent: bool = False


class EngineDrivenPayload(msgspec.Struct, frozen=True):
    """``RegisterEngineDrivenContextPayload``.  ``group_layouts`` is 0.5.7's field: a 0.5.7
    worker always sends it (``[]`` for a single group), a 0.5.6 worker never does, so
    ``UNSET`` names a 0.5.6 worker (pickle payloads) and a list a 0.5.7 one (tensor
    envelopes)."""

    instance_id: int
    model_name: str
    world_size: int
    block_size: int
    num_layers: int
    hidden_dim_size: int
    dtype_str: str
    use_mla: bool
    num_physical_slots: int | None = None
    group_layouts: list[GroupLayout] | msgspec.UnsetType = msgspec.UNSET


class EngineDrivenResponse(msgspec.Struct):
    """``RegisterEngineDrivenContextResponse``: ""/0 selects the worker's inline path
    (pickle for 0.5.6, tensor envelopes for 0.5.7).  ``null_block_id`` is 0.5.7's field,
    sent to 0.5.7 registrations only (``UNSET`` fields are not encoded), so a 0.5.6
    worker gets the reply it always got."""

    shm_name: str = ""
    pool_size: int = 0
    null_block_id: int | msgspec.UnsetType = msgspec.UNSET


class PrepareStoreResponse(msgspec.Struct):
    context: dict[str, Any] = {}


class PrepareRetrieveResponse(msgspec.Struct):
    success: bool
    data: bytes = b""
    context: dict[str, Any] = {}


class BlockAllocationRecord(msgspec.Struct):
    req_id: str
    new_block_ids: list[int]
    new_token_ids: list[int]


class TensorMetadata(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    dtype: str
    shape: list[int]
    stride: list[int]
    storage_offset: int
    device_uuid: str


class CpuShmDescriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``cpu_shm`` variant of the ext-type-1 IPC wrapper."""

    version: int
    metadata: TensorMetadata
    shm_name: str
    nbytes: int
    type: str = "cpu_shm"


CUDA_IPC_HANDLE_BYTES = 64
"""Size of ``cudaIpcMemHandle_t`` and ``cudaIpcEventHandle_t``."""
VMM_EXPORT_ID_BYTES = 16


class CudaStorageHandle(msgspec.Struct, frozen=True, array_like=True, forbid_unknown_fields=True):
    """The ``handle`` of a ``cuda`` descriptor: the 8 values torch's CUDA storage sharing
    produces for one storage (``UntypedStorage._share_cuda_()`` on the worker), in wire
    order.  The server reopens the storage from the last seven on its *own* device ordinal
    (found from the metadata's ``device_uuid``; ``device`` is the worker's index and means
    nothing here).

    Attributes:
        device: the worker's device index (informational only).
        mem_handle: torch's shareable handle of the caching-allocator block that holds
            the storage: opaque bytes that only torch parses (current torch wraps the
            block's ``cudaIpcMemHandle_t`` in a small versioned envelope, so it is not
            always exactly 64 bytes); None only for a storage with no memory.
        storage_size_bytes: bytes of the storage (the span of every view must fit in it).
        storage_offset_bytes: where the storage starts inside that block.
        ref_counter_handle: name of the worker's shared-memory file of IPC reference
            counters (torch keeps the block alive while the counter is non-zero).
        ref_counter_offset: this share's slot in that file.
        event_handle: a ``cudaIpcEventHandle_t`` recorded after the storage's last use
            on the worker, or None.
        event_sync_required: whether the opener must wait on ``event_handle`` first.
    """

    device: int
    mem_handle: bytes | None
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes | None
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool

    def __post_init__(self) -> None:
        for name in ("storage_size_bytes", "storage_offset_bytes", "ref_counter_offset"):
            if getattr(self, name) < 0:
                raise ValueError(f"cuda handle: `{name}` must be non-negative")
        if self.mem_handle is not None and not self.mem_handle:
            raise ValueError("cuda handle: `mem_handle` is empty (nil for no memory)")


def _non_negative(owner: str, **values: int) -> None:
    for name, value in values.items():
        if value < 0:
            raise ValueError(f"{owner}: `{name}` must be non-negative, got {value}")


class CudaDescriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``cuda`` variant (the default on CUDA): a storage shared through torch's
    CUDA IPC; the view is ``metadata``'s shape/stride/offset over that storage."""

    version: int
    metadata: TensorMetadata
    handle: CudaStorageHandle
    type: str = "cuda"


class CudaRawDescriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``cuda_raw`` variant (``isolated_ipc``): a driver IPC memory handle of a whole
    allocation; the view's bytes start ``alloc_offset`` bytes into it and span at most
    ``nbytes`` bytes."""

    version: int
    metadata: TensorMetadata
    ipc_handle: bytes
    alloc_offset: int
    nbytes: int
    type: str = "cuda_raw"

    def __post_init__(self) -> None:
        if len(self.ipc_handle) != CUDA_IPC_HANDLE_BYTES:
            raise ValueError(
                f"cuda_raw: `ipc_handle` has {len(self.ipc_handle)} bytes, "
                f"expected {CUDA_IPC_HANDLE_BYTES}"
            )
        _non_negative("cuda_raw", alloc_offset=self.alloc_offset, nbytes=self.nbytes)


class CudaVmmDescriptor(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ``cuda_vmm`` variant (``use_vmm_api``): one physical chunk of a CUDA VMM
    allocation (``alloc_size`` bytes), the view's bytes ``[alloc_offset, alloc_offset +
    nbytes)`` of it.  ``kind`` says how the allocation is shared: ``posix_fd`` (a file
    descriptor that never rides this descriptor; ``export_id`` names it) or ``fabric``
    (``fabric_blob``, present exactly then)."""

    version: int
    metadata: TensorMetadata
    export_id: bytes
    kind: str
    fabric_blob: bytes | None
    alloc_size: int
    alloc_offset: int
    nbytes: int
    type: str = "cuda_vmm"

    def __post_init__(self) -> None:
        if len(self.export_id) != VMM_EXPORT_ID_BYTES:
            raise ValueError(
                f"cuda_vmm: `export_id` has {len(self.export_id)} bytes, "
                f"expected {VMM_EXPORT_ID_BYTES}"
            )
        if self.kind not in ("posix_fd", "fabric"):
            raise ValueError(f"cuda_vmm: `kind` must be 'posix_fd' or 'fabric', got {self.kind!r}")
        if (self.kind == "fabric") != (self.fabric_blob is not None):
            raise ValueError("cuda_vmm: `fabric_blob` is present exactly when `kind` is 'fabric'")
        _non_negative(
            "cuda_vmm",
            alloc_size=self.alloc_size,
            alloc_offset=self.alloc_offset,
            nbytes=self.nbytes,
        )
        if self.alloc_offset + self.nbytes > self.alloc_size:
            raise ValueError(
                f"cuda_vmm: bytes [{self.alloc_offset}, {self.alloc_offset + self.nbytes}) "
                f"exceed the {self.alloc_size}-byte allocation"
            )


class OtherDescriptor(msgspec.Struct, frozen=True):
    """Any other IPC variant (musa, npu): decoded only far enough to say which one it is,
    so registration can refuse it with a clear reason."""

    type: str


CudaIpcDescriptor = CudaDescriptor | CudaRawDescriptor | CudaVmmDescriptor
"""The three CUDA variants (protocol §4.3)."""

_TYPED_DESCRIPTORS: dict[str, type[msgspec.Struct]] = {
    "cpu_shm": CpuShmDescriptor,
    "cuda": CudaDescriptor,
    "cuda_raw": CudaRawDescriptor,
    "cuda_vmm": CudaVmmDescriptor,
}


def descriptor_from_map(raw: dict[str, Any]) -> Any:
    """The typed descriptor of one decoded ext-1 payload map (its ``type`` tag a str):
    ``cpu_shm`` and the CUDA variants strictly (unknown fields, bad lengths or ranges raise
    ``msgspec.ValidationError``, which the codec turns into a ``ProtocolError`` reply),
    anything else as :class:`OtherDescriptor`.  Every typed variant requires ``version``
    1."""
    cls = _TYPED_DESCRIPTORS.get(raw["type"])
    if cls is None:
        return OtherDescriptor(type=raw["type"])
    desc = msgspec.convert(raw, cls)
    version = getattr(desc, "version", None)
    if version != 1:
        raise msgspec.ValidationError(
            f"{raw['type']}: unsupported descriptor version {version!r} (expected 1)"
        )
    return desc


class ServerModuleCallRequest(msgspec.Struct, frozen=True):
    """``ServerModuleCallRequest`` of ``server_module_call`` / ``server_module_affinity_call``:
    a namespaced method (``"pkg.echo"``) and its opaque payload."""

    method: str
    payload: bytes


class ServerModuleCallResponse(msgspec.Struct, frozen=True):
    """``ServerModuleCallResponse``: the handler's opaque answer, or ``success=False`` with a
    readable ``error`` (unknown method, a handler that raised)."""

    success: bool
    payload: bytes = b""
    error: str = ""


# ---- KV events (subscribe_kv_events) ---------------------------------------------------------

KV_EVENT_CAPABILITY = "kv_event_stream"
"""What ``get_experimental`` lists when the server serves ``subscribe_kv_events`` (0.5.6
subscribes only then; 0.5.7 subscribes unconditionally)."""
KV_EVENT_KIND_STORED = "stored"
KV_EVENT_KIND_REMOVED = "removed"
KV_EVENT_MEDIUM_CPU = "CPU"


class KVEventRecord(msgspec.Struct):
    """``KVEventRecord``: one sequenced CPU-tier change.  A ``stored`` record names one chunk
    (its hash, the previous chunk's hash in the chain or None for a sequence's first chunk,
    and the chunk's tokens); a ``removed`` record lists the chunk hashes that left L1.  Field
    order is the reference dataclass's, so the map encodes byte for byte the same."""

    seq: int
    kind: str
    medium: str
    model_name: str
    block_hashes: list[bytes]
    parent_block_hash: bytes | None
    token_ids: list[int]


class KVEventBatch(msgspec.Struct):
    """``KVEventBatch``: one pushed page of records.  A changed ``incarnation`` (the server's
    start time in ns) or ``lost=True`` tells the subscriber to withdraw what it announced;
    ``enabled=False`` means the server records no events (the stream then ends); resume
    after ``next_cursor``."""

    enabled: bool
    incarnation: int
    next_cursor: int
    lost: bool
    events: list[KVEventRecord]
