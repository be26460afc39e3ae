"""``plugin``: an adapter class loaded from a Python module named in the JSON.

``module_path`` is a dotted module name or a path to a ``.py`` file; ``class_name`` names a
subclass of :class:`kvhive.storage.l2.L2Adapter` (full asynchronous contract) or of
:class:`kvhive.storage.l2.ObjectStore` (per-object synchronous I/O, run by kvhive on
``num_workers`` threads).  Construction: with ``config_class_name``, the class receives
``ConfigClass.from_dict(adapter_params)`` (or ``ConfigClass(**adapter_params)``); otherwise
``Class.from_params(adapter_params)`` when defined, else ``Class(**adapter_params)``.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType
from typing import Any

from kvhive.config.l2_adapters import FLAG, AdapterSpec
from kvhive.errors import ConfigError
from kvhive.storage.l2.base import L2Adapter, ObjectStore
from kvhive.storage.l2.pooled import PooledAdapter


def load_module(spec: AdapterSpec, module_path: str) -> ModuleType:
    """Import ``module_path`` (dotted name or ``.py`` file); errors name the adapter."""
    try:
        if module_path.endswith(".py") or os.sep in module_path:
            name = f"kvhive_l2_plugin_{spec.index}"
            found = importlib.util.spec_from_file_location(name, module_path)
            if found is None or found.loader is None:
                raise ImportError(f"cannot load {module_path}")
            module = importlib.util.module_from_spec(found)
            sys.modules[name] = module
            found.loader.exec_module(module)
            return module
        return importlib.import_module(module_path)
    except Exception as exc:  # the plugin's own import errors, reported as config errors
        raise ConfigError(FLAG, f"{spec.label}: cannot import '{module_path}': {exc}") from None


def _construct(spec: AdapterSpec, module: ModuleType, cls: type) -> Any:
    params = dict(spec.params["adapter_params"])
    config_name = spec.params["config_class_name"]
    if config_name:
        config_cls = getattr(module, config_name, None)
        if config_cls is None:
            raise ConfigError(FLAG, f"{spec.label}: no class '{config_name}' in the module")
        factory = getattr(config_cls, "from_dict", None)
        return cls(factory(params) if factory else config_cls(**params))
    from_params = getattr(cls, "from_params", None)
    return from_params(params) if from_params else cls(**params)


def build(spec: AdapterSpec) -> L2Adapter:
    p = spec.params
    module = load_module(spec, p["module_path"])
    cls = getattr(module, p["class_name"], None)
    if not isinstance(cls, type) or not issubclass(cls, (L2Adapter, ObjectStore)):
        raise ConfigError(FLAG, f"{spec.label}: '{p['class_name']}' must be a subclass of "
                          "kvhive.storage.l2.L2Adapter or kvhive.storage.l2.ObjectStore")  # fmt: skip
    try:
        obj = _construct(spec, module, cls)
    except ConfigError:
        raise
    except Exception as exc:  # bad adapter_params: a configuration error
        raise ConfigError(
            FLAG, f"{spec.label}: constructing {cls.__name__} failed: {exc}"
        ) from None
    if isinstance(obj, ObjectStore):
        integrity = "raw" if spec.integrity == "raw" else "checksum"
        return PooledAdapter(obj, workers=p["num_workers"], integrity=integrity, name=spec.label)
    return obj
