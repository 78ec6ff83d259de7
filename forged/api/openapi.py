"""The OpenAPI 3.1 document of forged's HTTP API, served at GET /openapi.json.

The request schemas are built from the tables that validate requests (api/requests.py: the
accepted fields, numeric bounds, neutral values, roles, the limits), so the document cannot promise
what validation refuses or hide what it accepts. What those tables do not hold (the JSON shape of
`prompt`, `messages`, `stop`, `stream_options`, `tools`, `tool_choice`, `response_format`,
`logit_bias`, and the rules that tie fields together) is written here, once.
tests/integration/test_openapi.py holds the document to the routes the app registers and to the
validation, both ways. One rule no JSON Schema can state: a named tool_choice must name one of the
request's tools.

The routes come from api/app.py ROUTES, the one place routes are defined, handed over through the
aiohttp app (`app[ROUTES_KEY]`, set by `build_app`): this module never imports app.py, which
imports it.
"""

from __future__ import annotations

import re
from typing import Any

from aiohttp import web

from forged import __version__
from forged.api import openai, ops
from forged.api.auth import EXEMPT_ROUTES
from forged.api.chat import ROLES
from forged.api.errors import Handler, app_key
from forged.api.openai import STATE
from forged.api.requests import (
    BOOLEANS,
    CHAT_BOOLEANS,
    CHAT_FIELDS,
    COMPLETION_FIELDS,
    COMPLETION_NUMBERS,
    MAX_LOGIT_BIAS,
    MAX_STOP_STRINGS,
    NEUTRAL,
    NUMBERS,
    TOKEN_ID,
)
from forged.api.structured import NAME as SCHEMA_NAME
from forged.api.tools import MAX_TOOLS
from forged.api.tools import NAME as TOOL_NAME

OPENAPI_VERSION = "3.1.0"
Route = tuple[str, str, Handler]  # (method, path, handler), as api/app.py ROUTES lists them
# The routes the document covers: build_app puts ROUTES here.
ROUTES_KEY = app_key("documented_routes", list)
JSON = "application/json"

_NULL = {"type": "null"}
_STRING_OR_NULL = {"type": ["string", "null"]}
_TEXT_PART = {"type": "object", "required": ["type", "text"],
              "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
_CONTENT = {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]}
_TOOL_CALL = {"type": "object", "required": ["id", "function"], "additionalProperties": False, "properties": {
    "id": {"type": "string", "minLength": 1}, "type": {"const": "function"},
    "function": {"type": "object", "required": ["name", "arguments"], "additionalProperties": False,
                 "properties": {"name": {"type": "string", "minLength": 1},
                                "arguments": {"type": "string", "description": "JSON text"}}}}}


def _message(role: Any, required: list[str], **properties: Any) -> dict[str, Any]:
    return {"type": "object", "required": ["role", *required], "additionalProperties": False,
            "properties": {"role": role, **properties}}


_MESSAGE = {"anyOf": [
    _message({"enum": [r for r in ROLES if r not in ("assistant", "tool")]}, ["content"], content=_CONTENT,
             name=_STRING_OR_NULL),
    _message({"const": "assistant"}, ["content"], content=_CONTENT, name=_STRING_OR_NULL, refusal=_NULL,
             tool_calls={"anyOf": [_NULL, {"type": "array", "items": _TOOL_CALL}]}),
    _message({"const": "assistant"}, ["tool_calls"], content=_NULL, name=_STRING_OR_NULL, refusal=_NULL,
             tool_calls={"type": "array", "items": _TOOL_CALL, "minItems": 1}),
    _message({"const": "tool"}, ["content", "tool_call_id"], content=_CONTENT,
             tool_call_id={"type": "string", "minLength": 1}, name=_STRING_OR_NULL),
]}
_TOOL = {"type": "object", "required": ["type", "function"], "additionalProperties": False, "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "pattern": TOOL_NAME.pattern}, "description": _STRING_OR_NULL,
        "parameters": {"type": "object", "description": "JSON Schema of the arguments"},
        "strict": {"type": ["boolean", "null"]}}}}}
