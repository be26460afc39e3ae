"""Server configuration: one frozen, self-validating dataclass per seed section.

The ``kvhive server`` flags are generated from these dataclasses (:mod:`kvhive.config.parse`);
every invalid value raises :class:`kvhive.errors.ConfigError` naming its flag.
"""

from kvhive.config.compat import CompatConfig
from kvhive.config.deferred import REFUSALS, FlagRefused, Refusal
from kvhive.config.eviction import EvictionConfig, EvictionPolicy
from kvhive.config.http import HTTPConfig
from kvhive.config.kv_events import KVEventsConfig
from kvhive.config.l1 import L1Config
from kvhive.config.l2 import L2Config, PrefetchPolicy, StorePolicy
from kvhive.config.l2_adapters import AdapterSpec
from kvhive.config.mp import EngineType, HashAlgorithm, MPConfig, TransferMode, Transport
from kvhive.config.observability import (
    HTTPAdminConfig,
    LookupHashLogConfig,
    ObservabilityConfig,
    RuntimePluginConfig,
)
from kvhive.config.parse import (
    add_server_arguments,
    config_from_namespace,
    parse_server_args,
)
from kvhive.config.server import ServerConfig

__all__ = [
    "REFUSALS",
    "CompatConfig",
    "EngineType",
    "EvictionConfig",
    "EvictionPolicy",
    "FlagRefused",
    "HTTPAdminConfig",
    "HTTPConfig",
    "HashAlgorithm",
    "KVEventsConfig",
    "L1Config",
    "L2Config",
    "AdapterSpec",
    "PrefetchPolicy",
    "Refusal",
    "StorePolicy",
    "LookupHashLogConfig",
    "MPConfig",
    "ObservabilityConfig",
    "RuntimePluginConfig",
    "ServerConfig",
    "TransferMode",
    "Transport",
    "add_server_arguments",
    "config_from_namespace",
    "parse_server_args",
]
