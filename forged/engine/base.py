"""The engine contract: what the API and admission layers may ask of any inference engine.

An engine takes a `GenerationRequest` (prompt tokens, sampling parameters) and streams
`TokenEvent`s back into asyncio. It can cancel a request, report stats, and say exactly which
configuration it runs with. Admission decides *when* a request may start; the engine decides how
each step is spent.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from forged.engine.kv import KvShape

FinishReason = Literal["stop", "length", "cancelled", "error"]


class EngineError(Exception):
    """A failure of the engine itself (not of one request)."""


class RequestRejected(Exception):
    """A request the engine can never run as asked (too long, bad parameters). Maps to HTTP 400."""

    def __init__(self, message: str, code: str = "invalid_request", param: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.param = param


def context_overflow(prompt: int, max_tokens: int, context: int) -> RequestRejected:
    """A prompt (plus max_tokens) longer than the context, in OpenAI's own words, so that client
    libraries raise their context-window errors and their fallbacks (trimming, a larger model) run:
    litellm recognises "This model's maximum context length is", LangChain the code's name in the
    message (the openai client's exception text carries only the message, not the code)."""
    if prompt >= context:
        asked = f"{prompt} tokens in the prompt alone"
    else:
        asked = f"{prompt + max_tokens} tokens ({prompt} in the prompt, {max_tokens} in the completion)"
    return RequestRejected(f"This model's maximum context length is {context} tokens. However, you requested "
                           f"{asked}. Please reduce the length of the prompt or of max_tokens "
                           f"(context_length_exceeded).", "context_length_exceeded")


@dataclass(frozen=True)
class OutputConstraint:
    """What the generated text must be, enforced while sampling (never checked afterwards).

    `schema` is a JSON Schema the JSON text must satisfy; None means any JSON object (OpenAI's
    `json_object`). With `before`/`after` each JSON document is wrapped in that literal text, and
    `max_items` other than 1 allows that many wrapped documents in a row, at least one (None: any
    number): a model's native tool-call syntax, e.g. `<tool_call>\n{...}\n</tool_call>`. Engines
    turn it into their own grammar (llama.cpp's GBNF, TensorRT-LLM's guided decoding) and refuse, as
    RequestRejected, what they cannot enforce.
    """

    schema: dict[str, Any] | None = None
    before: str = ""
    after: str = ""
    max_items: int | None = 1

    @property
    def plain_json(self) -> bool:
        """One bare JSON document: what `response_format` asks for."""
        return not self.before and not self.after and self.max_items == 1


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 = off
    min_p: float = 0.0  # 0 = off
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # OpenAI's penalties: over the tokens this request has generated (not the prompt).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0  # llama.cpp's: logits of generated tokens divided (>0) or multiplied (<0) by it
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias added to its logit)
    # Log-probabilities: None = none; N >= 0 = the sampled token's, and the N most likely tokens' at
    # each position, from the model's own distribution (before penalties, bias, grammar, temperature).
    logprobs: int | None = None
    constraint: OutputConstraint | None = None


@dataclass
class GenerationRequest:
    request_id: str
    prompt_tokens: list[int]
    sampling: SamplingParams
    # Choices to generate from this one prompt (OpenAI's `n`). An engine generates them by forking
    # the sequence after the prompt's prefill, so the prompt is prefilled once; each choice has its
    # own sampler (seed + index when a seed is given) and its own finish. Engines whose
    # `max_choices` is below n refuse the request in validate().
    n: int = 1


@dataclass(frozen=True)
class TokenLogprob:
    """One generated token's log-probability, with the most likely alternatives at its position."""

    token: int
    piece: bytes  # the token's bytes (may be part of a UTF-8 character)
    logprob: float
    top: tuple[tuple[int, bytes, float], ...] = ()  # (token, bytes, logprob), most likely first


