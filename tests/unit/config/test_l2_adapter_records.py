"""``--l2-adapter`` records: one table of type names, builders that agree with it, exact errors."""

from __future__ import annotations

import dataclasses
import inspect
import json
from typing import Any, get_args, get_type_hints

import pytest

from kvhive.config.eviction import EvictionConfig, EvictionPolicy
from kvhive.config.l2 import L2Config
from kvhive.config.l2_adapters import (
    ADAPTER_TYPES,
    AdapterConfig,
    FaultInjectAdapterConfig,
    FsAdapterConfig,
    L2EvictionConfig,
    MockAdapterConfig,
    parse_adapter,
)
from kvhive.errors import ConfigError
from kvhive.storage.eviction import POLICIES, POLICY_NAMES
from kvhive.storage.l2.registry import BUILDERS, builder_of

MOCK = {"type": "mock", "max_size_gb": 1, "mock_bandwidth_gb": 2}
MINIMAL: dict[str, dict[str, Any]] = {
    "fs": {"base_path": "/x"},
    "fs_native": {"base_path": "/x"},
    "mock": {"max_size_gb": 1, "mock_bandwidth_gb": 2},
    "s3": {"s3_endpoint": "s3://b.h", "s3_region": "r"},
    "resp": {"host": "h", "port": 6379},
    "plugin": {"module_path": "m", "class_name": "C"},
    "native_plugin": {"library_path": "/l.so"},
    "raw_block": {"device_path": "/d", "slot_bytes": 8192},
    "dax": {"device_path": "/d", "max_dax_size_gb": 1, "slot_bytes": 4096},
    "nixl_store": {"backend": "OBJ", "pool_size": 4},
    "nixl_store_dynamic": {
        "backend": "POSIX",
        "backend_params": {"file_path": "/d", "use_direct_io": "false", "max_capacity_gb": "1"},
    },
    "mooncake_store": {"local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE"},
    "valkey": {"startup_nodes": "h1:7000,h2:7001"},
    "fault_inject": {"inner": MOCK},
}


def test_every_type_has_a_builder_taking_its_record() -> None:
    assert list(BUILDERS) == list(ADAPTER_TYPES) == list(MINIMAL)
    for kind, cls in ADAPTER_TYPES.items():
        assert kind == cls.TYPE
        build = builder_of(kind)
        first = next(iter(inspect.signature(build).parameters))
        assert get_type_hints(build)[first] is cls, kind


def test_eviction_policy_names_are_declared_once() -> None:
    names = set(get_args(EvictionPolicy))
    assert set(POLICIES) == set(POLICY_NAMES) == names
    assert get_type_hints(L2EvictionConfig)["eviction_policy"] == EvictionPolicy
    assert get_type_hints(EvictionConfig)["policy"] == EvictionPolicy


def test_flag_help_lists_the_table() -> None:
    help_text = next(f for f in dataclasses.fields(L2Config) if f.name == "adapters")
    assert ", ".join(ADAPTER_TYPES) in help_text.metadata["kvhive"].help


@pytest.mark.parametrize("kind", list(MINIMAL))
def test_records_are_frozen_slotted_and_round_trip_through_to_dict(kind: str) -> None:
    cfg = parse_adapter(2, {"type": kind, **MINIMAL[kind]})
    assert isinstance(cfg, ADAPTER_TYPES[kind]) and cfg.label == f"#2 ({kind})"
    assert not hasattr(cfg, "__dict__")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.timeout_s = 1.0  # type: ignore[misc]
    view = cfg.to_dict()
    assert next(iter(view)) == "type" and list(view)[-7:] == [
        "affinity_tag", "shared", "eviction", "persist_enabled", "integrity", "timeout_s",
        "store_timeout_s"]  # fmt: skip
    assert parse_adapter(2, json.loads(json.dumps(view))) == cfg


