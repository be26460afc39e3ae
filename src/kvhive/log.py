"""Logging set-up for the ``kvhive`` logger tree (called once by the CLI)."""

from __future__ import annotations

import logging
import sys

from kvhive import envs

LOGGER_NAME = "kvhive"
LEVELS: dict[str, int] = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "WARN": logging.WARNING,
    "ERROR": logging.ERROR,
    "CRITICAL": logging.CRITICAL,
}
DEFAULT_LEVEL = logging.INFO
FORMAT = "[%(asctime)s] kvhive %(levelname)s: %(message)s (%(filename)s:%(lineno)d:%(name)s)"


class _StderrHandler(logging.StreamHandler):
    """Writes to the *current* sys.stderr, so a replaced stderr (tests, daemons) is honoured."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> object:
        return sys.stderr

    @stream.setter
    def stream(self, _value: object) -> None:
        pass


def resolve_log_level() -> tuple[int, str | None]:
    """Level from KVHIVE_LOG_LEVEL, else LMCACHE_LOG_LEVEL, else INFO.

    Returns the level and, when the chosen variable held an unknown name, a complaint to log.
    """
    for name in ("KVHIVE_LOG_LEVEL", "LMCACHE_LOG_LEVEL"):
        value = getattr(envs, name)
        if value is not None:
            if value in LEVELS:
                return LEVELS[value], None
            return DEFAULT_LEVEL, f"{name}={value!r} is not a log level; using INFO"
    return DEFAULT_LEVEL, None


def configure_logging() -> logging.Logger:
    """Set the 'kvhive' logger's level from the environment and give it one stderr handler.

    Idempotent.  The logger keeps propagating so that embedding applications and pytest's
    caplog still see its records.
    """
    logger = logging.getLogger(LOGGER_NAME)
    level, complaint = resolve_log_level()
    logger.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
    if complaint:
        logger.warning(complaint)
    return logger
