"""Every environment variable kvhive reads, declared once with its type and default.

Read them as attributes (``envs.KVHIVE_LOG_LEVEL``); each access reads the live environment,
so tests can set variables with ``monkeypatch.setenv``.  No other module calls ``os.environ``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

T = TypeVar("T")


@dataclass(frozen=True)
class EnvVar(Generic[T]):
    """One environment variable: its name, parsed type, default and meaning."""

    name: str
    default: T
    parse: Callable[[str], T]
    doc: str

    def get(self) -> T:
        raw = os.environ.get(self.name)
        return self.default if raw is None else self.parse(raw)


def _optional_str(raw: str) -> str | None:
    return raw


def _log_level(raw: str) -> str | None:
    # An empty value counts as unset, so `KVHIVE_LOG_LEVEL= kvhive server` falls through.
    return raw.strip().upper() or None


ENV_VARS: dict[str, EnvVar[Any]] = {
    var.name: var
    for var in (
        EnvVar(
            "KVHIVE_LOG_LEVEL",
            None,
            _log_level,
            "Level of the 'kvhive' loggers (DEBUG, INFO, WARNING, ERROR, CRITICAL); wins over "
            "LMCACHE_LOG_LEVEL.",
        ),
        EnvVar(
            "LMCACHE_LOG_LEVEL",
            None,
            _log_level,
            "The reference's log-level variable, honoured when KVHIVE_LOG_LEVEL is unset.",
        ),
        *(
            EnvVar(
                f"LMCACHE_RESP_{what}",
                None,
                _optional_str,
                f"resp L2 adapter {what.lower()} used when the adapter JSON leaves it empty.",
            )
            for what in ("HOST", "PORT", "USERNAME", "PASSWORD")
        ),
        *(
            EnvVar(
                name,
                None,
                _optional_str,
                f"HTTP API {what} (as in lmcache 0.5.7; see --api-key-file){legacy}.",
            )
            for name, what, legacy in (
                ("LMCACHE_API_KEY", "key", ""),
                ("LMCACHE_API_KEY_FILE", "key file", ""),
                ("LMCACHE_HTTP_API_KEY", "key", ", legacy name read when LMCACHE_API_KEY is unset"),
                (
                    "LMCACHE_HTTP_API_KEY_FILE",
                    "key file",
                    ", legacy name read when LMCACHE_API_KEY_FILE is unset",
                ),
            )
        ),
        EnvVar(
            "PYTHONHASHSEED",
            None,
            _optional_str,
            "Default seed of the sha256_cbor NONE_HASH, as in vLLM (see --none-hash-seed).",
        ),
    )
}

if TYPE_CHECKING:  # declared for type checkers; values come from __getattr__
    KVHIVE_LOG_LEVEL: str | None
    LMCACHE_LOG_LEVEL: str | None
    PYTHONHASHSEED: str | None
    LMCACHE_RESP_HOST: str | None
    LMCACHE_RESP_PORT: str | None
    LMCACHE_RESP_USERNAME: str | None
    LMCACHE_RESP_PASSWORD: str | None
    LMCACHE_API_KEY: str | None
    LMCACHE_API_KEY_FILE: str | None
    LMCACHE_HTTP_API_KEY: str | None
    LMCACHE_HTTP_API_KEY_FILE: str | None


def __getattr__(name: str) -> Any:
    var = ENV_VARS.get(name)
    if var is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return var.get()


def __dir__() -> list[str]:
    return sorted([*globals(), *ENV_VARS])
