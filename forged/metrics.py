"""Every forge_* metric, defined once.

Event metrics (histograms, counters) are updated where the event happens. State metrics (sessions,
queue, KV blocks, memory, limits) are read live at scrape time from a snapshot provider, so that
/metrics can never disagree with /v1/status.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 60.0, 120.0)
TPS_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 40, 50, 60, 80, 100, 150, 200, 300, 500)
ITL_BUCKETS = (0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0, 5.0)
PREDICTION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)
QUEUE_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0)

# Once admitted, a request ends completed, cancelled, failed or client_stalled; before that it is
# rejected (refused) or abandoned (the client left first). Every request ends in exactly one.
ADMITTED_OUTCOMES = ("completed", "cancelled", "failed", "client_stalled")
OUTCOMES = (*ADMITTED_OUTCOMES, "rejected", "abandoned")
REJECTION_REASONS = ("queue_full", "ttft_target_unmeetable", "not_ready", "shutting_down", "invalid_request",
                     "server_busy")


@dataclass(frozen=True)
class LiveState:
    active_sessions: int
    queue_depth: int
    max_sessions: int
    max_queue_depth: int
    target_ttft_p99_ms: float
    kv_blocks_total: int
    # Blocks held by sessions. Cached blocks (prefix cache) are not used: allocation takes them back
    # before it waits, so they are free capacity for every reader of this figure.
    kv_blocks_used: int
    kv_blocks_cached: int
    memory_used_bytes: int
    memory_total_bytes: int
    # The engine's own running totals (prompt tokens); None when it cannot say.
    prefix_cache_queries: int | None = None
    prefix_cache_hits: int | None = None
    kv_tokens_per_block: int = 0

    @property
    def kv_usage_ratio(self) -> float:
        """Blocks in use / all blocks, 0..1: the inference gateway's KV-cache utilisation."""
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


