"""The whole server configuration: one frozen section per seed group."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, get_type_hints

from kvhive.config.compat import CompatConfig
from kvhive.config.eviction import EvictionConfig
from kvhive.config.http import HTTPConfig
from kvhive.config.kv_events import KVEventsConfig
from kvhive.config.l1 import L1Config
from kvhive.config.l2 import L2Config
from kvhive.config.mp import MPConfig
from kvhive.config.observability import (
    HTTPAdminConfig,
    LookupHashLogConfig,
    ObservabilityConfig,
    RuntimePluginConfig,
)


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Resolved configuration of ``kvhive server``; sections validate themselves on construction."""

    mp: MPConfig = field(default_factory=MPConfig)
    l1: L1Config
    eviction: EvictionConfig
    l2: L2Config = field(default_factory=L2Config)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    http_admin: HTTPAdminConfig = field(default_factory=HTTPAdminConfig)
    observability: ObservabilityConfig = field(default_factory=ObservabilityConfig)
    kv_events: KVEventsConfig = field(default_factory=KVEventsConfig)
    lookup_hash_log: LookupHashLogConfig = field(default_factory=LookupHashLogConfig)
    plugins: RuntimePluginConfig = field(default_factory=RuntimePluginConfig)
    compat: CompatConfig = field(default_factory=CompatConfig)

    def __post_init__(self) -> None:
        for name, cls in server_sections():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"ServerConfig.{name} must be a {cls.__name__}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-safe view grouped by section (for ``GET /config``)."""
        return {name: _lists(_section_dict(getattr(self, name))) for name, _ in server_sections()}


def _section_dict(section: Any) -> dict[str, Any]:
    """A section's own ``to_dict`` (e.g. masking secrets) or all its fields."""
    own = getattr(section, "to_dict", None)
    return own() if callable(own) else dataclasses.asdict(section)


def _lists(value: Any) -> Any:
    """Tuples (repeatable flags) become lists, so the view round-trips through JSON."""
    if isinstance(value, dict):
        return {k: _lists(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_lists(v) for v in value]
    return value


class Section(Protocol):
    """A config section class: a frozen dataclass of flag fields with a --help title."""

    TITLE: ClassVar[str]


@functools.cache
def server_sections() -> tuple[tuple[str, type[Section]], ...]:
    """(attribute name, section class) of every section, in flag-group order."""
    hints = get_type_hints(ServerConfig)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(ServerConfig))
