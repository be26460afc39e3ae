"""Typed records of every ``--l2-adapter`` JSON type, validated at construction (no I/O).

Each JSON object names its ``type``; :data:`ADAPTER_TYPES` maps that name to one frozen,
slotted record class.  Its keys are the common keys of :class:`AdapterConfig` (any type) plus
the type's own fields, declared once with :func:`json_field`: the annotation gives the type
and choices (``Literal[...]``, ``X | None``, ``tuple[X, ...]`` for JSON arrays), the metadata
an optional range check from :mod:`kvhive.config.checks` — the same checks, conversion and
wording as the command-line flags (:mod:`kvhive.config.fields`).

Unknown keys, missing required keys and bad values raise one :class:`ConfigError` for
``--l2-adapter`` naming the adapter index and type, the field and what is allowed, e.g.
``--l2-adapter #1 (fs): field 'base_path' is required`` or, inside a nested object,
``#0 (mock) eviction: field 'eviction_policy' must be one of LRU, IsolatedLRU, noop (got 'ARC')``.
Defaults follow LMCache 0.5.6 (``v1/distributed/l2_adapters``); fields marked "kvhive" are
extensions.  Builders (``kvhive.storage.l2.registry``) receive these records as they are.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, ClassVar, Literal, get_args, get_origin, get_type_hints

from kvhive.config.checks import (
    Check,
    ascii_chars,
    at_least,
    each,
    fraction,
    in_range,
    non_empty,
    positive,
    power_of_two,
    relative_path,
    unsupported,
)
from kvhive.config.eviction import EvictionPolicy
from kvhive.config.fields import checked, type_name, unwrap_optional
from kvhive.errors import ConfigError

FLAG = "--l2-adapter"
Integrity = Literal["checksum", "raw"]
"""Object format of an adapter: ``checksum`` frames objects with a CRC trailer, ``raw`` not."""
FaultOp = Literal["store", "lookup", "load", "delete"]
SECRETS = frozenset({"aws_secret_access_key", "password"})
_CHECK, _JSON = "kvhive_check", "kvhive_json"


def json_field(default: Any = dataclasses.MISSING, check: Check | None = None, *,
               factory: Any = dataclasses.MISSING) -> Any:  # fmt: skip
    """Declare one JSON key of a record; omit ``default`` (and ``factory``) for a required key."""
    return field(default=default, default_factory=factory, metadata={_CHECK: check})


@dataclass(frozen=True, slots=True)
class JsonKey:
    """One JSON key of a record class, with its resolved annotation."""

    name: str
    hint: Any
    check: Check | None
    required: bool


_KEYS: dict[type, tuple[JsonKey, ...]] = {}


def record_keys(cls: type) -> tuple[JsonKey, ...]:
    """The JSON keys of a record class, in declaration order (base-class keys first)."""
    keys = _KEYS.get(cls)
    if keys is None:
        hints = get_type_hints(cls)
        keys = _KEYS[cls] = tuple(
            JsonKey(f.name, hints[f.name], f.metadata.get(_CHECK),
                    f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING)
            for f in dataclasses.fields(cls)
            if f.metadata.get(_JSON, True)
        )  # fmt: skip
    return keys


def _fail(where: str, message: str) -> ConfigError:
    return ConfigError(FLAG, f"{where}: {message}")


def _json(value: Any) -> Any:
    if isinstance(value, JsonRecord):
        return value.to_dict()
    if isinstance(value, tuple):
        return [_json(v) for v in value]
    if isinstance(value, Mapping):
        return dict(value)
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class JsonRecord:
    """Base of records read from one JSON object; each dataclass field is one key."""

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view: nested records as objects, tuples as lists."""
        return {k.name: _json(getattr(self, k.name)) for k in record_keys(type(self))}


