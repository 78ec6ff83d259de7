"""Test-only fault injection for the embedded engine (FORGED_TEST_HOOKS=1, POST /_test/fault).

The step loop makes its per-step libllama calls through one `StepCalls` object. The first fault
armed wraps that object in a `FaultInjector`, which stalls, fails or passes each call through;
without the test hook nothing here is ever constructed.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

from forged.engine.base import Fault

if TYPE_CHECKING:
    from forged.engine.llama_cpp.calls import StepCalls
    from forged.engine.llama_cpp.sampling import Sampled
    from forged.engine.llama_cpp.scheduler import Slice
    from forged.engine.llama_cpp.sequence import Sequence

# llama.h: on these codes libllama restores the KV as it was before the call; on the others
# (2: aborted, < -1: fatal) the ubatches it had processed stay in the KV.
RESTORES_KV = (1, -1)


class InjectedFault(RuntimeError):
    """What an armed sample_error raises inside the step loop."""


class _Target:
    """One request: by id, or the next one the engine starts (the first arrival number after arming)."""

    def __init__(self, request_id: str | None, next_arrival: int) -> None:
        self.request_id = request_id
        self.arrival = next_arrival

    def hits(self, seq: Sequence) -> bool:
        return seq.request_id == self.request_id if self.request_id else seq.arrival == self.arrival


class FaultInjector:
    """StepCalls with faults armed from the event loop; each fault fires once."""

    def __init__(self, calls: StepCalls) -> None:
        self._calls = calls
        self._lock = threading.Lock()
        self._hang_until = 0.0
        self._sample: _Target | None = None
        self._decode: tuple[_Target, int] | None = None

    def arm(self, fault: Fault, next_arrival: int) -> None:
        with self._lock:
            if fault.kind == "hang":
                self._hang_until = time.monotonic() + fault.seconds
            elif fault.kind == "sample_error":
                self._sample = _Target(fault.request_id, next_arrival)
            else:
                self._decode = (_Target(fault.request_id, next_arrival), fault.status)

    def decode(self, ctx: Any, batch: Any, plan: list[Slice]) -> int:
        while time.monotonic() < self._hang_until:
            time.sleep(0.05)
        with self._lock:
            armed = self._decode
            fires = armed is not None and any(armed[0].hits(sl.seq) for sl in plan)  # type: ignore[arg-type]
            if fires:
                self._decode = None
        if not fires:
            return self._calls.decode(ctx, batch, plan)
        assert armed is not None
        status = armed[1]
        if status not in RESTORES_KV:
            self._calls.decode(ctx, batch, plan)  # the worst case: every ubatch was written, then it failed
        return status

    def sample(self, ctx: Any, seq: Sequence, idx: int) -> Sampled:
        with self._lock:
            fires = self._sample is not None and self._sample.hits(seq)
            if fires:
                self._sample = None
        if fires:
            raise InjectedFault(f"injected sample_error fault in request {seq.request_id} (test hook)")
        return self._calls.sample(ctx, seq, idx)
