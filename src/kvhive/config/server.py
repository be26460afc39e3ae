"""The whole server configuration: one frozen section per seed group."""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any, get_type_hints

from kvhive.config.eviction import EvictionConfig
from kvhive.config.http import HTTPConfig
from kvhive.config.l1 import L1Config
from kvhive.config.mp import MPConfig


@dataclass(frozen=True, kw_only=True)
class ServerConfig:
    """Resolved configuration of ``kvhive server``; sections validate themselves on construction."""

    mp: MPConfig = field(default_factory=MPConfig)
    l1: L1Config
    eviction: EvictionConfig
    http: HTTPConfig = field(default_factory=HTTPConfig)

    def __post_init__(self) -> None:
        for name, cls in server_sections():
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"ServerConfig.{name} must be a {cls.__name__}")

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """JSON-safe view grouped by section (for ``GET /config``)."""
        return {name: dataclasses.asdict(getattr(self, name)) for name, _ in server_sections()}


@functools.cache
def server_sections() -> tuple[tuple[str, type], ...]:
    """(attribute name, section class) of every section, in flag-group order."""
    hints = get_type_hints(ServerConfig)
    return tuple((f.name, hints[f.name]) for f in dataclasses.fields(ServerConfig))
