"""Tools, messages and answer shapes: api/tools.py, api/chat.py, api/structured.py, api/responses.py."""

from __future__ import annotations

import json
from typing import Any

import pytest

from forged.api.chat import parse_messages
from forged.api.errors import BadRequest
from forged.api.responses import ChoiceBuilder
from forged.api.structured import parse_response_format
from forged.api.tools import GENERIC, HERMES, GenericParser, HermesParser, ToolRequest, format_for, parse_tools
from forged.engine.base import OutputConstraint, TokenEvent, TokenLogprob

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"$ref": "#/$defs/Zone"}}, "required": ["zone"],
    "$defs": {"Zone": {"enum": ["UTC", "CET"]}}}}}
# The part of Qwen 2.5's template that makes it a hermes-format template.
QWEN_LIKE = ('{%- if tools %}{{- "<tools>" }}{%- for tool in tools %}{{ tool | tojson }}{%- endfor %}'
             '{{- "</tools>" }}{%- endif %}{%- for message in messages %}{%- if message.tool_calls %}'
             '{{- "<tool_call>" }}{%- endif %}{%- endfor %}')


def tools_of(**body: Any) -> ToolRequest:
    request = parse_tools(body)
    assert request is not None
    return request


# ------------------------------------------------------------------ parsing


def test_tool_choice_forms_and_defaults() -> None:
    assert tools_of(tools=[WEATHER]).choice == "auto"
    assert tools_of(tools=[WEATHER], tool_choice="required").forced
    named = tools_of(tools=[WEATHER, TIME], tool_choice={"type": "function", "function": {"name": "get_time"}},
                     parallel_tool_calls=False)
    assert (named.choice, named.function, named.parallel) == ("function", "get_time", False)
    assert tools_of(tools=[WEATHER]).parallel is None  # not said: each format has its default
    assert [t.name for t in named.callable()] == ["get_time"]
    assert not tools_of(tools=[WEATHER], tool_choice="none").active
    assert parse_tools({}) is None and parse_tools({"tools": [], "tool_choice": "none"}) is None


@pytest.mark.parametrize(("body", "param"), [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0]"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": []}}]}, "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "extra": 1}}]}, "tools[0].function.extra"),
    ({"tools": [WEATHER], "parallel_tool_calls": "yes"}, "parallel_tool_calls"),
])
def test_bad_tools_are_refused_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_tools(body)
    assert err.value.param == param


def test_messages_keep_tool_calls_and_results() -> None:
    messages = parse_messages([
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "Paris?"}]},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ])
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[1]["content"] == "Weather in Paris?"
    assert messages[2]["tool_calls"] == [{"id": "call_1", "type": "function",
                                          "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    assert messages[3] == {"role": "tool", "content": "sunny", "tool_call_id": "call_1", "name": "get_weather"}


@pytest.mark.parametrize(("message", "param"), [
    ({"role": "assistant", "content": None}, "messages[0].content"),
    ({"role": "tool", "content": "x"}, "messages[0].tool_call_id"),
    ({"role": "function", "content": "x", "name": "f"}, "messages[0].role"),
    ({"role": "assistant", "content": "x", "function_call": {"name": "f"}}, "messages[0].function_call"),
    ({"role": "user", "content": "x", "tool_calls": []}, "messages[0].tool_calls"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f"}}]},
     "messages[0].tool_calls[0].function.arguments"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{}"}, "x": 1}]},
     "messages[0].tool_calls[0]"),
    ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}, "messages[0].content"),
])
def test_messages_forged_cannot_pass_on_are_refused(message: dict[str, Any], param: str) -> None:
    with pytest.raises(BadRequest) as err:
        parse_messages([message])
    assert err.value.param == param


def test_response_format_forms() -> None:
    assert parse_response_format(None) is None and parse_response_format({"type": "text"}) is None
    assert parse_response_format({"type": "json_object"}) == OutputConstraint()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    got = parse_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema,
                                                                        "strict": True}})
    assert got == OutputConstraint(schema=schema)
    for bad in ({"type": "json_schema", "json_schema": {"schema": schema}}, {"type": "xml"},
                {"type": "json_object", "schema": schema},
                {"type": "json_schema", "json_schema": {"name": "x", "strict": "yes"}}):
        with pytest.raises(BadRequest):
            parse_response_format(bad)


# ------------------------------------------------------------------ formats


def test_template_decides_the_format() -> None:
    assert format_for(QWEN_LIKE) is HERMES
    assert format_for("{% for message in messages %}<|im_start|>{{ message.content }}{% endfor %}") is GENERIC
    assert format_for("") is GENERIC  # libllama's built-in templates take no tools


def test_generic_prompt_puts_tools_in_the_system_message_and_history_in_json() -> None:
    request = tools_of(tools=[WEATHER], tool_choice="required")
    messages = parse_messages([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "rain"},
    ])
    rendered, template_tools = GENERIC.template_inputs(messages, request, None)
    assert template_tools is None
    assert rendered[0]["content"].startswith("Be brief.\n\nYou can call these tools")
    assert '"get_weather"' in rendered[0]["content"]
    assert json.loads(rendered[2]["content"]) == {"tool_calls": [{"name": "get_weather",
                                                                  "arguments": {"city": "Oslo"}}]}
    assert rendered[3] == {"role": "user", "content": "get_weather returned: rain"}
    assert all(isinstance(m["content"], str) for m in rendered)
    # Without tools on offer, the earlier call is told in words: in JSON the model answers in JSON.
    plain, _ = GENERIC.template_inputs(messages, None, None)
    assert plain[2]["content"] == 'I called get_weather with {"city": "Oslo"}.'
    assert plain[0]["content"] == "Be brief."


