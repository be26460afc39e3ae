"""Requests the server cannot (fully) serve, sent with the real lmcache 0.5.6 client.

Runs in the client venv. Every request is submitted at once through one
``RequestClientFactory`` client; each gets the same short deadline. For each
case the driver reports ``result`` (with a JSON-able rendering), ``error``
(the future raised: e.g. the server's error reply, which the client turns into
a ValueError because the op frame does not match) or ``timeout`` (nothing
came back: the reference's behaviour for every failure, spec section 5).
"""

from __future__ import annotations

import os
import time
from typing import Any

from _common import driver_parser, emit
from lmcache.utils import EngineType
from lmcache.v1.multiprocess.custom_types import (
    BlockAllocationRecord,
    IPCCacheServerKey,
)
from lmcache.v1.multiprocess.transport.factory import RequestClientFactory
from lmcache.v1.platform.base.ipc_wire import CpuShmIPCData, TensorMetadata
from lmcache.v1.platform.devices.cpu.shm import CpuShmTensorWrapper


def render(value: Any) -> Any:
    if isinstance(value, bytes):
        return {"bytes": value.hex()}
    if isinstance(value, (list, tuple)):
        return [render(v) for v in value]
    if isinstance(value, dict):
        return {str(k): render(v) for k, v in value.items()}
    if hasattr(value, "__dataclass_fields__"):
        return {k: render(getattr(value, k)) for k in value.__dataclass_fields__}
    if hasattr(value, "__struct_fields__"):
        return {k: render(getattr(value, k)) for k in value.__struct_fields__}
    return value


def key(
    model: str, tokens: list[int], *, worker_id: int | None, end: int, readers: int, rid: str
) -> IPCCacheServerKey:
    return IPCCacheServerKey(
        model_name=model,
        world_size=1,
        worker_id=worker_id,
        token_ids=tuple(tokens),
        start=0,
        end=end,
        request_id=rid,
        num_kv_readers=readers,
    )


def collect(futures: dict[str, Any], deadline_s: float) -> dict[str, dict[str, Any]]:
    """Poll all futures until done or ``deadline_s``; record outcome and latency."""
    started = time.monotonic()
    out: dict[str, dict[str, Any]] = {}
    pending = dict(futures)
    while pending and time.monotonic() - started < deadline_s:
        for name, fut in list(pending.items()):
            if not fut.query():
                continue
            del pending[name]
            elapsed = round(time.monotonic() - started, 3)
            try:
                out[name] = {"outcome": "result", "value": render(fut.result(timeout=0))}
            except Exception as exc:  # noqa: BLE001 - the outcome is what is recorded
                out[name] = {"outcome": "error", "error": f"{type(exc).__name__}: {exc}"}
            out[name]["elapsed"] = elapsed
        time.sleep(0.002)
    for name in pending:
        out[name] = {"outcome": "timeout", "elapsed": round(time.monotonic() - started, 3)}
    return out


