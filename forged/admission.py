"""Session and queue guards.

A request becomes a *session* when a session slot is free and the engine has reserved its KV
blocks. Until then it waits in the *queue*, strictly FIFO. When the queue is full the request is
refused at once with 503 "Queue full" and a Retry-After computed from the measured drain rate.
A preempted session goes back to the head of the queue and resumes when re-admitted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from dataclasses import dataclass, field

from forged.engine.base import GenerationRequest, TokenEvent
from forged.engine.llama_cpp.runner import LlamaCppEngine
from forged.metrics import Metrics

log = logging.getLogger(__name__)

DRAIN_WINDOW_S = 120.0
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

    @property
    def request_id(self) -> str:
        return self.request.request_id


@dataclass
class Limits:
    max_sessions: int
    max_queue_depth: int


class Admission:
    def __init__(self, engine: LlamaCppEngine, limits: Limits, metrics: Metrics) -> None:
        self.engine = engine
        self.limits = limits
        self.metrics = metrics
        self.sessions: dict[str, Ticket] = {}
        self.queue: deque[Ticket] = deque()
        self.draining = False
        self._completions: deque[float] = deque()
        self._idle = asyncio.Event()
        self._idle.set()

    # ------------------------------------------------------------ request path

    async def admit(self, request: GenerationRequest) -> Ticket:
        """Return a ticket whose session has started, or raise Refused. Cancellation while queued
        (the client left) removes the ticket cleanly."""
        if self.draining:
            self.metrics.reject("shutting_down")
            raise Refused(503, "shutting_down", "forged is shutting down", retry_after=self._retry_after())
        ticket = Ticket(request=request, arrived=time.monotonic())
        if self.queue or not self._try_start(ticket):
            if len(self.queue) >= self.limits.max_queue_depth:
                self.metrics.reject("queue_full")
                raise Refused(503, "queue_full", "Queue full", retry_after=self._retry_after())
            self.queue.append(ticket)
            self._idle.clear()
        self.metrics.prompt_tokens.inc(len(request.prompt_tokens))
        try:
            await ticket.admitted.wait()
        except asyncio.CancelledError:
            self.finish(ticket, "cancelled")
            raise
        return ticket

    def finish(self, ticket: Ticket, outcome: str) -> None:
        """The request is over (completed, cancelled or failed): free its session or queue place."""
        if ticket.done:
            return
        ticket.done = True
        if ticket in self.queue:
            self.queue.remove(ticket)
        if self.sessions.pop(ticket.request_id, None) is not None:
            self._completions.append(time.monotonic())
        # The engine frees the sequence's KV at once; for a sequence that already finished this is a no-op.
        self.engine.cancel(ticket.request_id)
        self.metrics.requests.labels(outcome).inc()
        self._pump()

    def on_capacity_freed(self) -> None:
        self._pump()

    def on_preempted(self, request_id: str) -> None:
        ticket = self.sessions.pop(request_id, None)
        if ticket is None or ticket.done:
            return
        self.metrics.preemptions.inc()
        self.queue.appendleft(ticket)
        self._pump()

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
        if not self.engine.try_reserve(ticket.request_id, self.engine.blocks_needed(ticket.request)):
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

    def _retry_after(self) -> int:
        """Seconds until a place is likely free: the queue ahead of this request, divided by how
        fast sessions have been finishing. Before anything has finished, the oldest running
        session's age stands in for one session's duration."""
        now = time.monotonic()
        while self._completions and now - self._completions[0] > DRAIN_WINDOW_S:
            self._completions.popleft()
        ahead = len(self.queue) + 1
        if len(self._completions) >= 2:
            span = max(now - self._completions[0], 1e-3)
            rate = len(self._completions) / span
        elif self.sessions:
            oldest = min(t.started or now for t in self.sessions.values())
            rate = len(self.sessions) / max(now - oldest, 1.0)
        else:
            return 1
        return max(1, min(MAX_RETRY_AFTER_S, math.ceil(ahead / rate)))
