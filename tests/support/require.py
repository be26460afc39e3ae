"""What a test does when a service it needs is missing: skip, or fail in CI.

``KVHIVE_REQUIRE_SERVICES=1`` (set by ``.ci/run``) turns the skip into a failure, so CI never
passes by skipping the real-backend tests.
"""

from __future__ import annotations

import os

import pytest


def services_required() -> bool:
    return os.environ.get("KVHIVE_REQUIRE_SERVICES", "").strip().lower() in ("1", "true", "yes")


def unavailable(reason: str) -> None:
    """Skip with ``reason``, or fail under ``KVHIVE_REQUIRE_SERVICES=1`` (CI)."""
    if services_required():
        pytest.fail(f"KVHIVE_REQUIRE_SERVICES=1 but {reason}", pytrace=False)
    pytest.skip(reason)