_JSON_SCHEMA_FORMAT = {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False,
                       "properties": {"type": {"const": "json_schema"}, "json_schema": {
                           "type": "object", "required": ["name"], "additionalProperties": False, "properties": {
                               "name": {"type": "string", "pattern": SCHEMA_NAME.pattern},
                               "description": _STRING_OR_NULL, "schema": {"type": ["object", "null"]},
                               "strict": {"type": ["boolean", "null"]}}}}}
# JSON shapes of the fields whose validation is code rather than a table in api/requests.py.
_SHAPES: dict[str, dict[str, Any]] = {
    "model": {**_STRING_OR_NULL, "description": "the served model id (GET /v1/models); another id gets 404"},
    "user": _STRING_OR_NULL,
    "prompt": {"anyOf": [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1,
         "description": "token ids; ids outside the vocabulary get 400"},
    ]},
    "messages": {"type": "array", "minItems": 1, "items": _MESSAGE},
    "stop": {"anyOf": [_NULL, {"type": "string"},
                       {"type": "array", "items": {"type": "string"}, "maxItems": MAX_STOP_STRINGS}]},
    "stream_options": {"anyOf": [_NULL, {"type": "object", "additionalProperties": False,
                                         "properties": {"include_usage": {"type": ["boolean", "null"]}}}]},
    "tools": {"anyOf": [_NULL, {"type": "array", "maxItems": MAX_TOOLS, "items": _TOOL}]},
    "tool_choice": {"anyOf": [_NULL, {"enum": ["none", "auto", "required"]}, {
        "type": "object", "required": ["type", "function"], "additionalProperties": False,
        "properties": {"type": {"const": "function"},
                       "function": {"type": "object", "required": ["name"], "additionalProperties": False,
                                    "properties": {"name": {"type": "string",
                                                            "description": "one of the request's tools"}}}}}]},
    "response_format": {"anyOf": [_NULL, {"type": "object", "required": ["type"], "additionalProperties": False,
                                          "properties": {"type": {"enum": ["text", "json_object"]}}},
                                  _JSON_SCHEMA_FORMAT]},
    "logit_bias": {"anyOf": [_NULL, {"type": "object", "maxProperties": MAX_LOGIT_BIAS,
                                     "propertyNames": {"pattern": TOKEN_ID.pattern},
                                     "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}}]},
}
# Rules that tie fields together, per endpoint (JSON Schema conditionals).
_STREAM_OPTIONS_RULE = {  # stream_options only goes with stream: true
    "if": {"required": ["stream_options"], "properties": {"stream_options": {"type": "object"}}},
    "then": {"required": ["stream"], "properties": {"stream": {"const": True}}}}
_RULES: dict[str, list[dict[str, Any]]] = {
    "prompt": [_STREAM_OPTIONS_RULE, {  # echo returns the prompt's text, without log-probabilities
        "if": {"required": ["echo"], "properties": {"echo": {"const": True}}},
        "then": {"properties": {"logprobs": _NULL, "prompt": {"anyOf": [
            {"type": "string"}, {"type": "array", "items": {"type": "string"}, "minItems": 1, "maxItems": 1}]}}}}],
    "messages": [_STREAM_OPTIONS_RULE, {  # top_logprobs needs logprobs: true
        "if": {"required": ["top_logprobs"], "properties": {"top_logprobs": {"type": "integer"}}},
        "then": {"required": ["logprobs"], "properties": {"logprobs": {"const": True}}}}, {
        # a tool_choice other than none needs tools
        "if": {"required": ["tool_choice"], "properties": {"tool_choice": {"not": {"enum": [None, "none"]}}}},
        "then": {"required": ["tools"], "properties": {"tools": {"type": "array", "minItems": 1}}}}],
}
_EXTENSIONS = {"top_k": "extension (vLLM, llama-server): 0 = off",
               "min_p": "extension (vLLM, llama-server): 0 = off",
               "repeat_penalty": "extension (llama-server): 1 = off",
               "ignore_eos": "extension (vLLM, llama-server): keep generating past end-of-sequence",
               "return_token_ids": "extension (vLLM): token ids in each choice and the prompt's in the answer"}


def field_schema(name: str, context_length: int | None = None, required: str = "messages") -> dict[str, Any]:
    """The JSON Schema of one request field, from the table in api/requests.py that validates it.
    `required` tells the endpoint ("prompt" or "messages"): completions' logprobs is a count."""
    numbers = {**NUMBERS, **COMPLETION_NUMBERS} if required == "prompt" else NUMBERS
    booleans = BOOLEANS + (CHAT_BOOLEANS if required == "messages" else ())
    if name in numbers:
        bounds = numbers[name]
        schema: dict[str, Any] = {"type": ["integer" if bounds.kind is int else "number", "null"]}
        if bounds.lo is not None:
            schema["exclusiveMinimum" if bounds.lo_exclusive else "minimum"] = bounds.lo
        if bounds.hi is not None:
            schema["maximum"] = bounds.hi
        if name in ("max_tokens", "max_completion_tokens") and context_length:
            # Prompt + max_tokens must fit the context, so more than the whole context never does.
            schema["maximum"] = context_length
    elif name in booleans:
        schema = {"type": ["boolean", "null"]}
    elif name in NEUTRAL:
        schema = {"enum": list(NEUTRAL[name]),
                  "description": "OpenAI field forged does not implement: accepted only at a neutral value"}
    else:
        schema = dict(_SHAPES[name])
    if name in _EXTENSIONS:
        schema["description"] = _EXTENSIONS[name]
    return schema


def request_schema(fields: frozenset[str], required: str, context_length: int | None = None) -> dict[str, Any]:
    names = sorted(fields | set(NEUTRAL))
    return {
        "type": "object", "required": [required], "additionalProperties": False,
        "properties": {name: field_schema(name, context_length, required) for name in names},
        "allOf": _RULES[required],
    }


_ERROR = {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {"error": {
    "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
    "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string"},
                   "param": _STRING_OR_NULL, "code": _STRING_OR_NULL}}}}
