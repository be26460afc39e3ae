"""Wire structs of LMCache 0.5.6's multiprocess protocol (protocol.md §4, §8.3).

Structs travel as msgpack maps keyed by field name; the decoder matches by name
and ignores unknown keys, so order does not matter on input.
"""

from __future__ import annotations

from typing import Any

import msgspec


class CacheKey(msgspec.Struct, frozen=True):
    """``IPCCacheServerKey``: a token range of one request, as the client sends it."""

    model_name: str
    world_size: int
    worker_id: int | None
    token_ids: list[int]
    start: int
    end: int
    request_id: str
    cache_salt: str = ""
    request_configs: dict[str, Any] | None = None
    num_kv_readers: int = 0


class EngineGroupInfo(msgspec.Struct, frozen=True):
    engine_group_id: int
    layer_indices: list[int] = []
    tokens_per_block: int = 0
    sw_size_tokens: int = -1
    extra_object_group_tag: int = 0
    recurrent_state: bool = False


class EngineDrivenPayload(msgspec.Struct, frozen=True):
    """``RegisterEngineDrivenContextPayload``."""

    instance_id: int
    model_name: str
    world_size: int
    block_size: int
    num_layers: int
    hidden_dim_size: int
    dtype_str: str
    use_mla: bool
    num_physical_slots: int | None = None


class EngineDrivenResponse(msgspec.Struct):
    """``RegisterEngineDrivenContextResponse``: ""/0 selects the pickle path."""

    shm_name: str = ""
    pool_size: int = 0


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


class OtherDescriptor(msgspec.Struct, frozen=True):
    """Any other IPC variant (cuda, cuda_raw, cuda_vmm, musa, npu): decoded only far
    enough to say which one it is, so registration can refuse it with a clear reason."""

    type: str


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
