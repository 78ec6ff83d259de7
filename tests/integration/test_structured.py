"""Structured outputs, tools, logprobs, penalties and the rest of the OpenAI surface that turns a chat
model into a component, over raw HTTP against the real daemon and the real default model
(SmolLM2-135M-Instruct). The client libraries' view of the same is test_clients.py."""

from __future__ import annotations

import json
import math
from typing import Any

import httpx
import jsonschema
import pytest
from conftest import Daemon, sse_events

PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age"],
          "properties": {"name": {"type": "string", "maxLength": 30}, "age": {"type": "integer"},
                         "city": {"anyOf": [{"type": "string"}, {"type": "null"}]}}}
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
ASK = [{"role": "user", "content": "Invent a person and answer in JSON."}]


def post(daemon: Daemon, route: str, body: dict[str, Any]) -> httpx.Response:
    return httpx.post(f"{daemon.url}/v1/{route}", json=body, timeout=300)


def stream(daemon: Daemon, route: str, body: dict[str, Any]) -> list[Any]:
    with httpx.stream("POST", f"{daemon.url}/v1/{route}", json=dict(body, stream=True), timeout=300) as r:
        assert r.status_code == 200, r.read()
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    return events[:-1]


def json_schema(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "person", "schema": schema, "strict": True}}


# ------------------------------------------------------------------ response_format


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("route", ["chat/completions", "completions"])
def test_json_schema_answers_validate(shared_daemon: Daemon, route: str, streamed: bool) -> None:
    # Sampled, not greedy: the grammar must also hold when the draw would have left it.
    body: dict[str, Any] = {"max_tokens": 64, "temperature": 1.0, "seed": 7,
                            "response_format": json_schema(PERSON)}
    body.update({"messages": ASK} if route == "chat/completions" else {"prompt": "A person, as JSON:"})
    if streamed:
        events = stream(shared_daemon, route, body)
        pieces = [(e["choices"][0]["delta"].get("content") or "") if route == "chat/completions"
                  else e["choices"][0]["text"] for e in events if e["choices"]]
        text, finish = "".join(pieces), events[-1]["choices"][0]["finish_reason"]
    else:
        choice = post(shared_daemon, route, body).json()["choices"][0]
        text = choice["message"]["content"] if route == "chat/completions" else choice["text"]
        finish = choice["finish_reason"]
    assert finish == "stop", f"the answer did not finish within max_tokens: {text!r}"
    jsonschema.validate(json.loads(text), PERSON)


def test_json_object_is_a_json_object(shared_daemon: Daemon) -> None:
    body = {"messages": [{"role": "user", "content": "Give a JSON object with one key, colour."}],
            "max_tokens": 48, "temperature": 0, "response_format": {"type": "json_object"}}
    choice = post(shared_daemon, "chat/completions", body).json()["choices"][0]
    if choice["finish_reason"] == "stop":
        assert isinstance(json.loads(choice["message"]["content"]), dict)
    else:  # cut by max_tokens: what there is is still the start of an object
        assert choice["message"]["content"].lstrip().startswith("{")


