"""Parsing and validating OpenAI-shaped request bodies.

Policy on fields (docs/api.md): fields of the OpenAI API that forged implements are honoured;
OpenAI fields it does not implement are accepted only at their neutral value (`best_of: 1`,
`suffix: null`, ...) and refused otherwise, so a client never silently gets less than it asked
for; anything else is refused with 400 naming the field. Widely used extensions are accepted:
`top_k`, `min_p`, `repeat_penalty`, `ignore_eos` and `return_token_ids` (as in vLLM and llama-server).
Messages are parsed in api/chat.py, tools in api/tools.py, response_format in api/structured.py.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from forged.api.chat import parse_messages
from forged.api.errors import BadRequest
from forged.api.structured import parse_response_format
from forged.api.tools import ToolRequest, parse_tools
from forged.engine.base import OutputConstraint, SamplingParams

__all__ = ["BadRequest", "ParsedRequest", "parse_chat", "parse_completion"]


@dataclass(frozen=True)
class Bounds:
    """The accepted range of a numeric field; the OpenAPI document (api/openapi.py) reads it too."""

    kind: type[int] | type[float]
    lo: float | None = None
    hi: float | None = None
    lo_exclusive: bool = False


MAX_STOP_STRINGS = 4
MAX_CHOICES = 16  # n; the engine may allow fewer (Engine.max_choices)
MAX_TOP_LOGPROBS = 20
MAX_LOGIT_BIAS = 300
NUMBERS: dict[str, Bounds] = {
    "max_tokens": Bounds(int, lo=1),
    "max_completion_tokens": Bounds(int, lo=1),
    "temperature": Bounds(float, 0.0, 2.0),
    "top_p": Bounds(float, 0.0, 1.0, lo_exclusive=True),
    # libllama and TensorRT-LLM take top_k as a C int: a larger value would wrap (2**32 + 1 -> 1).
    # Any value from the vocabulary size up keeps every token, as 0 does.
    "top_k": Bounds(int, 0, 2**31 - 1),
    "min_p": Bounds(float, 0.0, 1.0),
    "seed": Bounds(int, -(2**63), 2**64 - 1),
    "n": Bounds(int, 1, MAX_CHOICES),
    "presence_penalty": Bounds(float, -2.0, 2.0),
    "frequency_penalty": Bounds(float, -2.0, 2.0),
    "repeat_penalty": Bounds(float, 0.0, 10.0, lo_exclusive=True),
    "top_logprobs": Bounds(int, 0, MAX_TOP_LOGPROBS),  # chat
}
# The same name means different things on the two endpoints: completions' logprobs is a count.
COMPLETION_NUMBERS: dict[str, Bounds] = {"logprobs": Bounds(int, 0, MAX_TOP_LOGPROBS)}
BOOLEANS = ("stream", "ignore_eos", "return_token_ids", "echo", "parallel_tool_calls")
CHAT_BOOLEANS = ("logprobs",)

COMMON_FIELDS = frozenset({"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop",
                           "stream", "stream_options", "ignore_eos", "return_token_ids", "user", "n",
                           "presence_penalty", "frequency_penalty", "repeat_penalty", "logit_bias", "logprobs",
                           "response_format"})
# OpenAI fields forged does not implement, with the values that mean "not used".
NEUTRAL: dict[str, tuple[Any, ...]] = {
    "best_of": (1, None), "suffix": (None,), "service_tier": (None, "auto"), "metadata": (None, {}),
    "store": (None, False),
}
COMPLETION_FIELDS = COMMON_FIELDS | {"prompt", "echo"}
CHAT_FIELDS = COMMON_FIELDS | {"messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                               "parallel_tool_calls"}
TOKEN_ID = re.compile(r"^[0-9]{1,10}$")


@dataclass(frozen=True)
class ParsedRequest:
    model: str | None
    sampling: SamplingParams | None  # None max_tokens resolved later against the context
    max_tokens: int | None
    stream: bool
    include_usage: bool
    return_token_ids: bool = False
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    n: int = 1
    echo: bool = False
    tools: ToolRequest | None = None
    # response_format as asked: None for text; its constraint also sits in sampling (without tools).
    response_format: OutputConstraint | None = None


def parse_completion(body: Any) -> ParsedRequest:
    body = _object(body)
    _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        ids = [_integer(t) for t in prompt]
        if ids and all(t is not None and t >= 0 for t in ids):
            prompt = ids
        else:
            raise BadRequest("prompt must be a string, a list of one string, or a list of token ids "
                             "(batched prompts are not supported)", "prompt")
    elif not isinstance(prompt, str):
        raise BadRequest("prompt is required and must be a string", "prompt")
    logprobs = _numeric(body, "logprobs", None, COMPLETION_NUMBERS)
    echo = _bool(body, "echo", False)
    if echo and logprobs is not None:
        raise BadRequest("echo with logprobs would need the prompt's log-probabilities, which forged does not "
                         "compute; drop one of them", "echo")
    if echo and not isinstance(prompt, str):
        raise BadRequest("echo needs a text prompt (it returns the prompt's text)", "echo")
    return _common(body, logprobs, prompt=prompt, echo=echo)


def parse_chat(body: Any) -> ParsedRequest:
    body = _object(body)
    _check_fields(body, CHAT_FIELDS)
    messages = parse_messages(body.get("messages"))
    if body.get("max_completion_tokens") is not None:
        # The newer name wins over the deprecated one, as in OpenAI's API; both must be valid.
        _numeric(body, "max_tokens", None)
        body = dict(body, max_tokens=_numeric(body, "max_completion_tokens", None))
    top = _numeric(body, "top_logprobs", None)
    logprobs = None
    if _bool(body, "logprobs", False):
        logprobs = top or 0
    elif top is not None:
        raise BadRequest("top_logprobs needs logprobs: true", "top_logprobs")
    return _common(body, logprobs, messages=messages, tools=parse_tools(body))


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _check_fields(body: dict[str, Any], allowed: frozenset[str]) -> None:
    for key, value in body.items():
        if key in allowed:
            continue
        if key in NEUTRAL:
            if _is_neutral(value, NEUTRAL[key]):
                continue
            accepted = " or ".join(json.dumps(v) for v in NEUTRAL[key])
            raise BadRequest(f"{key} is not supported by forged (only {accepted} is accepted)", key)
        raise BadRequest(f"unknown field {key!r}", key)


def _is_neutral(value: Any, neutral: tuple[Any, ...]) -> bool:
    # JSON's true is not 1, though Python's True == 1.
    return any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in neutral)


def _common(body: dict[str, Any], logprobs: int | None, **kw: Any) -> ParsedRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise BadRequest("user must be a string", "user")
    max_tokens = _numeric(body, "max_tokens", None)
    temperature = _numeric(body, "temperature", 1.0)
    top_p = _numeric(body, "top_p", 1.0)
    top_k = _numeric(body, "top_k", 0)
    seed = _numeric(body, "seed", None)
    stop = body.get("stop")
    if stop is None:
        stops: tuple[str, ...] = ()
    elif isinstance(stop, str):
        stops = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_STRINGS:
        stops = tuple(stop)
    else:
        raise BadRequest(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings", "stop")
    stream = _bool(body, "stream", False)
    ignore_eos = _bool(body, "ignore_eos", False)
    return_token_ids = _bool(body, "return_token_ids", False)
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict) or set(options) - {"include_usage"}:
            raise BadRequest("stream_options may only hold include_usage", "stream_options")
        include_usage = _bool(options, "include_usage", False)
        if not stream:
            raise BadRequest("stream_options is only allowed with stream: true", "stream_options")
    response_format = parse_response_format(body.get("response_format"))
    sampling = SamplingParams(
        max_tokens=max_tokens or 1, temperature=temperature, top_p=top_p, top_k=top_k,
        min_p=_numeric(body, "min_p", 0.0), seed=seed, stop=stops, ignore_eos=ignore_eos,
        presence_penalty=_numeric(body, "presence_penalty", 0.0),
        frequency_penalty=_numeric(body, "frequency_penalty", 0.0),
        repeat_penalty=_numeric(body, "repeat_penalty", 1.0), logit_bias=_logit_bias(body.get("logit_bias")),
        logprobs=logprobs, constraint=response_format)
    return ParsedRequest(model=model, sampling=sampling, max_tokens=max_tokens, stream=stream,
                         include_usage=include_usage, return_token_ids=return_token_ids,
                         n=_numeric(body, "n", 1), response_format=response_format, **kw)


def _logit_bias(value: Any) -> tuple[tuple[int, float], ...]:
    """{"token id": bias in -100..100}, as OpenAI takes it (JSON object keys are strings)."""
    if value is None:
        return ()
    if not isinstance(value, dict) or len(value) > MAX_LOGIT_BIAS:
        raise BadRequest(f"logit_bias must be an object of at most {MAX_LOGIT_BIAS} token ids", "logit_bias")
    out = []
    for key, bias in value.items():
        if not TOKEN_ID.match(key):
            raise BadRequest(f"logit_bias keys must be token ids, got {key!r}", "logit_bias")
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not -100 <= bias <= 100:
            raise BadRequest(f"logit_bias[{key!r}] must be a number in -100..100", "logit_bias")
        out.append((int(key), float(bias)))
    return tuple(out)


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false", key)
    return value


def _numeric(body: dict[str, Any], key: str, default: Any, table: dict[str, Bounds] = NUMBERS) -> Any:
    value = body.get(key)
    if value is None:
        return default
    bounds = table[key]
    if bounds.kind is int:
        value = _integer(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{key} must be {'an integer' if bounds.kind is int else 'a number'}", key)
    too_low = bounds.lo is not None and (value <= bounds.lo if bounds.lo_exclusive else value < bounds.lo)
    too_high = bounds.hi is not None and value > bounds.hi
    if too_low or too_high or value != value:  # value != value: NaN, which json.loads accepts
        low = "" if bounds.lo is None else f"{'>' if bounds.lo_exclusive else '>='} {_num(bounds.lo)}"
        high = "" if bounds.hi is None else f"<= {_num(bounds.hi)}"
        raise BadRequest(f"{key} must be {' and '.join(b for b in (low, high) if b)}, got {value}", key)
    return bounds.kind(value)


def _integer(value: Any) -> int | None:
    """An integer as JSON means it: 3 or 3.0 (JSON Schema's integer), never true or 3.5."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _num(value: float) -> str:
    return str(int(value)) if value == int(value) else str(value)