def validate_record(obj: JsonRecord, where: str) -> None:
    """Type- and range-check every key of ``obj`` in place (ints widened to floats, lists
    stored as tuples, objects as read-only mappings).  Nested records other than adapters
    (which check themselves) are checked here, named ``f"{where} {key}"``."""
    for key in record_keys(type(obj)):
        raw = getattr(obj, key.name)
        if raw is None and not unwrap_optional(key.hint)[1]:
            raise _fail(where, f"field '{key.name}' must be {type_name(key.hint)} (got None)")
        value, complaint = checked(key.hint, key.check, raw)
        if complaint:
            raise _fail(where, f"field '{key.name}' {complaint} (got {raw!r})")
        object.__setattr__(obj, key.name, value)  # frozen: store the converted value
        nested = value if isinstance(value, tuple) else (value,)
        for i, item in enumerate(nested):
            if isinstance(item, JsonRecord) and not isinstance(item, AdapterConfig):
                suffix = f"[{i}]" if isinstance(value, tuple) else ""
                validate_record(item, f"{where} {key.name}{suffix}")


# -- common keys -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class L2EvictionConfig(JsonRecord):
    """The ``eviction`` object of an adapter: byte-based trimming by the L2 evictor.

    Checked by the adapter record holding it.  ``trigger_watermark`` and ``eviction_ratio``
    are shares of the adapter's capacity / used bytes; ``default_quota_gb`` (GiB, kvhive) is
    the quota of a ``cache_salt`` without one under IsolatedLRU (None: 0 bytes).
    """

    eviction_policy: EvictionPolicy = json_field()
    trigger_watermark: float = json_field(0.8, fraction)
    eviction_ratio: float = json_field(0.2, fraction)
    default_quota_gb: float | None = json_field(None, at_least(0))  # kvhive


