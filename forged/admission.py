"""Session and queue guards.

A request becomes a *session* when a session slot is free and the engine says it has room for its
KV (cached prefix blocks count as free). Until then it waits in the *queue*, strictly FIFO. When the
queue is full the request is refused at once with 503 "Queue full" and a Retry-After computed from
the measured drain rate. The KV itself belongs to the engine's scheduler: a preempted session stays
a session, waiting inside the engine to resume, and the engine tells admission when room frees up.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

from forged.config import Profile
from forged.engine.base import Engine, GenerationRequest, TokenEvent
from forged.metrics import Metrics

log = logging.getLogger(__name__)

# How many finished sessions the drain rate averages over.
RECENT_SESSIONS = 32
MAX_RETRY_AFTER_S = 600


class Refused(Exception):
    """Admission said no. Carries everything the HTTP layer needs for the error object."""

    def __init__(self, status: int, code: str, message: str, retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.retry_after = retry_after


@dataclass(eq=False)
class Ticket:
    request: GenerationRequest
    arrived: float
    events: asyncio.Queue[TokenEvent] = field(default_factory=asyncio.Queue)
    admitted: asyncio.Event = field(default_factory=asyncio.Event)
    started: float | None = None
    done: bool = False
    predicted_ttft_s: float | None = None
    # Prompt tokens the engine expected to compute when the request arrived (not found cached).
    to_prefill: int = 0

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class Limits:
    max_sessions: int
    max_queue_depth: int
    # Deadline admission: refuse at once a request predicted to miss this TTFT (seconds); None = off.
    ttft_deadline_s: float | None = None

    @classmethod
    def from_profile(cls, profile: Profile, sessions: int | None = None) -> Limits:
        """The profile's guards: its sessions (or `sessions`, what the memory check enforces when
        fewer fit), its queue depth, and under `admission.mode: deadline` its TTFT P99 target."""
        deadline = profile.targets.ttft_p99_ms / 1000 if profile.admission.mode == "deadline" else None
        return cls(sessions or profile.inference.max_concurrent_sessions, profile.thresholds.max_queue_depth,
                   deadline)


class Admission:
    def __init__(self, engine: Engine, limits: Limits, metrics: Metrics) -> None:
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self.sessions: dict[str, Ticket] = {}
        self.queue: deque[Ticket] = deque()
        self.draining = False
        # How long each recent session lasted, start to end (time when nothing ran never enters it),
        # with the engine's per-sequence decode rate when it ended.
        self._durations: deque[tuple[float, float]] = deque(maxlen=RECENT_SESSIONS)
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------ request path

    async def admit(self, request: GenerationRequest, received: float | None = None) -> Ticket:
        """Return a ticket whose session has started, or raise Refused. Cancellation while queued
        (the client left) removes the ticket cleanly. `received` (monotonic) is when the request
        arrived: the TTFT target counts from there, parsing and tokenization included."""
        if self.draining:
            self.metrics.reject("shutting_down")
            raise Refused(503, "shutting_down", "forged is shutting down", retry_after=self._retry_after())
        ticket = Ticket(request=request, arrived=time.monotonic(), to_prefill=self._to_prefill(request))
        predicted = self.predict_ttft(ticket.to_prefill)
        if predicted is not None and received is not None:
            predicted += ticket.arrived - received
        ticket.predicted_ttft_s = predicted
        deadline = self.limits.ttft_deadline_s
        if deadline is not None and ticket.predicted_ttft_s is not None and ticket.predicted_ttft_s > deadline:
            self.metrics.reject("ttft_target_unmeetable")
            raise Refused(503, "ttft_target_unmeetable",
                          f"predicted time to first token {ticket.predicted_ttft_s:.1f} s exceeds the target "
                          f"of {deadline:.1f} s", retry_after=max(1, math.ceil(ticket.predicted_ttft_s - deadline)))
        if self.queue or not self._try_start(ticket):
            if len(self.queue) >= self.limits.max_queue_depth:
                self.metrics.reject("queue_full")
                raise Refused(503, "queue_full", "Queue full", retry_after=self._retry_after())
            self.queue.append(ticket)
            self._idle.clear()
        # Admitted from here on: every path out goes through finish(), which counts one outcome.
        self.metrics.admitted.inc()
        self.metrics.prompt_tokens.inc(len(request.prompt_tokens))
        try:
            await ticket.admitted.wait()
        except asyncio.CancelledError:
            self.finish(ticket, "cancelled")
            raise
        return ticket

    def finish(self, ticket: Ticket, outcome: str) -> None:
        """The request is over (completed, cancelled, failed or client_stalled): free its session or queue place."""
        if ticket.done:
            return
        ticket.done = True
        if ticket in self.queue:
            self.queue.remove(ticket)
        if self.sessions.get(ticket.request_id) is ticket and ticket.started is not None:
            self._durations.append((time.monotonic() - ticket.started, self._per_sequence_rate()))
        self.sessions.pop(ticket.request_id, None)
        # The engine frees the sequence's KV at once; for a sequence that already finished this is a no-op.
        self.engine.cancel(ticket.request_id)
        self.metrics.requests.labels(outcome).inc()
        self._pump()

    def on_capacity_freed(self) -> None:
        self._pump()

    def on_preempted(self, request_id: str) -> None:
        """The engine preempted a session to free KV: it stays a session (the engine resumes it
        first, before anything admitted later); only the count moves."""
        if request_id in self.sessions:
            self.metrics.preemptions.inc()

    # ------------------------------------------------------------ control

    def set_limits(self, limits: Limits) -> None:
        self.limits = limits
        self._pump()

    def start_draining(self) -> None:
        self.draining = True

    async def wait_idle(self, timeout: float) -> bool:
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            return True
        except TimeoutError:
            return False

    def cancel_all(self) -> None:
        for ticket in list(self.queue) + list(self.sessions.values()):
            self.engine.cancel(ticket.request_id)
            ticket.events.put_nowait(TokenEvent("", finish_reason="cancelled"))
            ticket.admitted.set()

    # ------------------------------------------------------------ internals

    def _try_start(self, ticket: Ticket) -> bool:
        if len(self.sessions) >= self.limits.max_sessions:
            return False
        if not self.engine.has_room_for(ticket.request):
            return False
        self.sessions[ticket.request_id] = ticket
        self._idle.clear()
        if ticket.started is None:
            ticket.started = time.monotonic()
            self.metrics.queue_wait.observe(ticket.started - ticket.arrived)
        self.engine.submit(ticket.request, ticket.events)
        ticket.admitted.set()
        return True

    def _pump(self) -> None:
        while self.queue and self._try_start(self.queue[0]):
            self.queue.popleft()
        if not self.queue and not self.sessions:
            self._idle.set()

    def predict_ttft(self, to_prefill: int) -> float | None:
        """Seconds until this request's first token, from the measured prefill rate and the prompt
        tokens ahead of it (running sessions' unfinished prefill and the queue), plus the wait for a
        session when all are taken. None before the engine has measured anything."""
        stats = self.engine.stats()
        rate = stats.prefill_tokens_per_s
        if rate <= 0:
            return None
        ahead = stats.prefill_backlog_tokens + sum(t.to_prefill for t in self.queue)
        slots_short = len(self.queue) + 1 - (self.limits.max_sessions - len(self.sessions))
        drain = self._drain_rate()
        wait_for_session = slots_short / drain if slots_short > 0 and drain else 0.0
        return max(ahead / rate, wait_for_session) + to_prefill / rate

    def _to_prefill(self, request: GenerationRequest) -> int:
        """The prompt tokens the engine will really compute: those its prefix cache lacks."""
        return len(request.prompt_tokens) - self.engine.expected_cached_tokens(request.prompt_tokens)

    def _drain_rate(self) -> float:
        """Sessions expected to end per second from now: by Little's law, the sessions running divided
        by how long a session lasts. How long: the last RECENT_SESSIONS that ended, each rescaled by
        how fast the engine decodes a sequence now against when it ended (on a CPU two sessions each
        take twice as long as one alone; on a GPU nearly as long). A duration only counts time its
        session existed, so a quiet spell before a burst does not dilute the rate: sessions finished
        per wall-clock second over a fixed window did, and overstated Retry-After 10-140x after an idle
        minute. Before any session has ended, a session is expected to last its prompt's prefill plus
        its max_tokens at the engine's measured rates (or, before it has measured those, the oldest
        running session's age); 0 when nothing runs."""
        running = len(self.sessions)
        if not running:
            return 0.0
        now_rate = self._per_sequence_rate()
        if self._durations:
            expected = [duration * (then_rate / now_rate if then_rate > 0 and now_rate > 0 else 1.0)
                        for duration, then_rate in self._durations]
            return running / max(sum(expected) / len(expected), 1e-3)
        stats = self.engine.stats()
        if stats.prefill_tokens_per_s > 0 and now_rate > 0:
            expected = [t.to_prefill / stats.prefill_tokens_per_s + t.request.sampling.max_tokens / now_rate
                        for t in self.sessions.values()]
            return running / max(sum(expected) / running, 1e-3)
        now = time.monotonic()
        oldest = min(t.started or now for t in self.sessions.values())
        return running / max(now - oldest, 1.0)

    def _per_sequence_rate(self) -> float:
        """Tokens a second one session decodes now: the engine's recent decode rate over the sessions."""
        return self.engine.stats().decode_tokens_per_s / max(len(self.sessions), 1)

    def _retry_after(self) -> int:
        """Seconds until the requests now queued have all started, at the drain rate (with no queue,
        until a session ends): a retry then finds room."""
        rate = self._drain_rate()
        if rate <= 0:
            return 1
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(max(len(self.queue), 1) / rate)))
