"""The section dataclasses: seed defaults, construction-time validation, derived values."""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

import pytest

from kvhive.config import EvictionConfig, HTTPConfig, L1Config, MPConfig, ServerConfig
from kvhive.errors import ConfigError

GiB = 1 << 30


def test_mp_defaults_equal_the_seed() -> None:
    mp = MPConfig()
    # seed (mp-server-config-reference.txt, "MP 服务器")
    assert (mp.host, mp.port, mp.chunk_size, mp.max_workers) == ("localhost", 5555, 256, 1)
    assert (mp.max_gpu_workers, mp.max_cpu_workers) == (1, 1)
    assert (mp.hash_algorithm, mp.engine_type) == ("blake3", "default")
    # protocol/observability specs and kvhive-only flags
    assert mp.supported_transfer_mode == "auto"  # kvhive serves both paths by default (§15.1)
    assert (mp.shm_name, mp.null_block_id, mp.ipc_path, mp.none_hash_seed) == ("", 0, "", None)
    assert mp.worker_reap_timeout_seconds == 120.0
    assert mp.worker_registration_grace_seconds == 3600.0
    assert mp.session_ttl_seconds == 600.0


def test_storage_and_http_defaults_equal_the_seed() -> None:
    l1 = L1Config(size_gb=1)
    assert (l1.use_lazy, l1.init_size_gb, l1.align_bytes) == (True, 20, 4096)
    assert (l1.write_ttl_seconds, l1.read_ttl_seconds) == (600, 300)
    ev = EvictionConfig(policy="LRU")
    assert (ev.trigger_watermark, ev.ratio) == (0.8, 0.2)
    http = HTTPConfig()
    assert (http.host, http.port) == ("0.0.0.0", 8080)  # the seed (the packages bind 127.0.0.1)


def test_required_fields_have_no_default() -> None:
    with pytest.raises(TypeError):
        L1Config()  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        EvictionConfig()  # type: ignore[call-arg]


@pytest.mark.parametrize(
    ("kwargs", "gpu", "cpu"),
    [
        ({}, 1, 1),
        ({"max_workers": 4}, 4, 4),
        ({"max_workers": 4, "max_gpu_workers": 2}, 2, 4),
        ({"max_workers": 4, "max_cpu_workers": 8}, 4, 8),
        ({"max_gpu_workers": 3, "max_cpu_workers": 5}, 3, 5),
    ],
)
def test_pool_sizes_inherit_max_workers(kwargs: dict[str, int], gpu: int, cpu: int) -> None:
    mp = MPConfig(**kwargs)
    assert (mp.max_gpu_workers, mp.max_cpu_workers) == (gpu, cpu)


