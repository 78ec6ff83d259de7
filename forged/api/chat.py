"""A chat request's `messages`, validated into the shape chat templates take.

Roles: system (and developer, its newer name), user, assistant, tool. An assistant message may
carry `tool_calls` (its content then may be null), and a `tool` message answers one of them by
`tool_call_id`. The result is what Hugging Face chat templates expect: tool-call arguments parsed
from their JSON text into objects (kept as text when it is not JSON), and each tool message carrying
its function's `name` when an earlier message made that call. Nothing a client sends is dropped: a
field forged cannot pass on is refused with 400.
"""

from __future__ import annotations

import json
from typing import Any

from forged.api.errors import BadRequest

ROLES = ("system", "developer", "user", "assistant", "tool")
# Per role, the fields a message may carry besides role and content (OpenAI's; `name` goes to the template).
FIELDS = {
    "system": {"name"}, "developer": {"name"}, "user": {"name"},
    "assistant": {"name", "tool_calls", "refusal"},
    "tool": {"tool_call_id", "name"},
}


def parse_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages is required and must be a non-empty list", "messages")
    out: list[dict[str, Any]] = []
    calls: dict[str, str] = {}  # tool_call_id -> function name, from earlier assistant messages
    for i, msg in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise BadRequest(f"{where} must be an object", where)
        role = msg.get("role")
        if role not in ROLES:
            raise BadRequest(f"{where}.role must be one of {', '.join(ROLES)}", f"{where}.role")
        extra = set(msg) - {"role", "content"} - FIELDS[role]
        if extra:
            key = sorted(extra)[0]
            hint = " (the deprecated function-calling fields: use tools and tool_calls)" \
                if key in ("function_call", "functions") else ""
            raise BadRequest(f"{where}.{key} is not supported for a {role} message{hint}", f"{where}.{key}")
        parsed: dict[str, Any] = {"role": "system" if role == "developer" else role}
        if isinstance(msg.get("name"), str):
            parsed["name"] = msg["name"]
        elif msg.get("name") is not None:
            raise BadRequest(f"{where}.name must be a string", f"{where}.name")
        if role == "assistant":
            tool_calls = _tool_calls(msg.get("tool_calls"), where)
            content = msg.get("content")
            if content is None and not tool_calls:
                raise BadRequest(f"{where}.content is required unless the message has tool_calls",
                                 f"{where}.content")
            parsed["content"] = None if content is None else _content_text(content, where)
            if msg.get("refusal") is not None:
                raise BadRequest(f"{where}.refusal must be null (forged's models give no refusal field)",
                                 f"{where}.refusal")
            if tool_calls:
                parsed["tool_calls"] = tool_calls
                calls.update((call["id"], call["function"]["name"]) for call in tool_calls)
        else:
            parsed["content"] = _content_text(msg.get("content"), where)
        if role == "tool":
            call_id = msg.get("tool_call_id")
            if not isinstance(call_id, str) or not call_id:
                raise BadRequest(f"{where}.tool_call_id is required for a tool message", f"{where}.tool_call_id")
            parsed["tool_call_id"] = call_id
            if call_id in calls:
                parsed["name"] = calls[call_id]  # the function the call named, before any name sent here
        out.append(parsed)
    return out


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise BadRequest(f"{where}.content: only text parts are supported", f"{where}.content")
            parts.append(part["text"])
        return "".join(parts)
    raise BadRequest(f"{where}.content must be a string or a list of text parts", f"{where}.content")


def _tool_calls(value: Any, where: str) -> list[dict[str, Any]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"{where}.tool_calls must be a list", f"{where}.tool_calls")
    out = []
    for j, call in enumerate(value):
        at = f"{where}.tool_calls[{j}]"
        fn = call.get("function") if isinstance(call, dict) else None
        if (not isinstance(call, dict) or call.get("type", "function") != "function" or not isinstance(fn, dict)
                or set(call) - {"id", "type", "function"} or set(fn) - {"name", "arguments"}):
            raise BadRequest(f"{at} must be {{\"id\", \"type\": \"function\", \"function\": {{\"name\", "
                             f"\"arguments\"}}}}", at)
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise BadRequest(f"{at}.id must be a non-empty string", f"{at}.id")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"{at}.function.name must be a non-empty string", f"{at}.function.name")
        arguments = fn.get("arguments")
        if not isinstance(arguments, str):
            raise BadRequest(f"{at}.function.arguments must be a string of JSON", f"{at}.function.arguments")
        try:
            # Templates render arguments as objects (Hugging Face's convention). OpenAI does not check
            # that they are JSON, nor does forged: text that is not is passed on as text.
            parsed: Any = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            parsed = arguments
        out.append({"id": call["id"], "type": "function", "function": {"name": fn["name"], "arguments": parsed}})
    return out