@dataclass(frozen=True, slots=True, kw_only=True)
class AdapterConfig(JsonRecord):
    """Keys every adapter type accepts, and the record's identity in the cascade.

    Construction validates every key, then the type's cross-field rules (:meth:`check`), and
    raises :class:`ConfigError` naming ``label``.  ``timeout_s`` bounds one lookup or load
    task, ``store_timeout_s`` one store task (seconds, kvhive).  ``integrity`` defaults to
    ``checksum`` for durable types and ``raw`` for the others.
    """

    TYPE: ClassVar[str] = ""
    """The JSON ``type`` this record class describes (the key in :data:`ADAPTER_TYPES`)."""
    PASSTHROUGH: ClassVar[str] = ""
    """Name of a mapping field that collects every key the type does not declare (the
    backend's own settings, forwarded untouched: ``mooncake_store``); "" rejects them."""

    index: int = field(default=0, metadata={_JSON: False})
    """Position of the adapter in the cascade (flag order); reads prefer lower indices."""
    affinity_tag: str = json_field("_default", non_empty)
    shared: bool = json_field(False)
    eviction: L2EvictionConfig | None = json_field(None)
    persist_enabled: bool = json_field(True)
    integrity: Integrity = json_field("checksum")  # kvhive
    timeout_s: float = json_field(30.0, positive)  # kvhive
    store_timeout_s: float = json_field(300.0, positive)  # kvhive

    def __post_init__(self) -> None:
        validate_record(self, self.label)
        self.check()

    def check(self) -> None:
        """Cross-field rules of the type (run after every key passed); raise :meth:`fail`."""

    def fail(self, message: str) -> ConfigError:
        """A ConfigError for this adapter: ``--l2-adapter #i (type): message``."""
        return _fail(self.label, message)

    @property
    def type(self) -> str:
        return self.TYPE

    @property
    def label(self) -> str:
        return f"#{self.index} ({self.TYPE})"

    @property
    def capacity_gb(self) -> float:
        """Configured capacity in GiB; 0: unbounded or the backend's own (slots x size)."""
        return 0.0

    @property
    def wraps(self) -> AdapterConfig | None:
        """The wrapped adapter of a wrapper type (built first and handed to its builder)."""
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe view with secrets masked (for ``/config``): ``type``, the type's own
        keys, then the common keys."""
        common = {k.name for k in record_keys(AdapterConfig)}
        view = JsonRecord.to_dict(self)
        out: dict[str, Any] = {"type": self.TYPE}
        out.update(
            (k, "***" if k in SECRETS and v else v) for k, v in view.items() if k not in common
        )
        out.update((k, v) for k, v in view.items() if k in common)
        return out


AdapterSpec = AdapterConfig
"""Former name of :class:`AdapterConfig` (still exported by :mod:`kvhive.config`)."""

_capacity = functools.partial(json_field, 0.0, at_least(0))  # max_capacity_gb, GiB


def _workers(n: int) -> Any:
    return json_field(n, positive)


# -- one record per type -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class FsAdapterConfig(AdapterConfig):
    """``fs``: one file per object under ``base_path``; ``num_workers`` I/O threads."""

    TYPE: ClassVar[str] = "fs"
    base_path: str = json_field(check=non_empty)
    relative_tmp_dir: str | None = json_field(None, relative_path)
    read_ahead_size: int | None = json_field(None, positive)
    use_odirect: bool = json_field(False)
    num_workers: int = _workers(4)  # kvhive


@dataclass(frozen=True, slots=True, kw_only=True)
class FsNativeAdapterConfig(AdapterConfig):
    """``fs_native``: the fs format, objects moved in ``stripe_bytes`` stripes in parallel."""

    TYPE: ClassVar[str] = "fs_native"
    base_path: str = json_field(check=non_empty)
    num_workers: int = _workers(4)
    relative_tmp_dir: str = json_field("", relative_path)
    use_odirect: bool = json_field(False)
    read_ahead_size: int | None = json_field(None, positive)
    max_capacity_gb: float = _capacity()
    stripe_bytes: int = json_field(8 << 20, positive)  # kvhive: unit of parallel pread/pwrite

    @property
    def capacity_gb(self) -> float:
        return self.max_capacity_gb


@dataclass(frozen=True, slots=True, kw_only=True)
class MockAdapterConfig(AdapterConfig):
    """``mock``: in memory, ``max_size_gb`` GiB, every transfer paced at ``mock_bandwidth_gb`` GiB/s."""

    TYPE: ClassVar[str] = "mock"
    integrity: Integrity = json_field("raw")
    max_size_gb: float = json_field(check=positive)
    mock_bandwidth_gb: float = json_field(check=positive)
    num_workers: int = _workers(4)  # kvhive

    @property
    def capacity_gb(self) -> float:
        return self.max_size_gb


@dataclass(frozen=True, slots=True, kw_only=True)
class S3AdapterConfig(AdapterConfig):
    """``s3``: objects in a bucket through awscrt; ``num_workers`` concurrent requests."""

    TYPE: ClassVar[str] = "s3"
    s3_endpoint: str = json_field(check=non_empty)
    s3_region: str = json_field(check=non_empty)
    s3_num_io_threads: int = _workers(64)
    s3_prefer_http2: bool = json_field(True)
    s3_enable_s3express: bool = json_field(False)
    disable_tls: bool = json_field(False)
    aws_access_key_id: str | None = json_field(None)
    aws_secret_access_key: str | None = json_field(None)
    max_capacity_gb: float = _capacity()
    s3_addressing_style: Literal["auto", "virtual", "path"] = json_field("auto")  # kvhive
    num_workers: int = _workers(16)  # kvhive

    @property
    def capacity_gb(self) -> float:
        return self.max_capacity_gb


@dataclass(frozen=True, slots=True, kw_only=True)
class RespAdapterConfig(AdapterConfig):
    """``resp``: Redis/Valkey strings; empty host/port/credentials come from LMCACHE_RESP_*."""

    TYPE: ClassVar[str] = "resp"
    host: str = json_field()
    port: int = json_field(check=in_range(0, 65535, "0: $LMCACHE_RESP_PORT"))
    num_workers: int = _workers(8)
    username: str = json_field("")
    password: str = json_field("")
    max_capacity_gb: float = _capacity()
    socket_timeout_s: float = json_field(10.0, positive)  # kvhive

    @property
    def capacity_gb(self) -> float:
        return self.max_capacity_gb


@dataclass(frozen=True, slots=True, kw_only=True)
class PluginAdapterConfig(AdapterConfig):
    """``plugin``: class ``class_name`` of Python module ``module_path``, built from
    ``adapter_params``; an ObjectStore plugin runs on ``num_workers`` threads."""

    TYPE: ClassVar[str] = "plugin"
    module_path: str = json_field(check=non_empty)
    class_name: str = json_field(check=non_empty)
    adapter_params: Mapping[str, Any] = json_field(factory=dict)
    config_class_name: str | None = json_field(None)
    num_workers: int = _workers(4)  # kvhive
    max_capacity_gb: float = _capacity()

    @property
    def capacity_gb(self) -> float:
        return self.max_capacity_gb


@dataclass(frozen=True, slots=True, kw_only=True)
class NativePluginAdapterConfig(AdapterConfig):
    """``native_plugin``: a shared library ``library_path`` with kvhive's C ABI."""

    TYPE: ClassVar[str] = "native_plugin"
    library_path: str | None = json_field(None, non_empty)  # kvhive C ABI
    module_path: str | None = json_field(None)
    class_name: str | None = json_field(None)
    adapter_params: Mapping[str, Any] = json_field(factory=dict)
    max_capacity_gb: float = _capacity()
    num_workers: int = _workers(4)

    @property
    def capacity_gb(self) -> float:
        return self.max_capacity_gb

    def check(self) -> None:
        if self.library_path is None:
            raise self.fail("field 'library_path' is required (the Python native-connector "
                            "form with module_path/class_name is not supported yet)")  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class RawBlockAdapterConfig(AdapterConfig):
    """``raw_block``: fixed ``slot_bytes`` slots (bytes) on a block device or file."""

    TYPE: ClassVar[str] = "raw_block"
    device_path: str = json_field(check=non_empty)
    slot_bytes: int = json_field(check=positive)
    capacity_bytes: int = json_field(0, at_least(0))
    use_odirect: bool = json_field(True)
    block_align: int = json_field(4096, power_of_two)
    header_bytes: int = json_field(4096, positive)
    meta_total_bytes: int = json_field(256 << 20, positive)
    meta_magic: str = json_field("LMCIDX01", ascii_chars(8))
    meta_version: int = json_field(1, at_least(0))
    meta_checkpoint_interval_sec: float = json_field(60.0, positive)
    meta_idle_quiet_ms: int = json_field(100, at_least(0))
    meta_enable_periodic: bool = json_field(True)
    load_checkpoint_on_init: bool = json_field(True)
    meta_verify_on_load: bool = json_field(True)
    enable_zero_copy: bool = json_field(True)
    io_engine: Literal["posix"] = json_field("posix")
    iouring_queue_depth: int = json_field(256, positive)
    use_uring_cmd: bool = json_field(False, unsupported)
    max_data_transfer_size: int = json_field(0, at_least(0))
    fdp_enabled: bool = json_field(False, unsupported)
    fdp_placement_ids: tuple[int, ...] = json_field(())
    fdp_data_placement_policy: str = json_field("")
    fdp_slot_reuse_policy: str = json_field("")
    meta_checkpoint_placement_id: int | None = json_field(None)
    num_store_workers: int = _workers(2)
    num_lookup_workers: int = _workers(1)
    num_load_workers: int = _workers(4)

    def check(self) -> None:
        if self.slot_bytes % self.block_align or self.slot_bytes <= self.header_bytes:
            raise self.fail(
                "field 'slot_bytes' must be a multiple of block_align and > header_bytes"
            )
        if self.header_bytes < 32 or self.meta_total_bytes % self.block_align:
            raise self.fail("field 'meta_total_bytes' must be a multiple of block_align")
        if not self.persist_enabled:
            raise self.fail("field 'persist_enabled' cannot be false for raw_block")


