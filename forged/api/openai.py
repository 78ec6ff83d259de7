"""OpenAI-compatible generation: /v1/completions, /v1/chat/completions and /v1/models.

A request is parsed, tokenized, checked against the context, admitted (or refused with 503), and
then streamed as SSE or collected into one JSON answer. Whatever way it ends (finished, client
gone, engine error) the `finally` block hands its session back, so nothing leaks. The prompt of a
chat (its tools included) is built by `_build_request` with api/tools.py; the answer's shape comes
from api/responses.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from aiohttp import web

from forged.admission import Refused, Ticket
from forged.api import body, tools
from forged.api.errors import app_key, error_response, sse_error
from forged.api.requests import BadRequest, ParsedRequest, parse_chat, parse_completion
from forged.api.responses import ChoiceBuilder, Kind, usage
from forged.engine.base import Engine, GenerationRequest, RequestRejected, SamplingParams, TokenEvent
from forged.state import ServiceState
from forged.targets import LatencyWindow

log = logging.getLogger(__name__)

STATE = app_key("state", ServiceState)
WINDOW = app_key("window", LatencyWindow)
WRITE_TIMEOUT = app_key("write_timeout_s", float)
# The generation requests being answered (admitted, until their handler ends), by id(request), for the
# drain's hang-up (aiohttp's requests are not hashable).
ANSWERING = app_key("answering", dict)
# Tokenizing and validating run here, off the event loop. The pool is joined when the app is cleaned
# up, before the daemon frees the model: a tokenization still running must not outlive the vocab.
TOKENIZER_POOL = app_key("tokenizer_pool", ThreadPoolExecutor)


class ClientStalled(ConnectionResetError):
    """The client took none of its answer for server.write_timeout_s, and forged hung up on it."""


def add_tokenizer_pool(app: web.Application) -> None:
    app[TOKENIZER_POOL] = pool = ThreadPoolExecutor(thread_name_prefix="forged-tokenize")

    async def join(_: web.Application) -> None:
        pool.shutdown(wait=True)

    app.on_cleanup.append(join)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def models(request: web.Request) -> web.Response:
    return web.json_response({"object": "list", "data": [_model_object(request.app[STATE])]})


async def model(request: web.Request) -> web.Response:
    """GET /v1/models/{model_id}: the served model, or 404 for any other id (client.models.retrieve)."""
    state = request.app[STATE]
    model_id = request.match_info["model_id"]
    if model_id != state.model_id:
        return error_response(404, f"model {model_id!r} does not exist; this daemon serves {state.model_id!r}",
                              "model_not_found", param="model")
    return web.json_response(_model_object(state))


def _model_object(state: ServiceState) -> dict[str, Any]:
    return {"id": state.model_id, "object": "model", "created": int(state.started_wall), "owned_by": "forged",
            "context_length": state.engine.model.context_length or None}


async def _wait_until_ready(state: ServiceState) -> web.Response | None:
    """Hold a request that arrives while the model loads; refuse one that arrives while draining."""
    deadline = time.monotonic() + state.config.settings.server.load_wait_s
    while state.phase == "loading" and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    if state.phase == "ready":
        return None
    reason = "shutting_down" if state.phase == "draining" else "not_ready"
    state.metrics.reject(reason)
    message = {"shutting_down": "forged is shutting down",
               "not_ready": f"forged is not ready ({state.failure or state.phase})"}[reason]
    return error_response(503, message, reason, retry_after=5)


async def _generate(request: web.Request, kind: Kind) -> web.StreamResponse:
    state = request.app[STATE]
    try:
        before = await _before_admission(request, state, kind)
    except (asyncio.CancelledError, ConnectionResetError):
        # The client left before a verdict: mid-body, or with a half-close right after its request,
        # which looks the same to a server (EOF; aiohttp then closes and cancels). Counted, not lost.
        state.metrics.abandon()
        raise
    if isinstance(before, web.StreamResponse):
        return before
    parsed, generation, plan = before
    assert state.admission is not None
    try:
        ticket = await state.admission.admit(generation, request["received"])
    except Refused as exc:
        return error_response(exc.status, exc.message, exc.code, retry_after=exc.retry_after)
    # Until an answer is complete, the way out is the client leaving (or the write failing).
    outcome = "cancelled"
    answering = request.app[ANSWERING]
    answering[id(request)] = request
    try:
        send = _stream if parsed.stream else _collect
        response, outcome = await send(request, state, ticket, parsed, plan, request["received"])
        return response
    except ClientStalled as exc:
        outcome = "client_stalled"
        log.warning("%s: %s; its session is freed", ticket.request_id, exc)
        raise
    except Exception as exc:
        # A write to a client that left fails with ConnectionResetError: still "cancelled". Anything
        # else is forged's own failure and must not pass for the client's choice.
        if not isinstance(exc, ConnectionResetError):
            outcome = "failed"
        raise
    finally:
        answering.pop(id(request), None)
        state.admission.finish(ticket, outcome)


async def _before_admission(request: web.Request, state: ServiceState,
                            kind: Kind) -> tuple[ParsedRequest, GenerationRequest, _Plan] | web.StreamResponse:
    """Read, parse, validate, wait for the model, tokenize: the request ready for admission, or its
    refusal (counted here, and returned or raised for the error middleware to answer)."""
    try:
        parsed = (parse_completion if kind == "completion" else parse_chat)(await body.read_json(request))
    except body.Busy as exc:
        state.metrics.reject("server_busy")
        return error_response(503, str(exc), "server_busy", retry_after=1)
    except (BadRequest, web.HTTPRequestEntityTooLarge):
        state.metrics.reject("invalid_request")  # the middleware turns it into the error object
        raise
    if parsed.model is not None and parsed.model != state.model_id:
        state.metrics.reject("invalid_request")
        return error_response(404, f"model {parsed.model!r} does not exist; this daemon serves "
                                   f"{state.model_id!r}", "model_not_found", param="model")
    not_ready = await _wait_until_ready(state)
    if not_ready is not None:
        return not_ready
    try:
        # Off the event loop: tokenizing a 20k-token prompt takes tens of milliseconds, and a burst
        # of them would otherwise hold up every other request (and each other) in turn.
        generation, plan = await asyncio.get_running_loop().run_in_executor(request.app[TOKENIZER_POOL],
                                                                            _build_request, state, parsed, kind)
    except RequestRejected as exc:
        state.metrics.reject("invalid_request")
        return error_response(400, str(exc), exc.code, param=exc.param)
    return parsed, generation, plan


async def _send(request: web.Request, write: Awaitable[Any]) -> None:
    """One write of an answer, allowed server.write_timeout_s. A client that stops reading fills its
    socket buffers, and then aiohttp's write waits for it forever, holding the session."""
    timeout = request.app[WRITE_TIMEOUT]
    try:
        async with asyncio.timeout(timeout):
            await write
    except TimeoutError:
        if request.transport is not None:
            request.transport.abort()  # drops what is still buffered for it; the handler ends now
        raise ClientStalled(f"the client took none of its answer for {timeout:g} s (server.write_timeout_s); "
                            f"hung up") from None


