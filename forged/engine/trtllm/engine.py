"""TrtLlmEngine: forged's engine contract (`engine/base.py`) over TensorRT-LLM's LLM API.

- **Sampling.** temperature, top_p, top_k, min_p, seed, presence/frequency penalties and
  `repeat_penalty` (`repetition_penalty`) map to `SamplingParams`. Structured output (a
  response_format, or a tool_choice that forces a call in the generic tool format) maps to guided
  decoding: `GuidedDecodingParams(json=schema)` or `(json_object=True)` in
  `SamplingParams.guided_decoding`, where the translation gave `LLM(...)` a
  `guided_decoding_backend`; without it a constrained request is refused (400), never answered
  unconstrained. Refused with 400 for now: logprobs, logit_bias (TensorRT-LLM takes a bias tensor,
  `embedding_bias`), n > 1 and a tool-call syntax wrapped around JSON (a native `<tool_call>` format
  under a forced tool_choice).
- **Streaming.** `generate_async(prompt_token_ids, SamplingParams, streaming=True)`; each
  `RequestOutput` (the same object, updated in place) gives `outputs[0].text_diff` and
  `token_ids_diff`. Stop strings are passed to TensorRT-LLM (so that it stops generating) with
  `include_stop_str_in_output=True`, and cut by forged's own matcher, which holds back a partial stop
  string across deltas as the embedded engine does. A client that leaves: `abort()`.
- **Stats** from `get_stats_async` (needs `enable_iter_perf_stats`): KV blocks (`kvCacheStats`),
  queued and paused requests, `gpuMemUsage`, the iteration counter (the watchdog's progress).
- **Errors.** `RequestError` (a per-request failure) becomes 400 when `generate_async` refuses the
  request, 503 when the executor fails it mid-way, with TensorRT-LLM's message. Any other exception
  from a request means the LLM shut itself down after a background failure (the LLM API calls
  `shutdown()` and re-raises; later calls raise "LLM is shutting down"): every open request gets 503,
  and `EngineHooks.on_fatal` makes the daemon turn not-ready and exit non-zero so that systemd
  restarts it. Idle, TensorRT-LLM surfaces such a failure only at the next request, and so does forged.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from forged.config import Profile
from forged.engine.base import (
    Engine,
    EngineError,
    EngineHooks,
    EngineStats,
    GenerationRequest,
    ModelInfo,
    OutputConstraint,
    Progress,
    Rate,
    RequestRejected,
    SamplingParams,
    TokenEvent,
    context_overflow,
)
from forged.engine.kv import blocks_for, shape_from_hf_config
from forged.engine.text import StopMatcher
from forged.engine.trtllm.checks import INSTALL_HINT, PACKAGE, Locate, check_hardware, one_line, refusal
from forged.engine.trtllm.translation import GUIDED_BACKEND_FIELD, Translation, translate
from forged.hardware import HardwareInfo

log = logging.getLogger(__name__)

STATS_TIMEOUT_S = 1.0
STATS_INTERVAL_S = 0.5
WARMUP_PREFIX = "forged-warmup-"


@dataclass(eq=False)
class _Live:
    request: GenerationRequest
    output: Any  # tensorrt_llm RequestOutput
    events: asyncio.Queue[TokenEvent]
    submitted: float
    task: asyncio.Task[None] | None = None
    first_token: float | None = None
    last_token: float | None = None


@dataclass
class _KvView:
    max_blocks: int = 0
    free_blocks: int = 0
    used_blocks: int = 0
    tokens_per_block: int = 0
    # kvCacheStats' running totals of prompt blocks reused from and missed in the block-reuse cache;
    # None while no stats carried them.
    reused_blocks: int | None = None
    missed_blocks: int | None = None


class TrtLlmEngine(Engine):
    name = "tensorrt_llm"

    def __init__(self, profile_name: str, profile: Profile, model_dir: Path, model_name: str,
                 hardware: HardwareInfo, *, where: Locate | None = None) -> None:
        self.profile_name = profile_name
        self.profile = profile
        self.levers = profile.tensorrt_llm
        self.model_path = model_dir
        self.model_name = model_name
        self.model = ModelInfo(name=model_name, path=str(model_dir), context_length=0)
        self.kv_shape = None
        self._where = where
        self.warnings = check_hardware(profile_name, profile, hardware, where)
        for warning in self.warnings:
            log.warning("%s", warning)
        self.translation: Translation | None = None
        self._trt: Any = None
        self._llm: Any = None
        self._tokenizer: Any = None
        self._request_error: tuple[type[BaseException], ...] = ()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._hooks = EngineHooks()
        self._live: dict[str, _Live] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._stats_task: asyncio.Task[None] | None = None
        self._submitted = False
        self._stopping = False
        self._failed: str | None = None
        self._kv = _KvView()
        self._waiting = 0
        self._paused = 0
        self._gpu_mem: int | None = None
        self._iter = 0
        self._last_step = time.monotonic()
        self._prefill_rate = Rate()
        self._decode_rate = Rate()
        self._tpb_warned = False
        self._stats_errors = 0

    # ------------------------------------------------------------ lifecycle

    def load(self) -> None:
        try:
            trt = importlib.import_module(PACKAGE)
        except Exception as exc:  # installed but broken (CUDA libraries, torch): one line
            raise EngineError(f"the {PACKAGE} package is installed but cannot be imported: {one_line(exc)}; "
                              f"reinstall it with {INSTALL_HINT}") from None
        self._trt = trt
        self._request_error = _request_error_classes()
        config = _read_config(self.model_path)
        trained = int(config.get("text_config", config).get("max_position_embeddings") or 0)
        max_seq_len = min(self.profile.inference.max_seq_len, trained) if trained else \
            self.profile.inference.max_seq_len
        with contextlib.suppress(KeyError, TypeError, ValueError):
            weights = sum(p.stat().st_size for p in self.model_path.glob("*.safetensors"))
            self.kv_shape = shape_from_hf_config(config, weights)
        tp = self.levers.tensor_parallel_size
        heads = config.get("text_config", config).get("num_attention_heads")
        if tp > 1 and isinstance(heads, int) and heads % tp:
            # Tensor parallelism gives each GPU an equal slice of the attention heads.
            raise refusal(self.profile_name, "tensorrt_llm.tensor_parallel_size", f"expected a divisor of the "
                          f"model's {heads} attention heads (config.json num_attention_heads), got {tp}",
                          self._where)
        self.translation = tr = translate(self.profile_name, self.profile, str(self.model_path), trt,
                                          max_seq_len=max_seq_len, where=self._where)
        log.info("TensorRT-LLM %s: %s", tr.version, tr.call)
        for note in tr.notes:
            log.info("TensorRT-LLM %s: %s", tr.version, note)
        try:
            self._llm = trt.LLM(**tr.kwargs)
        except Exception as exc:
            raise EngineError(f"TensorRT-LLM {tr.version} could not load {self.model_path}: {one_line(exc)}") \
                from None
        self._tokenizer = getattr(self._llm, "tokenizer", None)
        if self._tokenizer is None:
            self._shutdown_llm()
            raise EngineError(f"TensorRT-LLM loaded no tokenizer for {self.model_path}; the checkpoint directory "
                              f"needs its tokenizer files")
        meta = {k: v for k, v in config.items() if isinstance(v, str | int | float | bool)
                and k in ("model_type", "torch_dtype", "max_position_embeddings", "_name_or_path")}
        self.model = ModelInfo(name=self.model_name, path=str(self.model_path), context_length=max_seq_len,
                               size_bytes=self.kv_shape.weights_bytes if self.kv_shape else 0,
                               metadata={**meta, "tensorrt_llm_version": tr.version})

    def start(self, loop: asyncio.AbstractEventLoop, hooks: EngineHooks) -> None:
        self._loop = loop
        self._hooks = hooks
        self._last_step = time.monotonic()
        self._stats_task = loop.create_task(self._stats_loop())
        self._spawn(self._warm_up())

    async def stop(self) -> None:
        self._stopping = True
        for live in list(self._live.values()):
            self._abort(live)
            self._deliver(live, TokenEvent("", finish_reason="cancelled"))
        self._live.clear()
        tasks = [t for t in (self._stats_task, *self._tasks) if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._llm is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._shutdown_llm)

    def _shutdown_llm(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            try:
                llm.shutdown()
            except Exception as exc:
                log.warning("TensorRT-LLM shutdown: %s", one_line(exc))

    # ------------------------------------------------------------ event-loop side API

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        # A Hugging Face tokenizer always reads special tokens written in the text (parse_special).
        return list(self._tokenizer.encode(text, add_special_tokens=add_special))

    def tokenize_prompt(self, text: str) -> list[int]:
        return self.tokenize(text, add_special=True, parse_special=True)

    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        extra = {"tools": tools} if tools else {}
        try:
            text = self._tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True,
                                                       **extra)
        except Exception as exc:  # jinja2 TemplateError, or ValueError when the model has no template
            raise RequestRejected(f"the model's chat template refused these messages: {one_line(exc)}") from None
        return str(text)

    def chat_template_source(self) -> str:
        source = getattr(self._tokenizer, "chat_template", None)
        return source if isinstance(source, str) else ""

    def validate(self, request: GenerationRequest) -> None:
        sp = request.sampling
        refused = [name for name, asked in (("logprobs", sp.logprobs is not None), ("logit_bias", bool(sp.logit_bias)),
                                            (f"n: {request.n}", request.n > self.max_choices)) if asked]
        if refused:
            raise RequestRejected(f"the tensorrt_llm engine does not serve {', '.join(refused)} yet",
                                  param=refused[0].split(":")[0])
        if sp.constraint is not None:
            self._guided(sp.constraint)  # refuses what guided decoding cannot take
        prompt = len(request.prompt_tokens)
        context = self.model.context_length
        total = prompt + request.sampling.max_tokens
        if prompt == 0:
            raise RequestRejected("the prompt is empty")
        if prompt >= context or total > context:
            raise context_overflow(prompt, request.sampling.max_tokens, context)
        if not self.levers.enable_chunked_context and prompt > self.levers.max_num_tokens:
            raise RequestRejected(f"the prompt has {prompt} tokens, more than max_num_tokens "
                                  f"({self.levers.max_num_tokens}), and this profile has chunked context off")
        kv = self._kv
        capacity = kv.max_blocks * kv.tokens_per_block
        if (capacity and self.levers.scheduler_policy == "guaranteed_no_evict"
                and blocks_for(total, kv.tokens_per_block) > kv.max_blocks):
            raise RequestRejected(f"the prompt has {prompt} tokens and max_tokens is {request.sampling.max_tokens}, "
                                  f"{total} in all, but the whole KV cache holds {capacity} tokens")

    def has_room_for(self, request: GenerationRequest) -> bool:
        # KV blocks belong to TensorRT-LLM's scheduler (GUARANTEED_NO_EVICT reserves prompt +
        # max_tokens, MAX_UTILIZATION pauses on pressure); forged's session and queue guards still
        # bound what reaches it (max_batch_size = max_concurrent_sessions).
        return True

    def submit(self, request: GenerationRequest, events: asyncio.Queue[TokenEvent]) -> None:
        if self._failed is not None or self._llm is None:
            events.put_nowait(TokenEvent("", finish_reason="error", status=503,
                                         error=self._failed or "the TensorRT-LLM engine is not running"))
            return
        try:
            params = self._sampling(request.sampling)
            output = self._llm.generate_async(list(request.prompt_tokens), sampling_params=params, streaming=True)
        except Exception as exc:
            if self._is_request_error(exc) or isinstance(exc, ValueError | TypeError):
                events.put_nowait(TokenEvent("", finish_reason="error", status=400,
                                             error=f"TensorRT-LLM refused the request: {one_line(exc)}"))
            else:
                self._fatal(exc)
                events.put_nowait(TokenEvent("", finish_reason="error", status=503, error=str(self._failed)))
            return
        self._submitted = True
        live = _Live(request, output, events, submitted=time.monotonic())
        self._live[request.request_id] = live
        if len(self._live) == 1:
            self._last_step = time.monotonic()  # the stall clock starts when work does
        live.task = self._spawn(self._pump(live))

    def cancel(self, request_id: str) -> None:
        live = self._live.pop(request_id, None)
        if live is None:
            return
        self._abort(live)
        if live.task is not None and live.task is not asyncio.current_task():
            live.task.cancel()
        self._deliver(live, TokenEvent("", finish_reason="cancelled"))

    def stats(self) -> EngineStats:
        kv = self._kv
        # After the last request TensorRT-LLM runs no more iterations, so no stats say the blocks
        # came back; with nothing in flight none are held.
        used = kv.used_blocks if self._live else 0
        running = [live for live in self._live.values() if not live.request.request_id.startswith(WARMUP_PREFIX)]
        return EngineStats(
            kv_blocks_total=kv.max_blocks,
            kv_blocks_used=min(used, kv.max_blocks),
            tokens_per_block=kv.tokens_per_block or self.levers.tokens_per_block,
            running=len(running),
            open_sequences=len(self._live),
            steps=self._iter,
            prefill_tokens_per_s=self._prefill_rate.value,
            decode_tokens_per_s=self._decode_rate.value,
            kv_cells_used=min(used, kv.max_blocks) * kv.tokens_per_block,
            prefill_backlog_tokens=sum(len(live.request.prompt_tokens) for live in self._live.values()
                                       if live.first_token is None),
            waiting=self._waiting if self._live else 0,
            paused=self._paused if self._live else 0,
            device_memory_used_bytes=self._gpu_mem,
            **self._prefix_cache_tokens(),
        )

    def _prefix_cache_tokens(self) -> dict[str, int]:
        """Block reuse in forged's unit (prompt tokens): TensorRT-LLM counts blocks."""
        kv = self._kv
        if kv.reused_blocks is None or kv.missed_blocks is None:
            return {}
        tpb = kv.tokens_per_block or self.levers.tokens_per_block
        return {"prefix_cache_queries": (kv.reused_blocks + kv.missed_blocks) * tpb,
                "prefix_cache_hits": kv.reused_blocks * tpb}

    def progress(self) -> Progress:
        return Progress(steps=self._iter, pending_work=bool(self._live), last_step_monotonic=self._last_step)

    def effective_config(self) -> dict[str, Any]:
        tr = self.translation
        return {
            "engine": "tensorrt_llm",
            "tensorrt_llm_version": tr.version if tr else None,
            "model": str(self.model_path),
            # Exactly what LLM(**llm_kwargs) was given; nested configs as their constructor arguments
            # (the shape trtllm-serve's --extra_llm_api_options YAML takes).
            "llm_kwargs": tr.plain if tr else None,
            "llm_call": tr.call if tr else None,
            "notes": tr.notes if tr else ["not loaded yet"],
            "mapping": tr.mapping if tr else {},
            "runtime": {"tokens_per_block": self._kv.tokens_per_block or None,
                        "max_num_blocks": self._kv.max_blocks or None},
            "warnings": self.warnings,
            "profile_section": {
                "engine": self.profile.engine,
                "tensorrt_llm": asdict(self.levers),
                "inference": asdict(self.profile.inference),
            },
        }

    # ------------------------------------------------------------ internals

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        assert self._loop is not None, "start() first"
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _sampling(self, sp: SamplingParams) -> Any:
        kw: dict[str, Any] = {"max_tokens": sp.max_tokens}
        if sp.temperature <= 0:
            kw["top_k"] = 1  # greedy
        else:
            kw["temperature"] = sp.temperature
            if sp.top_p < 1.0:
                kw["top_p"] = sp.top_p
            if sp.top_k > 0:
                kw["top_k"] = sp.top_k
            if sp.min_p > 0:
                kw["min_p"] = sp.min_p
        for name, value, off in (("presence_penalty", sp.presence_penalty, 0.0),
                                 ("frequency_penalty", sp.frequency_penalty, 0.0),
                                 ("repetition_penalty", sp.repeat_penalty, 1.0)):
            if value != off:
                kw[name] = value
        if sp.constraint is not None:
            kw["guided_decoding"] = self._guided(sp.constraint)
        if sp.seed is not None:
            kw["seed"] = sp.seed
        if sp.stop:
            # TensorRT-LLM stops generating there; forged cuts the text itself (see _pump).
            kw["stop"] = list(sp.stop)
            kw["include_stop_str_in_output"] = True
        if sp.ignore_eos:
            kw["ignore_eos"] = True
        return self._trt.SamplingParams(**kw)

    def _guided(self, constraint: OutputConstraint) -> Any:
        """The constraint as TensorRT-LLM's GuidedDecodingParams; RequestRejected when it cannot be."""
        tr = self.translation
        if tr is None or GUIDED_BACKEND_FIELD not in tr.kwargs:
            raise RequestRejected(f"structured output needs TensorRT-LLM's {GUIDED_BACKEND_FIELD}, which TensorRT-LLM "
                                  f"{tr.version if tr else '?'} does not have")
        if not constraint.plain_json:
            raise RequestRejected("the tensorrt_llm engine cannot hold the model to its native tool-call syntax; "
                                  "use tool_choice auto with this model")
        params = getattr(importlib.import_module(f"{PACKAGE}.llmapi"), "GuidedDecodingParams", None)
        if params is None:
            raise RequestRejected(f"TensorRT-LLM {tr.version} has no GuidedDecodingParams")
        return params(json_object=True) if constraint.schema is None else params(json=constraint.schema)

    def _is_request_error(self, exc: BaseException) -> bool:
        if self._request_error and isinstance(exc, self._request_error):
            return True
        return any(cls.__name__ == "RequestError" for cls in type(exc).__mro__)

    async def _pump(self, live: _Live) -> None:
        """One request's stream: RequestOutput updates -> TokenEvents."""
        request_id = live.request.request_id
        matcher = StopMatcher(live.request.sampling.stop)
        try:
            async for result in live.output:
                out = result.outputs[0]
                text, ids = out.text_diff, tuple(out.token_ids_diff)
                self._on_tokens(live, len(ids))
                text, stopped = matcher.feed(text)
                if stopped:
                    if not result.finished:
                        self._abort(live)
                    self._deliver(live, TokenEvent(text, ids, finish_reason="stop"))
                    return
                if result.finished:
                    reason, error = _finish_reason(out.finish_reason)
                    if reason in ("stop", "length"):
                        text += matcher.flush()
                    self._deliver(live, TokenEvent(text, ids, finish_reason=reason, error=error,
                                                   status=503 if reason == "error" else None))
                    return
                if text or ids:
                    self._deliver(live, TokenEvent(text, ids))
            # The iterator ended without a finished output (it should not): end the request cleanly.
            self._deliver(live, TokenEvent(matcher.flush(), finish_reason="stop"))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if self._is_request_error(exc):
                log.warning("request %s failed in TensorRT-LLM: %s", request_id, one_line(exc))
                self._deliver(live, TokenEvent("", finish_reason="error", status=503,
                                               error=f"TensorRT-LLM failed this request: {one_line(exc)}"))
            else:
                self._fatal(exc)
        finally:
            if self._live.get(request_id) is live:
                del self._live[request_id]

    def _on_tokens(self, live: _Live, n: int) -> None:
        now = time.monotonic()
        self._last_step = now
        if n <= 0:
            return
        if live.first_token is None:
            live.first_token = now
            self._prefill_rate.add(len(live.request.prompt_tokens), now - live.submitted)
        elif live.last_token is not None:
            self._decode_rate.add(n, now - live.last_token)
        live.last_token = now

    def _deliver(self, live: _Live, event: TokenEvent) -> None:
        live.events.put_nowait(event)

    def _abort(self, live: _Live) -> None:
        if getattr(live.output, "finished", False):
            return
        try:
            live.output.abort()
        except Exception as exc:
            log.warning("TensorRT-LLM abort of %s: %s", live.request.request_id, one_line(exc))

    def _fatal(self, exc: BaseException) -> None:
        """The LLM shut itself down after a background failure: fail everything, tell the daemon."""
        if self._failed is not None:
            return
        self._failed = f"TensorRT-LLM failed and shut down: {one_line(exc)}"
        log.error("%s", self._failed)
        current = asyncio.current_task()
        for live in list(self._live.values()):
            if live.task is not None and live.task is not current:
                live.task.cancel()
            self._deliver(live, TokenEvent("", finish_reason="error", status=503, error=self._failed))
        self._live.clear()
        self._hooks.on_fatal(self._failed)

    async def _warm_up(self) -> None:
        """One short request before the first client's: it starts the iteration stats (which only
        exist once a request was submitted on the event loop), and seeds the prefill rate."""
        text = "The quick brown fox jumps over the lazy dog. " * 8
        tokens = self.tokenize_prompt(text)[: max(1, min(256, self.model.context_length // 2))]
        request = GenerationRequest(f"{WARMUP_PREFIX}{uuid.uuid4().hex[:8]}", tokens,
                                    SamplingParams(max_tokens=2, temperature=0))
        events: asyncio.Queue[TokenEvent] = asyncio.Queue()
        started = time.monotonic()
        self.submit(request, events)
        while (event := await events.get()).finish_reason is None:
            pass
        if event.finish_reason == "error":
            log.warning("TensorRT-LLM warm-up request failed: %s", event.error)
        else:
            log.info("TensorRT-LLM warm-up: %d prompt tokens, done in %.3f s", len(tokens),
                     time.monotonic() - started)

    async def _stats_loop(self) -> None:
        while not self._stopping:
            llm = self._llm
            if llm is not None and self._submitted and self._failed is None:
                try:
                    async for item in llm.get_stats_async(timeout=STATS_TIMEOUT_S):
                        self._apply_stats(item)
                    self._stats_errors = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # the stats are "beta"; they never take the daemon down
                    self._stats_errors += 1
                    if self._stats_errors in (1, 10, 100):
                        log.warning("TensorRT-LLM stats: %s", one_line(exc))
            await asyncio.sleep(STATS_INTERVAL_S)

    def _apply_stats(self, item: Any) -> None:
        stats = json.loads(item) if isinstance(item, str | bytes) else item
        if not isinstance(stats, dict):
            return
        kv = stats.get("kvCacheStats") or {}
        if kv:
            view = self._kv
            view.max_blocks = int(kv.get("maxNumBlocks", view.max_blocks) or 0)
            view.free_blocks = int(kv.get("freeNumBlocks", view.free_blocks) or 0)
            view.used_blocks = int(kv.get("usedNumBlocks", view.max_blocks - view.free_blocks) or 0)
            view.tokens_per_block = int(kv.get("tokensPerBlock", view.tokens_per_block) or 0)
            if "reusedBlocks" in kv and "missedBlocks" in kv:
                view.reused_blocks = int(kv["reusedBlocks"] or 0)
                view.missed_blocks = int(kv["missedBlocks"] or 0)
            if (view.tokens_per_block and view.tokens_per_block != self.levers.tokens_per_block
                    and not self._tpb_warned):
                self._tpb_warned = True
                log.warning("TensorRT-LLM runs %d tokens per KV block, not the profile's %d; KV blocks are "
                            "reported in its unit", view.tokens_per_block, self.levers.tokens_per_block)
        batching = stats.get("inflightBatchingStats") or {}
        self._paused = int(batching.get("numPausedRequests", 0) or 0)
        self._waiting = int(stats.get("numQueuedRequests", 0) or 0)
        if stats.get("gpuMemUsage") is not None:
            self._gpu_mem = int(stats["gpuMemUsage"])
        it = stats.get("iter")
        if isinstance(it, int) and it != self._iter:
            self._iter = it
            self._last_step = time.monotonic()


def _finish_reason(reason: str | None) -> tuple[str, str | None]:
    """CompletionOutput.finish_reason -> forged's (reason, error)."""
    if reason in (None, "stop"):
        return "stop", None
    if reason == "length":
        return "length", None
    if reason == "cancelled":
        return "cancelled", None
    if reason == "timeout":
        return "error", "TensorRT-LLM timed the request out"
    return "error", f"TensorRT-LLM ended the request with finish_reason {reason!r}"


def _request_error_classes() -> tuple[type[BaseException], ...]:
    found: list[type[BaseException]] = []
    for module in (f"{PACKAGE}.executor.utils", f"{PACKAGE}.executor", f"{PACKAGE}.llmapi"):
        with contextlib.suppress(Exception):
            cls = getattr(importlib.import_module(module), "RequestError", None)
            if isinstance(cls, type) and issubclass(cls, BaseException) and cls not in found:
                found.append(cls)
    return tuple(found)


def _read_config(model_dir: Path) -> dict[str, Any]:
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise EngineError(f"{model_dir / 'config.json'}: cannot read the model config: {exc}") from None
    if not isinstance(config, dict):
        raise EngineError(f"{model_dir / 'config.json'}: expected a JSON object")
    return config
