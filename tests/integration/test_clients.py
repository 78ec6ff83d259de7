"""The client libraries people use, against the real daemon and the real default model
(SmolLM2-135M-Instruct): the official `openai` SDK's structured outputs, LangChain's ChatOpenAI
(with_structured_output in all three methods, bind_tools), and litellm. Each answer must parse and
validate; a tool call round trip must complete; a prompt over the context must raise each library's
own context-window error, so that its fallbacks run."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import pydantic
import pytest
from conftest import Daemon

# litellm reads this at import: its price table from the installed package, not from the internet.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
import litellm
from langchain_core.messages import HumanMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI
from langchain_openai.chat_models.base import OpenAIContextOverflowError

ASK = "Invent a person. Answer in JSON with their name and age."


class Person(pydantic.BaseModel):
    """A person."""

    name: str = pydantic.Field(max_length=40)
    age: int


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return f"It is sunny and 24 C in {city}."


@pytest.fixture(scope="module")
def model_id(shared_daemon: Daemon) -> str:
    return httpx.get(f"{shared_daemon.url}/v1/models", timeout=30).json()["data"][0]["id"]


@pytest.fixture(scope="module")
def client(shared_daemon: Daemon) -> Iterator[openai.OpenAI]:
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(shared_daemon.socket_path)), timeout=300)
    yield openai.OpenAI(base_url="http://forged/v1", api_key="unused", http_client=http, max_retries=0)
    http.close()


@pytest.fixture(scope="module")
def chat(shared_daemon: Daemon, model_id: str) -> ChatOpenAI:
    return ChatOpenAI(base_url=f"{shared_daemon.url}/v1", api_key="unused", model=model_id,  # type: ignore[arg-type]
                      temperature=0, max_tokens=48, timeout=300, max_retries=0)


# ------------------------------------------------------------------ openai


def test_openai_parse_returns_a_valid_pydantic_object(client: openai.OpenAI, model_id: str) -> None:
    completion = client.chat.completions.parse(model=model_id, messages=[{"role": "user", "content": ASK}],
                                               response_format=Person, max_tokens=48, temperature=0)
    message = completion.choices[0].message
    assert isinstance(message.parsed, Person), message.content
    assert Person.model_validate_json(message.content or "") == message.parsed


def test_openai_streamed_tool_call_accumulates(client: openai.OpenAI, model_id: str) -> None:
    tools: Any = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                                     "parameters": {"type": "object", "required": ["city"],
                                                                    "properties": {"city": {"type": "string"}}}}}]
    with client.chat.completions.stream(model=model_id, tools=tools, tool_choice="required", max_tokens=48,
                                        temperature=0,
                                        messages=[{"role": "user", "content": "Weather in Lima?"}]) as stream:
        final = stream.get_final_completion()
    [call] = final.choices[0].message.tool_calls or []
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert set(json.loads(call.function.arguments)) == {"city"}  # type: ignore[union-attr]


def test_openai_models_retrieve(client: openai.OpenAI, model_id: str) -> None:
    assert client.models.retrieve(model_id).id == model_id
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")


# ------------------------------------------------------------------ LangChain


@pytest.mark.parametrize("method", ["json_schema", "function_calling", "json_mode"])
def test_langchain_structured_output(chat: ChatOpenAI, method: str) -> None:
    person = chat.with_structured_output(Person, method=method).invoke(ASK)  # type: ignore[arg-type]
    assert isinstance(person, Person)


def test_langchain_tool_round_trip(chat: ChatOpenAI) -> None:
    messages: list[Any] = [HumanMessage("What is the weather in Paris?")]
    # A 135M model often answers such a question itself: "required" makes the call happen.
    call = chat.bind_tools([get_weather], tool_choice="required").invoke(messages)
    assert [c["name"] for c in call.tool_calls] == ["get_weather"]  # type: ignore[attr-defined]
    assert set(call.tool_calls[0]["args"]) == {"city"}  # type: ignore[attr-defined]
    messages += [call, get_weather.invoke(call.tool_calls[0])]  # type: ignore[attr-defined]
    final = chat.bind_tools([get_weather]).invoke(messages)
    assert final.content and not final.tool_calls, final  # type: ignore[attr-defined]


def test_langchain_context_overflow_is_its_own_error(chat: ChatOpenAI, shared_daemon: Daemon) -> None:
    context = shared_daemon.status()["model"]["context_length"]
    with pytest.raises(OpenAIContextOverflowError):
        chat.invoke("word " * (context + 10))


# ------------------------------------------------------------------ litellm


def test_litellm_completion_and_structured_output(shared_daemon: Daemon, model_id: str) -> None:
    kw: dict[str, Any] = dict(model=f"openai/{model_id}", api_base=f"{shared_daemon.url}/v1", api_key="unused",
                              temperature=0, num_retries=0, timeout=300)
    answer = litellm.completion(messages=[{"role": "user", "content": "Say hello."}], max_tokens=12, **kw)
    assert answer.choices[0].message.content.strip()  # type: ignore[union-attr]
    assert answer.usage.completion_tokens >= 1  # type: ignore[attr-defined]
    structured = litellm.completion(messages=[{"role": "user", "content": ASK}], response_format=Person,
                                    max_tokens=48, **kw)
    Person.model_validate_json(structured.choices[0].message.content)  # type: ignore[union-attr]


def test_litellm_context_overflow_is_its_own_error(shared_daemon: Daemon, model_id: str) -> None:
    context = shared_daemon.status()["model"]["context_length"]
    with pytest.raises(litellm.ContextWindowExceededError):
        litellm.completion(model=f"openai/{model_id}", api_base=f"{shared_daemon.url}/v1", api_key="unused",
                           messages=[{"role": "user", "content": "word " * (context + 10)}], max_tokens=8,
                           num_retries=0)
