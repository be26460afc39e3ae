"""/loglevel: read or change logger levels at run time (the reference's shape)."""

from __future__ import annotations

import logging

from fastapi import APIRouter, HTTPException
from fastapi.responses import PlainTextResponse

from kvhive.log import LEVELS

router = APIRouter(tags=["process"])


@router.get("/loglevel", response_class=PlainTextResponse)
def loglevel(logger_name: str | None = None, level: str | None = None) -> PlainTextResponse:
    """No parameters: ``name: LEVEL`` per logger.  ``logger_name``: that logger's level.
    ``logger_name`` and ``level``: set the level on the logger and its handlers (400 if
    the level is unknown)."""
    if logger_name is None:
        if level is not None:
            raise HTTPException(400, "level needs logger_name")
        names = sorted(n for n in logging.root.manager.loggerDict if _is_logger(n))
        lines = [f"root: {logging.getLevelName(logging.root.level)}"]
        lines += [f"{n}: {logging.getLevelName(logging.getLogger(n).level)}" for n in names]
        return PlainTextResponse("\n".join(lines) + "\n")
    logger = logging.getLogger(logger_name) if logger_name != "root" else logging.root
    if level is None:
        return PlainTextResponse(f"{logger_name}: {logging.getLevelName(logger.level)}\n")
    value = LEVELS.get(level.strip().upper())
    if value is None:
        raise HTTPException(400, f"unknown level {level!r}; use one of {', '.join(LEVELS)}")
    logger.setLevel(value)
    for handler in logger.handlers:
        handler.setLevel(value)
    return PlainTextResponse(f"{logger_name}: {logging.getLevelName(value)}\n")


def _is_logger(name: str) -> bool:
    return isinstance(logging.root.manager.loggerDict.get(name), logging.Logger)