def test_generic_constraint_moves_each_tools_defs_apart() -> None:
    request = tools_of(tools=[WEATHER, TIME], parallel_tool_calls=False)
    constraint = GENERIC.constraint(request, None)
    assert constraint is not None and constraint.plain_json
    schema = constraint.schema
    assert schema is not None
    with_calls, answer = schema["anyOf"]
    calls = with_calls["properties"]["tool_calls"]
    assert calls["maxItems"] == 1 and calls["minItems"] == 1
    assert answer == {"type": "object", "properties": {"response": {"type": "string"}}, "required": ["response"]}
    time_call = calls["items"]["anyOf"][1]["properties"]["arguments"]
    assert time_call["properties"]["zone"] == {"$ref": "#/$defs/tool1-Zone"}
    assert schema["$defs"] == {"tool1-Zone": {"enum": ["UTC", "CET"]}}


def test_generic_format_allows_several_calls_only_when_asked() -> None:
    def max_items(**body: Any) -> Any:
        constraint = GENERIC.constraint(tools_of(tools=[WEATHER], tool_choice="required", **body), None)
        assert constraint is not None and constraint.schema is not None
        return constraint.schema["properties"]["tool_calls"].get("maxItems")

    assert max_items() == 1 and max_items(parallel_tool_calls=False) == 1
    assert max_items(parallel_tool_calls=True) is None


def test_hermes_constrains_only_forced_choices() -> None:
    assert HERMES.constraint(tools_of(tools=[WEATHER]), None) is None
    forced = HERMES.constraint(tools_of(tools=[WEATHER], tool_choice="required"), None)
    assert forced is not None and (forced.before, forced.after, forced.max_items) == \
        ("<tool_call>\n", "\n</tool_call>\n", None)
    _, template_tools = HERMES.template_inputs([{"role": "user", "content": "hi"}],
                                                      tools_of(tools=[WEATHER]), None)
    assert template_tools == [WEATHER]


# ------------------------------------------------------------------ parsers


def test_generic_parser_reads_calls_or_an_answer() -> None:
    parser = GenericParser()
    assert parser.feed('{"tool_calls": [{"name": "get_weather", ') == ("", [])
    parser.feed('"arguments": {"city": "Paris"}}]}')
    content, calls = parser.finish()
    assert content == "" and [(c.name, json.loads(c.arguments)) for c in calls] == [("get_weather",
                                                                                     {"city": "Paris"})]
    answer = GenericParser()
    answer.feed('{"response": "It is sunny."}')
    assert answer.finish() == ("It is sunny.", [])
    cut = GenericParser()
    cut.feed('{"tool_calls": [{"na')
    assert cut.finish() == ('{"tool_calls": [{"na', [])  # cut short by max_tokens: returned as content


def test_hermes_parser_streams_content_and_holds_back_a_partial_tag() -> None:
    parser = HermesParser()
    assert parser.feed("Let me check. <tool") == ("Let me check. ", [])
    assert parser.feed('_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}') == ("", [])
    content, calls = parser.feed("\n</tool_call>\n")
    assert content == "" and calls[0].name == "get_weather" and json.loads(calls[0].arguments) == {"city": "Rome"}
    assert parser.feed("Done.") == ("Done.", [])
    broken = HermesParser()
    assert broken.feed("<tool_call>not json</tool_call>") == ("<tool_call>not json</tool_call>", [])
    assert broken.finish() == ("", [])


# ------------------------------------------------------------------ answer shapes


def event(text: str, token: int, finish: str | None = None, logprob: float | None = None) -> TokenEvent:
    lp = (TokenLogprob(token, text.encode(), logprob, ((token, text.encode(), logprob),)),) if logprob else ()
    return TokenEvent(text, (token,), finish_reason=finish, logprobs=lp)  # type: ignore[arg-type]


def test_streamed_tool_calls_come_as_openai_deltas() -> None:
    builder = ChoiceBuilder(0, "chat", GenericParser())
    assert builder.opening() == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None}]
    assert builder.feed(event('{"tool_calls": [{"name": "get_weather", ', 1)) == []
    chunks = builder.feed(event('"arguments": {"city": "Paris"}}]}', 2, finish="stop"))
    first, args, end = chunks
    call_id = first["delta"]["tool_calls"][0]["id"]
    assert first["delta"] == {"tool_calls": [{"index": 0, "id": call_id, "type": "function",
                                              "function": {"name": "get_weather", "arguments": ""}}]}
    assert json.loads(args["delta"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert end == {"index": 0, "delta": {}, "logprobs": None, "finish_reason": "tool_calls"}
    whole = builder.choice()
    assert whole["message"]["content"] is None and whole["finish_reason"] == "tool_calls"
    assert whole["message"]["tool_calls"][0]["id"] == call_id


def test_completion_logprobs_and_offsets_follow_the_echo() -> None:
    builder = ChoiceBuilder(0, "completion", want_logprobs=True, echo="Hi")
    builder.collect(event(" there", 5, logprob=-0.5))
    builder.collect(event("!", 6, finish="length", logprob=-1.5))
    choice = builder.choice()
    assert choice["text"] == "Hi there!"
    assert choice["logprobs"] == {"tokens": [" there", "!"], "token_logprobs": [-0.5, -1.5],
                                  "top_logprobs": [{" there": -0.5}, {"!": -1.5}], "text_offset": [2, 8]}
