"""The embedded engine's step thread: it owns the libllama context, the KV pool and every sequence.

The event loop only posts commands (submit, cancel, stop) and reads `figures`, a snapshot the thread
replaces after every pass. Each pass takes the commands, starts what the scheduler can place, runs
one step (`llama_decode` over one batch), commits the new KV to the pool, samples, and hands each
request its `TokenEvent` through `loop.call_soon_threadsafe`.

Each sequence samples with its own `sampling.Sampler` (libllama's chain, a grammar, logprobs), made
when it arrives. A request of n choices forks here, in the step that completes its prompt: before
anything is sampled from that logits row, the other n - 1 choices get a slot with the prompt's KV
(`KvPool.fork`) and a sampler of their own (seeded seed + index when the request has a seed), and
all n sample their first token from it. A fork the pool cannot place at that moment (under
max_utilization the running sequences may have grown into what was reserved for it) waits at the
head of the line and prefills its prompt itself, mostly from the prefix cache. An error or a
cancellation of one choice ends them all: the request has one answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from forged.engine.base import EngineHooks, GenerationRequest, Rate, TokenEvent, TokenLogprob
from forged.engine.llama_cpp.batch import StepBatch
from forged.engine.llama_cpp.calls import StepCalls
from forged.engine.llama_cpp.context import LlamaContext
from forged.engine.llama_cpp.faults import FaultInjector
from forged.engine.llama_cpp.kvpool import KvPool, StreamPool
from forged.engine.llama_cpp.model import LlamaModel
from forged.engine.llama_cpp.sampling import Sampled, Sampler, build_sampler
from forged.engine.llama_cpp.scheduler import Policy, Scheduler, Slice
from forged.engine.llama_cpp.sequence import Sequence
from forged.engine.text import StopMatcher

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Figures:
    """What the event loop may know of the step thread, replaced whole after every pass."""

    blocks_total: int = 0
    blocks_used: int = 0
    blocks_cached: int = 0
    cells_used: int = 0
    running: int = 0
    waiting: int = 0  # started by admission, not placed yet (preempted ones included)
    room: int = 0  # units (blocks, or streams) a new sequence could still get
    backlog_tokens: int = 0  # prompt tokens not prefilled yet
    prefix_queries: int = 0
    prefix_hits: int = 0
    cache_detail: dict[str, Any] = field(default_factory=dict)


class StepLoop:
    def __init__(self, llama: LlamaModel, context: LlamaContext, pool: KvPool, policy: Policy,
                 calls: StepCalls, batch: StepBatch, prefill_rate: Rate, decode_rate: Rate) -> None:
        self.llama = llama
        self.context = context
        self.pool = pool
        self.scheduler = Scheduler(pool, policy, on_preempted=self.preempted, on_unplaceable=self.fail_unplaceable)
        self.calls: StepCalls | FaultInjector = calls
        self.batch = batch
        self.prefill_rate = prefill_rate
        self.decode_rate = decode_rate
        self.figures = Figures()
        self.steps = 0
        self.last_step = time.monotonic()
        self.arrivals = 0
        self._commands: deque[tuple[str, Any]] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hooks = EngineHooks()
        self._stopping = False
        self._freed = False  # a sequence ended since the last pass: tell admission after publishing
        self.prefilled_total = 0  # prompt tokens computed (prefilled) since start; read by stats()
        # Admission units (blocks or streams) posted by submit() on the event loop and taken up here:
        # one writer each, so their difference is what the command queue still holds.
        self.units_posted = 0
        self.units_taken = 0
        self.tokens_posted = 0
        self.tokens_taken = 0

    # ------------------------------------------------------------ event-loop side

    def start(self, loop: asyncio.AbstractEventLoop, hooks: EngineHooks) -> None:
        self._loop = loop
        self._hooks = hooks
        self.last_step = time.monotonic()
        self.publish()
        self._thread = threading.Thread(target=self._run, name="forged-engine", daemon=True)
        self._thread.start()

    def join(self) -> None:
        self.post("stop", None)
        if self._thread is not None:
            self._thread.join()

    def post(self, kind: str, payload: Any) -> None:
        self._commands.append((kind, payload))
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    def submit(self, request: GenerationRequest, events: asyncio.Queue[TokenEvent], units: int,
               prefill_tokens: int) -> None:
        self.units_posted += units
        self.tokens_posted += prefill_tokens
        self.post("submit", (request, events, units, prefill_tokens))

    @property
    def pending_work(self) -> bool:
        return bool(self.scheduler.running or self.scheduler.waiting or self._commands)

    # ------------------------------------------------------------ step thread

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._take_commands(block=not (self.scheduler.running or self.scheduler.waiting))
                started = self.scheduler.start_waiting()
                for seq in started:
                    if seq.preempted == 0 and seq.cached_tokens:
                        log.debug("request %s: %d of %d prompt tokens found cached", seq.request_id,
                                  seq.cached_tokens, len(seq.request.prompt_tokens))
                stepped = bool(self.scheduler.running) and self._step()
                self.publish()
                if self._freed:
                    # Only now: admission asks has_room_for, which reads the figures just published.
                    self._freed = False
                    self._call_loop(self._hooks.on_capacity_freed)
                if self.scheduler.running and not stepped:
                    self._wake.wait(timeout=0.01)  # nothing could run: wait for a command, don't spin
        except Exception as exc:  # a bug in the loop itself: fail loudly, let systemd restart us
            log.exception("engine step loop died")
            self._fail_all(f"engine failure: {exc}")
            self._call_loop(self._hooks.on_fatal, f"engine step loop died: {exc}")
        finally:
            self._fail_all("the daemon is shutting down", reason="cancelled")

    def _take_commands(self, block: bool) -> None:
        if block and not self._commands:
            self._wake.wait(timeout=0.5)
        self._wake.clear()
        units = tokens = 0
        while self._commands:
            kind, payload = self._commands.popleft()
            if kind == "submit":
                request, events, n_units, n_tokens = payload
                self._add(request, events)
                units += n_units
                tokens += n_tokens
            elif kind == "cancel":
                self._cancel(payload)
            elif kind == "stop":
                self._stopping = True
        if units or tokens:
            # Publish first, then count them taken: the event loop's estimate of the room left may
            # be low for a moment, never high.
            self.scheduler.start_waiting()
            self.publish()
            self.units_taken += units
            self.tokens_taken += tokens

    def _add(self, request: GenerationRequest, events: asyncio.Queue[TokenEvent]) -> None:
        self.arrivals += 1
        try:
            sampler = self._make_sampler(request, 0)
        except Exception as exc:  # validate() compiled its grammar already: not expected, but one request's
            log.exception("could not make the sampler for request %s", request.request_id)
            self._deliver([(events, TokenEvent("", finish_reason="error", error=f"sampler: {exc}"))])
            self._freed = True  # its admission units were counted taken: tell admission they are not
            return
        seq = Sequence(request=request, events=events, arrival=self.arrivals, sampler=sampler,
                       stop=StopMatcher(request.sampling.stop), forks=request.n - 1)
        if not (self.scheduler.running or self.scheduler.waiting):
            self.last_step = time.monotonic()  # the stall clock starts when work does
        self.scheduler.add(seq)

    def _make_sampler(self, request: GenerationRequest, index: int) -> Sampler | None:
        """Choice `index`'s sampler: the request's, its seed moved by the index (n choices of one
        seeded request differ, and the same request gives the same n answers)."""
        sampling = request.sampling
        if index and sampling.seed is not None:
            sampling = replace(sampling, seed=sampling.seed + index)
        return build_sampler(self.llama, sampling)

    def _cancel(self, request_id: str) -> None:
        self._end_request(request_id, TokenEvent("", finish_reason="cancelled"))

    def _end_request(self, request_id: str, event: TokenEvent | None) -> None:
        """Take every sequence (choice) of a request out, and deliver `event` once, if given."""
        while (seq := self.scheduler.remove(request_id)) is not None:
            _free_sampler(seq)
            if event is not None:
                self._deliver([(seq.events, event)])
                event = None
            self._freed = True

    def _step(self) -> bool:
        """One llama_decode over the planned batch. False when nothing could be scheduled."""
        planning = time.monotonic()
        plan = self.scheduler.plan()
        if not plan:
            return False
        batch = self.batch
        batch.clear()
        sample_at: list[tuple[Sequence, int]] = []
        n_prefill = n_decode = 0
        # In sequence-id order: with one KV stream per sequence, libllama cuts a batch into ubatches
        # of streams with consecutive ids (each ubatch is a forward pass), so out-of-order tokens
        # would cost extra passes. The plan's order (decodes first) only decided what fits the step.
        for sl in sorted(plan, key=lambda sl: sl.seq.slot.seq_id):  # type: ignore[attr-defined]
            seq: Sequence = sl.seq  # type: ignore[assignment]
            assert seq.slot is not None
            if sl.is_decode:
                last = batch.add((seq.pending_token,), seq.n_past, seq.slot.seq_id, want_last_logits=True)
                n_decode += 1
                sample_at.append((seq, last))
                continue
            chunk = seq.to_prefill[seq.prefilled: seq.prefilled + sl.n_tokens]
            completes = seq.prefilled + sl.n_tokens == len(seq.to_prefill)
            last = batch.add(chunk, seq.n_past, seq.slot.seq_id, want_last_logits=completes)
            n_prefill += len(chunk)
            if completes:
                sample_at.append((seq, last))
        started = time.monotonic()
        rc = self.calls.decode(self.context.ptr, batch.ready(), plan)
        finished = time.monotonic()
        if rc != 0:
            self._fail_batch(plan, rc)
            return True
        self._commit(plan, started, finished, n_prefill)
        self.steps += 1
        self.last_step = finished
        if n_decode and not n_prefill:
            self.decode_rate.add(n_decode, finished - started)
        deliveries: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]] = []
        failed: set[str] = set()
        for seq, idx in sample_at:
            choices = [seq]
            try:
                if seq.forks:
                    choices += self._fork(seq)
            except Exception as exc:  # a fork's sampler: not expected, ends the request as a sampling fault
                log.exception("forking the choices of request %s failed", seq.request_id)
                choices = []
                event = TokenEvent("", finish_reason="error", error=f"forking its choices failed: {exc}",
                                   index=seq.index)
                deliveries.append((seq.events, event))
                failed.add(seq.request_id)
            for choice in choices:
                if choice.request_id in failed:
                    break
                try:
                    event = self._sample(choice, idx)
                except Exception as exc:  # a fault in one request's sampling ends that request alone
                    log.exception("sampling failed for request %s", choice.request_id)
                    event = TokenEvent("", finish_reason="error", error=f"sampling failed: {exc}",
                                       index=choice.index)
                    failed.add(choice.request_id)
                if event.finish_reason is not None:
                    self.scheduler.finish(choice)
                    _free_sampler(choice)
                    self._freed = True
                deliveries.append((choice.events, event))
        for request_id in failed:
            self._end_request(request_id, None)  # its other choices: the request has one answer
        self._deliver(deliveries)
        if log.isEnabledFor(logging.DEBUG):  # logging.level: debug: where a step's time goes
            log.debug("step %d: %d decodes, %d prefill tokens, %d sequences; plan %.1f ms, decode %.1f ms, "
                      "sample and deliver %.1f ms", self.steps, n_decode, n_prefill, len(plan),
                      1000 * (started - planning), 1000 * (finished - started), 1000 * (time.monotonic() - finished))
        return True

    def _fork(self, parent: Sequence) -> list[Sequence]:
        """The other choices of a request whose prompt `parent` just prefilled: each with a slot
        holding the prompt's KV, placed running; the ones the pool cannot place now wait, first in
        line, to prefill the prompt themselves (found cached, mostly)."""
        assert parent.slot is not None
        forked: list[Sequence] = []
        for index in range(parent.index + 1, parent.index + 1 + parent.forks):
            child = Sequence(request=parent.request, events=parent.events, arrival=parent.arrival,
                             sampler=self._make_sampler(parent.request, index),
                             stop=StopMatcher(parent.request.sampling.stop), index=index,
                             cached_tokens=parent.cached_tokens)
            child.slot = self.pool.fork(parent.slot, self.scheduler.reserve_tokens(child))
            if child.slot is None:
                log.info("request %s: no room to fork choice %d now; it prefills its prompt itself",
                         parent.request_id, index)
                self.scheduler.waiting.appendleft(child)
                continue
            child.prefilled = len(child.to_prefill)
            self.scheduler.running.append(child)
            forked.append(child)
        parent.forks = 0
        return forked

    def _commit(self, plan: list[Slice], started: float, finished: float, n_prefill: int) -> None:
        """Record what the step wrote in each sequence's slot and advance the sequences."""
        for sl in plan:
            seq: Sequence = sl.seq  # type: ignore[assignment]
            assert seq.slot is not None
            if sl.is_decode:
                self.pool.commit(seq.slot, (seq.pending_token,))  # type: ignore[arg-type]
                seq.pending_token = None
                continue
            self.pool.commit(seq.slot, seq.to_prefill[seq.prefilled: seq.prefilled + sl.n_tokens])
            if seq.prefill_started == 0.0:
                seq.prefill_started, seq.prefill_mark = started, self.prefilled_total
            seq.prefilled += sl.n_tokens
            if seq.prefill_remaining == 0:
                # Measured over a prompt's whole prefill, first chunk to last: the rate the prompts
                # queued behind it will see, with decodes interleaved and attention growing with the
                # context. The tokens are every prompt's prefilled in that window, not this one's
                # alone: prompts that share steps share the time. A prompt found almost all cached
                # prefills a token or two, which says nothing about the rate.
                done = self.prefilled_total + n_prefill - seq.prefill_mark
                if done >= min(self.scheduler.policy.max_num_tokens, 256):
                    self.prefill_rate.add(done, finished - seq.prefill_started)
        self.prefilled_total += n_prefill

    def _sample(self, seq: Sequence, idx: int) -> TokenEvent:
        sampled = self.calls.sample(self.context.ptr, seq, idx)
        token = sampled.token
        sp = seq.request.sampling
        seq.generated.append(token)
        # The first event of each choice says how much of its prompt was found cached.
        event = TokenEvent("", (token,), cached_tokens=seq.cached_tokens if len(seq.generated) == 1 else None,
                           index=seq.index, logprobs=self._logprobs(sampled))
        if not sp.ignore_eos and self.llama.is_eog(token):
            return replace(event, text=self._flush(seq), finish_reason="stop")
        text = seq.decoder.feed(self.llama.piece(token))
        text, stopped = seq.stop.feed(text)
        if stopped:
            return replace(event, text=text, finish_reason="stop")
        if len(seq.generated) >= sp.max_tokens:
            return replace(event, text=text + self._flush(seq), finish_reason="length")
        seq.pending_token = token
        return replace(event, text=text)

    def _logprobs(self, sampled: Sampled) -> tuple[TokenLogprob, ...]:
        if sampled.logprob is None:
            return ()
        piece = self.llama.piece
        return (TokenLogprob(sampled.token, piece(sampled.token), sampled.logprob,
                             tuple((t, piece(t), lp) for t, lp in sampled.top)),)

    @staticmethod
    def _flush(seq: Sequence) -> str:
        text, _ = seq.stop.feed(seq.decoder.flush())
        return text + seq.stop.flush()

    def _fail_batch(self, plan: list[Slice], rc: int) -> None:
        """A failed llama_decode ends the requests whose tokens were in its batch, and only them.

        libllama restores the KV on status 1 and -1 but keeps the ubatches it had processed before an
        abort (2) or a fatal error (< -1), so what the batch left of these sequences is unknown: their
        slots are forgotten, not cached. Retrying would only repeat a batch that failed as it was
        built; the client can retry (503) and its request then starts afresh.
        """
        reason = f"llama_decode failed with status {rc}"
        failed: list[Sequence] = [sl.seq for sl in plan]  # type: ignore[misc]
        log.error("%s; failing the %d requests in that batch: %s", reason, len(failed),
                  ", ".join(seq.request_id for seq in failed))
        told: set[str] = set()
        for seq in failed:
            self.scheduler.finish(seq, trusted=False)
            _free_sampler(seq)
            if seq.request_id not in told:
                told.add(seq.request_id)
                self._deliver([(seq.events, TokenEvent("", finish_reason="error", error=reason, status=503))])
        for request_id in told:
            self._end_request(request_id, None)  # its choices that were not in the batch
        self._freed = True

    def fail_unplaceable(self, seq: Sequence) -> None:
        """The scheduler's verdict on a sequence that can never fit the KV cache: its request ends."""
        self.scheduler.finish(seq)
        self._end(seq, TokenEvent("", finish_reason="error", error="the KV cache cannot hold this request"))
        self._end_request(seq.request_id, None)
        self._freed = True

    def preempted(self, seq: Sequence) -> None:
        log.info("preempting request %s (%d tokens generated) to free KV blocks", seq.request_id,
                 len(seq.generated))
        self._call_loop(self._hooks.on_preempted, seq.request_id)

    def _end(self, seq: Sequence, event: TokenEvent) -> None:
        _free_sampler(seq)
        self._deliver([(seq.events, event)])

    def _fail_all(self, message: str, reason: str = "error") -> None:
        for seq in list(self.scheduler.running) + list(self.scheduler.waiting):
            self.scheduler.remove(seq.request_id)
            self._end(seq, TokenEvent("", finish_reason=reason,  # type: ignore[arg-type]
                                      error=message if reason == "error" else None))

    def publish(self) -> None:
        pool, scheduler = self.pool, self.scheduler
        used, cached = pool.used_blocks(), pool.cached_blocks()
        if isinstance(pool, StreamPool):
            room = pool.free_slots() - scheduler.waiting_slots()
        else:
            room = pool.total_blocks - used - scheduler.waiting_blocks()
        self.figures = Figures(
            blocks_total=pool.total_blocks, blocks_used=used, blocks_cached=cached, cells_used=pool.cells_used(),
            running=len(scheduler.running), waiting=len(scheduler.waiting), room=room,
            backlog_tokens=scheduler.prefill_backlog(), prefix_queries=pool.queries, prefix_hits=pool.hits,
            cache_detail=pool.detail())

    def _deliver(self, deliveries: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]]) -> None:
        if deliveries:
            self._call_loop(_put_all, deliveries)

    def _call_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(fn, *args)


def _put_all(deliveries: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]]) -> None:
    for queue, event in deliveries:
        queue.put_nowait(event)


def _free_sampler(seq: Sequence) -> None:
    if seq.sampler is not None:
        seq.sampler.free()
        seq.sampler = None