@dataclass(frozen=True)
class TokenEvent:
    """One step's output for one choice of a request: new text (possibly empty while UTF-8 or a stop
    string is incomplete), the token ids it came from, and a finish reason on the choice's last
    event.

    With n > 1 every event names its choice (`index`, 0..n-1); each choice ends with its own "stop"
    or "length" event, and the request is done when all n have. An "error" or "cancelled" event
    ends the whole request, whatever its index.
    """

    text: str
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    error: str | None = None
    # For an error event: the HTTP status the API answers with when nothing has been sent yet
    # (400: the engine refused the request as asked; 503: the engine failed it, a retry may work).
    # None: 500.
    status: int | None = None
    # On the first event of a request: how many of its prompt tokens were found in the prefix cache
    # (usage.prompt_tokens_details.cached_tokens).
    cached_tokens: int | None = None
    index: int = 0
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id, when the request asked for logprobs


FaultKind = Literal["hang", "sample_error", "decode_error"]


@dataclass(frozen=True)
class Fault:
    """A fault for the step loop to suffer: test hook only (FORGED_TEST_HOOKS=1, POST /_test/fault).

    hang: the step loop makes no step until `seconds` from now, as a wedged device would.
    sample_error: sampling the target request raises. decode_error: the next llama_decode whose
    batch holds a token of the target request reports `status`, as libllama would.
    The target is `request_id`, or with none the next request the engine starts after arming.
    """

    kind: FaultKind
    seconds: float = 0.0
    request_id: str | None = None
    status: int = -3  # GGML_STATUS_FAILED: the compute failed after earlier ubatches were kept


@dataclass
class EngineStats:
    kv_blocks_total: int = 0
    kv_blocks_used: int = 0  # held or reserved by running sequences
    kv_blocks_cached: int = 0  # held only by the prefix cache: free capacity, reclaimed on demand
    tokens_per_block: int = 0
    running: int = 0
    open_sequences: int = 0
    preemptions: int = 0
    steps: int = 0
    prefill_tokens_per_s: float = 0.0
    decode_tokens_per_s: float = 0.0
    kv_cells_used: int = 0  # cells the running sequences really occupy (<= blocks_used x tokens_per_block)
    kv_cache_bytes: int = 0  # what the engine allocated for the KV cache
    prefill_backlog_tokens: int = 0  # prompt tokens of running sessions not yet prefilled
    # Sessions inside the engine that hold no KV now: waiting for blocks, or preempted and waiting to
    # resume. Engines with their own scheduler (TensorRT-LLM) report what waits and is paused in it.
    waiting: int = 0
    paused: int = 0
    device_memory_used_bytes: int | None = None  # what the engine itself says it uses on the device
    # The prefix cache, in prompt tokens (vLLM's meaning): looked up, and found cached. None: the
    # engine cannot say.
    prefix_cache_queries: int | None = None
    prefix_cache_hits: int | None = None
    # Engine-specific figures of the prefix cache for /v1/status (copies, host tier, ...).
    prefix_cache_detail: dict[str, Any] = field(default_factory=dict)
    # Prompt tokens the engine computed since it started (found-cached ones are not); None: it cannot
    # say. A request of n choices prefills its prompt once.
    prefilled_tokens: int | None = None

    @property
    def kv_blocks_free(self) -> int:
        """Blocks nobody holds (cached ones are reclaimable too, but hold KV until then)."""
        return self.kv_blocks_total - self.kv_blocks_used - self.kv_blocks_cached