_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_OBJECT = {"type": "object"}
_MODEL = {"type": "object", "required": ["id", "object", "created", "owned_by"],
          "properties": {"id": {"type": "string"}, "object": {"const": "model"}, "created": {"type": "integer"},
                         "owned_by": {"type": "string"}}}
_CHOICES = {"type": "array", "items": _OBJECT}
_USAGE = {"type": "object", "required": ["prompt_tokens", "completion_tokens", "total_tokens"],
          "properties": {k: {"type": "integer", "minimum": 0}
                         for k in ("prompt_tokens", "completion_tokens", "total_tokens")}}


def _answer(kind: str) -> dict[str, Any]:
    return {"type": "object", "required": ["id", "object", "created", "model", "choices", "usage"],
            "properties": {"id": {"type": "string"}, "object": {"const": kind}, "created": {"type": "integer"},
                           "model": {"type": "string"}, "choices": _CHOICES, "usage": _USAGE}}


def _error(description: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ERROR_REF}}}


def _json(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": schema or _OBJECT}}}


def _generation(summary: str, request: str, answer: str) -> dict[str, Any]:
    return {
        "summary": summary,
        "requestBody": {"required": True, "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{request}"}}}},
        "responses": {
            "200": {"description": "the answer; with stream: true an SSE stream ending in `data: [DONE]`",
                    "content": {JSON: {"schema": {"$ref": f"#/components/schemas/{answer}"}},
                                # No type: tools read an SSE body either as text or as its events.
                                "text/event-stream": {"schema": {
                                    "description": "`data: {chunk}` events, the last `data: [DONE]`"}}}},
            "400": _error("invalid_request (malformed JSON, invalid UTF-8, wrong type, out of range, unknown "
                          "field) or context_length_exceeded"),
            "404": _error("model_not_found: another model id than the one served"),
            "408": _error("request_timeout: the body did not arrive within server.body_timeout_s"),
            "413": _error("request_too_large: the body is over server.max_body_bytes"),
            "417": _error("expectation_failed: an Expect header other than 100-continue"),
            "500": _error("engine_error: the engine failed this request"),
            "503": {**_error("queue_full, ttft_target_unmeetable, not_ready, shutting_down or server_busy (the "
                             "bodies being received at once are at server.max_body_bytes_in_flight)"),
                    "headers": {"Retry-After": {"schema": {"type": "integer", "minimum": 0}}}},
        },
    }


