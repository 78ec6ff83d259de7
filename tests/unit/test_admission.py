"""Admission's policy on its own: sessions and queue guards, FIFO without overtaking, Retry-After from
the drain rate, deadline refusals, one outcome per admitted request, and the profile's Limits.

The engine side is `EngineRoom` below, a double of the three questions admission asks the engine
contract (`has_room_for`, `expected_cached_tokens`, `stats`) and the two orders it gives (`submit`,
`cancel`). It is strict the way the real engines are: a request submitted twice, or without the room
it was said to have, fails the test. The integration tests (test_guards.py, test_chaos.py, ...) hold
the same policy against the real engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from forged import config
from forged.admission import Admission, Limits, Refused, Ticket
from forged.engine.base import EngineStats, GenerationRequest, SamplingParams
from forged.metrics import Metrics

REPO = Path(__file__).resolve().parents[2]


class EngineRoom:
    """The engine as admission sees it. `blocks` is the KV room left, in prompt tokens; a request
    needs as many as its prompt minus what the prefix cache holds (`cached`)."""

    def __init__(self, blocks: int = 10**6, stats: EngineStats | None = None, cached: int = 0) -> None:
        self.blocks = blocks
        self.cached = cached
        self._stats = stats or EngineStats()
        self.running: dict[str, int] = {}
        self.cancelled: list[str] = []

    def _need(self, request: GenerationRequest) -> int:
        return len(request.prompt_tokens) - self.expected_cached_tokens(request.prompt_tokens)

    def has_room_for(self, request: GenerationRequest) -> bool:
        return self._need(request) <= self.blocks

    def expected_cached_tokens(self, prompt_tokens: list[int]) -> int:
        return min(self.cached, len(prompt_tokens))

    def stats(self) -> EngineStats:
        return self._stats

    def submit(self, request: GenerationRequest, events: Any) -> None:
        assert request.request_id not in self.running, f"{request.request_id} submitted twice"
        need = self._need(request)
        assert need <= self.blocks, f"{request.request_id} submitted without room"
        self.blocks -= need
        self.running[request.request_id] = need

    def cancel(self, request_id: str) -> None:
        self.cancelled.append(request_id)
        self.blocks += self.running.pop(request_id, 0)


def request(request_id: str, prompt: int = 10, max_tokens: int = 8) -> GenerationRequest:
    return GenerationRequest(request_id, list(range(prompt)), SamplingParams(max_tokens=max_tokens))


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def make(engine: EngineRoom, sessions: int = 2, queue: int = 2, deadline: float | None = None) -> Admission:
    return Admission(engine, Limits(sessions, queue, deadline), Metrics(lambda: None))  # type: ignore[arg-type]


def count(admission: Admission, name: str, label: str | None = None) -> float:
    """A counter's value as a scrape would read it: forge_requests_total{outcome}, forge_rejections_total{reason}
    or forge_requests_admitted_total."""
    metric, labels = {"requests": ("forge_requests_total", {"outcome": label}),
                      "rejections": ("forge_rejections_total", {"reason": label}),
                      "admitted": ("forge_requests_admitted_total", {})}[name]
    value = admission.metrics.registry.get_sample_value(metric, labels)
    return value or 0.0


async def admit_in_background(admission: Admission, *requests: GenerationRequest) -> list[asyncio.Task[Ticket]]:
    tasks = [asyncio.create_task(admission.admit(r)) for r in requests]
    await asyncio.sleep(0)  # each task runs up to its wait: started, queued or refused
    return tasks


def test_sessions_start_at_once_and_the_rest_queue_in_order() -> None:
    async def scenario() -> None:
        engine = EngineRoom()
        admission = make(engine, sessions=2, queue=3)
        a, b, c, d = await admit_in_background(admission, *(request(x) for x in "abcd"))
        assert list(admission.sessions) == ["a", "b"] and [t.request_id for t in admission.queue] == ["c", "d"]
        assert a.done() and b.done() and not c.done() and not d.done()
        admission.finish(a.result(), "completed")
        await asyncio.sleep(0)
        assert c.done() and not d.done() and list(admission.sessions) == ["b", "c"]
        assert engine.cancelled == ["a"]  # finishing frees the sequence's KV at once
        for task in (b, c):
            admission.finish(task.result(), "completed")
        await asyncio.sleep(0)
        assert d.done()
        admission.finish(d.result(), "completed")
        assert not admission.sessions and not admission.queue

    run(scenario())


def test_a_later_small_request_never_overtakes_the_head_of_the_queue() -> None:
    async def scenario() -> None:
        engine = EngineRoom(blocks=100)
        admission = make(engine, sessions=4, queue=4)
        [big_first] = await admit_in_background(admission, request("running", prompt=60))
        head, small = await admit_in_background(admission, request("head", prompt=60), request("small", prompt=5))
        # A session is free and the small one would fit, but the head waits for room and nothing passes it.
        assert not head.done() and not small.done()
        assert [t.request_id for t in admission.queue] == ["head", "small"]
        admission.finish(big_first.result(), "completed")  # frees the blocks: the head, then the small one
        await asyncio.sleep(0)
        assert head.done() and small.done() and list(admission.sessions) == ["head", "small"]

    run(scenario())


def test_cached_prefix_tokens_count_as_room() -> None:
    async def scenario() -> None:
        admission = make(EngineRoom(blocks=10, cached=50), sessions=2, queue=1)
        [task] = await admit_in_background(admission, request("long", prompt=60))
        assert task.done() and task.result().to_prefill == 10

    run(scenario())


def test_a_full_queue_is_refused_at_once_with_retry_after_from_the_drain_rate() -> None:
    async def scenario() -> None:
        # Before any session ended, a session is expected to last its prefill plus its max_tokens at
        # the measured rates: 1000 tokens at 1000 tok/s, then 20 tokens at 10/2 tok/s per sequence = 5 s.
        engine = EngineRoom(stats=EngineStats(prefill_tokens_per_s=1000.0, decode_tokens_per_s=10.0))
        admission = make(engine, sessions=2, queue=1)
        await admit_in_background(admission, *(request(x, prompt=1000, max_tokens=20) for x in ("a", "b", "c")))
        with pytest.raises(Refused) as refused:
            await admission.admit(request("d"))
        # Two sessions ending every 5 s drain 0.4 a second: the one queued request starts within 3 s.
        assert (refused.value.status, refused.value.code, refused.value.retry_after) == (503, "queue_full", 3)
        assert count(admission, "rejections", "queue_full") == 1 and count(admission, "requests", "rejected") == 1
        assert count(admission, "admitted") == 3

    run(scenario())


def test_with_nothing_measured_retry_after_is_one_second() -> None:
    async def scenario() -> None:
        admission = make(EngineRoom(), sessions=1, queue=0)
        await admit_in_background(admission, request("a"))
        with pytest.raises(Refused) as refused:
            await admission.admit(request("b"))
        assert refused.value.code == "queue_full" and refused.value.retry_after == 1

    run(scenario())


def test_draining_refuses_new_requests() -> None:
    async def scenario() -> None:
        admission = make(EngineRoom())
        admission.start_draining()
        with pytest.raises(Refused) as refused:
            await admission.admit(request("a"))
        assert (refused.value.status, refused.value.code) == (503, "shutting_down")
        assert count(admission, "rejections", "shutting_down") == 1 and count(admission, "admitted") == 0

    run(scenario())


def test_deadline_admission_refuses_what_would_miss_the_target_by_the_predicted_excess() -> None:
    async def scenario() -> None:
        # 100 prompt tokens a second: a 450-token prompt behind a 300-token backlog starts in 7.5 s.
        engine = EngineRoom(stats=EngineStats(prefill_tokens_per_s=100.0, prefill_backlog_tokens=300))
        admission = make(engine, sessions=4, queue=4, deadline=2.0)
        assert admission.predict_ttft(450) == pytest.approx(7.5)
        with pytest.raises(Refused) as refused:
            await admission.admit(request("late", prompt=450))
        assert (refused.value.code, refused.value.retry_after) == ("ttft_target_unmeetable", 6)
        assert count(admission, "rejections", "ttft_target_unmeetable") == 1 and not admission.sessions

    run(scenario())


def test_deadline_admission_admits_what_meets_the_target() -> None:
    async def scenario() -> None:
        engine = EngineRoom(stats=EngineStats(prefill_tokens_per_s=100.0))
        admission = make(engine, sessions=4, queue=4, deadline=2.0)
        [task] = await admit_in_background(admission, request("quick", prompt=150))
        assert task.done() and task.result().predicted_ttft_s == pytest.approx(1.5, abs=0.1)

    run(scenario())


def test_every_admitted_request_ends_in_exactly_one_outcome() -> None:
    async def scenario() -> None:
        admission = make(EngineRoom(), sessions=1, queue=2)
        running, queued = await admit_in_background(admission, request("running"), request("queued"))
        queued.cancel()  # the client left while queued
        with pytest.raises(asyncio.CancelledError):
            await queued
        assert not admission.queue and count(admission, "requests", "cancelled") == 1
        ticket = running.result()
        admission.finish(ticket, "completed")
        admission.finish(ticket, "failed")  # a second way out of the same request counts nothing
        assert count(admission, "requests", "completed") == 1 and count(admission, "requests", "failed") == 0
        assert count(admission, "admitted") == 2

    run(scenario())


def test_lower_limits_apply_to_what_starts_next() -> None:
    async def scenario() -> None:
        admission = make(EngineRoom(), sessions=2, queue=2)
        a, b, c = await admit_in_background(admission, *(request(x) for x in "abc"))
        admission.set_limits(Limits(max_sessions=1, max_queue_depth=2))
        admission.finish(a.result(), "completed")
        await asyncio.sleep(0)
        assert not c.done()  # b still holds the one session the new limit allows
        admission.finish(b.result(), "completed")
        await asyncio.sleep(0)
        assert c.done()

    run(scenario())


def test_cancel_all_answers_every_queued_and_running_request() -> None:
    async def scenario() -> None:
        engine = EngineRoom()
        admission = make(engine, sessions=1, queue=1)
        running, queued = await admit_in_background(admission, request("running"), request("queued"))
        admission.cancel_all()
        await asyncio.sleep(0)
        assert queued.done() and sorted(engine.cancelled) == ["queued", "running"]
        assert running.result().events.get_nowait().finish_reason == "cancelled"

    run(scenario())


# ---------------------------------------------------------------- Limits from a profile

@pytest.fixture
def profile(monkeypatch: pytest.MonkeyPatch) -> config.Profile:
    """The repository's cpu profile, with no packaged layer under it (whatever the machine has installed)."""
    monkeypatch.setenv("FORGED_PROFILES_DIR", "")
    return config.load(REPO / "etc" / "forged").profiles["cpu"]


def test_limits_are_the_profiles_guards(profile: config.Profile) -> None:
    limits = Limits.from_profile(profile)
    assert limits == Limits(profile.inference.max_concurrent_sessions, profile.thresholds.max_queue_depth, None)


def test_limits_take_the_sessions_the_memory_check_enforces(profile: config.Profile) -> None:
    assert profile.inference.max_concurrent_sessions > 1
    assert Limits.from_profile(profile, sessions=1).max_sessions == 1


def test_deadline_mode_turns_the_ttft_p99_target_into_the_deadline(profile: config.Profile) -> None:
    deadline = replace(profile, admission=replace(profile.admission, mode="deadline"))
    assert Limits.from_profile(deadline).ttft_deadline_s == pytest.approx(profile.targets.ttft_p99_ms / 1000)
