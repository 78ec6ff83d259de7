"""Parsing and validating OpenAI-shaped request bodies.

Policy on fields (docs/api.md): fields of the OpenAI API that forged implements are honoured;
OpenAI fields it does not implement are accepted only at their neutral value (`n: 1`,
`logprobs: null`, ...) and refused otherwise, so a client never silently gets less than it asked
for; anything else is refused with 400 naming the field. Three widely used extensions are accepted:
`top_k`, `ignore_eos` and `return_token_ids` (as in vLLM and llama-server).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from forged.engine.base import SamplingParams


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


MAX_STOP_STRINGS = 4

_COMMON_FIELDS = {"model", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "stream",
                  "stream_options", "ignore_eos", "return_token_ids", "user"}
# OpenAI fields forged does not implement, with the values that mean "not used".
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (1, None), "presence_penalty": (0, 0.0, None), "frequency_penalty": (0, 0.0, None),
    "logit_bias": (None,), "logprobs": (None, False), "top_logprobs": (None,),
    "best_of": (1, None), "echo": (False, None), "suffix": (None,), "service_tier": (None, "auto"),
    "parallel_tool_calls": (None,), "tools": (None,), "tool_choice": (None, "none"), "metadata": (None,),
    "store": (None, False), "response_format": (None,),
}
_COMPLETION_FIELDS = _COMMON_FIELDS | {"prompt"}
_CHAT_FIELDS = _COMMON_FIELDS | {"messages", "max_completion_tokens"}


@dataclass(frozen=True)
class ParsedRequest:
    model: str | None
    sampling: SamplingParams | None  # None max_tokens resolved later against the context
    max_tokens: int | None
    stream: bool
    include_usage: bool
    return_token_ids: bool = False
    prompt: str | list[int] | None = None
    messages: list[dict[str, str]] | None = None


def parse_completion(body: Any) -> ParsedRequest:
    body = _object(body)
    _check_fields(body, _COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, list):
        if not prompt or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
            raise BadRequest("prompt must be a string, a list of one string, or a list of token ids "
                             "(batched prompts are not supported)", "prompt")
    elif not isinstance(prompt, str):
        raise BadRequest("prompt is required and must be a string", "prompt")
    return _common(body, prompt=prompt)


def parse_chat(body: Any) -> ParsedRequest:
    body = _object(body)
    _check_fields(body, _CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages is required and must be a non-empty list", "messages")
    out: list[dict[str, str]] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise BadRequest(f"messages[{i}] must be an object", f"messages[{i}]")
        role = msg.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise BadRequest(f"messages[{i}].role must be system, developer, user or assistant",
                             f"messages[{i}].role")
        out.append({"role": "system" if role == "developer" else role,
                    "content": _content_text(msg.get("content"), i)})
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if "max_completion_tokens" in body:
        body = dict(body, max_tokens=max_tokens)
    return _common(body, messages=out)


def _content_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise BadRequest(f"messages[{i}].content: only text parts are supported",
                                 f"messages[{i}].content")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"messages[{i}].content must be a string or a list of text parts",
                     f"messages[{i}].content")


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    return body


def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    for key, value in body.items():
        if key in allowed:
            continue
        if key in _NEUTRAL:
            if value in _NEUTRAL[key] or (key == "response_format" and value == {"type": "text"}) \
                    or (key in ("logit_bias", "metadata") and value == {}):
                continue
            raise BadRequest(f"{key} is not supported by forged (only {_NEUTRAL[key][0]!r} is accepted)", key)
        raise BadRequest(f"unknown field {key!r}", key)


def _common(body: dict[str, Any], **kw: Any) -> ParsedRequest:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise BadRequest("model must be a string", "model")
    max_tokens = _int(body, "max_tokens", lo=1, optional=True)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0:
        raise BadRequest("top_p must be greater than 0", "top_p")
    top_k = _int(body, "top_k", lo=0, default=0)
    seed = _int(body, "seed", optional=True, lo=-(2**63), hi=2**64 - 1)
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
    sampling = SamplingParams(max_tokens=max_tokens or 1, temperature=temperature, top_p=top_p, top_k=top_k,
                              seed=seed, stop=stops, ignore_eos=ignore_eos)
    return ParsedRequest(model=model, sampling=sampling, max_tokens=max_tokens, stream=stream,
                         include_usage=include_usage, return_token_ids=return_token_ids, **kw)


def _bool(body: dict[str, Any], key: str, default: bool) -> bool:
    value = body.get(key, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be true or false", key)
    return value


def _int(body: dict[str, Any], key: str, *, lo: int | None = None, hi: int | None = None,
         default: int | None = None, optional: bool = False) -> Any:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise BadRequest(f"{key} must be an integer", key)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise BadRequest(f"{key} must be {bounds}, got {value}", key)
    return value


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadRequest(f"{key} must be a number", key)
    if not lo <= value <= hi:
        raise BadRequest(f"{key} must be between {lo} and {hi}, got {value}", key)
    return float(value)
