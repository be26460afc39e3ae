"""``--server-module`` values: which Python modules to load as server modules.

A value is a JSON object in the reference's form, ``{"module_path": "pkg.mod",
"factory_name": "build_server_modules", "config": {...}}`` (``factory_name`` and ``config``
optional), a JSON list of such objects, or, as a kvhive shorthand, a bare dotted module
path.  Parsing is pure; importing the module and calling its factory happen when the server
is built (:mod:`kvhive.server.modules`, the API: ``docs/server-modules.md``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from kvhive.errors import ConfigError

FLAG = "--server-module"
DEFAULT_FACTORY = "build_server_modules"
"""The factory a module exposes unless ``factory_name`` says otherwise (the reference's)."""

_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
_KEYS = ("module_path", "factory_name", "config")


@dataclass(frozen=True)
class ServerModuleSpec:
    """One server module to load: its import path, factory and configuration."""

    module_path: str
    factory_name: str = DEFAULT_FACTORY
    config: MappingProxyType[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "module_path": self.module_path,
            "factory_name": self.factory_name,
            "config": dict(self.config),
        }


def parse_server_modules(values: tuple[str, ...]) -> tuple[ServerModuleSpec, ...]:
    """The specs of every ``--server-module`` value, in command-line order; a bad value
    raises :class:`ConfigError` naming the flag, the value's position and the field."""
    specs: list[ServerModuleSpec] = []
    for i, text in enumerate(values):
        where = f"#{i}"
        stripped = text.strip()
        if stripped[:1] not in ("{", "["):
            specs.append(_spec(where, {"module_path": stripped}))
            continue
        try:
            raw = json.loads(stripped)
        except ValueError as exc:
            raise ConfigError(FLAG, f"{where}: must be valid JSON ({exc})") from None
        entries = raw if isinstance(raw, list) else [raw]
        for j, entry in enumerate(entries):
            specs.append(_spec(f"{where}[{j}]" if isinstance(raw, list) else where, entry))
    return tuple(specs)


def _spec(where: str, raw: Any) -> ServerModuleSpec:
    if not isinstance(raw, dict):
        raise ConfigError(FLAG, f"{where}: must be a JSON object or a module path")
    unknown = sorted(set(raw) - set(_KEYS))
    if unknown:
        raise ConfigError(
            FLAG, f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(_KEYS)})"
        )
    module_path = raw.get("module_path")
    if not isinstance(module_path, str) or not _DOTTED.match(module_path):
        raise ConfigError(
            FLAG, f"{where}: field 'module_path' must be a dotted module path (got {module_path!r})"
        )
    factory = raw.get("factory_name", DEFAULT_FACTORY)
    if not isinstance(factory, str) or not factory.isidentifier():
        raise ConfigError(
            FLAG, f"{where}: field 'factory_name' must be a Python name (got {factory!r})"
        )
    config = raw.get("config", {})
    if not isinstance(config, dict):
        raise ConfigError(FLAG, f"{where}: field 'config' must be a JSON object")
    return ServerModuleSpec(module_path, factory, MappingProxyType(dict(config)))