@dataclass(frozen=True, slots=True, kw_only=True)
class DaxDevice(JsonRecord):
    """One entry of ``dax`` ``devices``: a DAX device (or file) and its size in GiB."""

    device_path: str = json_field(check=non_empty)
    max_dax_size_gb: float = json_field(check=positive)


@dataclass(frozen=True, slots=True, kw_only=True)
class DaxAdapterConfig(AdapterConfig):
    """``dax``: fixed slots on memory-mapped devices: ``device_path`` + ``max_dax_size_gb``,
    or a list of ``devices``."""

    TYPE: ClassVar[str] = "dax"
    slot_bytes: int = json_field(check=positive)
    device_path: str | None = json_field(None, non_empty)
    max_dax_size_gb: float | None = json_field(None, positive)
    devices: tuple[DaxDevice, ...] | None = json_field(None)
    hotplug_enabled: bool = json_field(False)
    num_store_workers: int = _workers(1)
    num_lookup_workers: int = _workers(1)
    num_load_workers: int = _workers(min(4, os.cpu_count() or 1))

    def check(self) -> None:
        single = self.device_path is not None
        if single == (self.devices is not None):
            raise self.fail("give either 'device_path' with 'max_dax_size_gb' or 'devices'")
        if single and self.max_dax_size_gb is None:
            raise self.fail("field 'max_dax_size_gb' is required with 'device_path'")
        if self.devices == ():
            raise self.fail("field 'devices' must not be empty")

    @property
    def device_list(self) -> tuple[DaxDevice, ...]:
        """The devices, whichever form configured them."""
        if self.devices is not None:
            return self.devices
        assert self.device_path is not None and self.max_dax_size_gb is not None
        return (DaxDevice(device_path=self.device_path, max_dax_size_gb=self.max_dax_size_gb),)