def main() -> None:
    p = driver_parser("interop-bad")
    p.add_argument("--deadline", type=float, default=3.0)
    args = p.parse_args()

    import zmq

    ctx = zmq.Context()
    client = RequestClientFactory.create(args.url, context=ctx)
    chunk = int(client.get_chunk_size().result(timeout=10))
    toks = list(range(1, chunk + 1))
    unknown_iid = 987_654_321
    missing = CpuShmTensorWrapper.from_wire(
        CpuShmIPCData(
            version=1,
            metadata=TensorMetadata(
                dtype="float16",
                shape=(2, 4, 2, 16, 8),
                stride=(1024, 256, 128, 8, 1),
                storage_offset=0,
                device_uuid="cpu",
            ),
            shm_name=f"/kvhive_interop_missing_{os.getpid()}",
            nbytes=4096,
        )
    )
    # A registered layout for the model, so that lookups get past the
    # "no layout registered" early exit and really hash and lock.
    from lmcache.v1.multiprocess.custom_types import RegisterEngineDrivenContextPayload

    layout_iid = unknown_iid + 3
    client.register_kv_cache_engine_driven_context(
        RegisterEngineDrivenContextPayload(
            instance_id=layout_iid,
            model_name=args.model,
            world_size=1,
            block_size=16,
            num_layers=2,
            hidden_dim_size=16,
            dtype_str="float16",
            use_mla=False,
            num_physical_slots=chunk,
        )
    ).result(timeout=10)
    wkey = key(args.model, toks, worker_id=0, end=chunk, readers=1, rid="bad-w")
    cases: dict[str, Any] = {
        # The shm segment does not exist: registration cannot succeed.
        "register_missing_shm": lambda: client.register_kv_cache(
            unknown_iid + 1, [missing], args.model, 1, EngineType.VLLM, {"kv_layout": "HND"}, []
        ),
        # lookup rejects num_kv_readers < 1 (reference: raises, never answers).
        "lookup_zero_readers": lambda: client.lookup(
            key(args.model, toks, worker_id=None, end=chunk, readers=0, rid="bad-l0"), 1
        ),
        # blake3 hashes tokens as uint32 (reference: raises, never answers).
        "lookup_token_out_of_range": lambda: client.lookup(
            key(args.model, [2**40] * chunk, worker_id=None, end=chunk, readers=1, rid="bad-l1"), 1
        ),
        "store_unknown_instance": lambda: client.store(
            wkey, unknown_iid, [[1]], b"stub_ipc_handle"
        ),
        "retrieve_unknown_instance": lambda: client.retrieve(
            wkey, unknown_iid, [[1]], b"stub_ipc_handle", 0
        ),
        "prepare_store_unknown_instance": lambda: client.prepare_store(wkey, unknown_iid),
        "commit_store_unknown_instance": lambda: client.commit_store(wkey, unknown_iid, b""),
        "prepare_retrieve_unknown_instance": lambda: client.prepare_retrieve(wkey, unknown_iid),
        "commit_retrieve_unknown_instance": lambda: client.commit_retrieve(wkey, unknown_iid),
        # Blend-only operation on a default server.
        "cb_unified_lookup_not_served": lambda: client.cb_unified_lookup(
            key(args.model, toks, worker_id=None, end=chunk, readers=1, rid="bad-cb"), 1
        ),
        "report_block_allocation": lambda: client.report_block_allocation(
            os.getpid(), args.model, [BlockAllocationRecord("r", [1, 2], [5, 6])]
        ),
        "free_lookup_locks_without_lookup": lambda: client.free_lookup_locks(
            key(args.model, toks, worker_id=None, end=chunk, readers=1, rid="bad-free"), 1
        ),
        "end_session_unknown": lambda: client.end_session("bad-never-seen"),
        "query_prefetch_status_unknown": lambda: client.query_prefetch_status("bad-never-seen"),
        "wait_prefetch_status_unknown": lambda: client.wait_prefetch_status("bad-never-seen", 0.1),
        "unregister_unknown_instance": lambda: client.unregister_kv_cache(unknown_iid + 2),
        "noop": lambda: client.noop(),
    }
    out = collect({name: make() for name, make in cases.items()}, args.deadline)
    # A lookup acknowledges at once; the failure shows in its prefetch status.
    out.update(
        collect(
            {
                "status_after_lookup_zero_readers": client.query_prefetch_status("bad-l0"),
                "status_after_lookup_token_out_of_range": client.query_prefetch_status("bad-l1"),
            },
            args.deadline,
        )
    )
    client.unregister_kv_cache_engine_driven_context(layout_iid).result(timeout=10)
    try:
        ping_after = bool(client.ping(None).result(timeout=5))
    except Exception as exc:  # noqa: BLE001 - the outcome is what is recorded
        ping_after = f"{type(exc).__name__}: {exc}"
    emit({"cases": out, "ping_after": ping_after})
    os._exit(0)  # pending futures of a silent server must not block interpreter exit


if __name__ == "__main__":
    main()
