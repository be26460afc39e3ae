"""Server configuration: one frozen, self-validating dataclass per seed section.

The ``kvhive server`` flags are generated from these dataclasses (:mod:`kvhive.config.parse`);
every invalid value raises :class:`kvhive.errors.ConfigError` naming its flag.
"""

from kvhive.config.deferred import DEFERRED_FLAGS, DEFERRED_VALUES
from kvhive.config.eviction import EvictionConfig, EvictionPolicy
from kvhive.config.http import HTTPConfig
from kvhive.config.l1 import L1Config
from kvhive.config.mp import EngineType, HashAlgorithm, MPConfig, TransferMode
from kvhive.config.parse import (
    add_server_arguments,
    config_from_namespace,
    parse_server_args,
)
from kvhive.config.server import ServerConfig

__all__ = [
    "DEFERRED_FLAGS",
    "DEFERRED_VALUES",
    "EngineType",
    "EvictionConfig",
    "EvictionPolicy",
    "HTTPConfig",
    "HashAlgorithm",
    "L1Config",
    "MPConfig",
    "ServerConfig",
    "TransferMode",
    "add_server_arguments",
    "config_from_namespace",
    "parse_server_args",
]