NIXL_BACKENDS = ("GDS", "GDS_MT", "POSIX", "HF3FS", "OBJ", "AZURE_BLOB", "IBM_SCALE")
NixlBackend = Literal["GDS", "GDS_MT", "POSIX", "HF3FS", "OBJ", "AZURE_BLOB", "IBM_SCALE"]
NixlFileBackend = Literal["GDS", "GDS_MT", "POSIX", "HF3FS", "IBM_SCALE"]
NIXL_FILE_BACKENDS = frozenset(get_args(NixlFileBackend))


def _string_map(v: Mapping[str, Any]) -> str | None:
    bad = [k for k, x in v.items() if not isinstance(x, str | int | float | bool)]
    return f"values must be strings (key {bad[0]!r})" if bad else None


def _strings(params: Mapping[str, Any]) -> dict[str, str]:
    """``backend_params`` as NIXL takes them: every value a string (JSON true -> "true")."""
    return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in params.items()}


@dataclass(frozen=True, slots=True, kw_only=True)
class NixlStoreAdapterConfig(AdapterConfig):
    """``nixl_store``: a fixed pool of NIXL storage: ``pool_size`` files of ``file_size``
    bytes (file backends; ``backend_params`` needs ``file_path`` and ``use_direct_io``;
    ``file_size`` defaults to the L1 alignment and must be a multiple of it) or
    ``pool_size`` objects of one L1 page each (``OBJ``).  Objects take whole pages."""

    TYPE: ClassVar[str] = "nixl_store"
    backend: NixlBackend = json_field()
    backend_params: Mapping[str, Any] = json_field(factory=dict, check=_string_map)
    pool_size: int = json_field(check=positive)
    transfer_threads: int = _workers(2)  # kvhive: concurrent NIXL transfers

    def check(self) -> None:
        if self.backend in NIXL_FILE_BACKENDS:
            for key in ("file_path", "use_direct_io"):
                if key not in self.backend_params:
                    raise self.fail(f"backend {self.backend} needs backend_params.{key}")
        size = self.backend_params.get("file_size")
        if size is not None and not (str(size).isdigit() and int(size) > 0):
            raise self.fail(f"backend_params.file_size must be a positive integer (got {size!r})")

    @property
    def params(self) -> dict[str, str]:
        return _strings(self.backend_params)

    @property
    def direct_io(self) -> bool:
        return str(self.backend_params.get("use_direct_io", "false")).lower() == "true"


