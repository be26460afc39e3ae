"""Flags of ``lmcache server`` that kvhive accepts and that change nothing in kvhive.

Each is a knob of a feature kvhive does not have (gRPC, P2P, GDS and DAX L1, the coordinator,
CacheBlend, /run_script): in the reference, too, it does nothing unless that feature is on,
and the flag that turns the feature on is refused (:mod:`kvhive.config.deferred`).  So a
command line written for ``lmcache server`` starts kvhive unchanged.  Values are still
checked as the reference checks them, and the server logs each one given (``notes``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar, Literal

from kvhive.config.fields import at_least, flag_field, positive, section_fields, validate_fields

GdsBackend = Literal["auto", "cufile", "hipfile", "mufile", "phx", "ugds"]

_GRPC = "no effect: only used by --transport grpc, which kvhive refuses."
_BLEND = "no effect: --engine-type blend only (refused); the default engine ignores it, as in the reference."
_P2P = "no effect: P2P transfer is off without --p2p-advertise-url, which kvhive refuses."
_GDS = "no effect: GDS L1 only (--gds-l1-path, refused)."
_COORD = "no effect: coordinator only (--coordinator-url, refused)."


def _policy(v: str) -> str | None:
    if v == "DEFAULT" or (":" in v and all(v.partition(":")[::2])):
        return None
    return "must be DEFAULT or 'package.module:ClassName'"


@dataclass(frozen=True)
class CompatConfig:
    """Flags accepted for command-line compatibility with `lmcache server`; each changes nothing in kvhive (see its help)."""

    TITLE: ClassVar[str] = "Accepted for compatibility (no effect)"

    grpc_server_workers: int = flag_field(
        "--grpc-server-workers", default=32, check=at_least(1), help=_GRPC
    )
    grpc_server_mode: Literal["sync", "aio", "native"] = flag_field(
        "--grpc-server-mode", default="sync", help=_GRPC
    )
    disable_grpc_metrics: bool = flag_field("--disable-grpc-metrics", default=False, help=_GRPC)
    isolated_ipc: bool = flag_field(
        "--isolated-ipc",
        default=False,
        help="no effect: it changes only CUDA IPC (timeline-semaphore events instead of "
        "interprocess event handles); kvhive serves CUDA workers' interprocess event handles and "
        "answers a store/retrieve carrying a timeline-semaphore event (an isolated_ipc worker) "
        "with its soft failure, logged naming isolated_ipc.",
    )
    script_allowed_imports: tuple[str, ...] = flag_field(
        "--script-allowed-imports",
        default=(),
        metavar="MODULE",
        help="no effect: kvhive has no /run_script endpoint (--run-script-api-enabled is refused).",
    )
    enable_segmented_prefix: bool = flag_field(
        "--enable-segmented-prefix", default=False, help=_BLEND
    )
    enable_dedup_content: bool = flag_field("--enable-dedup-content", default=False, help=_BLEND)
    enable_blend_reorder: bool = flag_field("--enable-blend-reorder", default=False, help=_BLEND)
    p2p_listen_url: str = flag_field("--p2p-listen-url", default="", help=_P2P)
    p2p_lookup_timeout: float = flag_field(
        "--p2p-lookup-timeout", default=30.0, check=positive, help=_P2P
    )
    p2p_load_timeout: float = flag_field(
        "--p2p-load-timeout", default=30.0, check=positive, help=_P2P
    )
    p2p_transfer_engine: str = flag_field("--p2p-transfer-engine", default="nixl", help=_P2P)
    gds_l1_use_direct_io: bool = flag_field("--gds-l1-use-direct-io", default=True, help=_GDS)
    gds_l1_backend: GdsBackend = flag_field("--gds-l1-backend", default="auto", help=_GDS)
    l1_devdax_offset_gb: float = flag_field(
        "--l1-devdax-offset-gb",
        default=0.0,
        check=at_least(0),
        help="no effect: DAX L1 only (--l1-devdax-path, refused).",
    )
    periodic_notifier_interval_ms: int = flag_field(
        "--periodic-notifier-interval-ms",
        default=5,
        check=at_least(1),
        help="no effect: kvhive has no periodic notifier; L2 completions are handed on as "
        "they happen.",
    )
    trace_output: str | None = flag_field(
        "--trace-output",
        default=None,
        default_text="none",
        help="no effect: trace recording only (--trace-level, refused).",
    )
    kv_load_policy: str = flag_field(
        "--kv-load-policy",
        default="DEFAULT",
        check=_policy,
        help="accepted as DEFAULT: kvhive serves every lookup, as 0.5.6 did (the 0.5.7 "
        "lmcache.skip_load request hint is not read); custom classes are refused.",
    )
    coordinator_advertise_ip: str | None = flag_field(
        "--coordinator-advertise-ip", default=None, default_text="none", help=_COORD
    )
    coordinator_heartbeat_interval: float | None = flag_field(
        "--coordinator-heartbeat-interval",
        default=None,
        check=positive,
        default_text="none",
        help=_COORD,
    )
    coordinator_event_reporting: bool = flag_field(
        "--coordinator-event-reporting", default=False, help=_COORD
    )
    coordinator_event_flush_interval: float | None = flag_field(
        "--coordinator-event-flush-interval",
        default=None,
        check=positive,
        default_text="none",
        help=_COORD,
    )
    coordinator_event_transport: Literal["http", "kafka"] = flag_field(
        "--coordinator-event-transport", default="http", help=_COORD
    )
    coordinator_kafka_bootstrap_servers: str = flag_field(
        "--coordinator-kafka-bootstrap-servers", default="", help=_COORD
    )
    coordinator_kafka_topic: str = flag_field(
        "--coordinator-kafka-topic", default="lmcache-cache-events", help=_COORD
    )
    coordinator_kafka_delivery_timeout: float = flag_field(
        "--coordinator-kafka-delivery-timeout", default=300.0, check=positive, help=_COORD
    )
    coordinator_blend_timeout: float = flag_field(
        "--coordinator-blend-timeout", default=1.0, check=positive, help=_COORD
    )
    coordinator_blend_match_concurrency: int = flag_field(
        "--coordinator-blend-match-concurrency", default=8, check=at_least(1), help=_COORD
    )
    coordinator_l2_event_reporting: bool = flag_field(
        "--coordinator-l2-event-reporting", default=False, help=_COORD
    )
    coordinator_l2_event_flush_interval: float | None = flag_field(
        "--coordinator-l2-event-flush-interval",
        default=None,
        check=positive,
        default_text="none",
        help=_COORD,
    )

    def __post_init__(self) -> None:
        validate_fields(self)

    def notes(self) -> list[str]:
        """One line per flag set to something other than its default: ``--flag=value: why``
        (the server logs them at start, so an operator sees what kvhive ignores)."""
        out = []
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        cls: type = type(self)
        for info in section_fields(cls):
            value = getattr(self, info.name)
            if value != defaults[info.name]:
                out.append(f"{info.spec.flag}={value!r} accepted, {info.spec.help}")
        return out