def test_schema_features_forged_cannot_enforce_are_named(shared_daemon: Daemon) -> None:
    schema = {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0},
                                               "email": {"type": "string", "format": "email"}}}
    r = post(shared_daemon, "chat/completions", {"messages": ASK, "max_tokens": 8,
                                                  "response_format": json_schema(schema)})
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "response_format.json_schema.schema"
    assert "properties.age.minimum" in error["message"] and "properties.email.format" in error["message"]
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    r = post(shared_daemon, "chat/completions", {"messages": ASK, "max_tokens": 8, "tools": [tool],
                                                  "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].function.parameters"


# ------------------------------------------------------------------ tools


def test_forced_tool_call_round_trip(shared_daemon: Daemon) -> None:
    messages: list[dict[str, Any]] = [{"role": "user", "content": "What is the weather in Paris?"}]
    answer = post(shared_daemon, "chat/completions", {"messages": messages, "tools": [WEATHER],
                                                       "tool_choice": "required", "max_tokens": 64,
                                                       "temperature": 0}).json()
    choice = answer["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
    # The call and its result go back; the model answers from them.
    messages += [choice["message"], {"role": "tool", "tool_call_id": call["id"], "content": "sunny, 24 C"}]
    final = post(shared_daemon, "chat/completions", {"messages": messages, "tools": [WEATHER],
                                                      "max_tokens": 48, "temperature": 0}).json()
    assert final["choices"][0]["message"]["content"] or final["choices"][0]["message"].get("tool_calls")


def test_named_tool_call_streams_as_openai_deltas(shared_daemon: Daemon) -> None:
    body = {"messages": [{"role": "user", "content": "Weather in Oslo, in fahrenheit?"}],
            "tools": [WEATHER, {"type": "function", "function": {"name": "get_time"}}],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
            "max_tokens": 64, "temperature": 0}
    events = stream(shared_daemon, "chat/completions", body)
    deltas = [e["choices"][0]["delta"] for e in events]
    assert deltas[0] == {"role": "assistant", "content": ""}
    calls = [d["tool_calls"][0] for d in deltas if "tool_calls" in d]
    opening, arguments = calls
    assert opening["index"] == 0 and opening["id"].startswith("call_") and opening["type"] == "function"
    assert opening["function"] == {"name": "get_weather", "arguments": ""}
    assert set(arguments) == {"index", "function"} and set(arguments["function"]) == {"arguments"}
    jsonschema.validate(json.loads(arguments["function"]["arguments"]), WEATHER["function"]["parameters"])
    assert events[-1]["choices"][0]["finish_reason"] == "tool_calls"


def test_an_assistant_messages_tool_calls_are_never_dropped(shared_daemon: Daemon) -> None:
    def prompt_tokens(assistant: dict[str, Any]) -> int:
        messages = [{"role": "user", "content": "Weather in Paris?"}, assistant,
                    {"role": "user", "content": "Thanks."}]
        r = post(shared_daemon, "chat/completions", {"messages": messages, "max_tokens": 1})
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                            "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    without = prompt_tokens({"role": "assistant", "content": ""})
    with_call = prompt_tokens({"role": "assistant", "content": "", "tool_calls": [call]})
    assert with_call > without + 8  # the call's name and arguments reached the prompt


# ------------------------------------------------------------------ logprobs


def test_chat_logprobs_are_the_models_distribution(shared_daemon: Daemon) -> None:
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 6, "temperature": 0,
            "logprobs": True, "top_logprobs": 5}
    choice = post(shared_daemon, "chat/completions", body).json()["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) >= 1
    for entry in entries:
        top = entry["top_logprobs"]
        assert len(top) == 5 and all(t["logprob"] <= 0 for t in top)
        assert sum(math.exp(t["logprob"]) for t in top) <= 1 + 1e-4
        # Greedy: the sampled token is the most likely one.
        assert entry["token"] == top[0]["token"] and entry["logprob"] == pytest.approx(top[0]["logprob"])
        assert bytes(entry["bytes"]).decode("utf-8", "replace") == entry["token"]
    # One entry per generated token, whose bytes make up the answer (an end token's are empty).
    assert bytes(b for e in entries for b in e["bytes"]).decode() == choice["message"]["content"]


def test_completion_logprobs_line_up_with_the_text(shared_daemon: Daemon) -> None:
    body = {"prompt": "The sky is", "max_tokens": 5, "temperature": 0, "logprobs": 3}
    choice = post(shared_daemon, "completions", body).json()["choices"][0]
    lp = choice["logprobs"]
    assert "".join(lp["tokens"]) == choice["text"]
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(lp["tokens"]))]
    for token, logprob, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"], strict=True):
        assert max(top.values()) == pytest.approx(logprob) and top[token] == pytest.approx(logprob)
        assert sum(math.exp(v) for v in top.values()) <= 1 + 1e-4
    streamed = stream(shared_daemon, "completions", body)
    assert [t for e in streamed if e["choices"] and e["choices"][0]["logprobs"]
            for t in e["choices"][0]["logprobs"]["tokens"]] == lp["tokens"]


# ------------------------------------------------------------------ sampling controls


REPEATS = "The cat sat on the mat. The cat sat on the mat. The cat sat on the mat. The cat"


def greedy_text(daemon: Daemon, **extra: Any) -> str:
    body = {"prompt": REPEATS, "max_tokens": 16, "temperature": 0, **extra}
    r = post(daemon, "completions", body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def test_penalties_and_bias_change_greedy_output(shared_daemon: Daemon) -> None:
    plain = greedy_text(shared_daemon)
    assert greedy_text(shared_daemon) == plain
    assert greedy_text(shared_daemon, frequency_penalty=2.0) != plain
    assert greedy_text(shared_daemon, presence_penalty=2.0) != plain
    assert greedy_text(shared_daemon, repeat_penalty=1.8) != plain
    # Banning the greedy first token changes the first token.
    first = post(shared_daemon, "completions", {"prompt": REPEATS, "max_tokens": 1, "temperature": 0,
                                                "return_token_ids": True}).json()["choices"][0]["token_ids"][0]
    banned = post(shared_daemon, "completions", {"prompt": REPEATS, "max_tokens": 1, "temperature": 0,
                                                 "return_token_ids": True, "logit_bias": {str(first): -100}})
    assert banned.json()["choices"][0]["token_ids"][0] != first
    # min_p at 1 keeps only the most likely token: sampling then equals greedy decoding.
    assert greedy_text(shared_daemon, temperature=1.5, min_p=1.0, seed=3) == plain


def test_echo_returns_the_prompt_first(shared_daemon: Daemon) -> None:
    body = {"prompt": "Roses are red,", "max_tokens": 6, "temperature": 0, "echo": True}
    text = post(shared_daemon, "completions", body).json()["choices"][0]["text"]
    plain = post(shared_daemon, "completions", dict(body, echo=False)).json()["choices"][0]["text"]
    assert text == "Roses are red," + plain
    events = stream(shared_daemon, "completions", body)
    assert events[0]["choices"][0]["text"] == "Roses are red,"


def test_models_retrieve(shared_daemon: Daemon) -> None:
    listed = httpx.get(f"{shared_daemon.url}/v1/models", timeout=30).json()["data"][0]
    one = httpx.get(f"{shared_daemon.url}/v1/models/{listed['id']}", timeout=30)
    assert one.status_code == 200 and one.json() == listed
    other = httpx.get(f"{shared_daemon.url}/v1/models/gpt-9", timeout=30)
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
