"""Observability, lookup-hash logging, runtime-plugin and HTTP-admin sections.

Flag names and defaults follow ``lmcache server`` (seed: "observability", "lookup hash
logging", "runtime plugins"); ``--http-api-token`` and ``--health-copy-deadline-seconds`` are
kvhive's own.  Construction validates without I/O; the plugin JSON is parsed here so that a bad
value exits 2 with the flag named.
"""

from __future__ import annotations

import importlib.util
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, ClassVar

from kvhive.config.fields import PORT, at_least, flag_field, flag_of, positive, validate_fields
from kvhive.errors import ConfigError


def _sample_rate(v: float) -> str | None:
    return None if 0 < v <= 1 else "must be in (0, 1]"


def _otlp_endpoint(v: str) -> str | None:
    return None if v.strip() else "must not be empty"


TRACING_MODULES = ("opentelemetry.sdk", "opentelemetry.exporter.otlp.proto.grpc")
"""What ``--enable-tracing`` needs installed (the ``tracing`` extra)."""


@dataclass(frozen=True)
class ObservabilityConfig:
    """Event bus, metrics, logging subscribers and tracing."""

    TITLE: ClassVar[str] = "Observability"

    disable_observability: bool = flag_field(
        "--disable-observability",
        default=False,
        help="Master switch: no event bus, hence no metrics, logging, tracing or lookup-hash log.",
    )
    disable_metrics: bool = flag_field(
        "--disable-metrics",
        default=False,
        help="Skip the metrics subscribers (/metrics then shows only process collectors).",
    )
    disable_logging: bool = flag_field(
        "--disable-logging", default=False, help="Skip the logging subscribers."
    )
    enable_tracing: bool = flag_field(
        "--enable-tracing",
        default=False,
        help="Export request/lookup/store/retrieve spans over OTLP gRPC; needs --otlp-endpoint "
        "and the 'tracing' extra.",
    )
    event_bus_queue_size: int = flag_field(
        "--event-bus-queue-size",
        default=10000,
        check=at_least(1),
        help="Events the bus queues before it drops new ones (tail drop, counted and warned).",
    )
    otlp_endpoint: str | None = flag_field(
        "--otlp-endpoint",
        default=None,
        check=_otlp_endpoint,
        default_text="none",
        help="OTLP gRPC endpoint (e.g. http://localhost:4317) that receives the traces.",
    )
    prometheus_port: int = flag_field(
        "--prometheus-port",
        default=9090,
        check=PORT,
        help="Port of a standalone Prometheus /metrics listener (also served on the HTTP port); "
        "a port in use is a warning.",
    )
    metrics_sample_rate: float = flag_field(
        "--metrics-sample-rate",
        default=0.01,
        check=_sample_rate,
        help="Share of chunks tracked by the per-chunk lifecycle histograms; counters count "
        "every event.",
    )
    service_instance_id: str | None = flag_field(
        "--service-instance-id",
        default=None,
        default_text="a random UUID4",
        aliases=("--instance-id",),
        help="OTel service.instance.id of this server, on every span, in target_info and in "
        "/status; an explicit empty string is kept.  --instance-id is the reference's name.",
    )
    enable_gc_monitor: bool = flag_field(
        "--enable-gc-monitor",
        default=False,
        help="Time every garbage collection and log the slow ones at INFO.",
    )
    gc_monitor_min_pause_ms: float = flag_field(
        "--gc-monitor-min-pause-ms",
        default=1.0,
        check=at_least(0),
        help="Collections shorter than this (milliseconds) are not logged; 0 logs every one.",
    )
    gc_monitor_top_objects: int = flag_field(
        "--gc-monitor-top-objects",
        default=0,
        check=at_least(0),
        help="Add the N most common object types of the collected generation to each logged "
        "collection (walks the generation: costly on a big cache; 0 = off).",
    )
    enable_extra_logging: bool = flag_field(
        "--enable-extra-logging",
        default=False,
        help="Log stored/retrieved chunks (and their rate) and L1 usage every "
        "--extra-logging-interval seconds.",
    )
    extra_logging_interval: float = flag_field(
        "--extra-logging-interval",
        default=10.0,
        check=positive,
        help="Seconds between extra-logging lines (at least 1 s apart, as in the reference).",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.enable_tracing and not self.disable_observability:
            if self.otlp_endpoint is None:
                raise ConfigError(
                    flag_of(ObservabilityConfig, "enable_tracing"), "requires --otlp-endpoint"
                )
            missing = [m for m in TRACING_MODULES if not _importable(m)]
            if missing:
                raise ConfigError(
                    flag_of(ObservabilityConfig, "enable_tracing"),
                    f"needs the 'tracing' extra (pip install 'kvhive[tracing]'); missing "
                    f"{', '.join(missing)}",
                )

    def resolved_instance_id(self) -> str:
        """The configured id (an explicit "" included), else a fresh UUID4 (call once)."""
        if self.service_instance_id is not None:
            return self.service_instance_id
        return str(uuid.uuid4())

    @property
    def bus_enabled(self) -> bool:
        return not self.disable_observability

    @property
    def metrics_enabled(self) -> bool:
        return self.bus_enabled and not self.disable_metrics

    @property
    def logging_enabled(self) -> bool:
        return self.bus_enabled and not self.disable_logging

    @property
    def tracing_enabled(self) -> bool:
        return self.bus_enabled and self.enable_tracing


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class LookupHashLogConfig:
    """JSONL log of every lookup's chunk hashes (for offline cache simulation); off by default."""

    TITLE: ClassVar[str] = "Lookup-hash logging"

    dir: str = flag_field(
        "--lookup-hash-log-dir",
        default="",
        help="Directory of the lookup_hashes_*.jsonl files; empty disables the log.",
    )
    rotation_interval: int = flag_field(
        "--lookup-hash-log-rotation-interval",
        default=21600,
        check=at_least(1),
        help="Seconds after which a new file is started.",
    )
    rotation_max_size: int = flag_field(
        "--lookup-hash-log-rotation-max-size",
        default=104857600,
        check=at_least(1),
        help="Bytes a file may hold before a new one is started.",
    )
    max_files: int = flag_field(
        "--lookup-hash-log-max-files",
        default=100,
        check=at_least(1),
        help="Files kept; the oldest are deleted beyond this count.",
    )

    def __post_init__(self) -> None:
        validate_fields(self)

    @property
    def enabled(self) -> bool:
        return bool(self.dir)


@dataclass(frozen=True)
class RuntimePluginConfig:
    """Scripts started and stopped with the server (.py: server's interpreter, .sh: bash)."""

    TITLE: ClassVar[str] = "Runtime plugins"

    locations: tuple[str, ...] = flag_field(
        "--runtime-plugin-locations",
        default=(),
        help="Plugin files or directories (searched recursively for *.py, then *.sh).",
    )
    config: str = flag_field(
        "--runtime-plugin-config",
        default="{}",
        help="JSON object handed to plugins in LMCACHE_RUNTIME_PLUGIN_EXTRA_CONFIG (and as "
        "runtime_plugin_extra_config inside LMCACHE_RUNTIME_PLUGIN_CONFIG).",
    )
    stop_grace_seconds: float = flag_field(
        "--runtime-plugin-stop-grace-seconds",
        default=5.0,
        check=positive,
        help="kvhive only: seconds between SIGTERM and SIGKILL when plugins are stopped.",
    )
    extra: dict[str, Any] = field(default_factory=dict, init=False, compare=False)
    """``config`` parsed (filled at construction)."""

    def __post_init__(self) -> None:
        validate_fields(self)
        flag = flag_of(RuntimePluginConfig, "config")
        try:
            extra = json.loads(self.config)
        except ValueError as exc:
            raise ConfigError(flag, f"must be valid JSON ({exc})") from None
        if not isinstance(extra, dict):
            raise ConfigError(flag, f"must be a JSON object (got {self.config!r})")
        object.__setattr__(self, "extra", extra)


@dataclass(frozen=True)
class HTTPAdminConfig:
    """Protection and health rules of the HTTP admin API."""

    TITLE: ClassVar[str] = "HTTP admin API"

    api_token: str = flag_field(
        "--http-api-token",
        default="",
        help="kvhive only: when set, mutating endpoints (POST/PUT/DELETE, /loglevel changes) "
        "require 'Authorization: Bearer TOKEN'; empty leaves the API open.",
    )
    api_key_files: tuple[str, ...] = flag_field(
        "--api-key-file",
        default=(),
        repeat=True,
        metavar="PATH",
        aliases=("--http-api-key-file",),
        help="A file holding one API key (one line); repeatable (key rotation).  With any key "
        "(also from $LMCACHE_API_KEY_FILE / $LMCACHE_API_KEY, or the legacy "
        "$LMCACHE_HTTP_API_KEY_FILE / $LMCACHE_HTTP_API_KEY), every HTTP path but / and "
        "/healthcheck needs 'Authorization: Bearer KEY' or 'X-LMCache-API-Key: KEY'.",
    )
    health_copy_deadline_seconds: float = flag_field(
        "--health-copy-deadline-seconds",
        default=60.0,
        check=positive,
        help="kvhive only: a store/retrieve copy or L2 load running longer than this makes "
        "/healthcheck report unhealthy (a stuck data path).",
    )

    def __post_init__(self) -> None:
        validate_fields(self)

    def to_dict(self) -> dict[str, Any]:
        """The /config view: the token is never shown, only whether one is set."""
        return {
            "api_token": "***" if self.api_token else "",
            "api_key_files": list(self.api_key_files),
            "health_copy_deadline_seconds": self.health_copy_deadline_seconds,
        }