@dataclass(frozen=True, slots=True, kw_only=True)
class NixlStoreDynamicAdapterConfig(AdapterConfig):
    """``nixl_store_dynamic``: one file per object under ``backend_params.file_path``
    (``use_direct_io``, the required ``max_capacity_gb`` > 0 and ``shard_dirs`` ("true":
    two levels of directories from the hash) also live in ``backend_params``)."""

    TYPE: ClassVar[str] = "nixl_store_dynamic"
    backend: NixlFileBackend = json_field()
    backend_params: Mapping[str, Any] = json_field(factory=dict, check=_string_map)
    num_workers: int = _workers(4)  # kvhive: concurrent per-file transfers

    def check(self) -> None:
        for key in ("file_path", "use_direct_io", "max_capacity_gb"):
            if key not in self.backend_params:
                raise self.fail(f"backend_params.{key} is required")
        try:
            gb = float(self.backend_params["max_capacity_gb"])
        except ValueError:
            gb = 0.0
        if not gb > 0:
            raise self.fail(
                "backend_params.max_capacity_gb must be a number > 0 "
                f"(got {self.backend_params['max_capacity_gb']!r})"
            )

    @property
    def params(self) -> dict[str, str]:
        return _strings(self.backend_params)

    @property
    def direct_io(self) -> bool:
        return str(self.backend_params["use_direct_io"]).lower() == "true"

    @property
    def shard_dirs(self) -> bool:
        return str(self.backend_params.get("shard_dirs", "false")).lower() == "true"

    @property
    def capacity_gb(self) -> float:
        return float(self.backend_params["max_capacity_gb"])


MOONCAKE_LANES = ("lookup", "retrieve", "store", "delete")
MOONCAKE_LEGACY = {"device_name": "rdma_devices", "master_server_address": "master_server_addr"}
MOONCAKE_REQUIRED = ("local_hostname", "metadata_server")


def _lanes(v: Mapping[str, Any]) -> str | None:
    for lane, n in v.items():
        if lane not in MOONCAKE_LANES:
            return f"keys must be among {', '.join(MOONCAKE_LANES)} (got {lane!r})"
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            return f"values must be integers > 0 (got {lane}={n!r})"
    return None


@dataclass(frozen=True, slots=True, kw_only=True)
class MooncakeStoreAdapterConfig(AdapterConfig):
    """``mooncake_store``: objects in a Mooncake Store cluster.  Every key this record does
    not declare goes, as a string, to ``MooncakeDistributedStore.setup`` (``setup_config``):
    ``local_hostname`` and ``metadata_server`` are required there, ``master_server_addr``
    names the master.  ``num_workers`` threads serve every lane not in ``per_op_workers``
    (``lookup``, ``retrieve``, ``store``, ``delete``); ``setup_timeout_s`` bounds the
    connection at start (Mooncake itself retries for about 90 s)."""

    TYPE: ClassVar[str] = "mooncake_store"
    PASSTHROUGH: ClassVar[str] = "setup_config"
    num_workers: int = _workers(4)
    per_op_workers: Mapping[str, Any] = json_field(factory=dict, check=_lanes)
    max_capacity_gb: float = _capacity()  # kvhive: usage figures and eviction
    setup_timeout_s: float = json_field(30.0, positive)  # kvhive
    setup_config: Mapping[str, Any] = json_field(factory=dict, check=_string_map)

    def check(self) -> None:
        for legacy, current in MOONCAKE_LEGACY.items():
            if legacy in self.setup_config:
                raise self.fail(
                    f"field '{legacy}' is an old lmcache name that Mooncake ignores "
                    f"(it would then dial its default and retry for ~90 s): use '{current}'"
                )
        for key in MOONCAKE_REQUIRED:
            if key not in self.setup_config:
                raise self.fail(f"field '{key}' is required (Mooncake's setup needs it)")

    @property
    def setup(self) -> dict[str, str]:
        """The settings for ``MooncakeDistributedStore.setup``, every value a string."""
        return _strings(self.setup_config)

    def to_dict(self) -> dict[str, Any]:
        """As given: Mooncake's settings at top level, after ``type``."""
        view = AdapterConfig.to_dict(self)
        setup = view.pop("setup_config")
        return {"type": view.pop("type"), **setup, **view}

    def workers(self, lane: str) -> int:
        """Threads of ``lane`` (one of :data:`MOONCAKE_LANES`)."""
        return int(self.per_op_workers.get(lane, self.num_workers))

    @property
    def capacity_gb(self) -> float:
        return self.max_capacity_gb


