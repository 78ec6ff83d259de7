"""`n` choices from one prefill: the embedded engine forks a request's sequence after its prompt.

Against the real daemon: the prompt is prefilled once (`/v1/status` engine.prefilled_tokens_total),
each choice samples on its own (seeded seed + index), greedy choices forked from one KV match a
request of one choice, admission reserves room for every choice, a client that leaves cancels them
all, and n above what the profile runs at once is a 400 naming n. Both KV layouts: streams (a fork
copies the stream) and unified (a fork tags the same cells).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import httpx
import pytest
from conftest import Daemon, sse_events

PROMPT = "Write one short sentence about the sea. " * 20
UNIFIED = {"llama_cpp": {"kv_unified": True}}


def prefilled(daemon: Daemon) -> int:
    value = daemon.status()["engine"]["prefilled_tokens_total"]
    assert isinstance(value, int)
    return value


def complete(daemon: Daemon, body: dict[str, Any]) -> dict[str, Any]:
    r = httpx.post(f"{daemon.url}/v1/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()


def wait_for(predicate: Any, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.05)


def check_one_prefill(daemon: Daemon, prompt: str) -> None:
    before = prefilled(daemon)
    body = {"prompt": prompt, "max_tokens": 12, "temperature": 1.0, "seed": 5, "n": 3}
    answer = complete(daemon, body)
    choices = answer["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert all(c["text"] and c["finish_reason"] in ("stop", "length") for c in choices)
    usage = answer["usage"]
    assert usage["completion_tokens"] >= 3
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # One prefill for the three choices: the prompt's tokens not found cached, computed once.
    cached = usage["prompt_tokens_details"]["cached_tokens"]
    assert prefilled(daemon) - before == usage["prompt_tokens"] - cached
    # Each choice has its own sampler (seed 5, 6, 7): different answers...
    assert len({c["text"] for c in choices}) > 1, choices
    # ... and seeded: the same request gives the same three answers. Compared between two runs that
    # both find the prompt cached: logits computed over a cached prefix differ from a whole prefill's
    # in their last bits (other batch shapes), which can move a sampled token.
    again, third = complete(daemon, body), complete(daemon, body)
    assert again["usage"]["prompt_tokens_details"] == third["usage"]["prompt_tokens_details"]
    assert [c["text"] for c in again["choices"]] == [c["text"] for c in third["choices"]]
    # Every choice's KV went back: nothing is held once the request is answered.
    wait_for(lambda: daemon.status()["engine"]["running"] == 0)


def test_three_choices_from_one_prefill(shared_daemon: Daemon) -> None:
    check_one_prefill(shared_daemon, PROMPT)


def test_three_choices_from_one_prefill_in_the_unified_pool(make_daemon) -> None:
    daemon: Daemon = make_daemon(profile=UNIFIED).start()
    check_one_prefill(daemon, PROMPT)
    kv = daemon.status()["kv_cache"]
    assert kv["blocks_used"] == 0, kv


@pytest.mark.parametrize("layout", ["streams", "unified"])
def test_greedy_choices_forked_from_one_prefill_match_a_single_choice(make_daemon, layout: str) -> None:
    """Greedy choices have nothing of their own: each fork must continue from exactly the prompt's
    KV, so all of them give the text a request of one choice gives (on another daemon, so that no
    cache is shared)."""
    profile = UNIFIED if layout == "unified" else {}
    prompt = "The lighthouse keeper wrote in his log that night: " * 6
    body = {"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    alone: Daemon = make_daemon(profile=profile).start()
    single = complete(alone, body)["choices"][0]["text"]
    alone.stop()
    forked: Daemon = make_daemon(profile=profile).start()
    answer = complete(forked, dict(body, n=3))
    assert [c["text"] for c in answer["choices"]] == [single] * 3
    assert answer["usage"]["completion_tokens"] == 3 * 16


def test_three_streamed_chat_choices(shared_daemon: Daemon) -> None:
    body = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 1.0,
            "n": 3, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{shared_daemon.url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200, r.read()
        events: list[Any] = list(sse_events(r.iter_lines()))
    assert events[-1] == "[DONE]"
    chunks = [e for e in events[:-1] if e["choices"]]
    by_index: dict[int, list[dict[str, Any]]] = {}
    for chunk in chunks:
        assert len(chunk["choices"]) == 1
        by_index.setdefault(chunk["choices"][0]["index"], []).append(chunk["choices"][0])
    assert sorted(by_index) == [0, 1, 2]
    for pieces in by_index.values():
        assert pieces[0]["delta"] == {"role": "assistant", "content": ""}
        assert [p["finish_reason"] for p in pieces if p["finish_reason"]] in (["stop"], ["length"])
    usage = events[-2]["usage"]
    generated = sum(len(p["delta"].get("content") or "") > 0 for ps in by_index.values() for p in ps)
    assert usage["completion_tokens"] >= generated >= 3


def test_three_structured_choices_each_validate(shared_daemon: Daemon) -> None:
    # Short enough to always close within max_tokens: each choice is sampled (temperature 1) on its own.
    schema = {"type": "object", "properties": {"colour": {"type": "string", "maxLength": 16}},
              "required": ["colour"], "additionalProperties": False}
    body = {"messages": [{"role": "user", "content": "A colour, as JSON."}], "max_tokens": 80, "n": 3,
            "temperature": 1.0, "seed": 3, "response_format": {"type": "json_schema",
                                                                "json_schema": {"name": "c", "schema": schema}}}
    r = httpx.post(f"{shared_daemon.url}/v1/chat/completions", json=body, timeout=300)
    assert r.status_code == 200, r.text
    answer = r.json()
    assert len(answer["choices"]) == 3
    for choice in answer["choices"]:
        assert choice["finish_reason"] == "stop"
        assert isinstance(json.loads(choice["message"]["content"])["colour"], str)


def test_more_choices_than_the_profile_runs_at_once_is_a_400_naming_n(shared_daemon: Daemon) -> None:
    sessions = shared_daemon.status()["sessions"]["max"]
    r = httpx.post(f"{shared_daemon.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "n": sessions + 1},
                   timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "n" and f"n is {sessions + 1}" in error["message"]


def test_choices_take_their_room_at_admission_and_leaving_cancels_them_all(make_daemon) -> None:
    """A request of as many choices as the profile has sessions holds every KV stream: one more
    request waits in the queue (admission asked the engine for room for all the choices), and runs
    once the client of the first leaves, which cancels all of its choices."""
    daemon: Daemon = make_daemon().start()
    sessions = daemon.status()["sessions"]["max"]
    wide = {"prompt": PROMPT, "max_tokens": 400, "temperature": 1.0, "ignore_eos": True, "n": sessions,
            "stream": True}
    later: dict[str, Any] = {}

    def second() -> None:
        r = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2}, timeout=300)
        later["status"] = r.status_code

    with httpx.stream("POST", f"{daemon.url}/v1/completions", json=wide, timeout=300) as r:
        assert r.status_code == 200
        seen: set[int] = set()
        events = sse_events(r.iter_lines())  # kept referenced: a dropped line iterator closes the stream
        for event in events:
            assert event != "[DONE]"
            seen.update(c["index"] for c in event["choices"])
            if len(seen) == sessions:
                break
        assert daemon.status()["engine"]["running"] == sessions
        waiter = threading.Thread(target=second)
        waiter.start()
        wait_for(lambda: daemon.status()["queue"]["depth"] == 1)
        status = daemon.status()
        assert status["sessions"]["active"] == 1 and status["engine"]["running"] == sessions
    # The client left mid-stream: every choice is cancelled, and the queued request runs.
    waiter.join(timeout=120)
    assert later.get("status") == 200
    wait_for(lambda: daemon.status()["engine"]["running"] == 0)
    assert daemon.status()["sessions"]["active"] == 0
