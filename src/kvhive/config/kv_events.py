"""KV events for routers: L2 (STORAGE) records and kvhive's own vLLM-format publisher.

All kvhive's own (docs/kv-events.md).  Construction validates the values without I/O; an
endpoint that cannot be bound is found when the server starts (exit 2 naming the flag).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from kvhive.config.fields import at_least, flag_field, flag_of, validate_fields
from kvhive.errors import ConfigError

EventLayout = Literal["map", "array"]

_SCHEMES = ("tcp://", "ipc://")


def _endpoint(v: str) -> str | None:
    if not v.startswith(_SCHEMES) or len(v) <= len("tcp://"):
        return "must be tcp://HOST:PORT (or ipc://PATH)"
    if v.startswith("tcp://") and ":" not in v[len("tcp://") :]:
        return "must be tcp://HOST:PORT (or ipc://PATH)"
    return None


def _topic(v: str) -> str | None:
    return "must not contain NUL" if "\x00" in v else None


@dataclass(frozen=True)
class KVEventsConfig:
    """L2 KV-event records and the direct publisher (kvhive's own flags)."""

    TITLE: ClassVar[str] = "KV events"

    kv_events_l2: bool = flag_field(
        "--kv-events-l2",
        default=False,
        help="Also record L2 changes as KV events with medium STORAGE: stores, evictions, "
        "objects found gone, and objects another node wrote to a shared tier that a lookup "
        "discovered.",
    )
    kv_events_endpoint: str | None = flag_field(
        "--kv-events-endpoint",
        default=None,
        check=_endpoint,
        default_text="none",
        metavar="tcp://HOST:PORT",
        help="Bind a ZMQ PUB socket here and publish vLLM-format KV event batches "
        "([topic, seq, msgpack(KVEventBatch)]) for KV-aware routers; e.g. "
        "tcp://127.0.0.1:5557 (a port of * picks a free one, see /status).",
    )
    kv_events_replay_endpoint: str | None = flag_field(
        "--kv-events-replay-endpoint",
        default=None,
        check=_endpoint,
        default_text="none",
        metavar="tcp://HOST:PORT",
        help="Bind a ZMQ ROUTER here answering replay requests ([b'', start seq]) from the "
        "buffered batches, as vLLM's publisher does; needs --kv-events-endpoint.",
    )
    kv_events_topic: str = flag_field(
        "--kv-events-topic",
        default="",
        check=_topic,
        help="Topic frame of every message; {model} is replaced by the batch's model name "
        "(one batch per model then), e.g. kv@pod-1@{model} as llm-d uses.",
    )
    kv_events_buffer_steps: int = flag_field(
        "--kv-events-buffer-steps",
        default=10000,
        check=at_least(0),
        help="Published batches kept for replay (vLLM's buffer_steps).",
    )
    kv_events_hwm: int = flag_field(
        "--kv-events-hwm",
        default=100000,
        check=at_least(1),
        help="ZMQ high-water mark of the PUB socket: messages queued per subscriber before "
        "a slow subscriber loses new ones (a sequence gap it can replay).",
    )
    kv_events_layout: EventLayout = flag_field(
        "--kv-events-layout",
        default="map",
        help="Event encoding: map (tagged maps, as vLLM 0.32 sends) or array (array_like "
        "events, for subscribers built on older vLLM's structs).",
    )

    def __post_init__(self) -> None:
        validate_fields(self)
        if self.kv_events_replay_endpoint and not self.kv_events_endpoint:
            raise ConfigError(
                flag_of(KVEventsConfig, "kv_events_replay_endpoint"),
                "needs --kv-events-endpoint",
            )
        if (
            self.kv_events_replay_endpoint is not None
            and self.kv_events_replay_endpoint == self.kv_events_endpoint
            and not self.kv_events_endpoint.endswith(":*")  # a wildcard port picks two
        ):
            raise ConfigError(
                flag_of(KVEventsConfig, "kv_events_replay_endpoint"),
                "must differ from --kv-events-endpoint",
            )

    @property
    def publishing(self) -> bool:
        return self.kv_events_endpoint is not None
