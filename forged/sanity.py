"""Does the chosen profile fit this machine's memory? Checked once the model is loaded.

weights + max_concurrent_sessions x one context of KV must fit in the budget the engine will use:
the weights, plus `free_gpu_memory_fraction` of what is available once they are in (MemAvailable on
CPU boxes and unified-memory machines, NVML v2 free on a discrete GPU: `MemoryReading.available_bytes`).
The KV bytes come from the model's real shape (`forged.engine.kv`). When the sessions do not fit,
forged still starts, but says so (log and STATUS=) and enforces the number that does fit, so that
memory never runs out silently.

The daemon calls it after the load with the memory read before the load and the engine's KV
shape, logs the warning, shows it in STATUS= and /v1/status, and makes `sessions_enforced` the
admission limit.
"""

from __future__ import annotations

from dataclasses import dataclass

from forged.config import Profile
from forged.engine.kv import KvShape, kv_budget_bytes, plan_capacity
from forged.hardware import MemoryReading

GIB = 2**30


@dataclass(frozen=True)
class MemorySanity:
    sessions_wanted: int
    sessions_fit: int
    # What admission should enforce: the profile's limit, or what fits when that is less (at least 1;
    # a single context that does not fit is the engine's startup error, not a warning).
    sessions_enforced: int
    context: int
    available_bytes: int
    budget_bytes: float  # weights + fraction x (available - weights)
    needed_bytes: float  # weights + sessions_wanted x one context of KV
    warning: str | None  # one line for the log and STATUS=; None when it fits

    @property
    def fits(self) -> bool:
        return self.warning is None


def check(profile: Profile, reading: MemoryReading, shape: KvShape, *, engine: str | None = None) -> MemorySanity:
    levers = profile.tensorrt_llm
    engine = engine or profile.engine
    wanted = profile.inference.max_concurrent_sessions
    context = min(profile.inference.max_seq_len, shape.trained_context or profile.inference.max_seq_len)
    available = reading.available_bytes
    budget = shape.weights_bytes + kv_budget_bytes(available, shape.weights_bytes, levers.free_gpu_memory_fraction)
    plan = plan_capacity(shape, int(budget), levers.kv_cache_dtype, levers.tokens_per_block, context, wanted,
                         engine=engine)
    needed = shape.weights_bytes + wanted * plan.bytes_per_session
    if plan.fits(wanted):
        return MemorySanity(wanted, plan.sessions_fit, wanted, context, available, budget, needed, None)
    enforced = max(min(plan.sessions_fit, wanted), 1)
    warning = (f"memory: {wanted} sessions x {context} tokens of {levers.kv_cache_dtype} KV "
               f"({plan.bytes_per_session / GIB:.2f} GiB each) + {shape.weights_bytes / GIB:.2f} GiB weights "
               f"need {needed / GIB:.1f} GiB, but {levers.free_gpu_memory_fraction:g} of the "
               f"{available / GIB:.1f} GiB available holds {plan.sessions_fit}; enforcing {enforced} sessions")
    return MemorySanity(wanted, plan.sessions_fit, enforced, context, available, budget, needed, warning)