def parse_host_ports(raw: str) -> tuple[tuple[str, int], ...]:
    """``"host:port[,host:port...]"`` as ``((host, port), ...)`` (LMCache 0.5.6's valkey rule:
    blank entries are skipped, the port follows the last ``:``, ``[v6]`` brackets are dropped);
    ValueError naming the bad entry."""
    nodes = []
    for chunk in (c.strip() for c in raw.split(",")):
        if not chunk:
            continue
        host, sep, port = chunk.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) <= 65535:
            raise ValueError(
                f"entries must be 'host:port' with a port in 1..65535 (bad: {chunk!r})"
            )
        nodes.append((host, int(port)))
    if not nodes:
        raise ValueError("must list at least one 'host:port'")
    return tuple(nodes)


def _host_ports(v: str) -> str | None:
    try:
        parse_host_ports(v)
    except ValueError as exc:
        return str(exc)
    return None


def _no_at(v: str) -> str | None:
    return "must not contain '@' (it separates the prefix from the key)" if "@" in v else None


@dataclass(frozen=True, slots=True, kw_only=True)
class ValkeyAdapterConfig(AdapterConfig):
    """``valkey``: Valkey/Redis strings in a cluster (``cluster_mode``) or on one server (the
    first of ``startup_nodes``, logical db ``database_id``).  Keys are ``<key_prefix>@<name>``
    (just ``<name>`` without a prefix); ``request_timeout`` bounds each call and
    ``connection_timeout`` each connection (seconds, as the reference); ``ttl_seconds``
    (None: no expiry) expires every object that long after its store."""

    TYPE: ClassVar[str] = "valkey"
    startup_nodes: str = json_field(check=_host_ports)
    cluster_mode: bool = json_field(False)
    username: str = json_field("")
    password: str = json_field("")
    key_prefix: str = json_field("", _no_at)
    num_workers: int = _workers(8)
    tls_enable: bool = json_field(False)
    database_id: int | None = json_field(None, at_least(0))
    request_timeout: float = json_field(5.0, positive)
    connection_timeout: float = json_field(10.0, positive)
    max_capacity_gb: float = _capacity()
    ttl_seconds: int | None = json_field(None, positive)

    @property
    def nodes(self) -> tuple[tuple[str, int], ...]:
        """``startup_nodes`` as ``(host, port)`` pairs."""
        return parse_host_ports(self.startup_nodes)

    @property
    def capacity_gb(self) -> float:
        return self.max_capacity_gb


@dataclass(frozen=True, slots=True, kw_only=True)
class FaultInjectAdapterConfig(AdapterConfig):
    """``fault_inject``: wraps the ``inner`` adapter (same index) and breaks it on purpose.

    ``rate`` (0..1) of keys, ``gap_indices`` positions and ``gap_tail_ratios`` of each load
    batch miss; ``*_delay_ms`` postpone tasks (kvhive); ``fail_ops`` tasks fail (kvhive).
    """

    TYPE: ClassVar[str] = "fault_inject"
    integrity: Integrity = json_field("raw")
    inner: AdapterConfig = json_field()
    rate: float = json_field(0.0, in_range(0, 1))
    seed: int = json_field(0)
    gap_indices: tuple[int, ...] = json_field((), each(at_least(0)))
    gap_tail_ratios: tuple[float, ...] = json_field((), each(in_range(0, 1)))
    store_delay_ms: int = json_field(0, at_least(0))  # kvhive: slow backend
    lookup_delay_ms: int = json_field(0, at_least(0))
    load_delay_ms: int = json_field(0, at_least(0))
    fail_ops: tuple[FaultOp, ...] = json_field(())  # kvhive: ops whose tasks fail

    @property
    def wraps(self) -> AdapterConfig | None:
        return self.inner


