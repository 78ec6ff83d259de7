"""The running daemon's shared state, as the API and the notifier see it."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from forged.admission import Admission
from forged.config import LoadedConfig, Profile
from forged.engine.base import Engine
from forged.gpus import Placement
from forged.hardware import HardwareInfo
from forged.metrics import LiveState, Metrics

Phase = Literal["loading", "ready", "draining", "failed"]


@dataclass
class ServiceState:
    config: LoadedConfig
    profile_name: str
    profile: Profile
    hardware: HardwareInfo
    engine: Engine
    metrics: Metrics
    # The GPUs the engine uses and how the model is spread over them (forged.gpus).
    placement: Placement
    admission: Admission | None = None
    phase: Phase = "loading"
    failure: str | None = None
    started_monotonic: float = field(default_factory=time.monotonic)
    started_wall: float = field(default_factory=time.time)
    test_hooks: bool = False
    # Set when the profile's sessions do not fit in memory at a full context (forged/sanity.py).
    memory_warning: str | None = None
    # Config changes a reload could not apply live (they need a restart).
    pending_restart: list[str] = field(default_factory=list)
    # Set when the engine running is not the one the profile names (engine_fallback), and why.
    engine_note: str | None = None
    # The listeners and whether TCP needs a key (api.app.access_summary), once they are open.
    access: dict[str, Any] = field(default_factory=dict)
    # Set when the machine has a GPU that the engine does not use (llama_cpp.allow_cpu_fallback), and why.
    gpu_unused: str | None = None

    @property
    def model_id(self) -> str:
        return self.engine.model_name

    def live(self) -> LiveState | None:
        """Snapshot for /metrics and /v1/status; None until the engine exists."""
        admission = self.admission
        stats = self.engine.stats()
        memory = self.placement.memory(self.hardware)
        return LiveState(
            active_sessions=len(admission.sessions) if admission else 0,
            queue_depth=len(admission.queue) if admission else 0,
            max_sessions=admission.limits.max_sessions if admission else
            self.profile.inference.max_concurrent_sessions,
            max_queue_depth=admission.limits.max_queue_depth if admission else
            self.profile.thresholds.max_queue_depth,
            target_ttft_p99_ms=self.profile.targets.ttft_p99_ms,
            kv_blocks_total=stats.kv_blocks_total,
            kv_blocks_used=stats.kv_blocks_used,
            kv_blocks_cached=stats.kv_blocks_cached,
            kv_tokens_per_block=stats.tokens_per_block,
            memory_used_bytes=memory.used_bytes,
            memory_total_bytes=memory.total_bytes,
            prefix_cache_queries=stats.prefix_cache_queries,
            prefix_cache_hits=stats.prefix_cache_hits,
        )
