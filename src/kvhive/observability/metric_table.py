"""The event-fed Prometheus metrics as data: one :class:`MetricSpec` per metric.

Names are the reference's exposition names without the ``_total`` suffix that
prometheus_client adds to counters (OTel ``lmcache_mp.l1_read`` with unit ``chunks`` →
``lmcache_mp_l1_read_chunks`` → ``lmcache_mp_l1_read_chunks_total``).  ``unit`` records the
unit the name already ends with; it is checked, never appended, so the exposition (classic
and OpenMetrics) is exactly the names written here.  :data:`METRICS` is in registration
order, which is the order of the exposition.

The spec constants are also the handles the subscriber uses (``metrics[L1_READ]``); they
compare and hash by identity, so a lookup costs one pointer hash.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client import CollectorRegistry, Counter, Histogram

DEFAULT_BUCKETS = (0, 5, 10, 25, 50, 75, 100, 250, 500, 750, 1000, 2500, 5000, 7500, 10000)
LIFECYCLE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)

MetricKind = Literal["counter", "histogram"]


@dataclass(frozen=True, slots=True, eq=False)
class MetricSpec:
    """One metric: exposition ``name`` (counters without ``_total``), ``kind``, ``help``
    text, label names in order, histogram ``buckets`` and the ``unit`` the name ends with."""

    name: str
    kind: MetricKind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    unit: str = ""

    def __post_init__(self) -> None:
        if self.unit and not self.name.endswith("_" + self.unit):
            raise ValueError(f"metric {self.name} does not end with its unit {self.unit}")
        if (self.kind == "histogram") != bool(self.buckets):
            raise ValueError(f"metric {self.name}: buckets are for histograms only")


def _c(name: str, help: str, labels: tuple[str, ...] = (), unit: str = "") -> MetricSpec:
    return MetricSpec(name, "counter", help, labels, (), unit)


def _h(
    name: str, help: str, labels: tuple[str, ...], buckets: tuple[float, ...], unit: str
) -> MetricSpec:
    return MetricSpec(name, "histogram", help, labels, buckets, unit)


_SALT_TAG = ("cache_salt", "l1_tag")
_TAG = ("l1_tag",)
_ML = ("model_name", "cache_salt")
_DEV = ("device",)
_TP = ("device", "engine_id", "model_name")
_L2 = ("l2_name",)
_GBPS = "GB_per_second"

# -- L1 ------------------------------------------------------------------------------------
L1_READ = _c("lmcache_mp_l1_read_chunks", "Chunks read from L1.", _SALT_TAG, "chunks")
L1_WRITE = _c("lmcache_mp_l1_write_chunks", "Chunks written to L1.", _SALT_TAG, "chunks")
L1_EVICTED = _c("lmcache_mp_l1_evicted_chunks", "Chunks removed from L1.", _SALT_TAG, "chunks")
TICKS = _c("lmcache_mp_l1_eviction_loop_ticks", "L1 eviction loop ticks.", (), "ticks")
TRIGGERED = _c("lmcache_mp_l1_eviction_loop_triggered", "L1 eviction ticks that evicted.")
ALLOC_FAIL = _c("lmcache_mp_l1_allocation_failure_chunks", "Chunks L1 could not allocate.",
                ("during", "model_name"), "chunks")  # fmt: skip
READ_FAIL = _c("lmcache_mp_l1_read_failure_chunks", "Chunks L1 could not serve.",
               ("during", "reason", "model_name"), "chunks")  # fmt: skip
LIFETIME = _h("lmcache_mp_l1_chunk_lifetime_seconds", "Sampled chunk lifetime in L1.", _TAG,
              LIFECYCLE_BUCKETS, "seconds")  # fmt: skip
IDLE = _h("lmcache_mp_l1_chunk_idle_before_evict_seconds", "Sampled idle time before eviction.",
          _TAG, LIFECYCLE_BUCKETS, "seconds")  # fmt: skip
REUSE_GAP = _h("lmcache_mp_l1_chunk_reuse_gap_seconds", "Sampled time between two touches.",
               _TAG, LIFECYCLE_BUCKETS, "seconds")  # fmt: skip
EVICT_REUSE = _h("lmcache_mp_l1_chunk_evict_reuse_gap_seconds",
                 "Sampled time from eviction to the next write (capped at 300 s).", _TAG,
                 LIFECYCLE_BUCKETS, "seconds")  # fmt: skip
# -- lookups -------------------------------------------------------------------------------
REQUESTED = _c("lmcache_mp_lookup_requested_tokens", "Tokens looked up.", _ML, "tokens")
HIT = _c("lmcache_mp_lookup_hit_tokens", "Tokens found.", _ML, "tokens")
HIT_L1 = _c("lmcache_mp_lookup_hit_l1_tokens", "Tokens found in L1.", _ML, "tokens")
HIT_L2 = _c("lmcache_mp_lookup_hit_l2_tokens", "Tokens found in L2.", _ML, "tokens")
HIT_L1_KEYS = _c("lmcache_mp_lookup_hit_l1_keys", "Keys found in L1.", _ML, "keys")
HIT_L2_KEYS = _c("lmcache_mp_lookup_hit_l2_keys", "Keys found in L2.", _ML, "keys")
LOOKUPS = _c("lmcache_mp_lookups_requests", "Lookups.", _ML, "requests")
EARLY_EXIT = _c("lmcache_mp_lookup_early_exit_requests", "Lookups that exited early.",
                (*_ML, "reason"), "requests")  # fmt: skip
# -- transfers -----------------------------------------------------------------------------
SUB_STORES = _c("lmcache_mp_num_submitted_stores", "Stores submitted.", _DEV)
FIN_STORES = _c("lmcache_mp_num_finished_stores", "Stores finished.", _DEV)
SUB_RETRIEVES = _c("lmcache_mp_num_submitted_retrieves", "Retrieves submitted.", _DEV)
FIN_RETRIEVES = _c("lmcache_mp_num_finished_retrieves", "Retrieves finished.", _DEV)
STORE_TP = _h("lmcache_mp_l0_l1_store_throughput_GB_per_second", "Engine → L1 copy throughput.",
              _TP, DEFAULT_BUCKETS, _GBPS)  # fmt: skip
LOAD_TP = _h("lmcache_mp_l0_l1_load_throughput_GB_per_second", "L1 → engine copy throughput.",
             _TP, DEFAULT_BUCKETS, _GBPS)  # fmt: skip
CHUNKS_LOADED = _c("lmcache_mp_num_chunks_loaded", "Chunks retrieved into engines.",
                   ("worker_id", "model_name", "cache_salt"))  # fmt: skip
STORED_BYTES = _c("kvhive_stored_bytes", "Bytes copied from engines into L1.", _DEV, "bytes")
RETRIEVED_BYTES = _c("kvhive_retrieved_bytes", "Bytes copied from L1 to engines.", _DEV, "bytes")
# -- L2 ------------------------------------------------------------------------------------
L2_SUB = _c("lmcache_mp_l2_store_submitted_requests", "L2 store tasks submitted.", (),
            "requests")  # fmt: skip
L2_SUB_OBJ = _c("lmcache_mp_l2_store_submitted_objects_chunks", "Chunks submitted to L2.", _L2,
                "chunks")  # fmt: skip
L2_DONE = _c("lmcache_mp_l2_store_completed_requests", "L2 store tasks completed.", _L2,
             "requests")  # fmt: skip
L2_DONE_OBJ = _c("lmcache_mp_l2_store_completed_objects_chunks", "Chunks stored in L2.", _L2,
                 "chunks")  # fmt: skip
L2_LOAD_DONE = _c("lmcache_mp_l2_load_completed_requests", "L2 load tasks completed.", _L2,
                  "requests")  # fmt: skip
L2_LOADED = _c("lmcache_mp_l2_prefetch_load_completed_chunks", "Chunks loaded from L2.", _L2,
               "chunks")  # fmt: skip
L2_EVICTED = _c("lmcache_mp_l2_evicted_objects_chunks", "Chunks evicted from L2.", (), "chunks")
L2_PF_FAIL = _c("lmcache_mp_l2_prefetch_failure_chunks", "Chunks an L2 prefetch could not load.",
                ("reason", "model_name"), "chunks")  # fmt: skip
L2_FAILURES = _c("kvhive_l2_failures", "Failed L2 chunk operations.", ("l2_name", "op"))
PF_TIMEOUTS = _c("kvhive_prefetch_timeouts", "L2 prefetches that ran out of time.")
L2_STORE_TP = _h("lmcache_mp_l2_store_throughput_GB_per_second", "L1 → L2 throughput.", _L2,
                 DEFAULT_BUCKETS, _GBPS)  # fmt: skip
L2_LOAD_TP = _h("lmcache_mp_l2_load_throughput_GB_per_second", "L2 → L1 throughput.", _L2,
                DEFAULT_BUCKETS, _GBPS)  # fmt: skip
TIMEOUTS = _c("lmcache_mp_timeouts", "Timeouts raised.", ("exception_type",))

METRICS: tuple[MetricSpec, ...] = (
    L1_READ, L1_WRITE, L1_EVICTED, TICKS, TRIGGERED, ALLOC_FAIL, READ_FAIL,
    LIFETIME, IDLE, REUSE_GAP, EVICT_REUSE,
    REQUESTED, HIT, HIT_L1, HIT_L2, HIT_L1_KEYS, HIT_L2_KEYS, LOOKUPS, EARLY_EXIT,
    SUB_STORES, FIN_STORES, SUB_RETRIEVES, FIN_RETRIEVES, STORE_TP, LOAD_TP, CHUNKS_LOADED,
    STORED_BYTES, RETRIEVED_BYTES,
    L2_SUB, L2_SUB_OBJ, L2_DONE, L2_DONE_OBJ, L2_LOAD_DONE, L2_LOADED, L2_EVICTED, L2_PF_FAIL,
    L2_FAILURES, PF_TIMEOUTS, L2_STORE_TP, L2_LOAD_TP, TIMEOUTS,
)  # fmt: skip
"""Every event-fed metric, in registration (= exposition) order."""


def build_metrics(
    registry: CollectorRegistry, specs: tuple[MetricSpec, ...] = METRICS
) -> Mapping[MetricSpec, Counter | Histogram]:
    """Create and register one prometheus_client metric per spec (in order); returns them
    by spec.  Raises ValueError (prometheus_client) when a name is already registered."""
    built: dict[MetricSpec, Counter | Histogram] = {}
    for spec in specs:
        if spec.kind == "counter":
            built[spec] = Counter(spec.name, spec.help, list(spec.labels), registry=registry)
        else:
            built[spec] = Histogram(
                spec.name, spec.help, list(spec.labels), registry=registry,
                buckets=list(spec.buckets),
            )  # fmt: skip
    return built
