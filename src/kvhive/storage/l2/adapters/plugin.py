"""``plugin``: an adapter class loaded from a Python module named in the JSON.

``module_path`` is a dotted module name or a path to a ``.py`` file; ``class_name`` names a
subclass of :class:`kvhive.storage.l2.L2Adapter` (full asynchronous contract) or of
:class:`kvhive.storage.l2.ObjectStore` (per-object synchronous I/O, run by kvhive on
``num_workers`` threads).  Construction: with ``config_class_name``, the class receives
``ConfigClass.from_dict(adapter_params)`` (or ``ConfigClass(**adapter_params)``); otherwise
``Class.from_params(adapter_params)`` when defined, else ``Class(**adapter_params)``.

A class written for LMCache's L2 adapter interface (a subclass of LMCache's
``L2AdapterInterface``, e.g. its ``fs`` adapter or ``memkv-lmcache``'s ``MemKVL2Adapter``) is
loaded too when ``lmcache`` is importable in the server's environment: it is constructed as
``lmcache server`` constructs plugins (``lmcache_bridge.construct``) and run behind
:class:`~kvhive.storage.l2.adapters.lmcache_bridge.LMCacheBridge`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

from kvhive.config.l2_adapters import FLAG, AdapterConfig, PluginAdapterConfig
from kvhive.errors import ConfigError
from kvhive.storage.l2.adapters import lmcache_bridge
from kvhive.storage.l2.base import L2Adapter, ObjectStore
from kvhive.storage.l2.pooled import PooledAdapter


def load_module(cfg: AdapterConfig, module_path: str) -> ModuleType:
    """Import ``module_path`` (dotted name or ``.py`` file); errors name the adapter."""
    try:
        if module_path.endswith(".py") or os.sep in module_path:
            name = f"kvhive_l2_plugin_{cfg.index}"
            found = importlib.util.spec_from_file_location(name, module_path)
            if found is None or found.loader is None:
                raise ImportError(f"cannot load {module_path}")
            module = importlib.util.module_from_spec(found)
            sys.modules[name] = module
            found.loader.exec_module(module)
            return module
        return importlib.import_module(module_path)
    except Exception as exc:  # noqa: BLE001 - the plugin's own import errors, reported as config errors
        raise ConfigError(FLAG, f"{cfg.label}: cannot import '{module_path}': {exc}") from None


def _construct(cfg: PluginAdapterConfig, module: ModuleType, cls: type) -> Any:
    params = dict(cfg.adapter_params)
    config_name = cfg.config_class_name
    if config_name:
        config_cls = getattr(module, config_name, None)
        if config_cls is None:
            raise ConfigError(FLAG, f"{cfg.label}: no class '{config_name}' in the module")
        factory = getattr(config_cls, "from_dict", None)
        return cls(factory(params) if factory else config_cls(**params))
    from_params = getattr(cls, "from_params", None)
    return from_params(params) if from_params else cls(**params)


def _bridge(cfg: PluginAdapterConfig, module: ModuleType) -> L2Adapter:
    """An LMCache adapter class, constructed as ``lmcache server`` does, behind the bridge."""
    params = dict(cfg.adapter_params)
    adapter = lmcache_bridge.construct(module, cfg.class_name, params, cfg.config_class_name)
    try:
        return lmcache_bridge.LMCacheBridge(adapter, name=cfg.label)
    except BaseException:
        adapter.close()
        raise


def build(cfg: PluginAdapterConfig) -> L2Adapter:
    """Import the plugin, construct its class (module docstring); an ObjectStore is run on
    ``num_workers`` threads.  Import and construction failures raise ConfigError."""
    module = load_module(cfg, cfg.module_path)
    cls = getattr(module, cfg.class_name, None)
    lmcache_class = isinstance(cls, type) and lmcache_bridge.is_lmcache_adapter(cls)
    if not isinstance(cls, type) or not (
        lmcache_class or issubclass(cls, (L2Adapter, ObjectStore))
    ):
        raise ConfigError(FLAG, f"{cfg.label}: '{cfg.class_name}' must be a subclass of "
                          "kvhive.storage.l2.L2Adapter or kvhive.storage.l2.ObjectStore, or of "
                          "LMCache's L2AdapterInterface")  # fmt: skip
    try:
        if lmcache_class:
            return _bridge(cfg, module)
        obj = _construct(cfg, module, cls)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - bad adapter_params: a configuration error
        raise ConfigError(FLAG, f"{cfg.label}: constructing {cls.__name__} failed: {exc}") from None
    if isinstance(obj, ObjectStore):
        return PooledAdapter(obj, workers=cfg.num_workers, integrity=cfg.integrity, name=cfg.label)
    return obj
