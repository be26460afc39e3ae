"""Prometheus text exposition, parsed by ``prometheus_client``'s own parser."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

__all__ = ["Sample", "scrape", "value"]


def scrape(text: str) -> list[Sample]:
    """Every sample of a ``/metrics`` body (counters keep their ``_total`` sample name,
    histograms their ``_bucket``/``_count``/``_sum`` ones)."""
    return [s for family in text_string_to_metric_families(text) for s in family.samples]


def value(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels`` (0 when none)."""
    return float(
        sum(
            s.value
            for s in samples
            if s.name == name and all(s.labels.get(k) == want for k, want in labels.items())
        )
    )