ADAPTER_TYPES: Mapping[str, type[AdapterConfig]] = MappingProxyType({
    cls.TYPE: cls
    for cls in (FsAdapterConfig, FsNativeAdapterConfig, MockAdapterConfig, S3AdapterConfig,
                RespAdapterConfig, PluginAdapterConfig, NativePluginAdapterConfig,
                RawBlockAdapterConfig, DaxAdapterConfig, NixlStoreAdapterConfig,
                NixlStoreDynamicAdapterConfig, MooncakeStoreAdapterConfig,
                ValkeyAdapterConfig, FaultInjectAdapterConfig)
})  # fmt: skip
"""Every supported adapter ``type`` and its record class: the one table of type names
(the builders in ``kvhive.storage.l2.registry`` are keyed by the same names)."""


# -- parsing -----------------------------------------------------------------------------------


def parse_adapter(index: int, raw: Any) -> AdapterConfig:
    """Validate one adapter JSON object (already decoded) into its :data:`ADAPTER_TYPES` record."""
    where = f"#{index}"
    if not isinstance(raw, dict):
        raise _fail(where, f"must be a JSON object (got {type(raw).__name__})")
    kind = raw.get("type")
    known = ", ".join(sorted(ADAPTER_TYPES))
    if not isinstance(kind, str):
        raise _fail(where, f"field 'type' is required; one of {known}")
    where = f"#{index} ({kind})"
    cls = ADAPTER_TYPES.get(kind)
    if cls is None:
        raise _fail(where, f"unknown adapter type '{kind}'; one of {known}")
    if "serde" in raw:
        raise _fail(where, "field 'serde' is not supported yet (later issue)")
    if raw.get("integrity", "") is None:  # null: the type's default, as when absent
        raw = {k: v for k, v in raw.items() if k != "integrity"}
    passthrough = cls.PASSTHROUGH
    if passthrough:  # the keys the record does not declare are the backend's own settings
        declared = {k.name for k in record_keys(cls)} - {passthrough}
        own = {k: v for k, v in raw.items() if k in declared or k == "type"}
        rest = {k: v for k, v in raw.items() if k not in own}
        if passthrough in rest:
            raise _fail(where, f"field '{passthrough}' is not a key: give its keys at top level")
        raw = {**own, passthrough: rest}
    return cls(index=index, **_kwargs(cls, raw, where, index, {"type"}))


def _kwargs(cls: type, raw: dict[str, Any], where: str, index: int,
            skip: frozenset[str] | set[str] = frozenset()) -> dict[str, Any]:  # fmt: skip
    """Constructor arguments of record ``cls`` from JSON object ``raw``: unknown and missing
    keys raise; JSON objects of record-typed keys become records (checked by the holder)."""
    keys = record_keys(cls)
    allowed = {k.name for k in keys} | set(skip)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise _fail(
            where, f"field '{unknown[0]}' is unknown; allowed: {', '.join(sorted(allowed))}"
        )
    out: dict[str, Any] = {}
    for key in keys:
        if key.name in raw:
            out[key.name] = _nested(key, raw[key.name], where, index)
        elif key.required:
            raise _fail(where, f"field '{key.name}' is required")
    return out


def _nested(key: JsonKey, value: Any, where: str, index: int) -> Any:
    base, _ = unwrap_optional(key.hint)
    if get_origin(base) is tuple and isinstance(value, list):
        item = get_args(base)[0]
        if isinstance(item, type) and issubclass(item, JsonRecord):
            return tuple(_record(item, v, f"{where} {key.name}[{i}]", index)
                         for i, v in enumerate(value))  # fmt: skip
    elif isinstance(base, type) and issubclass(base, JsonRecord) and isinstance(value, dict):
        if issubclass(base, AdapterConfig):
            return parse_adapter(index, value)  # a wrapped adapter shares its wrapper's index
        return _record(base, value, f"{where} {key.name}", index)
    return value


def _record(cls: type, raw: Any, where: str, index: int) -> Any:
    if not isinstance(raw, dict):
        raise _fail(where, f"must be a JSON object (got {raw!r})")
    return cls(**_kwargs(cls, raw, where, index))
