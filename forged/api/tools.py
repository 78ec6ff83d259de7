"""Tools: a request's `tools` and `tool_choice`, how they reach the model, how calls come back.

A model family writes tool calls in its own syntax, which its chat template teaches it. forged
knows two formats (docs/api.md, "Tools"):

- **hermes**: the template takes `tools` and the model answers each call as
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`: Hermes 2 Pro and 3, Qwen 2.5 and
  3, SmolLM3 and the many templates derived from them. Recognised by `<tool_call>` in a template that
  reads `tools`. The template renders the tools, the assistant's earlier calls and the tool results;
  forged parses the calls out of the text (streamed content stops at `<tool_call>`).
- **generic**: every other template, SmolLM2's included (its template knows no tools, and a small
  model needs the help). llama.cpp's server does the same for templates without native tools; the
  form here is forged's own: the tools are described in the system message, and the answer is
  constrained by a JSON grammar to `{"tool_calls": [{"name", "arguments"}, ...]}` or, under
  `tool_choice: auto`, `{"response": "..."}`. Earlier calls and tool results are written into the
  conversation in that same JSON, as user turns for results. One call per answer unless the request
  says `parallel_tool_calls: true` (llama.cpp's server defaults to one as well): allowed several, a
  small model repeats its first call until max_tokens.

`tool_choice: required` or a named function is enforced by grammar in both formats (only calls of
the allowed tools, with arguments valid against their parameter schemas); `auto` under hermes
leaves the model free, and `none` sends no tools at all.
"""

from __future__ import annotations

import abc
import copy
import functools
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal

from forged.api.errors import BadRequest
from forged.engine.base import OutputConstraint

MAX_TOOLS = 128
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
EMPTY_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}}
HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"

Choice = Literal["none", "auto", "required", "function"]
TemplateInputs = tuple[list[dict[str, Any]], list[dict[str, Any]] | None]  # messages, tools


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai(self) -> dict[str, Any]:
        """The OpenAI shape, which Hugging Face templates take as `tools`."""
        fn: dict[str, Any] = {"name": self.name, "parameters": self.parameters}
        if self.description:
            fn["description"] = self.description
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple[Tool, ...]
    choice: Choice = "auto"
    function: str | None = None  # the named function, when choice is "function"
    parallel: bool | None = None  # as asked; None: not said (each format has its default)

    @property
    def active(self) -> bool:
        return self.choice != "none"

    @property
    def forced(self) -> bool:
        return self.choice in ("required", "function")

    def callable(self) -> tuple[Tool, ...]:
        """The tools a call may name: the named one, or all."""
        return tuple(t for t in self.tools if t.name == self.function) if self.function else self.tools


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI returns it
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def parse_tools(body: dict[str, Any]) -> ToolRequest | None:
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = body.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise BadRequest("parallel_tool_calls must be true or false", "parallel_tool_calls")
    if tools is None or tools == []:
        if choice not in (None, "none"):
            raise BadRequest("tool_choice needs tools", "tool_choice")
        return None
    if not isinstance(tools, list) or len(tools) > MAX_TOOLS:
        raise BadRequest(f"tools must be a list of at most {MAX_TOOLS} tools", "tools")
    parsed: list[Tool] = []
    for i, tool in enumerate(tools):
        at = f"tools[{i}]"
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(fn, dict):
            raise BadRequest(f"{at} must be {{\"type\": \"function\", \"function\": {{\"name\", ...}}}}", at)
        extra = set(fn) - {"name", "description", "parameters", "strict"}
        if extra:
            raise BadRequest(f"{at}.function.{sorted(extra)[0]} is not a field of a function tool",
                             f"{at}.function.{sorted(extra)[0]}")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise BadRequest(f"{at}.function.name must be 1-64 letters, digits, _ or -", f"{at}.function.name")
        description = fn.get("description")
        if description is not None and not isinstance(description, str):
            raise BadRequest(f"{at}.function.description must be a string", f"{at}.function.description")
        parameters = fn.get("parameters", EMPTY_PARAMETERS)
        if not isinstance(parameters, dict):
            raise BadRequest(f"{at}.function.parameters must be a JSON Schema object", f"{at}.function.parameters")
        if fn.get("strict") is not None and not isinstance(fn["strict"], bool):
            raise BadRequest(f"{at}.function.strict must be true or false", f"{at}.function.strict")
        parsed.append(Tool(name, description or "", parameters))
    function = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        if (choice.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str)
                or set(choice) != {"type", "function"} or set(fn) != {"name"}):
            raise BadRequest('tool_choice must be "none", "auto", "required" or {"type": "function", '
                             '"function": {"name": ...}}', "tool_choice")
        function = fn["name"]
        if all(t.name != function for t in parsed):
            raise BadRequest(f"tool_choice names {function!r}, which is not in tools", "tool_choice")
        choice = "function"
    elif choice not in ("none", "auto", "required"):
        raise BadRequest('tool_choice must be "none", "auto", "required" or a named function', "tool_choice")
    return ToolRequest(tuple(parsed), choice, function, parallel)