async def _deliver(request: web.Request, response: web.StreamResponse) -> None:
    await response.prepare(request)
    await response.write_eof()


def hang_up(app: web.Application) -> int:
    """Abort the connection of every generation request still being answered; their handlers end at
    once, cancelled. The drain's last step, for clients that stopped reading their final event."""
    requests = list(app[ANSWERING].values())
    for request in requests:
        if request.transport is not None:
            request.transport.abort()
    return len(requests)


@dataclass(frozen=True)
class _Plan:
    """How to read what the engine generates for a request."""

    kind: Kind
    parser: Callable[[], tools.OutputParser] = tools.ContentParser
    echo: str = ""

    def builders(self, parsed: ParsedRequest) -> list[ChoiceBuilder]:
        assert parsed.sampling is not None
        return [ChoiceBuilder(i, self.kind, self.parser(), parsed.sampling.logprobs is not None, self.echo)
                for i in range(parsed.n)]


def _build_request(state: ServiceState, parsed: ParsedRequest, kind: Kind) -> tuple[GenerationRequest, _Plan]:
    """The engine request (prompt tokens and sampling, validated by the engine: RequestRejected),
    and how to read its output."""
    engine = state.engine
    assert parsed.sampling is not None
    sampling = parsed.sampling
    plan = _Plan(kind)
    if parsed.response_format is not None:
        _check_schema(engine, parsed.response_format.schema, "response_format.json_schema.schema")
    if kind == "chat":
        sampling, plan, (messages, template_tools) = _chat(engine, parsed)
        text = engine.render_chat(messages, template_tools)
        tokens = engine.tokenize(text, add_special=False, parse_special=True)
    elif isinstance(parsed.prompt, str):
        tokens = engine.tokenize_prompt(parsed.prompt)
        plan = _Plan(kind, echo=parsed.prompt if parsed.echo else "")
    else:
        assert parsed.prompt is not None
        tokens = list(parsed.prompt)
    max_tokens = parsed.max_tokens
    if max_tokens is None:
        room = engine.model.context_length - len(tokens)
        max_tokens = max(1, min(state.config.settings.server.default_max_tokens, room))
    generation = GenerationRequest(request_id=f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}",
                                   prompt_tokens=tokens, sampling=replace(sampling, max_tokens=max_tokens),
                                   n=parsed.n)
    engine.validate(generation)
    return generation, plan


