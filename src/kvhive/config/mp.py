"""MP server section: the ZMQ front end, worker pools, hashing and liveness."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from kvhive.config.fields import (
    PORT,
    at_least,
    flag_field,
    flag_of,
    no_nul,
    non_empty,
    positive,
    validate_fields,
)
from kvhive.config.server_modules import ServerModuleSpec, parse_server_modules
from kvhive.errors import ConfigError

HashAlgorithm = Literal["builtin", "sha256_cbor", "blake3"]
EngineType = Literal["default", "blend"]
TransferMode = Literal["lmcache_driven", "engine_driven", "auto"]
Transport = Literal["zmq", "grpc"]

MIN_REAP_TIMEOUT_S = 30.0
"""Smallest non-zero reap timeout: clients ping every 10 s, so a few lost pings must not reap."""

MAX_IPC_PATH_BYTES = 107
"""sockaddr_un.sun_path holds 108 bytes including the terminating NUL (Linux)."""


def _shm_name(v: str) -> str | None:
    # POSIX shm names are one path component; a leading "/" is tolerated and stripped later.
    return "must not contain '/' or NUL" if "/" in v.lstrip("/") or "\x00" in v else None


def _ipc_path(v: str) -> str | None:
    if len(v.encode()) > MAX_IPC_PATH_BYTES:
        return f"must be at most {MAX_IPC_PATH_BYTES} bytes"
    return no_nul(v)


@dataclass(frozen=True)
class MPConfig:
    """Configuration of the multiprocess cache server (ZMQ requests, worker pools, hashing)."""

    TITLE: ClassVar[str] = "MP server"

    transport: Transport = flag_field(
        "--transport",
        default="zmq",
        help="Request transport: LMCache's ZMQ protocol ('grpc' is refused: not built).",
    )
    host: str = flag_field(
        "--host", default="localhost", check=non_empty, help="Host address the ZMQ server binds."
    )
    port: int = flag_field("--port", default=5555, check=PORT, help="Port the ZMQ server binds.")
    chunk_size: int = flag_field(
        "--chunk-size",
        default=256,
        check=at_least(1),
        help="Chunk size of KV cache operations, in tokens.",
    )
    max_workers: int = flag_field(
        "--max-workers",
        default=1,
        check=at_least(1),
        help="Base number of worker threads; the default of both the GPU-affinity and the CPU pool.",
    )
    max_gpu_workers: int | None = flag_field(
        "--max-gpu-workers",
        default=None,
        check=at_least(1),
        default_text="--max-workers",
        help="Threads of the GPU-affinity pool (store/retrieve); one engine worker always maps to "
        "the same thread.",
    )
    max_cpu_workers: int | None = flag_field(
        "--max-cpu-workers",
        default=None,
        check=at_least(1),
        default_text="--max-workers",
        help="Threads of the CPU pool (lookup and other blocking calls).",
    )
    hash_algorithm: HashAlgorithm = flag_field(
        "--hash-algorithm", default="blake3", help="Hash function of token chunks."
    )
    none_hash_seed: str | None = flag_field(
        "--none-hash-seed",
        default=None,
        default_text="$PYTHONHASHSEED if set, else 'vllm-none-hash'",
        help="kvhive only: seed of the sha256_cbor NONE_HASH (the chain's first parent); only "
        "valid with --hash-algorithm sha256_cbor.",
    )
    engine_type: EngineType = flag_field(
        "--engine-type",
        default="default",
        help="Cache engine: 'default' (prefix caching) or 'blend' (cross-request KV reuse).",
    )
    supported_transfer_mode: TransferMode = flag_field(
        "--supported-transfer-mode",
        default="auto",
        help="Data paths served: 'lmcache_driven' (store/retrieve), 'engine_driven' "
        "(prepare/commit) or 'auto' (both).",
    )
    shm_name: str = flag_field(
        "--shm-name",
        default="",
        check=_shm_name,
        help="Name of the POSIX segment that shares the L1 pool with engine-driven clients; "
        "empty means pickled payloads.",
    )
    null_block_id: int = flag_field(
        "--null-block-id", default=0, help="Engine block id that stands for absent KV data."
    )
    worker_reap_timeout_seconds: float = flag_field(
        "--worker-reap-timeout-seconds",
        default=120.0,
        help="Silence after which a pinging worker's KV-cache registration is dropped; 0 disables "
        f"reaping, other values must be >= {MIN_REAP_TIMEOUT_S:g}.",
    )
    worker_registration_grace_seconds: float = flag_field(
        "--worker-registration-grace-seconds",
        default=3600.0,
        help="Silence allowed to a worker that registered but never pinged; must be >= "
        "--worker-reap-timeout-seconds.",
    )
    session_ttl_seconds: float = flag_field(
        "--session-ttl-seconds",
        default=600.0,
        check=positive,
        help="Age (from creation) at which a request session is reaped.",
    )
    kv_event_log_size: int = flag_field(
        "--kv-event-log-size",
        default=32768,
        check=at_least(0),
        help="L1 store/eviction records kept for KV-event subscribers (subscribe_kv_events); "
        "0 disables the channel.",
    )
    server_modules: tuple[str, ...] = flag_field(
        "--server-module",
        default=(),
        repeat=True,
        metavar="JSON",
        help='A server module: {"module_path": "pkg.mod", "factory_name": '
        '"build_server_modules", "config": {...}} (or just pkg.mod), served by '
        "server_module_call and server_module_affinity_call; repeatable "
        "(docs/server-modules.md).",
    )
    ipc_path: str = flag_field(
        "--ipc-path",
        default="",
        check=_ipc_path,
        help="kvhive only: also bind ipc://PATH next to the TCP endpoint; empty disables.",
    )
    server_module_specs: tuple[ServerModuleSpec, ...] = field(init=False, repr=False, compare=False)
    """``server_modules`` parsed, in flag order (filled at construction)."""

    def __post_init__(self) -> None:
        validate_fields(self)
        object.__setattr__(self, "server_module_specs", parse_server_modules(self.server_modules))
        # None = "not given": the pool inherits --max-workers, so after construction both are ints.
        if self.max_gpu_workers is None:
            object.__setattr__(self, "max_gpu_workers", self.max_workers)
        if self.max_cpu_workers is None:
            object.__setattr__(self, "max_cpu_workers", self.max_workers)
        self._check_liveness()
        if self.none_hash_seed is not None and self.hash_algorithm != "sha256_cbor":
            raise ConfigError(
                flag_of(MPConfig, "none_hash_seed"),
                f"only applies to --hash-algorithm sha256_cbor (got {self.hash_algorithm!r})",
            )

    def _check_liveness(self) -> None:
        reap = self.worker_reap_timeout_seconds
        grace = self.worker_registration_grace_seconds
        if reap < 0 or 0 < reap < MIN_REAP_TIMEOUT_S:
            raise ConfigError(
                flag_of(MPConfig, "worker_reap_timeout_seconds"),
                f"must be 0 (disabled) or >= {MIN_REAP_TIMEOUT_S:g} (got {reap!r})",
            )
        if grace < reap:
            raise ConfigError(
                flag_of(MPConfig, "worker_registration_grace_seconds"),
                f"must be >= --worker-reap-timeout-seconds ({reap:g}) (got {grace!r})",
            )

    def to_dict(self) -> dict[str, Any]:
        """The /config view: every flag field, ``--server-module`` values as parsed specs."""
        out: dict[str, Any] = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init
        }
        out["server_modules"] = [spec.to_dict() for spec in self.server_module_specs]
        return out
