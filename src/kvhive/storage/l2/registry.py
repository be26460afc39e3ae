"""Adapter types by name: a lazy table ``type -> "module:builder"``.

A builder takes the validated :class:`AdapterSpec` and returns an :class:`L2Adapter`;
modules are imported on first use, so optional clients (awscrt, redis-py) are needed only
by the types that use them.  Third-party adapters need no entry here: use the ``plugin``
(Python) or ``native_plugin`` (C ABI) types.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from kvhive.config.l2_adapters import AdapterSpec
from kvhive.storage.l2.base import L2Adapter

Builder = Callable[[AdapterSpec], L2Adapter]

_PKG = "kvhive.storage.l2.adapters"
BUILDERS: dict[str, str] = {
    "fs": f"{_PKG}.fs:build",
    "fs_native": f"{_PKG}.fs:build",
    "mock": f"{_PKG}.mock:build",
    "s3": f"{_PKG}.s3:build",
    "resp": f"{_PKG}.resp:build",
    "plugin": f"{_PKG}.plugin:build",
    "native_plugin": f"{_PKG}.native_plugin:build",
    "raw_block": f"{_PKG}.raw_block:build",
    "dax": f"{_PKG}.raw_block:build",
    "fault_inject": f"{_PKG}.fault:build",
}


def builder_of(kind: str) -> Builder:
    path = BUILDERS.get(kind)
    if path is None:
        raise KeyError(f"no L2 adapter type {kind!r}")
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def build_adapter(spec: AdapterSpec) -> L2Adapter:
    """Open the adapter described by ``spec`` (imports, connects, opens files).

    A wrapper type (``spec.inner`` set, e.g. ``fault_inject``) gets its inner adapter,
    built first, as a second argument.
    """
    if spec.inner is None:
        return builder_of(spec.type)(spec)
    inner = build_adapter(spec.inner)
    try:
        return builder_of(spec.type)(spec, inner)  # type: ignore[call-arg]
    except BaseException:
        inner.close()
        raise