def test_typed_values_and_defaults() -> None:
    raw = {"type": "fault_inject", "inner": {**MOCK, "eviction": {"eviction_policy": "LRU"}},
           "gap_tail_ratios": [0, 1], "fail_ops": ["load"], "integrity": None}  # fmt: skip
    cfg = parse_adapter(1, raw)
    assert isinstance(cfg, FaultInjectAdapterConfig) and isinstance(cfg.inner, MockAdapterConfig)
    assert cfg.gap_tail_ratios == (0.0, 1.0) and cfg.fail_ops == ("load",)
    assert cfg.integrity == "raw" and cfg.wraps is cfg.inner and cfg.inner.index == 1
    assert cfg.inner.eviction == L2EvictionConfig(eviction_policy="LRU")
    assert cfg.inner.capacity_gb == 1.0 and cfg.inner.max_size_gb == 1.0
    fs = parse_adapter(0, {"type": "fs", "base_path": "/x"})
    assert fs.integrity == "checksum" and fs.capacity_gb == 0.0 and fs.wraps is None
    plugin = parse_adapter(0, {"type": "plugin", "module_path": "m", "class_name": "C",
                               "adapter_params": {"a": [1]}})  # fmt: skip
    with pytest.raises(TypeError):
        plugin.adapter_params["b"] = 2  # type: ignore[index]
    assert plugin.to_dict()["adapter_params"] == {"a": [1]}
    secret = parse_adapter(0, {"type": "resp", "host": "h", "port": 1, "password": "pw"})
    assert secret.to_dict()["password"] == "***" and secret.password == "pw"


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(ConfigError) as info:
        FsAdapterConfig(index=4, base_path=" ")
    assert info.value.message == "#4 (fs): field 'base_path' must not be empty (got ' ')"
    with pytest.raises(ConfigError) as info:
        MockAdapterConfig(max_size_gb=1, mock_bandwidth_gb=1, eviction=L2EvictionConfig(
            eviction_policy="LRU", trigger_watermark=2))  # fmt: skip
    assert info.value.message == (
        "#0 (mock) eviction: field 'trigger_watermark' must be in (0, 1] (got 2)"
    )
    assert isinstance(parse_adapter(0, MOCK), AdapterConfig)


