"""Reading forged's /metrics: prometheus_client's own text parser, flattened into samples.

`Scrape.value("forge_rejections_total", reason="queue_full")` reads one sample; `histogram()` and
`Histogram.minus()` give the observations between two scrapes, and `Histogram.quantile()` estimates a
quantile the way PromQL's histogram_quantile does (linear inside the bucket).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

Key = tuple[str, tuple[tuple[str, str], ...]]


@dataclass
class Scrape:
    at: float  # time.monotonic() of the scrape
    samples: dict[Key, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str, at: float | None = None) -> Scrape:
        scrape = cls(time.monotonic() if at is None else at)
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                scrape.samples[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
        return scrape

    def names(self) -> set[str]:
        return {name for name, _ in self.samples}

    def value(self, name: str, default: float | None = None, **labels: str) -> float | None:
        return self.samples.get((name, tuple(sorted(labels.items()))), default)

    def labelled(self, name: str, label: str) -> dict[str, float]:
        """Every sample of `name`, by the value of one label: {'queue_full': 3.0, ...}."""
        return {dict(lbls).get(label, ""): v for (n, lbls), v in self.samples.items() if n == name}

    def histogram(self, name: str) -> Histogram:
        buckets = []
        for (n, lbls), v in self.samples.items():
            if n == f"{name}_bucket":
                le = dict(lbls)["le"]
                buckets.append((math.inf if le in ("+Inf", "inf") else float(le), v))
        buckets.sort()
        return Histogram(tuple(buckets), self.value(f"{name}_count", 0.0) or 0.0,
                         self.value(f"{name}_sum", 0.0) or 0.0)


@dataclass(frozen=True)
class Histogram:
    buckets: tuple[tuple[float, float], ...]  # (upper bound, cumulative count), +Inf last
    count: float
    sum: float

    def minus(self, earlier: Histogram) -> Histogram:
        """The observations made between `earlier` and this scrape."""
        before = dict(earlier.buckets)
        return Histogram(tuple((le, c - before.get(le, 0.0)) for le, c in self.buckets),
                         self.count - earlier.count, self.sum - earlier.sum)

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count > 0 else None

    def quantile(self, q: float) -> float | None:
        """histogram_quantile(q): linear interpolation inside the bucket that holds the rank."""
        if self.count <= 0 or not self.buckets:
            return None
        rank = q * self.count
        lower, below = 0.0, 0.0
        for le, cumulative in self.buckets:
            if cumulative >= rank:
                if math.isinf(le):
                    return lower  # the highest finite bound, as PromQL does
                if cumulative == below:
                    return le
                return lower + (le - lower) * (rank - below) / (cumulative - below)
            lower, below = le, cumulative
        return lower

    def bucket_of(self, value: float) -> tuple[float, float]:
        """The (lower, upper] bucket bounds a value falls into."""
        lower = 0.0
        for le, _ in self.buckets:
            if value <= le:
                return lower, le
            lower = le
        return lower, math.inf

    def count_at_most(self, bound: float) -> float:
        for le, cumulative in self.buckets:
            if le == bound:
                return cumulative
        raise KeyError(bound)