class _LiveCollector(Collector):
    def __init__(self, provider: Callable[[], LiveState | None]) -> None:
        self._provider = provider

    def describe(self) -> list[Metric]:
        # Nothing to describe up front: the values only exist once the daemon runs.
        return []

    def collect(self) -> Iterator[Metric]:
        state = self._provider()
        if state is None:
            return
        yield _gauge("forge_active_sessions", "Sessions (admitted requests holding KV blocks) now.",
                     state.active_sessions)
        yield _gauge("forge_queue_depth", "Requests waiting for a session now.", state.queue_depth)
        yield _gauge("forge_max_sessions", "Session limit in force (alert threshold).", state.max_sessions)
        yield _gauge("forge_max_queue_depth", "Queue depth limit in force (alert threshold).",
                     state.max_queue_depth)
        yield _gauge("forge_target_ttft_p99_ms", "The profile's TTFT P99 target in milliseconds "
                     "(alert threshold).", state.target_ttft_p99_ms)
        yield _gauge("forge_gpu_memory_used_bytes", "Memory in use on the GPUs holding the model, summed "
                     "(system RAM on CPU and unified-memory machines and with no layer on a GPU: MemTotal - "
                     "MemAvailable).", state.memory_used_bytes)
        yield _gauge("forge_gpu_memory_total_bytes", "Memory of the GPUs holding the model, summed (or "
                     "MemTotal).", state.memory_total_bytes)
        blocks = GaugeMetricFamily("forge_kv_cache_blocks", "KV cache blocks by state: used (held or reserved by "
                                   "running sequences), cached (held only by the prefix cache, reclaimed on "
                                   "demand), free; and their total.", labels=["state"])
        blocks.add_metric(["total"], state.kv_blocks_total)
        blocks.add_metric(["used"], state.kv_blocks_used)
        blocks.add_metric(["cached"], state.kv_blocks_cached)
        blocks.add_metric(["free"], state.kv_blocks_total - state.kv_blocks_used - state.kv_blocks_cached)
        yield blocks
        if state.prefix_cache_queries is not None:
            # The engine keeps these totals; exposed as counters, read at scrape time.
            yield CounterMetricFamily("forge_prefix_cache_queries", "Prompt tokens looked up in the prefix cache.",
                                      value=state.prefix_cache_queries)
            yield CounterMetricFamily("forge_prefix_cache_hits", "Prompt tokens found in the prefix cache (their KV "
                                      "was reused, not computed).", value=state.prefix_cache_hits or 0)
        # For routers in front of a fleet (the Kubernetes inference gateway's model-server protocol,
        # docs/scaling.md): its KVCacheUtilization (a 0..1 gauge; forge_queue_depth and
        # forge_active_sessions are its queued and running requests) and its optional block size.
        yield _gauge("forge_kv_cache_usage_ratio", "KV cache blocks held by sessions / all blocks (0..1); "
                     "cached prefix blocks count as free.", state.kv_usage_ratio)
        config = GaugeMetricFamily("forge_kv_cache_config_info", "The KV cache's shape in labels (value 1): "
                                   "block_size in tokens, num_gpu_blocks in all.",
                                   labels=["block_size", "num_gpu_blocks"])
        config.add_metric([str(state.kv_tokens_per_block), str(state.kv_blocks_total)], 1)
        yield config


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class Metrics:
    def __init__(self, provider: Callable[[], LiveState | None]) -> None:
        self.registry = registry = CollectorRegistry(auto_describe=True)
        self.ttft = Histogram("forge_ttft_seconds", "Time to first token, from request receipt.",
                              buckets=TTFT_BUCKETS, registry=registry)
        self.tokens_per_second = Histogram("forge_tokens_per_second", "Per-request decode rate after the "
                                           "first token.", buckets=TPS_BUCKETS, registry=registry)
        self.inter_token_latency = Histogram("forge_inter_token_latency_seconds", "Gap between streamed "
                                             "tokens of one request.", buckets=ITL_BUCKETS, registry=registry)
        self.queue_wait = Histogram("forge_queue_wait_seconds", "Time from arrival to session start.",
                                    buckets=QUEUE_BUCKETS, registry=registry)
        self.ttft_prediction_error = Histogram(
            "forge_ttft_prediction_error_seconds", "How far admission's TTFT prediction was from the "
            "measured TTFT (absolute), per admitted request.", buckets=PREDICTION_BUCKETS,
            registry=registry)
        self.requests = Counter("forge_requests", "Generation requests by outcome: rejected (refused before "
                                "admission), abandoned (the client left before a verdict), or, once admitted, "
                                "completed, cancelled, failed or client_stalled (hung up on: it took none of its "
                                "answer for server.write_timeout_s).", ["outcome"], registry=registry)
        self.admitted = Counter("forge_requests_admitted", "Generation requests admitted (given a session "
                                "or a queue place). Each ends in exactly one of forge_requests_total's "
                                "completed, cancelled, failed or client_stalled.", registry=registry)
        self.rejections = Counter("forge_rejections", "Generation requests refused, by reason (invalid_request: "
                                  "any 4xx for a client's mistake; server_busy: too many request bodies being "
                                  "received at once).", ["reason"], registry=registry)
        self.preemptions = Counter("forge_preemptions", "Sessions preempted to free KV blocks.",
                                   registry=registry)
        self.prompt_tokens = Counter("forge_prompt_tokens", "Prompt tokens of admitted requests.",
                                     registry=registry)
        self.generation_tokens = Counter("forge_generation_tokens", "Tokens generated.", registry=registry)
        self.info = Info("forge", "What this daemon runs: SKU, engine, model, profile.", registry=registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        for reason in REJECTION_REASONS:
            self.rejections.labels(reason)
        registry.register(_LiveCollector(provider))

    def set_info(self, *, sku: str, engine: str, model: str, profile: str) -> None:
        self.info.info({"sku": sku, "engine": engine, "model": model, "profile": profile})

    def reject(self, reason: str) -> None:
        self.rejections.labels(reason).inc()
        self.requests.labels("rejected").inc()

    def abandon(self) -> None:
        """The client left before its request was admitted or refused."""
        self.requests.labels("abandoned").inc()

    def request_totals(self) -> dict[str, int]:
        """Admitted requests and every outcome so far."""
        totals = {"admitted": int(self.registry.get_sample_value("forge_requests_admitted_total") or 0)}
        for outcome in OUTCOMES:
            totals[outcome] = int(self.registry.get_sample_value("forge_requests_total", {"outcome": outcome}) or 0)
        return totals

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
