"""``native_plugin``: a shared library implementing kvhive's small C ABI, loaded with ctypes.

JSON: ``library_path`` (the ``.so``), ``adapter_params`` (any JSON object, handed to
``kvh_open`` as a JSON string), ``num_workers`` (threads calling the library at once),
``max_capacity_gb``.  Keys are ``naming.flat_name`` strings (UTF-8, NUL-terminated); values
are the logical bytes plus the integrity trailer (``integrity: "raw"``: bare bytes).

The ABI, version 1 (every function must be thread-safe; kvhive calls them from several
threads at once, without the GIL)::

    typedef struct { void *base; uint64_t len; } kvh_iov;
    int      kvh_abi_version(void);                          // must return 1
    void    *kvh_open(const char *params_json);             // NULL: failure
    void     kvh_close(void *h);
    int      kvh_put(void *h, const char *key, const kvh_iov *iov, int iovcnt);
                                                             // 0: stored, < 0: error
    int64_t  kvh_get(void *h, const char *key, const kvh_iov *iov, int iovcnt);
                     // fill the iovs in order from the object's start (as far as it
                     // reaches); return the object's full length, -1: absent, < -1: error
    int      kvh_exists(void *h, const char *key);          // 1: yes, 0: no, < 0: error
    int      kvh_delete(void *h, const char *key);          // 1: removed, 0: absent, < 0: error

``tests/l2/sample_plugin.c`` is a complete in-memory example.
"""

from __future__ import annotations

import ctypes
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from kvhive.config.l2_adapters import FLAG, NativePluginAdapterConfig
from kvhive.errors import ConfigError, L2Error, ObjectMissing
from kvhive.keys import ObjectKey
from kvhive.storage.l2.base import L2Adapter, ObjectStore
from kvhive.storage.l2.naming import flat_name
from kvhive.storage.l2.pooled import PooledAdapter

ABI_VERSION = 1


class Iov(ctypes.Structure):
    _fields_ = [("base", ctypes.c_void_p), ("len", ctypes.c_uint64)]


def _bind(lib: ctypes.CDLL) -> None:
    c = ctypes
    table = {
        "kvh_abi_version": (c.c_int, []),
        "kvh_open": (c.c_void_p, [c.c_char_p]),
        "kvh_close": (None, [c.c_void_p]),
        "kvh_put": (c.c_int, [c.c_void_p, c.c_char_p, c.POINTER(Iov), c.c_int]),
        "kvh_get": (c.c_int64, [c.c_void_p, c.c_char_p, c.POINTER(Iov), c.c_int]),
        "kvh_exists": (c.c_int, [c.c_void_p, c.c_char_p]),
        "kvh_delete": (c.c_int, [c.c_void_p, c.c_char_p]),
    }
    for name, (restype, argtypes) in table.items():
        fn = getattr(lib, name)  # AttributeError: symbol missing
        fn.restype, fn.argtypes = restype, argtypes


def _iovs(parts: Sequence[memoryview]) -> tuple[Any, list[np.ndarray]]:
    arrays = [np.frombuffer(p, dtype=np.uint8) for p in parts]
    iov = (Iov * len(parts))(*[Iov(a.ctypes.data, a.nbytes) for a in arrays])
    return iov, arrays  # keep the arrays alive during the call


class NativeStore(ObjectStore):
    """Objects in a library implementing the C ABI (module docstring); ``params`` is handed
    to ``kvh_open`` as JSON.  Loading or opening failures raise ConfigError."""

    durable = True

    def __init__(self, library_path: str, params: dict[str, Any]) -> None:
        self.path = library_path
        try:
            self.lib = ctypes.CDLL(library_path)
            _bind(self.lib)
        except (OSError, AttributeError) as exc:
            raise ConfigError(FLAG, f"native_plugin '{library_path}': {exc}") from None
        version = self.lib.kvh_abi_version()
        if version != ABI_VERSION:
            raise ConfigError(
                FLAG, f"native_plugin '{library_path}': ABI {version}, need {ABI_VERSION}"
            )
        self.handle = self.lib.kvh_open(json.dumps(params).encode())
        if not self.handle:
            raise ConfigError(FLAG, f"native_plugin '{library_path}': kvh_open failed")

    def put(self, key: ObjectKey, parts: Sequence[memoryview]) -> None:
        iov, _keep = _iovs(parts)
        rc = self.lib.kvh_put(self.handle, flat_name(key).encode(), iov, len(parts))
        if rc < 0:
            raise L2Error(f"kvh_put returned {rc}")

    def get(self, key: ObjectKey, parts: Sequence[memoryview]) -> int:
        iov, _keep = _iovs(parts)
        rc = self.lib.kvh_get(self.handle, flat_name(key).encode(), iov, len(parts))
        if rc == -1:
            raise ObjectMissing(flat_name(key))
        if rc < 0:
            raise L2Error(f"kvh_get returned {rc}")
        return int(rc)

    def exists(self, key: ObjectKey) -> bool:
        rc = self.lib.kvh_exists(self.handle, flat_name(key).encode())
        if rc < 0:
            raise L2Error(f"kvh_exists returned {rc}")
        return rc == 1

    def delete(self, key: ObjectKey) -> bool:
        rc = self.lib.kvh_delete(self.handle, flat_name(key).encode())
        if rc < 0:
            raise L2Error(f"kvh_delete returned {rc}")
        return rc == 1

    def status(self) -> dict[str, Any]:
        return {"library_path": self.path, "abi": ABI_VERSION}

    def close(self) -> None:
        if self.handle:
            self.lib.kvh_close(self.handle)
            self.handle = None


def build(cfg: NativePluginAdapterConfig) -> L2Adapter:
    assert cfg.library_path is not None  # the record requires it
    store = NativeStore(cfg.library_path, dict(cfg.adapter_params))
    return PooledAdapter(store, workers=cfg.num_workers, integrity=cfg.integrity, name=cfg.label)