def _response_schema(parsed: ParsedRequest) -> dict[str, Any] | None:
    """What a direct answer must be under response_format: its schema, any object for json_object."""
    if parsed.response_format is None:
        return None
    return parsed.response_format.schema or {"type": "object"}


def _chat(engine: Engine, parsed: ParsedRequest) -> tuple[SamplingParams, _Plan, tools.TemplateInputs]:
    """A chat in the model's tool format: its sampling (the grammar its response_format or
    tool_choice needs), how to read its output, and what the chat template renders."""
    assert parsed.sampling is not None and parsed.messages is not None
    fmt = tools.format_for(engine.chat_template_source())
    request = parsed.tools
    sampling = parsed.sampling
    if request is not None and request.active:
        constraint = fmt.constraint(request, _response_schema(parsed))
        if constraint is not None:
            for i, tool in enumerate(request.tools):
                _check_schema(engine, tool.parameters, f"tools[{i}].function.parameters")
            sampling = replace(sampling, constraint=constraint)
        elif parsed.response_format is not None:
            raise RequestRejected(f"response_format cannot be combined with tools under tool_choice auto for a "
                                  f"model with native tool calls ({fmt.name} format): the model chooses freely "
                                  f"between text and calls there; use tool_choice required, or no response_format",
                                  param="response_format")
    inputs = fmt.template_inputs(parsed.messages, request, _response_schema(parsed))
    return sampling, _Plan("chat", lambda: fmt.parser(request)), inputs


def _check_schema(engine: Engine, schema: dict[str, Any] | None, where: str) -> None:
    """Refuse, naming them, the parts of a client's schema the engine would not enforce."""
    problems = engine.schema_problems(schema) if schema is not None else []
    if problems:
        raise RequestRejected(f"{where} uses JSON Schema features that forged cannot enforce while sampling: "
                              + "; ".join(p.replace("$", where, 1) for p in problems[:8]), param=where)


class _Timing:
    """Per-request latency bookkeeping, fed into the histograms and the targets window."""

    def __init__(self, state: ServiceState, window: LatencyWindow, received: float, ticket: Ticket) -> None:
        self.state = state
        self.ticket = ticket
        self.window = window
        self.received = received
        self.first: float | None = None
        self.last: float | None = None
        self.tokens = 0
        self.cached_tokens = 0

    def on_event(self, event: TokenEvent) -> None:
        if event.cached_tokens is not None:
            self.cached_tokens = event.cached_tokens
        if not event.token_ids:
            return
        now = time.monotonic()
        metrics = self.state.metrics
        if self.first is None:
            self.first = now
            metrics.ttft.observe(now - self.received)
            self.window.add_ttft(now - self.received)
            if self.ticket.predicted_ttft_s is not None:
                actual = now - self.ticket.arrived
                metrics.ttft_prediction_error.observe(abs(actual - self.ticket.predicted_ttft_s))
        elif self.last is not None:
            metrics.inter_token_latency.observe(now - self.last)
        self.last = now
        self.tokens += len(event.token_ids)
        metrics.generation_tokens.inc(len(event.token_ids))

    def finish(self) -> None:
        if self.first is not None and self.last is not None and self.tokens > 1 and self.last > self.first:
            tps = (self.tokens - 1) / (self.last - self.first)
            self.state.metrics.tokens_per_second.observe(tps)
            self.window.add_tps(tps)


def _usage(ticket: Ticket, timing: _Timing) -> dict[str, Any]:
    return usage(len(ticket.request.prompt_tokens), timing.tokens, timing.cached_tokens)


