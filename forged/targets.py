"""Live performance against the profile's targets: TTFT P50/P99 and TPS over a sliding window."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from forged.config import Targets

WINDOW_S = 300.0


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of unsorted values; 0.0 for none."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), -(-len(ordered) * q // 100)))
    return ordered[int(rank) - 1]


class LatencyWindow:
    """Per-request TTFT and decode TPS of the last WINDOW_S seconds."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._ttft: deque[tuple[float, float]] = deque()
        self._tps: deque[tuple[float, float]] = deque()

    def add_ttft(self, seconds: float) -> None:
        self._ttft.append((time.monotonic(), seconds))

    def add_tps(self, tps: float) -> None:
        self._tps.append((time.monotonic(), tps))

    def _recent(self, samples: deque[tuple[float, float]]) -> list[float]:
        cutoff = time.monotonic() - self.window_s
        while samples and samples[0][0] < cutoff:
            samples.popleft()
        return [v for _, v in samples]

    def ttft(self) -> list[float]:
        return self._recent(self._ttft)

    def tps(self) -> list[float]:
        return self._recent(self._tps)


@dataclass(frozen=True)
class Check:
    name: str
    target: float
    live: float | None
    met: bool | None  # None: no samples yet
    comparison: str

    def as_dict(self) -> dict[str, Any]:
        return {"target": self.target, "live": self.live, "met": self.met, "comparison": self.comparison}


def evaluate(targets: Targets, window: LatencyWindow, sessions: int, max_sessions: int, queue: int,
             max_queue: int) -> dict[str, Any]:
    ttft = window.ttft()
    tps = window.tps()

    def upper(name: str, target: float, live: float | None) -> Check:
        return Check(name, target, live, None if live is None else live <= target, "<=")

    p50 = percentile(ttft, 50) * 1000 if ttft else None
    p99 = percentile(ttft, 99) * 1000 if ttft else None
    tps_p50 = percentile(tps, 50) if tps else None
    checks = [
        upper("ttft_p50_ms", targets.ttft_ms, p50),
        upper("ttft_p99_ms", targets.ttft_p99_ms, p99),
        Check("tps", targets.tps, tps_p50, None if tps_p50 is None else tps_p50 >= targets.tps, ">="),
        upper("sessions", max_sessions, sessions),
        upper("queue_depth", max_queue, queue),
    ]
    known = [c.met for c in checks if c.met is not None]
    return {
        "window_s": window.window_s,
        "samples": len(ttft),
        "targets": {c.name: c.as_dict() for c in checks},
        "all_met": all(known) if known else None,
    }
