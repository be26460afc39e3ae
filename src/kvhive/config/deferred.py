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
    # L2 policy / L2 adapters
    DeferredFlag("--l2-store-policy", "L2 storage", "L2 store policy (default, skip_l1).", _value("POLICY")),
    DeferredFlag("--l2-prefetch-policy", "L2 storage", "L2 prefetch policy (default, retain).", _value("POLICY")),
    DeferredFlag("--l2-prefetch-max-in-flight", "L2 storage", "Concurrent L2 prefetch requests.", _value("INT")),
    DeferredFlag("--l2-adapter", "L2 storage", "L2 adapter as a JSON object; repeatable.", {"metavar": "JSON", "action": "append"}),
    # observability
    DeferredFlag("--disable-observability", "observability", "Disable the event bus entirely.", _SWITCH),
    DeferredFlag("--disable-metrics", "observability", "Skip the metrics subscribers.", _SWITCH),
    DeferredFlag("--disable-logging", "observability", "Skip the logging subscribers.", _SWITCH),
    DeferredFlag("--enable-tracing", "observability", "Register the tracing subscriber.", _SWITCH),
    DeferredFlag("--event-bus-queue-size", "observability", "Event bus queue capacity.", _value("INT")),
    DeferredFlag("--otlp-endpoint", "observability", "OTLP gRPC endpoint for metrics and traces.", _value("URL")),
    DeferredFlag("--prometheus-port", "observability", "Port of the Prometheus /metrics endpoint.", _value("PORT")),
    DeferredFlag("--metrics-sample-rate", "observability", "Share of chunks tracked by lifecycle histograms.", _value("RATE")),
    DeferredFlag("--service-instance-id", "observability", "OTel service.instance.id of this server.", _value("ID")),
    # lookup-hash logging
    DeferredFlag("--lookup-hash-log-dir", "lookup-hash logging", "Directory of the lookup-hash JSONL log.", _value("DIR")),
    DeferredFlag("--lookup-hash-log-rotation-interval", "lookup-hash logging", "Seconds before the log rotates.", _value("SECONDS")),
    DeferredFlag("--lookup-hash-log-rotation-max-size", "lookup-hash logging", "Bytes before the log rotates.", _value("BYTES")),
    DeferredFlag("--lookup-hash-log-max-files", "lookup-hash logging", "Log files kept.", _value("INT")),
    # runtime plugins
    DeferredFlag("--runtime-plugin-locations", "runtime plugins", "Plugin scripts or directories.", {"metavar": "PATH", "nargs": "*"}),
    DeferredFlag("--runtime-plugin-config", "runtime plugins", "Extra plugin config as a JSON object.", _value("JSON")),
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
