"""Adapter types by name: a lazy table ``type -> "module:builder"``.

The type names are declared once, by :data:`kvhive.config.l2_adapters.ADAPTER_TYPES`
(name -> config record class); this table is keyed by the same names, and each builder's
first parameter is annotated with that record class (a unit test checks both).  A builder
takes the validated record and returns an :class:`L2Adapter`; a wrapper type's builder
(``fault_inject``) also takes the inner adapter, built first.  Modules are imported on first
use, so optional clients (awscrt, redis-py) are needed only by the types that use them.
Third-party adapters need no entry here: use the ``plugin`` (Python) or ``native_plugin``
(C ABI) types.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kvhive.config.l2_adapters import AdapterConfig
from kvhive.storage.l2.base import HostRegion, L2Adapter

Builder = Callable[..., L2Adapter]
"""``build(cfg)`` or, for a wrapper, ``build(cfg, inner)``; ``cfg`` is the type's record."""

_PKG = "kvhive.storage.l2.adapters"
BUILDERS: dict[str, str] = {
    "fs": f"{_PKG}.fs:build",
    "fs_native": f"{_PKG}.fs:build_native",
    "mock": f"{_PKG}.mock:build",
    "s3": f"{_PKG}.s3:build",
    "resp": f"{_PKG}.resp:build",
    "plugin": f"{_PKG}.plugin:build",
    "native_plugin": f"{_PKG}.native_plugin:build",
    "raw_block": f"{_PKG}.raw_block:build_raw_block",
    "dax": f"{_PKG}.raw_block:build_dax",
    "nixl_store": f"{_PKG}.nixl_static:build",
    "nixl_store_dynamic": f"{_PKG}.nixl_dynamic:build",
    "mooncake_store": f"{_PKG}.mooncake:build",
    "valkey": f"{_PKG}.valkey:build",
    "fault_inject": f"{_PKG}.fault:build",
}
HOST_AWARE = frozenset({"nixl_store", "nixl_store_dynamic"})
"""Types whose builder also takes ``host=`` (the L1 arena as a :class:`HostRegion`, or None
when there is none, e.g. an adapter opened by the bench)."""


def builder_of(kind: str) -> Builder:
    """The builder of adapter type ``kind`` (imports its module); KeyError when unknown."""
    path = BUILDERS.get(kind)
    if path is None:
        raise KeyError(f"no L2 adapter type {kind!r}")
    module, _, name = path.partition(":")
    builder: Builder = getattr(importlib.import_module(module), name)
    return builder


def build_adapter(cfg: AdapterConfig, host: HostRegion | None = None) -> L2Adapter:
    """Open the adapter described by ``cfg`` (imports, connects, opens files).

    A wrapper type (``cfg.wraps`` set, e.g. ``fault_inject``) gets its inner adapter, built
    first, as a second argument; if the wrapper fails, the inner adapter is closed.  Types in
    :data:`HOST_AWARE` also get ``host``, the L1 arena.
    """
    inner_cfg = cfg.wraps
    if inner_cfg is None:
        if cfg.type in HOST_AWARE:
            return builder_of(cfg.type)(cfg, host=host)
        return builder_of(cfg.type)(cfg)
    inner = build_adapter(inner_cfg, host)
    try:
        return builder_of(cfg.type)(cfg, inner)
    except BaseException:
        inner.close()
        raise
