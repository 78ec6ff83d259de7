"""The embedded engine: continuous batching over libllama, one step loop in its own thread.

Many sequences share one `llama_context` (one KV pool, or one stream per session with
`kv_unified: false`). Each step is one `llama_batch`
that holds one decode token for every sequence past its prefill, then prefill chunks (see
`scheduler.plan_step`). The asyncio side never touches libllama: it posts commands (submit,
cancel) to this thread and receives `TokenEvent`s through `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import llama_cpp as ll
import numpy as np

from forged.config import Profile
from forged.engine.base import (
    Engine,
    EngineError,
    EngineHooks,
    EngineStats,
    Fault,
    GenerationRequest,
    ModelInfo,
    Progress,
    Rate,
    RequestRejected,
    TokenEvent,
)
from forged.engine.kv import LLAMA_CPP_DTYPE_BYTES, KvShape, shape_from_metadata
from forged.engine.llama_cpp import backends
from forged.engine.llama_cpp.batch import StepBatch
from forged.engine.llama_cpp.blocks import BlockAllocator, blocks_for
from forged.engine.llama_cpp.faults import FaultInjector
from forged.engine.llama_cpp.model import LlamaModel
from forged.engine.llama_cpp.scheduler import Slice, plan_step
from forged.engine.llama_cpp.text import StopMatcher, StreamDecoder

log = logging.getLogger(__name__)

# The warm-up's timed prefill: a prompt as long as the serving context (attention grows with it),
# but never more than 16 chunks or about a second, so that READY is not held up on a slow box.
WARM_UP_MAX_CHUNKS = 16
WARM_UP_BUDGET_S = 1.0

# The profile names KV dtypes as TensorRT-LLM does; libllama has no fp8, q8_0 is its 1-byte type.
KV_DTYPE_TO_GGML: dict[str, tuple[str, int]] = {
    "fp32": ("f32", ll.GGML_TYPE_F32),
    "fp16": ("f16", ll.GGML_TYPE_F16),
    "bf16": ("bf16", getattr(ll, "GGML_TYPE_BF16", 30)),
    "fp8": ("q8_0", ll.GGML_TYPE_Q8_0),
}


@dataclass(eq=False)
class Sequence:
    request: GenerationRequest
    events: asyncio.Queue[TokenEvent]
    arrival: int
    sampler: Any
    to_prefill: list[int]
    seq_id: int = -1
    prefilled: int = 0
    n_past: int = 0
    pending_token: int | None = None
    generated: list[int] = field(default_factory=list)
    decoder: StreamDecoder = field(default_factory=StreamDecoder)
    stop: StopMatcher | None = None
    # When the step holding its first prompt chunk began, and the engine's prefill token count then.
    prefill_started: float = 0.0
    prefill_mark: int = 0

    @property
    def greedy(self) -> bool:
        return self.request.sampling.temperature <= 0

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def prefill_remaining(self) -> int:
        return len(self.to_prefill) - self.prefilled


class StepCalls:
    """The libllama calls the step loop makes for each step. Test fault injection (faults.py) wraps
    this object; nothing else replaces it."""

    def __init__(self, n_vocab: int) -> None:
        self.n_vocab = n_vocab

    def decode(self, ctx: Any, batch: Any, plan: list[Slice]) -> int:
        return ll.llama_decode(ctx, batch)

    def sample(self, ctx: Any, seq: Sequence, idx: int) -> int:
        if seq.greedy:
            # The argmax straight off the logits row: libllama's greedy sampler first copies the whole
            # vocabulary (262k entries for Gemma 3) into a candidates array, once per sequence per
            # step; at 20 streams on the H200 that held decode to 0.72x llama-server's (now 2.6x).
            logits = ll.llama_get_logits_ith(ctx, idx)
            if not logits:
                raise EngineError(f"libllama has no logits for batch position {idx}")
            return int(np.ctypeslib.as_array(logits, shape=(self.n_vocab,)).argmax())
        return ll.llama_sampler_sample(seq.sampler, ctx, idx)


class LlamaCppEngine(Engine):
    name = "llama_cpp"

    def __init__(self, profile: Profile, model_path: Path, model_name: str,
                 memory_available: Callable[[], int], library: backends.Library | None = None,
                 gpu_unused: str | None = None) -> None:
        self.profile = profile
        # The libllama loaded and what it has (backends.inspect), and why the GPU is unused, if it is.
        self.library = library
        self.gpu_unused = gpu_unused
        self._device: dict[str, Any] | None = None
        self._memory_available = memory_available
        self.kv: KvSizing | None = None
        self.kv_shape: KvShape | None = None
        self.levers = profile.tensorrt_llm
        self.model_path = model_path
        self.model_name = model_name
        self.model = ModelInfo(name=model_name, path=str(model_path), context_length=0)
        self._llama: LlamaModel | None = None
        self._ctx: Any = None
        self._mem: Any = None
        self._batch: Any = None
        self.allocator: BlockAllocator | None = None
        self._context_params: dict[str, Any] = {}
        self._commands: deque[tuple[str, Any]] = deque()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hooks = EngineHooks()
        self._running: list[Sequence] = []
        self._parked: dict[str, Sequence] = {}  # preempted, waiting to be re-admitted
        self._free_seq_ids: list[int] = []
        self._arrivals = 0
        self._stopping = False
        self._steps = 0
        self._last_step = time.monotonic()
        self._preemptions = 0
        self._prefill_rate = Rate()
        self._decode_rate = Rate()
        self._prefilled_total = 0  # prompt tokens the engine has prefilled, all sequences
        self._calls: StepCalls | FaultInjector | None = None  # made at load, when n_vocab is known
        # Written by the step thread only, read by the event loop: plain ints, atomic under the GIL.
        self._backlog = 0
        self._cells_used = 0
        # Prompt tokens posted by submit() (event loop) and taken up by the step thread: one writer
        # each, so their difference is the backlog still in the command queue.
        self._submitted_tokens = 0
        self._accepted_tokens = 0

    # ------------------------------------------------------------ lifecycle

    def load(self) -> None:
        opts = self.profile.llama_cpp
        available_before = self._memory_available()
        backends.LOAD_LOG.reset()
        self._llama = model = LlamaModel(self.model_path, 0 if self.gpu_unused else opts.n_gpu_layers)
        context = min(self.profile.inference.max_seq_len, model.n_ctx_train)
        sessions = self.profile.inference.max_concurrent_sessions
        n_ubatch = min(opts.n_ubatch, self.levers.max_num_tokens)
        self.kv_shape = shape_from_metadata(model.metadata, model.size_bytes)
        try:
            self.kv = size_kv_cache(self.kv_shape, self.levers,
                                    sessions=sessions, context=context, n_ubatch=n_ubatch,
                                    available_bytes=available_before, unified=opts.kv_unified)
        except EngineError:
            model.free()
            raise
        kv = self.kv
        kv_name, kv_type = KV_DTYPE_TO_GGML[self.levers.kv_cache_dtype]
        threads = opts.n_threads or len(os.sched_getaffinity(0))
        params = ll.llama_context_default_params()
        params.n_ctx = kv.n_ctx
        params.n_batch = self.levers.max_num_tokens
        params.n_ubatch = n_ubatch
        params.n_seq_max = kv.sessions
        params.n_threads = threads
        params.n_threads_batch = threads
        params.type_k = kv_type
        params.type_v = kv_type
        params.kv_unified = opts.kv_unified
        params.swa_full = False
        params.no_perf = True
        # A quantized V cache needs flash attention in libllama.
        params.flash_attn_type = (ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if kv_name == "q8_0"
                                  else ll.LLAMA_FLASH_ATTN_TYPE_AUTO)
        ctx = ll.llama_init_from_model(model.ptr, params)
        if not ctx:
            model.free()
            raise EngineError(f"libllama could not create a context of {kv.n_ctx} KV cells "
                              f"({kv_name} KV) for {self.model_path}")
        self._ctx = ctx
        if self.library is not None:
            self._device = backends.placement(self.library, backends.LOAD_LOG,
                                              backends.model_layers(model.metadata), self.gpu_unused)
            log.info("engine device: %s; %s/%s layers offloaded; KV on %s", self._device["runs_on"],
                     self._device["layers_offloaded"], self._device["layers_total"],
                     ", ".join(self._device["kv_on"]) or "?")
        self._mem = ll.llama_get_memory(ctx)
        self._batch = StepBatch(self.levers.max_num_tokens)
        self._calls = StepCalls(model.n_vocab)
        self.allocator = BlockAllocator(kv.num_blocks, kv.tokens_per_block)
        self._free_seq_ids = list(range(kv.sessions - 1, -1, -1))
        self.max_sessions = kv.sessions
        self.model = ModelInfo(name=self.model_name, path=str(self.model_path), context_length=context,
                               n_params=model.n_params, size_bytes=model.size_bytes,
                               metadata={k: v for k, v in model.metadata.items()
                                         if k.startswith("general.") or k.endswith("context_length")})
        self._context_params = {
            "n_ctx": kv.n_ctx, "n_batch": params.n_batch, "n_ubatch": params.n_ubatch,
            "n_seq_max": kv.sessions, "n_threads": threads, "type_k": kv_name, "type_v": kv_name,
            "kv_unified": opts.kv_unified, "swa_full": False, "flash_attn_type": int(params.flash_attn_type),
            "n_gpu_layers": 0 if self.gpu_unused else opts.n_gpu_layers,
        }
        self._warm_up()
        log.info("model %s loaded: %d params, trained context %d, serving context %d; KV %d blocks x %d "
                 "tokens = %d cells (%s, %.1f MiB; limited by %s), %d threads; prefill %.0f tok/s, "
                 "decode %.0f tok/s", self.model_path.name, model.n_params, model.n_ctx_train, context,
                 kv.num_blocks, kv.tokens_per_block, kv.n_ctx, kv_name, kv.cache_bytes / 2**20, kv.limited_by,
                 threads, self._prefill_rate.value, self._decode_rate.value)

    def _warm_up(self) -> None:
        """A prefill and a few decodes before READY: pages the weights in and seeds the prefill and
        decode rates that Retry-After and deadline admission start from.

        The timed prefill is one long prompt in max_num_tokens chunks (up to the serving context,
        WARM_UP_MAX_CHUNKS or WARM_UP_BUDGET_S), because a prompt's rate falls as its context grows:
        timed on one short chunk, or on half the context, the H200 looked 20-40% faster than it is on
        20k-token prompts, and deadline admission let in requests that then missed the target.
        """
        assert self._llama is not None
        text = "The quick brown fox jumps over the lazy dog. " * 64
        sample = self._llama.tokenize(text, add_special=True, parse_special=False)
        chunk = min(self.levers.max_num_tokens, self.model.context_length // 2)
        length = max(chunk, min(self.model.context_length - 8, WARM_UP_MAX_CHUNKS * chunk))
        tokens = (sample * (length // len(sample) + 1))[:length]
        batch = self._batch

        def prefill(n_tokens: int) -> int:
            ll.llama_memory_seq_rm(self._mem, 0, -1, -1)
            started, done = time.monotonic(), 0
            while done < n_tokens and (done == 0 or time.monotonic() - started < WARM_UP_BUDGET_S):
                part = tokens[done: min(done + chunk, n_tokens)]
                batch.clear()
                batch.add(part, done, 0, want_last_logits=True)
                if ll.llama_decode(self._ctx, batch.ready()) != 0:
                    raise EngineError("the warm-up step failed in llama_decode")
                done += len(part)
            self._prefill_rate.add(done, time.monotonic() - started)
            return done

        prefill(min(chunk, 512))  # pays for page faults and kernel selection; overwritten below
        self._prefill_rate = Rate()
        n = prefill(length)
        for step in range(4):
            batch.clear()
            batch.add(tokens[step:step + 1], n + step, 0, want_last_logits=True)
            started = time.monotonic()
            if ll.llama_decode(self._ctx, batch.ready()) != 0:
                raise EngineError("the warm-up step failed in llama_decode")
            self._decode_rate.add(1, time.monotonic() - started)
        ll.llama_memory_seq_rm(self._mem, 0, -1, -1)

    def device(self) -> dict[str, Any] | None:
        return self._device

    def start(self, loop: asyncio.AbstractEventLoop, hooks: EngineHooks) -> None:
        self._loop = loop
        self._hooks = hooks
        self._last_step = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="forged-engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._post("stop", None)
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join)
        self._batch = None  # numpy-owned; never llama_batch_free'd
        if self._ctx:
            ll.llama_free(self._ctx)
            self._ctx = None
        if self._llama is not None:
            self._llama.free()

    # ------------------------------------------------------------ event-loop side API

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        assert self._llama is not None
        return self._llama.tokenize(text, add_special=add_special, parse_special=parse_special)

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        assert self._llama is not None
        return self._llama.render_chat(messages)

    @property
    def add_bos(self) -> bool:
        return bool(self._llama and self._llama.add_bos)

    def tokenize_prompt(self, text: str) -> list[int]:
        return self.tokenize(text, add_special=self.add_bos, parse_special=True)

    def validate(self, request: GenerationRequest) -> None:
        """Refuse what this engine can never run, with both numbers named."""
        prompt = len(request.prompt_tokens)
        context = self.model.context_length
        if prompt == 0:
            raise RequestRejected("the prompt is empty")
        if prompt >= context:
            raise RequestRejected(f"the prompt has {prompt} tokens, but this model's context is {context} "
                                  f"tokens", "context_length_exceeded")
        if prompt + request.sampling.max_tokens > context:
            raise RequestRejected(f"the prompt has {prompt} tokens and max_tokens is "
                                  f"{request.sampling.max_tokens}, {prompt + request.sampling.max_tokens} in "
                                  f"all, but this model's context is {context} tokens", "context_length_exceeded")
        assert self._llama is not None
        bad = next((t for t in request.prompt_tokens if not 0 <= t < self._llama.n_vocab), None)
        if bad is not None:
            raise RequestRejected(f"token id {bad} is not in this model's vocabulary (0..{self._llama.n_vocab - 1})")
        if not self.levers.enable_chunked_context and prompt > self.levers.max_num_tokens:
            raise RequestRejected(f"the prompt has {prompt} tokens, more than max_num_tokens "
                                  f"({self.levers.max_num_tokens}), and this profile has chunked context off")

    def blocks_needed(self, request: GenerationRequest) -> int:
        parked = self._parked.get(request.request_id)
        prompt = len(request.prompt_tokens) + (len(parked.generated) if parked else 0)
        tpb = self.levers.tokens_per_block
        if not self.levers.use_paged_kv_cache:
            # Unpaged: every session holds a whole max-length context, as a contiguous cache would.
            return blocks_for(self.model.context_length, tpb)
        if self.levers.scheduler_policy == "guaranteed_no_evict":
            return blocks_for(len(request.prompt_tokens) + request.sampling.max_tokens, tpb)
        return blocks_for(prompt + 1, tpb)

    def try_reserve(self, request_id: str, blocks: int) -> bool:
        assert self.allocator is not None
        return self.allocator.try_reserve(request_id, blocks)

    def submit(self, request: GenerationRequest, events: asyncio.Queue[TokenEvent]) -> None:
        # Counted here, not when the step thread picks it up: a burst of arrivals must see the
        # prompts admitted a moment before them (deadline admission reads this).
        self._submitted_tokens += len(request.prompt_tokens)
        self._post("submit", (request, events))

    def cancel(self, request_id: str) -> None:
        self._post("cancel", request_id)

    def stats(self) -> EngineStats:
        alloc = self.allocator
        return EngineStats(
            kv_blocks_total=alloc.num_blocks if alloc else 0,
            kv_blocks_used=alloc.used if alloc else 0,
            tokens_per_block=self.levers.tokens_per_block,
            running=len(self._running),
            open_sequences=len(self._running) + len(self._parked),
            preemptions=self._preemptions,
            steps=self._steps,
            prefill_tokens_per_s=self._prefill_rate.value,
            decode_tokens_per_s=self._decode_rate.value,
            kv_cells_used=self._cells_used,
            kv_cache_bytes=int(self.kv.cache_bytes) if self.kv else 0,
            prefill_backlog_tokens=self._backlog + self._submitted_tokens - self._accepted_tokens,
        )

    def progress(self) -> Progress:
        pending = bool(self._running) or bool(self._commands)
        return Progress(steps=self._steps, pending_work=pending, last_step_monotonic=self._last_step)

    def effective_config(self) -> dict[str, Any]:
        return {
            "engine": "llama_cpp",
            "model": str(self.model_path),
            "llama_context_params": dict(self._context_params),
            "kv_cache_dtype_mapping": {k: v[0] for k, v in KV_DTYPE_TO_GGML.items()},
            "mapping": {
                "kv_cache_dtype": f"{self.levers.kv_cache_dtype} -> type_k/type_v "
                                  f"{KV_DTYPE_TO_GGML[self.levers.kv_cache_dtype][0]}",
                "tokens_per_block": "block size of forged's KV allocator over the unified cache",
                "use_paged_kv_cache": "true: blocks on demand; false: each session reserves a full context",
                "enable_chunked_context": "prefill split across steps, decodes first",
                "max_num_tokens": "tokens per llama_decode step (n_batch)",
                "scheduler_policy": "admission reservation and preemption in forged's scheduler",
                "max_concurrent_sessions": "n_seq_max and the session guard",
            },
            "profile_section": {
                "tensorrt_llm": _asdict(self.levers),
                "inference": _asdict(self.profile.inference),
                "llama_cpp": _asdict(self.profile.llama_cpp),
            },
        }

    def inject_fault(self, fault: Fault) -> None:
        """Test hook (FORGED_TEST_HOOKS=1 only): arm `fault` in the step loop's libllama calls."""
        if self._calls is None:
            raise EngineError("the engine has not loaded its model yet; arm faults once it is ready")
        if not isinstance(self._calls, FaultInjector):
            self._calls = FaultInjector(self._calls)
        # Read across threads: "the next request to start" is the one after those started so far.
        self._calls.arm(fault, next_arrival=self._arrivals + 1)
        self._wake.set()

    # ------------------------------------------------------------ step thread

    def _post(self, kind: str, payload: Any) -> None:
        self._commands.append((kind, payload))
        self._wake.set()

    def _run(self) -> None:
        try:
            while not self._stopping:
                self._drain_commands(block=not self._running)
                if self._running and not self._step():
                    # Nothing could run this step (blocks still reserved for a submit on its way):
                    # wait for the next command instead of spinning.
                    self._wake.wait(timeout=0.01)
        except Exception as exc:  # a bug in the loop itself: fail loudly, let systemd restart us
            log.exception("engine step loop died")
            self._fail_all(f"engine failure: {exc}")
            self._call_loop(self._hooks.on_fatal, f"engine step loop died: {exc}")
        finally:
            self._fail_all("the daemon is shutting down", reason="cancelled")

    def _drain_commands(self, block: bool) -> None:
        if block and not self._commands:
            self._wake.wait(timeout=0.5)
        self._wake.clear()
        while self._commands:
            kind, payload = self._commands.popleft()
            if kind == "submit":
                self._start_sequence(*payload)
            elif kind == "cancel":
                self._cancel(payload)
            elif kind == "stop":
                self._stopping = True

    def _start_sequence(self, request: GenerationRequest, events: asyncio.Queue[TokenEvent]) -> None:
        self._accepted_tokens += len(request.prompt_tokens)
        seq = self._parked.pop(request.request_id, None)
        if seq is None:
            self._arrivals += 1
            seq = Sequence(request=request, events=events, arrival=self._arrivals,
                           sampler=_make_sampler(request), to_prefill=list(request.prompt_tokens),
                           stop=StopMatcher(request.sampling.stop))
        else:
            # Resume after preemption: recompute prompt + everything already streamed.
            seq.events = events
            seq.to_prefill = list(request.prompt_tokens) + seq.generated
            seq.prefilled = seq.n_past = 0
            seq.pending_token = None
        seq.seq_id = self._free_seq_ids.pop()
        if not self._running:
            self._last_step = time.monotonic()  # the stall clock starts when work does
        self._running.append(seq)
        self._account()

    def _cancel(self, request_id: str) -> None:
        seq = self._parked.pop(request_id, None)
        if seq is not None:
            self._finish(seq, TokenEvent("", finish_reason="cancelled"))
            return
        for seq in self._running:
            if seq.request_id == request_id:
                self._finish(seq, TokenEvent("", finish_reason="cancelled"))
                return
        # Already finished, or never started: drop any reservation left behind.
        assert self.allocator is not None
        if self.allocator.release(request_id):
            self._call_loop(self._hooks.on_capacity_freed)

    def _step(self) -> bool:
        """One llama_decode over the planned batch. False when nothing could be scheduled."""
        plan = self._secure_blocks(self._replan())
        if not plan:
            return False
        batch = self._batch
        batch.clear()
        sample_at: list[tuple[Sequence, int]] = []
        n_prefill = n_decode = 0
        for sl in plan:
            seq: Sequence = sl.seq  # type: ignore[assignment]
            if sl.is_decode:
                last = batch.add((seq.pending_token,), seq.n_past, seq.seq_id, want_last_logits=True)
                n_decode += 1
                sample_at.append((seq, last))
                continue
            chunk = seq.to_prefill[seq.prefilled: seq.prefilled + sl.n_tokens]
            completes = seq.prefilled + sl.n_tokens == len(seq.to_prefill)
            last = batch.add(chunk, seq.n_past, seq.seq_id, want_last_logits=completes)
            n_prefill += len(chunk)
            if completes:
                sample_at.append((seq, last))
        started = time.monotonic()
        assert self._calls is not None  # made at load, before the step loop starts
        rc = self._calls.decode(self._ctx, batch.ready(), plan)
        finished = time.monotonic()
        if rc != 0:
            self._fail_batch(plan, rc)
            return True
        for sl in plan:
            seq = sl.seq  # type: ignore[assignment]
            if sl.is_decode:
                seq.n_past += 1
                seq.pending_token = None
                continue
            if seq.prefilled == 0:
                seq.prefill_started, seq.prefill_mark = started, self._prefilled_total
            seq.prefilled += sl.n_tokens
            seq.n_past += sl.n_tokens
            if seq.prefill_remaining == 0:
                # Measured over a prompt's whole prefill, first chunk to last: the rate the prompts
                # queued behind it will see, with decodes interleaved and attention growing with the
                # context (a rate per step overstated it early in a long prompt, and deadline
                # admission over-admitted). The tokens are every prompt's prefilled in that window,
                # not this one's alone: prompts that share steps share the time.
                done = self._prefilled_total + n_prefill - seq.prefill_mark
                self._prefill_rate.add(done, finished - seq.prefill_started)
        self._prefilled_total += n_prefill
        self._steps += 1
        self._last_step = finished
        self._account()
        if n_decode and not n_prefill:
            self._decode_rate.add(n_decode, finished - started)
        deliveries: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]] = []
        for seq, idx in sample_at:
            try:
                event = self._sample(seq, idx)
            except Exception as exc:  # a fault in one request's sampling ends that request alone
                log.exception("sampling failed for request %s", seq.request_id)
                event = TokenEvent("", finish_reason="error", error=f"sampling failed: {exc}")
            deliveries.append((seq.events, event))
            if event.finish_reason is not None:
                self._release(seq)
        self._deliver(deliveries)
        return True

    def _fail_batch(self, plan: list[Slice], rc: int) -> None:
        """A failed llama_decode ends the requests whose tokens were in its batch, and only them.

        libllama restores the KV on status 1 and -1 but keeps the ubatches it had processed before
        an abort (2) or a fatal error (< -1), so what the batch left of these sequences is unknown:
        all their cells go (`_release`). Retrying would only repeat a batch that failed as it was
        built; the client can retry (503) and its request then starts afresh.
        """
        reason = f"llama_decode failed with status {rc}"
        failed: list[Sequence] = [sl.seq for sl in plan]  # type: ignore[misc]
        log.error("%s; failing the %d requests in that batch: %s", reason, len(failed),
                  ", ".join(seq.request_id for seq in failed))
        for seq in failed:
            self._finish(seq, TokenEvent("", finish_reason="error", error=reason, status=503))

    def _account(self) -> None:
        self._backlog = sum(s.prefill_remaining for s in self._running)
        self._cells_used = sum(s.n_past for s in self._running)

    def _secure_blocks(self, plan: list[Slice]) -> list[Slice]:
        """Make sure every sequence in the plan owns cells for what it is about to write.

        Under guaranteed_no_evict (or unpaged KV) the reservation made at admission always covers
        it. Under max_utilization blocks are taken on demand, and when none are free the youngest
        running sequence is preempted until the rest fit; then the step is planned again.
        """
        assert self.allocator is not None
        while True:
            short, needed = None, 0
            for sl in plan:
                seq: Sequence = sl.seq  # type: ignore[assignment]
                if not self.allocator.ensure_tokens(seq.request_id, seq.n_past + sl.n_tokens):
                    short, needed = seq, seq.n_past + sl.n_tokens
                    break
            if short is None:
                return plan
            if len(self._running) == 1:
                if self._commands:
                    # Blocks are reserved for requests whose submit is still queued: start them, so
                    # that the youngest can be preempted like any other.
                    self._drain_commands(block=False)
                    plan = self._replan()
                    continue
                if blocks_for(needed, self.allocator.tokens_per_block) <= self.allocator.num_blocks:
                    # The blocks are reserved for a request admitted a moment ago whose submit has
                    # not arrived yet: skip this step; it will be preemptable on the next one.
                    return []
                # Alone and short even of the whole cache: it can never fit. Never loop on it.
                self._finish(short, TokenEvent("", finish_reason="error",
                                               error="the KV cache cannot hold this request"))
                return []
            victim = max(self._running, key=lambda s: s.arrival)
            self._preempt(victim, beneficiary=short, tokens=needed)
            plan = self._replan()

    def _replan(self) -> list[Slice]:
        decoding = [s for s in self._running if s.pending_token is not None]
        prefilling = [s for s in self._running if s.pending_token is None and s.prefill_remaining > 0]
        return plan_step(decoding, prefilling, self.levers.max_num_tokens, self.levers.enable_chunked_context)

    def _preempt(self, seq: Sequence, beneficiary: Sequence, tokens: int) -> None:
        self._preemptions += 1
        log.info("preempting request %s (%d tokens generated) to free KV blocks",
                 seq.request_id, len(seq.generated))
        assert self.allocator is not None
        # Hand the blocks straight to the sequence that needs them, then free the rest of the victim.
        self.allocator.release_to(seq.request_id, beneficiary.request_id, tokens)
        self._release(seq, keep_sampler=True, notify=False)
        self._parked[seq.request_id] = seq
        self._call_loop(self._hooks.on_preempted, seq.request_id)

    def _sample(self, seq: Sequence, idx: int) -> TokenEvent:
        assert self._llama is not None and self._calls is not None
        token = self._calls.sample(self._ctx, seq, idx)
        sp = seq.request.sampling
        seq.generated.append(token)
        if not sp.ignore_eos and self._llama.is_eog(token):
            return TokenEvent(self._flush(seq), (token,), finish_reason="stop")
        text = seq.decoder.feed(self._llama.piece(token))
        assert seq.stop is not None
        text, stopped = seq.stop.feed(text)
        if stopped:
            return TokenEvent(text, (token,), finish_reason="stop")
        if len(seq.generated) >= sp.max_tokens:
            return TokenEvent(text + self._flush(seq), (token,), finish_reason="length")
        seq.pending_token = token
        return TokenEvent(text, (token,))

    @staticmethod
    def _flush(seq: Sequence) -> str:
        assert seq.stop is not None
        text, _ = seq.stop.feed(seq.decoder.flush())
        return text + seq.stop.flush()

    def _release(self, seq: Sequence, keep_sampler: bool = False, notify: bool = True) -> None:
        """Free a running sequence's KV cells, blocks and seq id at once, and tell admission."""
        assert self.allocator is not None
        if seq in self._running:
            self._running.remove(seq)
            ll.llama_memory_seq_rm(self._mem, seq.seq_id, -1, -1)
            self._free_seq_ids.append(seq.seq_id)
            seq.seq_id = -1
            self._account()
        freed = self.allocator.release(seq.request_id)
        if not keep_sampler and seq.sampler:
            ll.llama_sampler_free(seq.sampler)
            seq.sampler = None
        if freed and notify:
            self._call_loop(self._hooks.on_capacity_freed)

    def _finish(self, seq: Sequence, event: TokenEvent) -> None:
        self._release(seq)
        self._deliver([(seq.events, event)])

    def _fail_all(self, message: str, reason: str = "error") -> None:
        for seq in list(self._running) + list(self._parked.values()):
            self._finish(seq, TokenEvent("", finish_reason=reason,  # type: ignore[arg-type]
                                         error=message if reason == "error" else None))
        self._parked.clear()

    def _deliver(self, deliveries: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]]) -> None:
        if deliveries:
            self._call_loop(_put_all, deliveries)

    def _call_loop(self, fn: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed between the check and the call
                loop.call_soon_threadsafe(fn, *args)


@dataclass(frozen=True)
class KvSizing:
    num_blocks: int
    tokens_per_block: int
    cache_bytes: float  # what libllama allocates for this cache: full layers plus the sliding-window part
    budget_bytes: float
    limited_by: str
    sessions: int  # n_seq_max: the sequences the context can hold at once

    @property
    def n_ctx(self) -> int:
        return self.num_blocks * self.tokens_per_block


def size_kv_cache(shape: KvShape, levers: Any, *, sessions: int, context: int, n_ubatch: int,
                  available_bytes: int, unified: bool = True) -> KvSizing:
    """How many KV blocks the libllama cache gets, and how many sequences it holds.

    The budget is `free_gpu_memory_fraction` of the device memory left once the weights are in
    (MemAvailable on CPU and unified-memory machines). Sliding-window layers keep a fixed-size cache
    (libllama: window x sequences + one ubatch), which comes off the budget first.

    Unified: one pool; the rest of the budget buys blocks of full-attention cells, capped by every
    session at a full context (more would never be used) and by `kv_cache_max_tokens`. Less than one
    full context refuses to start. Not unified: each sequence owns a stream of one full context, so
    the budget decides how many sequences (sessions) fit.
    """
    tpb = levers.tokens_per_block
    context_blocks = blocks_for(context, tpb)
    cell_bytes = shape.elements_per_token_per_layer() * LLAMA_CPP_DTYPE_BYTES[levers.kv_cache_dtype]
    budget = levers.free_gpu_memory_fraction * max(available_bytes - shape.weights_bytes, 0)

    def swa_bytes(n_seq: int) -> float:
        if not shape.swa_layers:
            return 0.0
        cells = min(-(-(shape.sliding_window * n_seq + n_ubatch) // 256) * 256, n_seq * context_blocks * tpb)
        return shape.swa_layers * cells * cell_bytes

    if not unified:
        stream = shape.full_layers * context_blocks * tpb * cell_bytes + swa_bytes(1)
        caps = {"max_concurrent_sessions": sessions,
                "free_gpu_memory_fraction of free memory": int(budget // stream) if stream else sessions}
        if levers.kv_cache_max_tokens:
            caps["kv_cache_max_tokens"] = levers.kv_cache_max_tokens // (context_blocks * tpb)
        limited_by, fit = min(caps.items(), key=lambda kv: kv[1])
        if fit < 1:
            raise EngineError(f"one session's KV stream of {context} tokens does not fit ({limited_by}); lower "
                              f"inference.max_seq_len or give the KV cache more memory")
        return KvSizing(fit * context_blocks, tpb, shape.full_layers * fit * context_blocks * tpb * cell_bytes
                        + swa_bytes(fit), budget, limited_by, fit)
    caps = {"every session at a full context": sessions * context_blocks}
    if shape.full_layers:
        caps["free_gpu_memory_fraction of free memory"] = int(max(budget - swa_bytes(sessions), 0)
                                                              // (shape.full_layers * cell_bytes * tpb))
    if levers.kv_cache_max_tokens:
        caps["kv_cache_max_tokens"] = levers.kv_cache_max_tokens // tpb
    limited_by, num_blocks = min(caps.items(), key=lambda kv: kv[1])
    if num_blocks < context_blocks:
        raise EngineError(f"the KV cache can hold {num_blocks * tpb} tokens ({limited_by}), less than one "
                          f"context of {context} tokens; lower inference.max_seq_len or give the KV cache "
                          f"more memory")
    cache = shape.full_layers * num_blocks * tpb * cell_bytes + swa_bytes(sessions)
    return KvSizing(num_blocks, tpb, cache, budget, limited_by, sessions)


def _put_all(deliveries: list[tuple[asyncio.Queue[TokenEvent], TokenEvent]]) -> None:
    for queue, event in deliveries:
        queue.put_nowait(event)


def _make_sampler(request: GenerationRequest) -> Any:
    """libllama's sampler chain for the request; None for greedy, which StepCalls.sample does itself."""
    sp = request.sampling
    if sp.temperature <= 0:
        return None
    params = ll.llama_sampler_chain_default_params()
    params.no_perf = True
    chain = ll.llama_sampler_chain_init(params)
    if sp.top_k > 0:
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_k(sp.top_k))
    if sp.top_p < 1.0:
        ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_top_p(sp.top_p, 1))
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_temp(sp.temperature))
    seed = ll.LLAMA_DEFAULT_SEED if sp.seed is None else sp.seed & 0xFFFFFFFF
    ll.llama_sampler_chain_add(chain, ll.llama_sampler_init_dist(seed))
    return chain


def _asdict(obj: Any) -> dict[str, Any]:
    from dataclasses import asdict
    return asdict(obj)
