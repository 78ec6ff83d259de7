"""The embedded engine: continuous batching over libllama, with a prefix cache, in its own thread.

`LlamaCppEngine` is the engine contract (`engine/base.py`) for libllama. It loads the model, sizes
the KV cache (`sizing.py`), creates the context (`context.py`), warms it up, and hands everything
that runs to the step thread (`worker.py`): the KV pool (`kvpool.py`), the scheduler
(`scheduler.py`) and every sequence. The event loop only posts commands and reads the thread's
published figures; admission asks `has_room_for` before it starts a session.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import llama_cpp as ll

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
    context_overflow,
)
from forged.engine.kv import KvShape, shape_from_metadata
from forged.engine.llama_cpp import backends
from forged.engine.llama_cpp.batch import StepBatch
from forged.engine.llama_cpp.calls import StepCalls
from forged.engine.llama_cpp.context import KV_DTYPE_TO_GGML, LlamaContext
from forged.engine.llama_cpp.faults import FaultInjector
from forged.engine.llama_cpp.grammar import to_gbnf, unsupported_features
from forged.engine.llama_cpp.hostcache import HostCache
from forged.engine.llama_cpp.kvpool import KvPool, StreamPool, UnifiedPool
from forged.engine.llama_cpp.model import LlamaModel
from forged.engine.llama_cpp.scheduler import CPU_MIN_CHUNK, Policy
from forged.engine.llama_cpp.sequence import choice_blocks, reserve_tokens
from forged.engine.llama_cpp.sizing import KvSizing, size_kv_cache
from forged.engine.llama_cpp.warmup import warm_up
from forged.engine.llama_cpp.worker import StepLoop
from forged.gpus import Placement

log = logging.getLogger(__name__)


class LlamaCppEngine(Engine):
    name = "llama_cpp"

    def __init__(self, profile: Profile, model_path: Path, model_name: str,
                 memory_available: Callable[[], int], placement: Placement | None = None,
                 host_tier: bool = False, library: backends.Library | None = None,
                 gpu_unused: str | None = None) -> None:
        self.profile = profile
        # The libllama loaded and what it has (backends.inspect), and why the GPU is unused, if it is.
        self.library = library
        self.gpu_unused = gpu_unused
        self._device: dict[str, Any] | None = None
        # Which GPUs hold the model and its KV, and how it is split over them (forged.gpus).
        self.placement = placement or Placement(self.name)
        # Whether the profile's host_cache_size may be used: KV on a discrete GPU only.
        self._host_tier = host_tier
        self.levers = profile.tensorrt_llm
        self._memory_available = memory_available
        self.model_path = model_path
        self.model_name = model_name
        self.model = ModelInfo(name=model_name, path=str(model_path), context_length=0)
        self.kv: KvSizing | None = None
        self.kv_shape: KvShape | None = None
        self._llama: LlamaModel | None = None
        self._context: LlamaContext | None = None
        self._loop: StepLoop | None = None
        self._prefill_rate = Rate()
        self._decode_rate = Rate()

    # ------------------------------------------------------------ lifecycle

    def load(self) -> None:
        opts, levers = self.profile.llama_cpp, self.levers
        available_before = self._memory_available()
        backends.LOAD_LOG.reset()
        self._llama = model = LlamaModel(self.model_path, self.n_gpu_layers, **self.placement.model_params())
        context_length = min(self.profile.inference.max_seq_len, model.n_ctx_train)
        sessions = self.profile.inference.max_concurrent_sessions
        n_ubatch = opts.n_ubatch
        self.kv_shape = shape_from_metadata(model.metadata, model.size_bytes)
        try:
            # Only the weights on the KV cache's GPUs come off their memory (forged.gpus).
            self.kv = kv = size_kv_cache(self.placement.kv_shape(self.kv_shape), levers, sessions=sessions,
                                         context=context_length,
                                         n_ubatch=n_ubatch, available_bytes=available_before,
                                         unified=opts.kv_unified)
            # A step never holds more than max_num_tokens while anything decodes; an idle engine
            # prefills a whole ubatch per step (scheduler.py).
            n_batch = max(levers.max_num_tokens, n_ubatch)
            self._context = context = LlamaContext(model, self.profile, kv, n_batch, n_ubatch, self.n_gpu_layers)
        except EngineError:
            model.free()
            raise
        if self.library is not None:
            self._device = backends.placement(self.library, backends.LOAD_LOG,
                                              backends.model_layers(model.metadata), self.gpu_unused)
            log.info("engine device: %s; %s/%s layers offloaded; KV on %s", self._device["runs_on"],
                     self._device["layers_offloaded"], self._device["layers_total"],
                     ", ".join(self._device["kv_on"]) or "?")
        batch = StepBatch(n_batch)
        self.model = ModelInfo(name=self.model_name, path=str(self.model_path), context_length=context_length,
                               n_params=model.n_params, size_bytes=model.size_bytes,
                               metadata={k: v for k, v in model.metadata.items()
                                         if k.startswith("general.") or k.endswith("context_length")})
        self.max_sessions = kv.sessions
        # n choices run as n sequences at once (forked after the prompt's prefill), and a request
        # never gets more sequences than the profile has sessions.
        self.max_choices = kv.sessions
        self._prefill_rate, self._decode_rate = warm_up(model, context, batch, levers.max_num_tokens, context_length)
        pool = self._make_pool(kv, context)
        policy = Policy(scheduler_policy=levers.scheduler_policy, paged=levers.use_paged_kv_cache,
                        chunked=levers.enable_chunked_context, max_num_tokens=levers.max_num_tokens,
                        idle_max_num_tokens=n_batch, context=context_length,
                        min_chunk=CPU_MIN_CHUNK if self.n_gpu_layers == 0 else 1)
        self._loop = StepLoop(model, context, pool, policy, StepCalls(model.n_vocab), batch, self._prefill_rate,
                              self._decode_rate)
        log.info("model %s loaded: %d params, trained context %d, serving context %d; KV %d blocks x %d tokens "
                 "= %d cells (%s, %.1f MiB; %s; limited by %s), prefix cache %s, %d threads; prefill %.0f "
                 "tok/s, decode %.0f tok/s", self.model_path.name, model.n_params, model.n_ctx_train,
                 context_length, kv.num_blocks, kv.tokens_per_block, kv.n_ctx, context.kv_type_name,
                 kv.cache_bytes / 2**20, f"{kv.sessions} streams" if not kv.unified else
                 f"one pool, {kv.n_seq_max} sequence ids", kv.limited_by,
                 "on" if opts.prefix_cache else "off", context.params["n_threads"], self._prefill_rate.value,
                 self._decode_rate.value)

    def _make_pool(self, kv: KvSizing, context: LlamaContext) -> KvPool:
        caching = self.profile.llama_cpp.prefix_cache
        window = self.kv_shape.sliding_window if self.kv_shape and self.kv_shape.swa_layers else 0
        if kv.unified:
            return UnifiedPool(context, kv.n_seq_max, kv.num_blocks, kv.tokens_per_block, caching=caching,
                               window=window)
        budget = self.levers.host_cache_size or 0
        host = HostCache(budget, kv.tokens_per_block) if budget and self._host_tier else None
        if budget and not self._host_tier:
            log.info("tensorrt_llm.host_cache_size is set, but the KV is not in separate GPU memory here: "
                     "no host tier")
        return StreamPool(context, kv.n_seq_max, kv.stream_blocks, kv.tokens_per_block, caching=caching,
                          window=window, host=host)

    @property
    def n_gpu_layers(self) -> int:
        """The profile's n_gpu_layers, or 0 when the GPU is unused (llama_cpp.allow_cpu_fallback)."""
        return 0 if self.gpu_unused else self.profile.llama_cpp.n_gpu_layers

    def device(self) -> dict[str, Any] | None:
        return self._device

    def start(self, loop: asyncio.AbstractEventLoop, hooks: EngineHooks) -> None:
        assert self._loop is not None
        self._loop.start(loop, hooks)

    async def stop(self) -> None:
        if self._loop is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._loop.join)
        if self._context is not None:
            self._context.free()
        if self._llama is not None:
            self._llama.free()

    # ------------------------------------------------------------ event-loop side API

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        assert self._llama is not None
        return self._llama.tokenize(text, add_special=add_special, parse_special=parse_special)

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        assert self._llama is not None
        return self._llama.render_chat(messages, tools)

    def chat_template_source(self) -> str:
        assert self._llama is not None
        return self._llama.chat_template_text

    def schema_problems(self, schema: Any) -> list[str]:
        return unsupported_features(schema)

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
        if prompt >= context or prompt + request.sampling.max_tokens > context:
            raise context_overflow(prompt, request.sampling.max_tokens, context)
        assert self._llama is not None
        n_vocab = self._llama.n_vocab
        bad = next((t for t in request.prompt_tokens if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise RequestRejected(f"token id {bad} is not in this model's vocabulary (0..{n_vocab - 1})")
        if request.n > self.max_choices:
            raise RequestRejected(f"n is {request.n}, but this profile runs at most {self.max_choices} sequences "
                                  f"at once (max_concurrent_sessions), and the llama_cpp engine runs a request's "
                                  f"choices together", param="n")
        if request.n > 1 and self._loop is not None and not isinstance(self._loop.pool, StreamPool) \
                and self._units(request) > self._loop.pool.total_blocks:
            raise RequestRejected(f"{request.n} choices of this request need {self._units(request)} KV blocks, "
                                  f"more than the cache's {self._loop.pool.total_blocks}; ask for fewer choices or "
                                  f"a lower max_tokens", param="n")
        sp = request.sampling
        bad = next((t for t, _ in sp.logit_bias if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise RequestRejected(f"logit_bias names token id {bad}, which is not in this model's vocabulary "
                                  f"(0..{n_vocab - 1})", param="logit_bias")
        if sp.constraint is not None:
            # Compiled here, on the tokenizer pool, so that a grammar libllama cannot parse is a 400; the
            # step thread compiles it again for each choice's sampler.
            grammar = ll.llama_sampler_init_grammar(self._llama.vocab, to_gbnf(sp.constraint).encode(), b"root")
            if not grammar:
                raise RequestRejected("libllama could not parse the grammar made for this request")
            ll.llama_sampler_free(grammar)
        if not self.levers.enable_chunked_context and prompt > self.levers.max_num_tokens:
            raise RequestRejected(f"the prompt has {prompt} tokens, more than max_num_tokens "
                                  f"({self.levers.max_num_tokens}), and this profile has chunked context off")

    def expected_cached_tokens(self, prompt_tokens: list[int]) -> int:
        return self._loop.pool.estimate(prompt_tokens) if self._loop is not None else 0

    def has_room_for(self, request: GenerationRequest) -> bool:
        loop = self._loop
        if loop is None:
            return False
        figures = loop.figures
        room = figures.room - (loop.units_posted - loop.units_taken)
        return figures.waiting == 0 and room >= self._units(request)

    def _units(self, request: GenerationRequest) -> int:
        """What admission counts a request in: KV blocks in the unified pool (all its choices'), one
        stream per choice otherwise."""
        assert self._loop is not None
        pool = self._loop.pool
        if isinstance(pool, StreamPool):
            return request.n
        prompt = len(request.prompt_tokens)
        tokens = reserve_tokens(prompt, prompt, request.sampling.max_tokens, self.levers.scheduler_policy,
                                self.levers.use_paged_kv_cache, self.model.context_length)
        return choice_blocks(prompt, tokens, request.n, pool.tpb, pool.caching)

    def submit(self, request: GenerationRequest, events: asyncio.Queue[TokenEvent]) -> None:
        assert self._loop is not None
        # Counted here, not when the step thread picks it up: a burst of arrivals must see the
        # prompts admitted a moment before them (deadline admission reads the backlog).
        prefill = len(request.prompt_tokens) - self.expected_cached_tokens(request.prompt_tokens)
        self._loop.submit(request, events, self._units(request), prefill)

    def cancel(self, request_id: str) -> None:
        if self._loop is not None:
            self._loop.post("cancel", request_id)

    def stats(self) -> EngineStats:
        loop = self._loop
        if loop is None:
            return EngineStats(tokens_per_block=self.levers.tokens_per_block)
        f = loop.figures
        return EngineStats(
            kv_blocks_total=f.blocks_total,
            kv_blocks_used=f.blocks_used,
            kv_blocks_cached=f.blocks_cached,
            tokens_per_block=self.levers.tokens_per_block,
            running=f.running,
            open_sequences=f.running + f.waiting,
            waiting=f.waiting,
            preemptions=loop.scheduler.preemptions,
            steps=loop.steps,
            prefill_tokens_per_s=self._prefill_rate.value,
            decode_tokens_per_s=self._decode_rate.value,
            kv_cells_used=f.cells_used,
            kv_cache_bytes=int(self.kv.cache_bytes) if self.kv else 0,
            prefill_backlog_tokens=f.backlog_tokens + loop.tokens_posted - loop.tokens_taken,
            prefix_cache_queries=f.prefix_queries,
            prefix_cache_hits=f.prefix_hits,
            prefix_cache_detail=f.cache_detail,
            prefilled_tokens=loop.prefilled_total,
        )

    def progress(self) -> Progress:
        loop = self._loop
        if loop is None:
            return Progress(steps=0, pending_work=False, last_step_monotonic=0.0)
        return Progress(steps=loop.steps, pending_work=loop.pending_work, last_step_monotonic=loop.last_step)

    def effective_config(self) -> dict[str, Any]:
        kv = self.kv
        return {
            "engine": "llama_cpp",
            "model": str(self.model_path),
            "llama_context_params": dict(self._context.params) if self._context else {},
            "llama_model_params": {"n_gpu_layers": self.n_gpu_layers,
                                   **self.placement.model_params()},
            "kv_cache_dtype_mapping": {k: v[0] for k, v in KV_DTYPE_TO_GGML.items()},
            "kv_layout": None if kv is None else {
                "unified": kv.unified, "sequences": kv.n_seq_max, "sessions": kv.sessions,
                "prefix_cache": self.profile.llama_cpp.prefix_cache},
            "mapping": {
                "kv_cache_dtype": f"{self.levers.kv_cache_dtype} -> type_k/type_v "
                                  f"{KV_DTYPE_TO_GGML[self.levers.kv_cache_dtype][0]}",
                "tokens_per_block": "block size of forged's KV pool and prefix cache",
                "use_paged_kv_cache": "true: blocks on demand; false: each session reserves a full context",
                "enable_chunked_context": "prefill split across steps, decodes first",
                "max_num_tokens": "tokens per llama_decode step while any sequence decodes (n_batch)",
                "scheduler_policy": "reservation and preemption in forged's scheduler",
                "max_concurrent_sessions": "sequences (n_seq_max: streams, or sessions + cache holders) "
                                           "and the session guard",
            },
            "profile_section": {
                "tensorrt_llm": asdict(self.levers),
                "inference": asdict(self.profile.inference),
                "llama_cpp": asdict(self.profile.llama_cpp),
            },
        }

    def inject_fault(self, fault: Fault) -> None:
        """Test hook (FORGED_TEST_HOOKS=1 only): arm `fault` in the step loop's libllama calls."""
        loop = self._loop
        if loop is None:
            raise EngineError("the engine has not loaded its model yet; arm faults once it is ready")
        if not isinstance(loop.calls, FaultInjector):
            loop.calls = FaultInjector(loop.calls)
        # Read across threads: "the next request to start" is the one after those started so far.
        loop.calls.arm(fault, next_arrival=loop.arrivals + 1)
        loop.wake()