ERRORS = [
    ([], "#0: must be a JSON object (got list)"),
    ({}, "#0: field 'type' is required; one of dax, fault_inject, fs, fs_native, mock, "
         "mooncake_store, native_plugin, nixl_store, nixl_store_dynamic, plugin, raw_block, "
         "resp, s3, valkey"),
    ({"type": "fs"}, "#0 (fs): field 'base_path' is required"),
    ({"type": "fs", "base_path": "/x", "num_workers": 0}, "#0 (fs): field 'num_workers' must be > 0 (got 0)"),
    ({"type": "fs", "base_path": "/x", "num_workers": True},
     "#0 (fs): field 'num_workers' must be an integer (got True)"),
    ({"type": "fs", "base_path": "/x", "timeout_s": float("nan")},
     "#0 (fs): field 'timeout_s' must be a finite number (got nan)"),
    ({"type": "fs", "base_path": "/x", "integrity": "crc"},
     "#0 (fs): field 'integrity' must be one of checksum, raw (got 'crc')"),
    ({"type": "fs", "base_path": "/x", "nope": 1},
     "#0 (fs): field 'nope' is unknown; allowed: affinity_tag, base_path, eviction, integrity, "
     "num_workers, persist_enabled, read_ahead_size, relative_tmp_dir, shared, store_timeout_s, "
     "timeout_s, type, use_odirect"),
    ({**MOCK, "eviction": {"eviction_policy": "LRU", "x": 1}},
     "#0 (mock) eviction: field 'x' is unknown; allowed: default_quota_gb, eviction_policy, "
     "eviction_ratio, trigger_watermark"),
    ({**MOCK, "eviction": {}}, "#0 (mock) eviction: field 'eviction_policy' is required"),
    ({**MOCK, "eviction": "LRU"}, "#0 (mock): field 'eviction' must be a JSON object (got 'LRU')"),
    ({**MOCK, "eviction": {"eviction_policy": "LRU", "default_quota_gb": -1}},
     "#0 (mock) eviction: field 'default_quota_gb' must be >= 0 (got -1)"),
    ({"type": "resp", "host": "h", "port": 70000},
     "#0 (resp): field 'port' must be in 0..65535 (0: $LMCACHE_RESP_PORT) (got 70000)"),
    ({"type": "raw_block", "device_path": "/d", "slot_bytes": 8192, "block_align": 3000},
     "#0 (raw_block): field 'block_align' must be a power of two (got 3000)"),
    ({"type": "raw_block", "device_path": "/d", "slot_bytes": 8192, "meta_magic": "x"},
     "#0 (raw_block): field 'meta_magic' must be 8 ASCII characters (got 'x')"),
    ({"type": "raw_block", "device_path": "/d", "slot_bytes": 8192, "fdp_enabled": True},
     "#0 (raw_block): field 'fdp_enabled' is not supported (got True)"),
    ({"type": "raw_block", "device_path": "/d", "slot_bytes": 8192, "persist_enabled": False},
     "#0 (raw_block): field 'persist_enabled' cannot be false for raw_block"),
    ({"type": "dax", "slot_bytes": 4096, "device_path": "/d"},
     "#0 (dax): field 'max_dax_size_gb' is required with 'device_path'"),
    ({"type": "dax", "slot_bytes": 4096, "devices": [{"device_path": "/d"}]},
     "#0 (dax) devices[0]: field 'max_dax_size_gb' is required"),
    ({"type": "dax", "slot_bytes": 4096, "devices": ["/d"]},
     "#0 (dax) devices[0]: must be a JSON object (got '/d')"),
    ({"type": "native_plugin", "module_path": "m"},
     "#0 (native_plugin): field 'library_path' is required (the Python native-connector form "
     "with module_path/class_name is not supported yet)"),
    ({"type": "s3", "s3_endpoint": "e", "s3_region": "r", "s3_addressing_style": "dns"},
     "#0 (s3): field 's3_addressing_style' must be one of auto, virtual, path (got 'dns')"),
    ({"type": "fault_inject", "inner": MOCK, "fail_ops": ["store", "drop"]},
     "#0 (fault_inject): field 'fail_ops' items must be one of store, lookup, load, delete "
     "(got ['store', 'drop'])"),
    ({"type": "fault_inject", "inner": MOCK, "gap_indices": [0, -1]},
     "#0 (fault_inject): field 'gap_indices' items must be >= 0 (got [0, -1])"),
    ({"type": "fault_inject", "inner": MOCK, "gap_tail_ratios": [0.5, 2]},
     "#0 (fault_inject): field 'gap_tail_ratios' items must be in 0..1 (got [0.5, 2])"),
    ({"type": "fault_inject", "inner": MOCK, "gap_indices": "0"},
     "#0 (fault_inject): field 'gap_indices' must be a list of integers (got '0')"),
    ({"type": "fault_inject", "inner": {"type": "mock"}}, "#0 (mock): field 'max_size_gb' is required"),
    ({"type": "fault_inject", "inner": MOCK, "rate": 1.5},
     "#0 (fault_inject): field 'rate' must be in 0..1 (got 1.5)"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "message"), ERRORS)