def _engine_error(event: TokenEvent) -> web.Response:
    """An engine's error event as an HTTP answer: its own status (400 refused as asked, 503 failed,
    retry may work) with the engine's real message, else 500."""
    if event.status == 400:
        return error_response(400, str(event.error), "invalid_request")
    if event.status == 503:
        return error_response(503, str(event.error), "engine_error", retry_after=5)
    return error_response(500, f"generation failed: {event.error}", "engine_error")


def _outcome(event: TokenEvent) -> str:
    return {"stop": "completed", "length": "completed", "error": "failed"}.get(event.finish_reason or "",
                                                                               "cancelled")


async def _collect(request: web.Request, state: ServiceState, ticket: Ticket, parsed: ParsedRequest,
                   plan: _Plan, received: float) -> tuple[web.StreamResponse, str]:
    timing = _Timing(state, request.app[WINDOW], received, ticket)
    builders = plan.builders(parsed)
    remaining = len(builders)
    while remaining:
        event = await ticket.events.get()
        timing.on_event(event)
        if event.finish_reason in ("error", "cancelled"):
            break
        builders[event.index].collect(event)
        if event.finish_reason is not None:
            remaining -= 1
    timing.finish()
    outcome = _outcome(event)
    if event.finish_reason == "error":
        return _engine_error(event), outcome
    if event.finish_reason == "cancelled":
        return error_response(503, "the request was cancelled because forged is shutting down",
                              "shutting_down"), outcome
    answer = {"id": ticket.request_id, "object": "chat.completion" if plan.kind == "chat" else "text_completion",
              "created": int(time.time()), "model": state.model_id,
              "choices": [b.choice(parsed.return_token_ids) for b in builders],
              "usage": _usage(ticket, timing)}
    if parsed.return_token_ids:
        answer["prompt_token_ids"] = ticket.request.prompt_tokens
    response = web.json_response(answer)
    # Sent here rather than by aiohttp after the handler, so that a client that does not read it is
    # bounded by the write timeout, and the request counts as completed only once it is delivered.
    await _send(request, _deliver(request, response))
    return response, outcome


async def _stream(request: web.Request, state: ServiceState, ticket: Ticket, parsed: ParsedRequest,
                  plan: _Plan, received: float) -> tuple[web.StreamResponse, str]:
    timing = _Timing(state, request.app[WINDOW], received, ticket)
    # An engine that refused the request while it was submitted has already said so: answer with its
    # status rather than a 200 stream that carries only an error.
    first = None if ticket.events.empty() else ticket.events.get_nowait()
    if first is not None and first.finish_reason == "error" and first.status is not None:
        return _engine_error(first), _outcome(first)
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                           "X-Accel-Buffering": "no"})
    await _send(request, response.prepare(request))
    created = int(time.time())
    obj = "chat.completion.chunk" if plan.kind == "chat" else "text_completion"

    def write(data: bytes) -> Awaitable[None]:
        return _send(request, response.write(data))

    def chunk(choices: list[dict[str, Any]], **extra: Any) -> bytes:
        data = {"id": ticket.request_id, "object": obj, "created": created, "model": state.model_id,
                "choices": choices, **extra}
        return b"data: " + json.dumps(data, ensure_ascii=False).encode() + b"\n\n"

    builders = plan.builders(parsed)
    for builder in builders:
        for choice in builder.opening(parsed.return_token_ids):
            await write(chunk([choice]))
    remaining = len(builders)
    while remaining:
        if first is not None:
            event, first = first, None
        else:
            event = await ticket.events.get()
        timing.on_event(event)
        if event.finish_reason in ("error", "cancelled"):
            message = ((str(event.error) if event.status else f"generation failed: {event.error}")
                       if event.finish_reason == "error"
                       else "the request was cancelled because forged is shutting down")
            await write(sse_error(message, "engine_error" if event.finish_reason == "error"
                                  else "shutting_down"))
            break
        for choice in builders[event.index].feed(event, token_ids=parsed.return_token_ids):
            await write(chunk([choice]))
        if event.finish_reason is not None:
            remaining -= 1
    timing.finish()
    if parsed.include_usage:
        await write(chunk([], usage=_usage(ticket, timing)))
    await write(b"data: [DONE]\n\n")
    await _send(request, response.write_eof())
    return response, _outcome(event)
