"""Seed flags whose features belong to later work: accepted by the parser, then rejected.

The parser knows their arity, so a full ``lmcache server`` command line parses and the operator
gets one clear "--X is not supported yet" instead of "unrecognized arguments".  Enabling a
feature later means deleting its rows here and declaring the real field in its section.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvhive.errors import ConfigError


@dataclass(frozen=True)
class DeferredFlag:
    """A recognised but not yet supported flag."""

    flag: str
    feature: str
    help: str
    argparse_kwargs: dict[str, Any] = field(default_factory=dict)
    """How argparse consumes the flag (arity only); values are never interpreted."""


_SWITCH = {"action": "store_true"}


def _value(metavar: str) -> dict[str, Any]:
    return {"metavar": metavar}


# One row per flag.  Feature names group the rows in --help.
# fmt: off
DEFERRED_FLAGS: tuple[DeferredFlag, ...] = (
)
# fmt: on

# Values of supported flags whose feature is not there yet: (flag, value) -> feature.
DEFERRED_VALUES: dict[tuple[str, Any], str] = {
    ("--engine-type", "blend"): "CacheBlend engine",
}


def dest_of(deferred: DeferredFlag) -> str:
    """The argparse destination of a deferred flag (never clashes with a section field)."""
    return "deferred." + deferred.flag.lstrip("-")


def check_deferred_value(flag: str, value: Any) -> None:
    """Reject a supported flag's value whose feature is deferred (e.g. ``--engine-type blend``)."""
    try:
        deferred = (flag, value) in DEFERRED_VALUES
    except TypeError:  # unhashable value: cannot be a deferred one
        return
    if deferred:
        raise ConfigError(flag, f"{value} is not supported yet")