def test_errors_name_index_type_field_and_what_is_allowed(raw: Any, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_adapter(0, raw)
    assert (info.value.flag, info.value.message) == ("--l2-adapter", message)


# -- nixl_store, nixl_store_dynamic, mooncake_store ---------------------------------------------

NIXL_POSIX = {"type": "nixl_store", "backend": "POSIX", "pool_size": 64,
              "backend_params": {"file_path": "/data/l2", "use_direct_io": "false"}}  # fmt: skip


def test_nixl_store_record_reads_the_seed_example() -> None:
    cfg = parse_adapter(0, dict(NIXL_POSIX))
    assert cfg.type == "nixl_store"
    assert cfg.params == {"file_path": "/data/l2", "use_direct_io": "false"}
    assert cfg.direct_io is False
    obj = parse_adapter(1, {"type": "nixl_store", "backend": "OBJ", "backend_params": {},
                            "pool_size": 32})  # fmt: skip
    assert obj.params == {}
    # JSON booleans and numbers become the strings NIXL takes
    cfg = parse_adapter(0, {**NIXL_POSIX, "backend_params": {"file_path": "/d", "use_direct_io": True,
                                                               "file_size": 8192}})  # fmt: skip
    assert cfg.params == {"file_path": "/d", "use_direct_io": "true", "file_size": "8192"}
    assert cfg.direct_io is True


NIXL_ERRORS = [
    ({**NIXL_POSIX, "backend": "NVME"}, "field 'backend' must be one of GDS, GDS_MT, POSIX, HF3FS, OBJ, AZURE_BLOB, IBM_SCALE"),
    ({**NIXL_POSIX, "pool_size": 0}, "field 'pool_size' must be > 0"),
    ({"type": "nixl_store", "backend": "POSIX", "backend_params": {"file_path": "/d"}, "pool_size": 1},
     "backend POSIX needs backend_params.use_direct_io"),
    ({**NIXL_POSIX, "backend_params": {"file_path": "/d", "use_direct_io": "false", "file_size": "4k"}},
     "backend_params.file_size must be a positive integer"),
    ({**NIXL_POSIX, "backend_params": {"file_path": ["x"], "use_direct_io": "false"}},
     "values must be strings (key 'file_path')"),
    ({"type": "nixl_store_dynamic", "backend": "OBJ", "backend_params": {}},
     "field 'backend' must be one of GDS, GDS_MT, POSIX, HF3FS, IBM_SCALE"),
    ({"type": "nixl_store_dynamic", "backend": "POSIX",
      "backend_params": {"file_path": "/d", "use_direct_io": "false"}},
     "backend_params.max_capacity_gb is required"),
    ({"type": "nixl_store_dynamic", "backend": "POSIX",
      "backend_params": {"file_path": "/d", "use_direct_io": "false", "max_capacity_gb": "0"}},
     "backend_params.max_capacity_gb must be a number > 0 (got '0')"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "fragment"), NIXL_ERRORS)
def test_nixl_records_reject_bad_json(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_adapter(0, raw)
    assert fragment in str(err.value)


def test_nixl_store_dynamic_record() -> None:
    cfg = parse_adapter(2, {"type": "nixl_store_dynamic", "backend": "POSIX", "persist_enabled": False,
                            "backend_params": {"file_path": "/d", "use_direct_io": "false",
                                               "max_capacity_gb": 2, "shard_dirs": "true"}})  # fmt: skip
    assert (cfg.capacity_gb, cfg.shard_dirs, cfg.direct_io, cfg.persist_enabled) == (
        2.0,
        True,
        False,
        False,
    )


MOONCAKE = {"type": "mooncake_store", "local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE",
            "global_segment_size": 268435456, "protocol": "tcp", "master_server_addr": "127.0.0.1:50151"}  # fmt: skip


def test_mooncake_record_forwards_undeclared_keys_as_strings() -> None:
    cfg = parse_adapter(0, {**MOONCAKE, "num_workers": 2, "per_op_workers": {"store": 3},
                            "persist_enabled": True})  # fmt: skip
    assert cfg.setup == {"local_hostname": "127.0.0.1", "metadata_server": "P2PHANDSHAKE",
                         "global_segment_size": "268435456", "protocol": "tcp",
                         "master_server_addr": "127.0.0.1:50151"}  # fmt: skip
    assert (cfg.workers("store"), cfg.workers("lookup")) == (3, 2)
    assert cfg.to_dict()["protocol"] == "tcp"  # shown as given, at top level


MOONCAKE_ERRORS = [
    ({**MOONCAKE, "master_server_address": "10.0.0.1:50051"},
     "field 'master_server_address' is an old lmcache name that Mooncake ignores"),
    ({**MOONCAKE, "device_name": "mlx5_0"}, "use 'rdma_devices'"),
    ({k: v for k, v in MOONCAKE.items() if k != "metadata_server"}, "field 'metadata_server' is required"),
    ({**MOONCAKE, "per_op_workers": {"scan": 2}}, "keys must be among lookup, retrieve, store, delete"),
    ({**MOONCAKE, "per_op_workers": {"store": 0}}, "values must be integers > 0 (got store=0)"),
    ({**MOONCAKE, "num_workers": 0}, "field 'num_workers' must be > 0"),
    ({**MOONCAKE, "setup_config": {"a": "b"}}, "field 'setup_config' is not a key"),
    ({**MOONCAKE, "extra": {"nested": 1}}, "values must be strings (key 'extra')"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "fragment"), MOONCAKE_ERRORS)
def test_mooncake_record_rejects_legacy_and_bad_keys(raw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_adapter(0, raw)
    assert fragment in str(err.value)
