from __future__ import annotations

from forged.config import Targets
from forged.targets import LatencyWindow, evaluate, percentile


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50 and percentile(values, 99) == 99 and percentile(values, 100) == 100
    assert percentile([], 99) == 0.0


def test_targets_met_and_unmet() -> None:
    window = LatencyWindow()
    for ttft in [0.2] * 98 + [4.0, 4.0]:
        window.add_ttft(ttft)
    window.add_tps(30)
    doc = evaluate(Targets(ttft_ms=500, ttft_p99_ms=2000, tps=20), window, 1, 4, 9, 8)
    t = doc["targets"]
    assert t["ttft_p50_ms"]["met"] is True and t["ttft_p50_ms"]["live"] == 200
    assert t["ttft_p99_ms"]["met"] is False and t["ttft_p99_ms"]["live"] == 4000
    assert t["tps"]["met"] is True
    assert t["queue_depth"]["met"] is False
    assert doc["all_met"] is False


def test_no_samples_is_unknown_not_met() -> None:
    doc = evaluate(Targets(), LatencyWindow(), 0, 4, 0, 8)
    assert doc["targets"]["ttft_p99_ms"]["met"] is None and doc["samples"] == 0