def test_sections_are_frozen_and_floats_are_widened() -> None:
    mp = MPConfig(worker_reap_timeout_seconds=0, session_ttl_seconds=5)
    assert isinstance(mp.worker_reap_timeout_seconds, float)
    assert isinstance(L1Config(size_gb=2).size_gb, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        mp.port = 1  # type: ignore[misc]


def test_l1_sizes() -> None:
    l1 = L1Config(size_gb=1.5, init_size_gb=1)
    assert l1.size_bytes == int(1.5 * GiB)
    assert l1.init_bytes == GiB
    assert L1Config(size_gb=2).init_bytes == 2 * GiB  # init 20 GiB capped at the size


# Every invalid value names its flag.  (section, kwargs, flag, fragment of the message)
INVALID: list[tuple[type, dict[str, Any], str, str]] = [
    (MPConfig, {"host": ""}, "--host", "must not be empty"),
    (MPConfig, {"host": 5}, "--host", "must be a string"),
    (MPConfig, {"port": 0}, "--port", "must be in 1..65535 (got 0)"),
    (MPConfig, {"port": 65536}, "--port", "1..65535"),
    (MPConfig, {"port": "5555"}, "--port", "must be an integer"),
    (MPConfig, {"port": True}, "--port", "must be an integer"),
    (MPConfig, {"chunk_size": 0}, "--chunk-size", "must be >= 1"),
    (MPConfig, {"chunk_size": 1.5}, "--chunk-size", "must be an integer"),
    (MPConfig, {"max_workers": 0}, "--max-workers", "must be >= 1"),
    (MPConfig, {"max_gpu_workers": 0}, "--max-gpu-workers", "must be >= 1"),
    (MPConfig, {"max_cpu_workers": -2}, "--max-cpu-workers", "must be >= 1"),
    (MPConfig, {"hash_algorithm": "md5"}, "--hash-algorithm", "builtin, sha256_cbor, blake3"),
    (MPConfig, {"none_hash_seed": "x"}, "--none-hash-seed", "only applies to --hash-algorithm sha256_cbor"),
    (MPConfig, {"hash_algorithm": "sha256_cbor", "none_hash_seed": 3}, "--none-hash-seed", "must be a string"),
    (MPConfig, {"engine_type": "blend"}, "--engine-type", "not supported by kvhive: --engine-type blend"),
    (MPConfig, {"transport": "grpc"}, "--transport", "not supported by kvhive: --transport grpc"),
    (MPConfig, {"transport": "http"}, "--transport", "must be one of zmq, grpc"),
    (MPConfig, {"kv_event_log_size": -1}, "--kv-event-log-size", "must be >= 0"),
    (MPConfig, {"server_modules": ("{",)}, "--server-module", "#0: must be valid JSON"),
    (MPConfig, {"engine_type": "blend_legacy"}, "--engine-type", "default, blend"),
    (MPConfig, {"supported_transfer_mode": "both"}, "--supported-transfer-mode", "lmcache_driven, engine_driven, auto"),
    (MPConfig, {"shm_name": "a/b"}, "--shm-name", "must not contain '/'"),
    (MPConfig, {"shm_name": "a\x00"}, "--shm-name", "NUL"),
    (MPConfig, {"null_block_id": 1.0}, "--null-block-id", "must be an integer"),
    (MPConfig, {"worker_reap_timeout_seconds": 10}, "--worker-reap-timeout-seconds", "0 (disabled) or >= 30"),
    (MPConfig, {"worker_reap_timeout_seconds": -1}, "--worker-reap-timeout-seconds", "0 (disabled) or >= 30"),
    (MPConfig, {"worker_reap_timeout_seconds": math.nan}, "--worker-reap-timeout-seconds", "finite"),
    (MPConfig, {"worker_reap_timeout_seconds": math.inf}, "--worker-reap-timeout-seconds", "finite"),
    (MPConfig, {"worker_registration_grace_seconds": 60}, "--worker-registration-grace-seconds", ">= --worker-reap-timeout-seconds (120)"),
    (MPConfig, {"session_ttl_seconds": 0}, "--session-ttl-seconds", "must be > 0"),
    (MPConfig, {"ipc_path": "x" * 108}, "--ipc-path", "at most 107 bytes"),
    (MPConfig, {"ipc_path": "/tmp/a\x00"}, "--ipc-path", "NUL"),
    (L1Config, {"size_gb": 0}, "--l1-size-gb", "must be > 0"),
    (L1Config, {"size_gb": -1}, "--l1-size-gb", "must be > 0"),
    (L1Config, {"size_gb": math.nan}, "--l1-size-gb", "finite"),
    (L1Config, {"size_gb": "1"}, "--l1-size-gb", "must be a number"),
    (L1Config, {"size_gb": None}, "--l1-size-gb", "is required"),
    (L1Config, {"size_gb": 1e-9}, "--l1-size-gb", "at least one 4096-byte"),
    (L1Config, {"size_gb": 1, "use_lazy": "yes"}, "--l1-use-lazy", "true or false"),
    (L1Config, {"size_gb": 1, "init_size_gb": 0}, "--l1-init-size-gb", "must be >= 1"),
    (L1Config, {"size_gb": 1, "init_size_gb": 1.5}, "--l1-init-size-gb", "must be an integer"),
    (L1Config, {"size_gb": 1, "align_bytes": 1000}, "--l1-align-bytes", "power of two"),
    (L1Config, {"size_gb": 1, "align_bytes": 0}, "--l1-align-bytes", "power of two"),
    (L1Config, {"size_gb": 1, "write_ttl_seconds": 0}, "--l1-write-ttl-seconds", "must be > 0"),
    (L1Config, {"size_gb": 1, "read_ttl_seconds": -5}, "--l1-read-ttl-seconds", "must be > 0"),
    (EvictionConfig, {"policy": "ARC"}, "--eviction-policy", "LRU, IsolatedLRU, noop"),
    (EvictionConfig, {"policy": "lru"}, "--eviction-policy", "LRU, IsolatedLRU, noop"),
    (EvictionConfig, {"policy": "LRU", "trigger_watermark": 0}, "--eviction-trigger-watermark", "(0, 1]"),
    (EvictionConfig, {"policy": "LRU", "trigger_watermark": 1.5}, "--eviction-trigger-watermark", "(0, 1]"),
    (EvictionConfig, {"policy": "LRU", "ratio": 0}, "--eviction-ratio", "(0, 1]"),
    (EvictionConfig, {"policy": "LRU", "ratio": 1.01}, "--eviction-ratio", "(0, 1]"),
    (HTTPConfig, {"host": " "}, "--http-host", "must not be empty"),
    (HTTPConfig, {"port": 0}, "--http-port", "1..65535"),
    (HTTPConfig, {"port": 70000}, "--http-port", "1..65535"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("section", "kwargs", "flag", "fragment"),
    INVALID,
    ids=[f"{flag}={next(iter(kw.values()))!r}" for _, kw, flag, _ in INVALID],
)
def test_invalid_values_raise_config_error_naming_the_flag(
    section: type, kwargs: dict[str, Any], flag: str, fragment: str
) -> None:
    with pytest.raises(ConfigError) as info:
        section(**kwargs)
    assert info.value.flag == flag
    assert fragment in info.value.message


def test_boundary_values_are_accepted() -> None:
    MPConfig(port=1, worker_reap_timeout_seconds=0, worker_registration_grace_seconds=0)
    MPConfig(port=65535, worker_reap_timeout_seconds=30, worker_registration_grace_seconds=30)
    MPConfig(ipc_path="x" * 107, shm_name="/pool", null_block_id=-1)
    MPConfig(hash_algorithm="sha256_cbor", none_hash_seed="")
    L1Config(size_gb=4096 / GiB, align_bytes=1, init_size_gb=1)
    EvictionConfig(policy="noop", trigger_watermark=1, ratio=1)
    EvictionConfig(policy="IsolatedLRU", trigger_watermark=0.01, ratio=0.01)


def test_server_config_to_dict_is_json_and_grouped() -> None:
    config = ServerConfig(l1=L1Config(size_gb=1), eviction=EvictionConfig(policy="LRU"))
    data = config.to_dict()
    assert list(data)[:5] == ["mp", "l1", "eviction", "l2", "http"]
    assert {"observability", "lookup_hash_log", "plugins", "http_admin"} <= set(data)
    assert data["mp"]["port"] == 5555
    assert data["mp"]["max_gpu_workers"] == 1
    assert data["l1"]["size_gb"] == 1.0
    assert data["eviction"]["policy"] == "LRU"
    assert data["http"] == {"host": "0.0.0.0", "port": 8080}
    assert json.loads(json.dumps(data)) == data


def test_server_config_requires_section_instances() -> None:
    with pytest.raises(TypeError):
        ServerConfig(l1={"size_gb": 1}, eviction=EvictionConfig(policy="LRU"))  # type: ignore[arg-type]