def _read(summary: str, content: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    return {"summary": summary, "responses": {"200": content or _json("OK"), **extra}}


def _operations() -> dict[Any, dict[str, Any]]:
    """Handler -> its documentation. The paths and methods come from api/app.py ROUTES, the one place
    routes are defined; a handler in ROUTES without an entry here fails loudly (KeyError) in tests."""
    return {
        openai.completions: _generation("Text completion (OpenAI shape)", "CompletionRequest", "Completion"),
        openai.chat_completions: _generation("Chat completion (OpenAI shape)", "ChatCompletionRequest",
                                             "ChatCompletion"),
        openai.models: _read("The served model", _json("an OpenAI model list", {
            "type": "object", "required": ["object", "data"],
            "properties": {"object": {"const": "list"}, "data": {"type": "array", "items": _MODEL}}})),
        openai.model: {**_read("One model by id (the served one)", _json("an OpenAI model", _MODEL),
                               **{"404": _error("model_not_found: not the served model")}),
                       "parameters": [{"name": "model_id", "in": "path", "required": True,
                                       "schema": {"type": "string"}}]},
        ops.status: _read("SKU, hardware, profile, engine, model, uptime, sessions, queue, KV blocks"),
        ops.performance_targets: _read("The profile's targets beside live values, each met or unmet"),
        ops.engine_config: _read("The engine configuration as passed to the engine, and its profile"),
        ops.healthz: _read("The process is alive"),
        ops.readyz: _read("Ready to serve", **{"503": _json("loading, draining or stalled", {
            "type": "object", "required": ["status"],
            "properties": {"status": {"type": "string"}, "reason": _STRING_OR_NULL}})}),
        ops.metrics: _read("Prometheus metrics", {"description": "Prometheus text exposition",
                                                  "content": {"text/plain": {"schema": {"type": "string"}}}}),
        openapi_json: _read("This document", _json("an OpenAPI 3.1 document")),
    }


def document(routes: list[Route], context_length: int | None = None) -> dict[str, Any]:
    """The whole document for `routes` (api/app.py ROUTES). `context_length`, when known, bounds
    max_tokens."""
    operations = _operations()
    paths: dict[str, dict[str, Any]] = {}
    for method, route, handler in routes:
        path = re.sub(r"\{(\w+):[^}]*\}", r"{\1}", route)  # aiohttp's {name:regex} is OpenAPI's {name}
        operation = operations[handler]
        op = {**operation, "responses": {**operation["responses"], "default": _error("any other error")}}
        if path in EXEMPT_ROUTES:
            op["security"] = [{}]
        paths.setdefault(path, {})[method.lower()] = op
    return {
        "openapi": OPENAPI_VERSION,
        "info": {"title": "forged", "version": __version__,
                 "description": "Local LLM appliance daemon: OpenAI-compatible generation and operator routes. "
                                "The same routes are served on TCP and the UNIX socket (docs/api.md)."},
        # The key is needed only on TCP and only with listen.http.api_keys_file set (docs/api.md, Security).
        "security": [{}, {"apiKey": []}],
        "paths": paths,
        "components": {
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "CompletionRequest": request_schema(COMPLETION_FIELDS, "prompt", context_length),
                "ChatCompletionRequest": request_schema(CHAT_FIELDS, "messages", context_length),
                "Completion": _answer("text_completion"),
                "ChatCompletion": _answer("chat.completion"),
                "Error": _ERROR,
            },
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response(document(request.app[ROUTES_KEY], state.engine.model.context_length or None))