# ---------------------------------------------------------------------------------- formats


@functools.lru_cache(maxsize=8)
def format_for(template_source: str) -> ToolFormat:
    """The tool format a chat template speaks (see the module docstring)."""
    if HERMES_OPEN in template_source and "tools" in template_source:
        return HERMES
    return GENERIC


class ToolFormat(abc.ABC):
    name: str

    @abc.abstractmethod
    def template_inputs(self, messages: list[dict[str, Any]], request: ToolRequest | None,
                        response_schema: dict[str, Any] | None) -> TemplateInputs:
        """The messages and `tools` to render the chat template with."""

    @abc.abstractmethod
    def constraint(self, request: ToolRequest, response_schema: dict[str, Any] | None) -> OutputConstraint | None:
        """The grammar the answer is held to; None: the model is free."""

    @abc.abstractmethod
    def parser(self, request: ToolRequest | None) -> OutputParser: ...


class GenericFormat(ToolFormat):
    name = "generic"

    def template_inputs(self, messages: list[dict[str, Any]], request: ToolRequest | None,
                        response_schema: dict[str, Any] | None) -> TemplateInputs:
        active = request is not None and request.active
        out = [_plain_message(m, as_json=active) for m in messages]
        if active:
            prompt = _generic_prompt(request, response_schema)
            if out[0]["role"] == "system":
                out[0] = dict(out[0], content=f"{out[0]['content']}\n\n{prompt}")
            else:
                out.insert(0, {"role": "system", "content": prompt})
        return out, None

    def constraint(self, request: ToolRequest, response_schema: dict[str, Any] | None) -> OutputConstraint | None:
        if not request.active:
            return None
        defs: dict[str, Any] = {}
        calls: dict[str, Any] = {"type": "array", "items": _call_schema(request, defs), "minItems": 1}
        if request.parallel is not True:
            calls["maxItems"] = 1
        with_calls = {"type": "object", "properties": {"tool_calls": calls}, "required": ["tool_calls"]}
        if request.forced:
            schema = with_calls
        else:
            answer = {"type": "string"} if response_schema is None else _embed(response_schema, "response-", defs)
            schema = {"anyOf": [with_calls, {"type": "object", "properties": {"response": answer},
                                             "required": ["response"]}]}
        if defs:
            schema = dict(schema, **{"$defs": defs})
        return OutputConstraint(schema=schema)

    def parser(self, request: ToolRequest | None) -> OutputParser:
        return GenericParser() if request is not None and request.active else ContentParser()


