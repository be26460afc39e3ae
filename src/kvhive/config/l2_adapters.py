"""Field schemas of every ``--l2-adapter`` JSON type, validated at parse time (no I/O).

Each JSON object names its ``type``; its other keys are the common keys (any type) plus the
type's own fields.  Unknown keys, missing required fields and bad values raise one
:class:`ConfigError` for ``--l2-adapter`` naming the adapter index, the field and what is
allowed, e.g. ``--l2-adapter #1 (fs): field 'base_path' is required``.  Defaults follow
LMCache 0.5.6 (``v1/distributed/l2_adapters``); fields marked "kvhive" are extensions.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kvhive.errors import ConfigError

FLAG = "--l2-adapter"
REQUIRED: Any = object()
Check = Callable[[Any], "str | None"]

_TYPES = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
          dict: "a JSON object", list: "a JSON array"}  # fmt: skip


@dataclass(frozen=True)
class Field:
    """One JSON field: its type, default (``REQUIRED`` if none) and an optional check."""

    name: str
    kind: type
    default: Any = REQUIRED
    check: Check | None = None
    optional: bool = False  # None allowed (absent means None)


def _pos(v: float) -> str | None:
    return None if v > 0 else "must be > 0"


def _nonneg(v: float) -> str | None:
    return None if v >= 0 else "must be >= 0"


def _frac(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _unit(v: float) -> str | None:
    return None if 0 <= v <= 1 else "must be in [0, 1]"


def _port(v: int) -> str | None:
    return None if 0 <= v <= 65535 else "must be in 0..65535 (0: $LMCACHE_RESP_PORT)"


def _pow2(v: int) -> str | None:
    return None if v > 0 and v & (v - 1) == 0 else "must be a power of two"


def _nonempty(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


def _one_of(*allowed: str) -> Check:
    return lambda v: None if v in allowed else f"must be one of {', '.join(allowed)}"


def _relative(v: str) -> str | None:
    if os.path.isabs(v) or ".." in v.split("/"):
        return "must be a relative path without '..'"
    return None


def _magic(v: str) -> str | None:
    return None if len(v) == 8 and v.isascii() else "must be 8 ASCII characters"


COMMON: tuple[Field, ...] = (
    Field("affinity_tag", str, "_default", _nonempty),
    Field("shared", bool, False),
    Field("eviction", dict, None, optional=True),
    Field("persist_enabled", bool, True),
    Field("integrity", str, None, _one_of("checksum", "raw"), optional=True),  # kvhive
    Field("timeout_s", float, 30.0, _pos),  # kvhive: deadline of one lookup or load task
    Field("store_timeout_s", float, 300.0, _pos),  # kvhive: deadline of one store task
)

EVICTION: tuple[Field, ...] = (
    Field("eviction_policy", str, REQUIRED, _one_of("LRU", "IsolatedLRU", "noop")),
    Field("trigger_watermark", float, 0.8, _frac),
    Field("eviction_ratio", float, 0.2, _frac),
    Field("default_quota_gb", float, None, _nonneg, optional=True),  # kvhive
)

_CAP = Field("max_capacity_gb", float, 0.0, _nonneg)

SCHEMAS: dict[str, tuple[Field, ...]] = {
    "fs": (
        Field("base_path", str, REQUIRED, _nonempty),
        Field("relative_tmp_dir", str, None, _relative, optional=True),
        Field("read_ahead_size", int, None, _pos, optional=True),
        Field("use_odirect", bool, False),
        Field("num_workers", int, 4, _pos),  # kvhive
    ),
    "fs_native": (
        Field("base_path", str, REQUIRED, _nonempty),
        Field("num_workers", int, 4, _pos),
        Field("relative_tmp_dir", str, "", lambda v: _relative(v) if v else None),
        Field("use_odirect", bool, False),
        Field("read_ahead_size", int, None, _pos, optional=True),
        _CAP,
        Field("stripe_bytes", int, 8 << 20, _pos),  # kvhive: unit of parallel pread/pwrite
    ),
    "mock": (
        Field("max_size_gb", float, REQUIRED, _pos),
        Field("mock_bandwidth_gb", float, REQUIRED, _pos),
        Field("num_workers", int, 4, _pos),  # kvhive
    ),
    "s3": (
        Field("s3_endpoint", str, REQUIRED, _nonempty),
        Field("s3_region", str, REQUIRED, _nonempty),
        Field("s3_num_io_threads", int, 64, _pos),
        Field("s3_prefer_http2", bool, True),
        Field("s3_enable_s3express", bool, False),
        Field("disable_tls", bool, False),
        Field("aws_access_key_id", str, None, optional=True),
        Field("aws_secret_access_key", str, None, optional=True),
        _CAP,
        Field("s3_addressing_style", str, "auto", _one_of("auto", "virtual", "path")),  # kvhive
        Field("num_workers", int, 16, _pos),  # kvhive: concurrent requests
    ),
    "resp": (
        Field("host", str, REQUIRED),
        Field("port", int, REQUIRED, _port),
        Field("num_workers", int, 8, _pos),
        Field("username", str, ""),
        Field("password", str, ""),
        _CAP,
        Field("socket_timeout_s", float, 10.0, _pos),  # kvhive
    ),
    "plugin": (
        Field("module_path", str, REQUIRED, _nonempty),
        Field("class_name", str, REQUIRED, _nonempty),
        Field("adapter_params", dict, {}),
        Field("config_class_name", str, None, optional=True),
        Field("num_workers", int, 4, _pos),  # kvhive: pool of an ObjectStore plugin
        _CAP,
    ),
    "native_plugin": (
        Field("library_path", str, None, _nonempty, optional=True),  # kvhive C ABI
        Field("module_path", str, None, optional=True),
        Field("class_name", str, None, optional=True),
        Field("adapter_params", dict, {}),
        _CAP,
        Field("num_workers", int, 4, _pos),
    ),
    "raw_block": (
        Field("device_path", str, REQUIRED, _nonempty),
        Field("slot_bytes", int, REQUIRED, _pos),
        Field("capacity_bytes", int, 0, _nonneg),
        Field("use_odirect", bool, True),
        Field("block_align", int, 4096, _pow2),
        Field("header_bytes", int, 4096, _pos),
        Field("meta_total_bytes", int, 256 << 20, _pos),
        Field("meta_magic", str, "LMCIDX01", _magic),
        Field("meta_version", int, 1, _nonneg),
        Field("meta_checkpoint_interval_sec", float, 60.0, _pos),
        Field("meta_idle_quiet_ms", int, 100, _nonneg),
        Field("meta_enable_periodic", bool, True),
        Field("load_checkpoint_on_init", bool, True),
        Field("meta_verify_on_load", bool, True),
        Field("enable_zero_copy", bool, True),
        Field("io_engine", str, "posix", _one_of("posix")),
        Field("iouring_queue_depth", int, 256, _pos),
        Field("use_uring_cmd", bool, False, lambda v: "is not supported" if v else None),
        Field("max_data_transfer_size", int, 0, _nonneg),
        Field("fdp_enabled", bool, False, lambda v: "is not supported" if v else None),
        Field("fdp_placement_ids", list, []),
        Field("fdp_data_placement_policy", str, ""),
        Field("fdp_slot_reuse_policy", str, ""),
        Field("meta_checkpoint_placement_id", int, None, optional=True),
        Field("num_store_workers", int, 2, _pos),
        Field("num_lookup_workers", int, 1, _pos),
        Field("num_load_workers", int, 4, _pos),
    ),
    "dax": (
        Field("slot_bytes", int, REQUIRED, _pos),
        Field("device_path", str, None, _nonempty, optional=True),
        Field("max_dax_size_gb", float, None, _pos, optional=True),
        Field("devices", list, None, optional=True),
        Field("hotplug_enabled", bool, False),
        Field("num_store_workers", int, 1, _pos),
        Field("num_lookup_workers", int, 1, _pos),
        Field("num_load_workers", int, min(4, os.cpu_count() or 1), _pos),
    ),
    "fault_inject": (
        Field("inner", dict, REQUIRED),
        Field("rate", float, 0.0, _unit),
        Field("seed", int, 0),
        Field("gap_indices", list, []),
        Field("gap_tail_ratios", list, []),
        Field("store_delay_ms", int, 0, _nonneg),  # kvhive: slow backend
        Field("lookup_delay_ms", int, 0, _nonneg),
        Field("load_delay_ms", int, 0, _nonneg),
        Field("fail_ops", list, []),  # kvhive: ops whose tasks fail
    ),
}

LATER = ("nixl_store", "nixl_store_dynamic", "mooncake_store")
DURABLE = frozenset({"fs", "fs_native", "s3", "resp", "raw_block", "dax", "plugin",
                     "native_plugin"})  # fmt: skip
SECRETS = frozenset({"aws_secret_access_key", "password"})


@dataclass(frozen=True)
class AdapterSpec:
    """One validated ``--l2-adapter`` JSON: ``params`` holds the type's fields, defaults filled."""

    index: int
    type: str
    params: Mapping[str, Any]
    affinity_tag: str = "_default"
    shared: bool = False
    eviction: Mapping[str, Any] | None = None
    persist_enabled: bool = True
    integrity: str = "checksum"
    timeout_s: float = 30.0
    store_timeout_s: float = 300.0
    inner: AdapterSpec | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"#{self.index} ({self.type})"

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view with secrets masked (for ``/config``)."""
        out: dict[str, Any] = {"type": self.type}
        out.update({k: "***" if k in SECRETS and v else v for k, v in self.params.items()})
        if self.inner is not None:
            out["inner"] = self.inner.to_dict()
        for name in ("affinity_tag", "shared", "eviction", "persist_enabled", "integrity",
                     "timeout_s", "store_timeout_s"):  # fmt: skip
            out[name] = getattr(self, name)
        return out


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(FLAG, f"{where}: {message}")


def _value(where: str, f: Field, value: Any) -> Any:
    if value is None and f.optional:
        return None
    if f.kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, f.kind) or (f.kind is not bool and isinstance(value, bool)):
        raise _fail(where, f"field '{f.name}' must be {_TYPES[f.kind]} (got {value!r})")
    if f.kind is float and not math.isfinite(value):
        raise _fail(where, f"field '{f.name}' must be finite (got {value!r})")
    complaint = f.check(value) if f.check else None
    if complaint:
        raise _fail(where, f"field '{f.name}' {complaint} (got {value!r})")
    return value


def _fields(where: str, fields: tuple[Field, ...], raw: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields:
        if f.name in raw:
            out[f.name] = _value(where, f, raw[f.name])
        elif f.default is REQUIRED:
            raise _fail(where, f"field '{f.name}' is required")
        else:
            out[f.name] = f.default
    return out


def parse_adapter(index: int, raw: Any) -> AdapterSpec:
    """Validate one adapter JSON object (already decoded) into an :class:`AdapterSpec`."""
    where = f"#{index}"
    if not isinstance(raw, dict):
        raise _fail(where, f"must be a JSON object (got {type(raw).__name__})")
    kind = raw.get("type")
    known = ", ".join(sorted([*SCHEMAS, *LATER]))
    if not isinstance(kind, str):
        raise _fail(where, f"field 'type' is required; one of {known}")
    where = f"#{index} ({kind})"
    if kind in LATER:
        raise _fail(where, f"adapter type '{kind}' is not supported yet (later issue)")
    if kind not in SCHEMAS:
        raise _fail(where, f"unknown adapter type '{kind}'; one of {known}")
    if "serde" in raw:
        raise _fail(where, "field 'serde' is not supported yet (later issue)")
    fields = SCHEMAS[kind]
    allowed = {"type"} | {f.name for f in (*COMMON, *fields)}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _fail(
            where, f"field '{unknown[0]}' is unknown; allowed: {', '.join(sorted(allowed))}"
        )
    common = _fields(where, COMMON, raw)
    params = _fields(where, fields, raw)
    _check_type(where, kind, params, common)
    inner = parse_adapter(index, params["inner"]) if kind == "fault_inject" else None
    return AdapterSpec(
        index=index,
        type=kind,
        params=params,
        affinity_tag=common["affinity_tag"],
        shared=common["shared"],
        eviction=_eviction(where, common["eviction"]),
        persist_enabled=common["persist_enabled"],
        integrity=common["integrity"] or ("checksum" if kind in DURABLE else "raw"),
        timeout_s=common["timeout_s"],
        store_timeout_s=common["store_timeout_s"],
        inner=inner,
    )


def _eviction(where: str, raw: Any) -> Mapping[str, Any] | None:
    if raw is None:
        return None
    allowed = {f.name for f in EVICTION}
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _fail(
            where,
            f"field 'eviction.{unknown[0]}' is unknown; allowed: {', '.join(sorted(allowed))}",
        )
    return _fields(f"{where} eviction", EVICTION, raw)


def _check_type(where: str, kind: str, p: dict[str, Any], common: dict[str, Any]) -> None:
    """Cross-field rules of single types."""
    if kind == "raw_block":
        if p["slot_bytes"] % p["block_align"] or p["slot_bytes"] <= p["header_bytes"]:
            raise _fail(
                where, "field 'slot_bytes' must be a multiple of block_align and > header_bytes"
            )
        if p["header_bytes"] < 32 or p["meta_total_bytes"] % p["block_align"]:
            raise _fail(where, "field 'meta_total_bytes' must be a multiple of block_align")
        if not common["persist_enabled"]:
            raise _fail(where, "field 'persist_enabled' cannot be false for raw_block")
    elif kind == "dax":
        single = p["device_path"] is not None
        if single == (p["devices"] is not None):
            raise _fail(where, "give either 'device_path' with 'max_dax_size_gb' or 'devices'")
        if single and p["max_dax_size_gb"] is None:
            raise _fail(where, "field 'max_dax_size_gb' is required with 'device_path'")
        for i, dev in enumerate(p["devices"] or []):
            if not (isinstance(dev, dict) and set(dev) == {"device_path", "max_dax_size_gb"}):
                raise _fail(where, f"devices[{i}] must be {{device_path, max_dax_size_gb}}")
    elif kind == "native_plugin":
        if p["library_path"] is None:
            raise _fail(where, "field 'library_path' is required (the Python native-connector "
                        "form with module_path/class_name is not supported yet)")  # fmt: skip
    elif kind == "fault_inject":
        bad = sorted(set(p["fail_ops"]) - {"store", "lookup", "load", "delete"})
        if bad:
            raise _fail(
                where, f"field 'fail_ops' allows store, lookup, load, delete (got {bad[0]!r})"
            )
        if not all(isinstance(i, int) and i >= 0 for i in p["gap_indices"]):
            raise _fail(where, "field 'gap_indices' must hold non-negative integers")
        if not all(isinstance(r, (int, float)) and 0 <= r <= 1 for r in p["gap_tail_ratios"]):
            raise _fail(where, "field 'gap_tail_ratios' must hold numbers in [0, 1]")
