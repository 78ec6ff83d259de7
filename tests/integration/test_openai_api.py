"""The OpenAI surface over both listeners, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import httpx
import openai
import pytest
from conftest import Daemon, sse_events


def _client(daemon: Daemon, unix: bool) -> openai.OpenAI:
    http = httpx.Client(transport=httpx.HTTPTransport(uds=str(daemon.socket_path))) if unix else None
    base = "http://forged/v1" if unix else f"{daemon.url}/v1"
    return openai.OpenAI(base_url=base, api_key="unused", http_client=http, max_retries=0)


@pytest.mark.parametrize("unix", [True, False], ids=["unix-socket", "tcp"])
def test_streamed_chat_with_official_client(shared_daemon: Daemon, unix: bool) -> None:
    client = _client(shared_daemon, unix)
    model = client.models.list().data[0].id
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Name three colours."}], stream=True,
        max_tokens=24, temperature=0, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert text.strip(), "the stream carried no text"
    assert finishes in (["stop"], ["length"])
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens >= 1 and usage.prompt_tokens > 5
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_non_stream_completion_is_deterministic_when_greedy(shared_daemon: Daemon) -> None:
    client = _client(shared_daemon, unix=True)
    kw = dict(model=client.models.list().data[0].id, prompt="The capital of France is", max_tokens=12,
              temperature=0)
    first = client.completions.create(**kw)
    second = client.completions.create(**kw)
    assert first.choices[0].text == second.choices[0].text != ""
    assert first.usage.completion_tokens <= 12


def test_raw_sse_ends_with_done(shared_daemon: Daemon) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 8, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{shared_daemon.url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert all(e["object"] == "text_completion" for e in events[:-1])


def test_stop_string_ends_the_answer_before_it(shared_daemon: Daemon) -> None:
    body = {"prompt": "Count: 1, 2, 3, 4, 5, 6, 7, 8, 9,", "max_tokens": 40, "temperature": 0}
    plain = httpx.post(f"{shared_daemon.url}/v1/completions", json=body, timeout=60).json()
    text = plain["choices"][0]["text"]
    assert len(text) > 6
    stop = text[3:6]
    stopped = httpx.post(f"{shared_daemon.url}/v1/completions", json=dict(body, stop=[stop]), timeout=60).json()
    assert stopped["choices"][0]["finish_reason"] == "stop"
    assert stopped["choices"][0]["text"] == text[: text.index(stop)]


def test_seeded_sampling_repeats(shared_daemon: Daemon) -> None:
    body = {"prompt": "A short story:", "max_tokens": 16, "temperature": 0.9, "top_p": 0.9, "top_k": 40,
            "seed": 1234}
    a = httpx.post(f"{shared_daemon.url}/v1/completions", json=body, timeout=60).json()
    b = httpx.post(f"{shared_daemon.url}/v1/completions", json=body, timeout=60).json()
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_prompt_over_context_names_both_numbers(shared_daemon: Daemon) -> None:
    context = shared_daemon.status()["model"]["context_length"]
    r = httpx.post(f"{shared_daemon.url}/v1/completions", json={"prompt": "word " * (context + 100)}, timeout=60)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["code"] == "context_length_exceeded"
    # OpenAI's own wording, which client libraries match to raise their context-window errors.
    assert error["message"].startswith(f"This model's maximum context length is {context} tokens.")
    prompt_tokens = int(error["message"].split("you requested ")[1].split(" tokens")[0])
    assert prompt_tokens > context
    r = httpx.post(f"{shared_daemon.url}/v1/completions", json={"prompt": "word", "max_tokens": context},
                   timeout=60)
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert f"in the prompt, {context} in the completion" in r.json()["error"]["message"]


@pytest.mark.parametrize(("body", "param"), [
    (b"{not json", None),
    (b'{"prompt": 5}', "prompt"),
    (b'{"prompt": "x", "max_tokens": -1}', "max_tokens"),
    (b'{"prompt": "x", "temperature": "hot"}', "temperature"),
    (b'{"prompt": "x", "frobnicate": 1}', "frobnicate"),
    (b'{"prompt": "x", "n": 99}', "n"),
    (b'{"prompt": "x", "best_of": 3}', "best_of"),
    (b'{"prompt": "\xff\xfe"}', None),
])
def test_bad_requests_get_openai_errors(shared_daemon: Daemon, body: bytes, param: str | None) -> None:
    r = httpx.post(f"{shared_daemon.url}/v1/completions", content=body,
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param


def test_unknown_model_and_route(shared_daemon: Daemon) -> None:
    r = httpx.post(f"{shared_daemon.url}/v1/completions", json={"prompt": "x", "model": "gpt-9"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = httpx.get(f"{shared_daemon.url}/v1/nothing", timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"


def test_utf8_split_across_tokens_streams_whole_characters(shared_daemon: Daemon) -> None:
    body = {"messages": [{"role": "user", "content": "Reply with exactly these emoji: 🌊🐚🦀🐙 and the word 海"}],
            "max_tokens": 40, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{shared_daemon.url}/v1/chat/completions", json=body, timeout=60) as r:
        choices = [e["choices"][0] for e in sse_events(r.iter_lines()) if e != "[DONE]" and e["choices"]]
    deltas = [c["delta"].get("content") or "" for c in choices]
    text = "".join(deltas)
    if choices[-1]["finish_reason"] == "length":
        # max_tokens may end the answer inside a character: its bytes so far can only be U+FFFD.
        text = text.removesuffix("\ufffd")
    assert "\ufffd" not in text, f"a multi-byte character was split: {deltas!r}"
    assert text.strip()
