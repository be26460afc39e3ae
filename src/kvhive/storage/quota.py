"""Per-cache_salt byte limits (the quota registry behind ``/quota``).

Semantics follow the reference whitelist rule where a policy enforces quotas: a salt that was
never registered has no entry (``get`` returns None) and consumers treat it as a limit of 0.
Quotas never block writes; they only steer isolated eviction (see ``l1/manager.py``).

Thread-safe: HTTP handlers write while the eviction thread reads.
"""

from __future__ import annotations

import threading


class QuotaRegistry:
    """Thread-safe map ``cache_salt -> limit in bytes``."""

    __slots__ = ("_lock", "_limits")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._limits: dict[str, int] = {}

    def set(self, salt: str, limit_bytes: int) -> None:
        """Register or replace the limit of ``salt``; negative limits raise ValueError."""
        if limit_bytes < 0:
            raise ValueError(f"quota limit must be non-negative, got {limit_bytes}")
        with self._lock:
            self._limits[salt] = int(limit_bytes)

    def get(self, salt: str) -> int | None:
        """The limit in bytes, or None when ``salt`` has no registered quota."""
        with self._lock:
            return self._limits.get(salt)

    def delete(self, salt: str) -> bool:
        """Remove the quota of ``salt``; False when there was none."""
        with self._lock:
            return self._limits.pop(salt, None) is not None

    def items(self) -> dict[str, int]:
        """A snapshot copy of every registered ``salt -> limit_bytes``."""
        with self._lock:
            return dict(self._limits)

    def __len__(self) -> int:
        with self._lock:
            return len(self._limits)