class Rate:
    """Exponentially weighted tokens/s, for stats and Retry-After estimates."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.value = 0.0

    def add(self, tokens: int, seconds: float) -> None:
        if tokens <= 0 or seconds <= 0:
            return
        sample = tokens / seconds
        self.value = sample if self.value == 0 else self.alpha * sample + (1 - self.alpha) * self.value


@dataclass
class Progress:
    """What the watchdog needs: has the step loop moved since work became pending?"""

    steps: int
    pending_work: bool
    last_step_monotonic: float


# Callbacks the engine uses to talk back to admission (called on the event loop thread).
@dataclass
class EngineHooks:
    on_preempted: Callable[[str], None] = lambda request_id: None
    on_capacity_freed: Callable[[], None] = lambda: None
    on_fatal: Callable[[str], None] = lambda reason: None


@dataclass
class ModelInfo:
    name: str
    path: str
    context_length: int
    n_params: int = 0
    size_bytes: int = 0
    metadata: dict[str, Any] = field(default_factory=dict)


class Engine(abc.ABC):
    """Base of every engine. Methods not marked async are safe to call from the event loop and
    must not block it."""

    # Which engine this is: "llama_cpp" or "tensorrt_llm" (metrics, /v1/status).
    name: str
    # The id clients see in /v1/models and send as "model".
    model_name: str
    model: ModelInfo
    # The model's KV shape once loaded (None when it cannot be known), for the memory sanity check.
    kv_shape: KvShape | None = None
    # Sessions the loaded engine can hold at once (its sequence slots); None: no limit of its own.
    max_sessions: int | None = None
    # The most choices (GenerationRequest.n) one request may ask for; validate() refuses more (400,
    # before admission). llama_cpp: its sessions (the choices run at once, forked after the prefill).
    max_choices: int = 1

    @abc.abstractmethod
    def load(self) -> None:
        """Load the model and allocate the KV cache. Blocking; run it in a thread."""

    @abc.abstractmethod
    def start(self, loop: asyncio.AbstractEventLoop, hooks: EngineHooks) -> None:
        """Start stepping. Events are delivered on `loop`."""

    @abc.abstractmethod
    async def stop(self) -> None:
        """Cancel what is left, stop the step loop, free the model."""

    @abc.abstractmethod
    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]: ...

    def tokenize_prompt(self, text: str) -> list[int]:
        """A completion prompt as the model expects it: with the special tokens (BOS) the model adds."""
        return self.tokenize(text, add_special=True, parse_special=True)

    @abc.abstractmethod
    def render_chat(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
        """Apply the model's own chat template, with the OpenAI `tools` list when given (Jinja
        templates take `tools`). Raises RequestRejected for messages it refuses."""

    def schema_problems(self, schema: Any) -> list[str]:
        """The parts of a JSON Schema (response_format, tool parameters) this engine cannot enforce
        while sampling, each naming its path; the API refuses the request with them (400)."""
        return []

    def chat_template_source(self) -> str:
        """The chat template's text (Jinja), or "" when the engine renders chats another way; the API
        reads it to recognise a model family's tool-call syntax."""
        return ""

    @abc.abstractmethod
    def validate(self, request: GenerationRequest) -> None:
        """Raise RequestRejected (HTTP 400) for a request this engine can never run as asked."""

    @abc.abstractmethod
    def has_room_for(self, request: GenerationRequest) -> bool:
        """Whether the engine could start `request` now: its KV fits (cached blocks count as free)
        and nothing the engine already holds is waiting for room. Admission asks before it starts a
        session. Advisory: the engine's scheduler owns the KV and places the request itself; one
        that finds no room there waits inside the engine, at the head of the line. An engine whose
        own scheduler owns the KV cache (TensorRT-LLM) always says yes; the session and queue
        guards still apply."""

    def expected_cached_tokens(self, prompt_tokens: list[int]) -> int:
        """Prompt tokens the prefix cache would likely serve now (an estimate, for predictions)."""
        return 0

    @abc.abstractmethod
    def submit(self, request: GenerationRequest, events: asyncio.Queue[TokenEvent]) -> None:
        """Start a request admission made a session of. Events go to `events`, ending with a
        finish_reason. Never blocks."""

    @abc.abstractmethod
    def cancel(self, request_id: str) -> None:
        """Stop a request and free its KV at once. Unknown ids are ignored."""

    @abc.abstractmethod
    def stats(self) -> EngineStats: ...

    @abc.abstractmethod
    def progress(self) -> Progress: ...

    @abc.abstractmethod
    def effective_config(self) -> dict[str, Any]:
        """The configuration exactly as handed to the engine, with the profile section it came from."""

    def device(self) -> dict[str, Any] | None:
        """Where the engine really runs, once loaded (/v1/status `engine.device`): the device holding
        the layers and the KV, layers offloaded, the library. None: this engine does not say."""
        return None

    def inject_fault(self, fault: Fault) -> None:
        """Test hook (FORGED_TEST_HOOKS=1 only): arm `fault` in the step loop. Engines without
        fault hooks refuse."""
        raise EngineError(f"the {self.name} engine has no fault hooks")
