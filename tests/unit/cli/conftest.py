"""The CLI configures the process-wide 'kvhive' logger; put it back after every test."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def _restore_kvhive_logger(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name in ("KVHIVE_LOG_LEVEL", "LMCACHE_LOG_LEVEL", "PYTHONHASHSEED"):
        monkeypatch.delenv(name, raising=False)
    logger = logging.getLogger("kvhive")
    level, handlers, propagate = logger.level, list(logger.handlers), logger.propagate
    yield
    logger.setLevel(level)
    logger.handlers[:] = handlers
    logger.propagate = propagate