class HermesFormat(ToolFormat):
    name = "hermes"

    def template_inputs(self, messages: list[dict[str, Any]], request: ToolRequest | None,
                        response_schema: dict[str, Any] | None) -> TemplateInputs:
        tools = [t.openai() for t in request.tools] if request is not None and request.active else None
        return messages, tools

    def constraint(self, request: ToolRequest, response_schema: dict[str, Any] | None) -> OutputConstraint | None:
        if not request.forced:
            return None  # auto: the model decides between text and <tool_call> blocks
        defs: dict[str, Any] = {}
        call = _call_schema(request, defs)
        if defs:
            call = dict(call, **{"$defs": defs})
        return OutputConstraint(schema=call, before=f"{HERMES_OPEN}\n", after=f"\n{HERMES_CLOSE}\n",
                                max_items=1 if request.parallel is False else None)

    def parser(self, request: ToolRequest | None) -> OutputParser:
        return HermesParser() if request is not None and request.active else ContentParser()


GENERIC = GenericFormat()
HERMES = HermesFormat()


def _call_schema(request: ToolRequest, defs: dict[str, Any]) -> dict[str, Any]:
    """One call of an allowed tool: {"name": <its name>, "arguments": <valid for its parameters>}."""
    alternatives = [{"type": "object",
                     "properties": {"name": {"const": tool.name},
                                    "arguments": _embed(tool.parameters, f"tool{i}-", defs)},
                     "required": ["name", "arguments"]}
                    for i, tool in enumerate(request.callable())]
    return alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}


def _embed(schema: dict[str, Any], prefix: str, defs: dict[str, Any]) -> dict[str, Any]:
    """A schema placed inside a larger one. Its `$defs`/`definitions` move to the top under names
    that start with `prefix` (two tools may both define "Location"), and its local `$ref`s follow;
    a reference to its own root (recursion) points at a copy of it kept in the top `$defs`."""
    schema = copy.deepcopy(schema)
    own = {**(schema.pop("definitions", None) or {}), **(schema.pop("$defs", None) or {})}
    to_root = False

    def ref(target: str) -> str:
        nonlocal to_root
        for head in ("#/$defs/", "#/definitions/"):
            if target.startswith(head):
                return f"#/$defs/{prefix}{target[len(head):]}"
        if target == "#" or target.startswith("#/"):
            to_root = True
            return f"#/$defs/{prefix}root{target[1:]}"
        return target  # remote: refused by the engine's schema check

    def walk(node: Any) -> Any:
        if isinstance(node, list):
            return [walk(n) for n in node]
        if not isinstance(node, dict):
            return node
        return {k: (ref(v) if k == "$ref" and isinstance(v, str) else v if k in ("const", "enum") else walk(v))
                for k, v in node.items()}

    schema = walk(schema)
    for name, sub in own.items():
        defs[f"{prefix}{name}"] = walk(sub)
    if to_root:
        defs[f"{prefix}root"] = schema
    return schema


def _generic_prompt(request: ToolRequest, response_schema: dict[str, Any] | None) -> str:
    tools = json.dumps([{"name": t.name, "description": t.description, "parameters": t.parameters}
                        for t in request.tools], ensure_ascii=False)
    call = '{"tool_calls": [{"name": "<tool name>", "arguments": {<arguments>}}]}'
    lines = [f"You can call these tools; each one's arguments follow the JSON Schema given with it:\n{tools}"]
    if request.choice == "function":
        lines.append(f"Call the tool {request.function} now. Answer with JSON: {call}")
    elif request.choice == "required":
        lines.append(f"Call one or more of these tools now. Answer with JSON: {call}")
    else:
        answer = '{"response": "<your answer>"}' if response_schema is None else \
            '{"response": <your answer, as JSON that follows this schema: ' + json.dumps(response_schema) + ">}"
        lines.append(f"To call tools, answer with JSON: {call}\nTo answer directly, or once a tool has returned "
                     f"what you need, answer with JSON: {answer}")
    return "\n".join(lines)


