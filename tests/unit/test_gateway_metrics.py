"""forged/metrics.py: the gauges a router in front of a fleet reads (the Kubernetes inference
gateway's model-server protocol, docs/scaling.md), with the types and meaning the protocol asks for."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from forged.metrics import LiveState, Metrics


def _state(**changes: int) -> LiveState:
    values = dict(active_sessions=3, queue_depth=2, max_sessions=8, max_queue_depth=5, target_ttft_p99_ms=3000.0,
                  kv_blocks_total=400, kv_blocks_used=100, kv_blocks_cached=0, memory_used_bytes=1,
                  memory_total_bytes=2, kv_tokens_per_block=32)
    values.update(changes)
    return LiveState(**values)  # type: ignore[arg-type]


def _families(state: LiveState | None) -> dict[str, object]:
    text = Metrics(lambda: state).exposition().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def test_gateway_gauges_have_the_protocols_types_and_meaning() -> None:
    families = _families(_state())
    queued, running, usage = (families[n] for n in ("forge_queue_depth", "forge_active_sessions",
                                                    "forge_kv_cache_usage_ratio"))
    assert [(f.type, f.samples[0].value) for f in (queued, running, usage)] == \
        [("gauge", 2), ("gauge", 3), ("gauge", 0.25)]
    # The optional block size: an info-style gauge whose labels carry the numbers, as the endpoint
    # picker's cache-info metric reads them (block_size, num_gpu_blocks).
    config = families["forge_kv_cache_config_info"]
    assert config.type == "gauge"
    [sample] = config.samples
    assert sample.labels == {"block_size": "32", "num_gpu_blocks": "400"} and sample.value == 1


def test_cached_prefix_blocks_count_as_free_in_the_usage_ratio() -> None:
    families = _families(_state(kv_blocks_used=100, kv_blocks_cached=200))
    assert families["forge_kv_cache_usage_ratio"].samples[0].value == 0.25
    blocks = {s.labels["state"]: s.value for s in families["forge_kv_cache_blocks"].samples}
    assert blocks == {"total": 400, "used": 100, "cached": 200, "free": 100}


def test_usage_ratio_is_a_fraction_and_zero_without_a_cache() -> None:
    assert _families(_state(kv_blocks_used=400))["forge_kv_cache_usage_ratio"].samples[0].value == 1.0
    assert _families(_state(kv_blocks_used=0))["forge_kv_cache_usage_ratio"].samples[0].value == 0.0
    # Before the engine has sized its cache there are no blocks: 0, never a division by zero.
    assert _families(_state(kv_blocks_total=0, kv_blocks_used=0))["forge_kv_cache_usage_ratio"] \
        .samples[0].value == 0.0


def test_no_live_gauges_before_the_engine_exists() -> None:
    families = _families(None)
    assert "forge_kv_cache_usage_ratio" not in families and "forge_queue_depth" not in families