def _plain_message(message: dict[str, Any], as_json: bool) -> dict[str, Any]:
    """A message as a template without tool support can render it: text content only. Earlier calls
    are written in the generic format's JSON while tools are offered (the model answers in kind), as
    a sentence when they are not (it would answer in that JSON too); results always as a sentence."""
    role = message["role"]
    if role == "tool":
        # Plain text: given JSON here, a small model answers in that JSON rather than in words. No call
        # id either: a random id in the prompt makes a small model's answer change from run to run.
        name = message.get("name") or "the tool"
        return {"role": "user", "content": f"{name} returned: {message['content']}"}
    if role == "assistant" and message.get("tool_calls"):
        calls = [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                 for c in message["tool_calls"]]
        if as_json:
            text = json.dumps({"tool_calls": calls}, ensure_ascii=False)
        else:
            text = " ".join(f"I called {c['name']} with {json.dumps(c['arguments'], ensure_ascii=False)}."
                            for c in calls)
        content = message.get("content")
        return {"role": "assistant", "content": f"{content}\n{text}" if content else text}
    return {"role": role, "content": message.get("content") or ""}


# ---------------------------------------------------------------------------------- parsers


class OutputParser(abc.ABC):
    """One choice's generated text in, as it streams; content and tool calls out."""

    @abc.abstractmethod
    def feed(self, text: str) -> tuple[str, list[ToolCall]]: ...

    @abc.abstractmethod
    def finish(self) -> tuple[str, list[ToolCall]]: ...


class ContentParser(OutputParser):
    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        return text, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        return "", []


class GenericParser(OutputParser):
    """The generic format's JSON, read once it is complete (nothing streams before the end)."""

    def __init__(self) -> None:
        self._parts: list[str] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._parts.append(text)
        return "", []

    def finish(self) -> tuple[str, list[ToolCall]]:
        text = "".join(self._parts)
        try:
            doc = json.loads(text)
        except ValueError:
            return text, []  # cut short (max_tokens): the client gets what there is, as content
        if isinstance(doc, dict) and isinstance(doc.get("tool_calls"), list):
            calls = [_call(c) for c in doc["tool_calls"]]
            if all(calls):
                return "", [c for c in calls if c is not None]
        if isinstance(doc, dict) and set(doc) == {"response"}:
            answer = doc["response"]
            return (answer if isinstance(answer, str) else json.dumps(answer, ensure_ascii=False)), []
        return text, []


class HermesParser(OutputParser):
    """Content streams until `<tool_call>`; each complete block becomes a call. The whitespace that
    separates calls (and follows the last) is the syntax's, not content."""

    def __init__(self) -> None:
        self._buffer = ""
        self._in_call = False
        self._after_call = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._in_call:
                end = self._buffer.find(HERMES_CLOSE)
                if end < 0:
                    break
                block, self._buffer = self._buffer[:end], self._buffer[end + len(HERMES_CLOSE):]
                self._in_call = False
                call = _parse_call_text(block)
                if call is None:
                    content.append(f"{HERMES_OPEN}{block}{HERMES_CLOSE}")
                else:
                    calls.append(call)
                    self._after_call = True
                continue
            if self._after_call:
                self._buffer = self._buffer.lstrip()
                if not self._buffer:
                    break
                self._after_call = False
            start = self._buffer.find(HERMES_OPEN)
            if start >= 0:
                content.append(self._buffer[:start])
                self._buffer = self._buffer[start + len(HERMES_OPEN):]
                self._in_call = True
                continue
            keep = _partial_suffix(self._buffer, HERMES_OPEN)
            content.append(self._buffer[:len(self._buffer) - keep])
            self._buffer = self._buffer[len(self._buffer) - keep:]
            break
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest, self._buffer = self._buffer, ""
        if self._after_call:
            rest = rest.lstrip()
        return (f"{HERMES_OPEN}{rest}" if self._in_call else rest), []


def _parse_call_text(text: str) -> ToolCall | None:
    try:
        return _call(json.loads(text))
    except ValueError:
        return None


def _call(doc: Any) -> ToolCall | None:
    if not isinstance(doc, dict) or not isinstance(doc.get("name"), str):
        return None
    arguments = doc.get("arguments", doc.get("parameters", {}))
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(doc["name"], text)


def _partial_suffix(text: str, marker: str) -> int:
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0
