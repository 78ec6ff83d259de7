"""TrtLlmEngine in-process: streaming, finish reasons, abort, errors, stats, background failure.

Runs against the STAND-IN for `tensorrt_llm` (tests/fixtures/fake_tensorrt_llm; its docstring says
what it mirrors: ../shared/reference/trtllm-llm-api.md). It is not TensorRT-LLM: the stand-in's
"model" answers every prompt with "The quick brown fox jumps over the lazy dog." and its end token.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from forged import config
from forged.engine.base import (
    EngineHooks,
    GenerationRequest,
    OutputConstraint,
    RequestRejected,
    SamplingParams,
    TokenEvent,
)
from forged.engine.trtllm import TrtLlmEngine
from forged.hardware import HardwareInfo

REPO = Path(__file__).resolve().parents[4]
FAKE = REPO / "tests" / "fixtures" / "fake_tensorrt_llm"
CHECKPOINT = FAKE / "tiny-checkpoint"
SCRIPT = "The quick brown fox jumps over the lazy dog."
RTX = HardwareInfo(kind="gpu", name="NVIDIA RTX 4000 Ada Generation", cores=8, memory_total_bytes=20 << 30,
                   unified_memory=False, compute_capability="8.9", device_index=0)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.syspath_prepend(str(FAKE))
    monkeypatch.setenv("FAKE_TRTLLM_ITER_S", "0.002")
    trt = importlib.import_module("tensorrt_llm")
    trt._fake.select_version("1.2")
    trt._fake.EVENTS.clear()
    yield trt
    trt._fake.select_version("1.2")


def profile(**levers: Any) -> config.Profile:
    base = config.Profile(engine="tensorrt_llm", tensorrt_llm=config.EngineLevers(kv_cache_dtype="fp8"),
                          inference=config.InferenceLimits(max_concurrent_sessions=4, max_seq_len=8192))
    return dataclasses.replace(base, tensorrt_llm=dataclasses.replace(base.tensorrt_llm, **levers))


class Run:
    """One loaded engine on a private event loop."""

    def __init__(self, engine: TrtLlmEngine) -> None:
        self.engine = engine
        self.fatal: list[str] = []

    async def events(self, prompt: str, **sampling: Any) -> list[TokenEvent]:
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        self.submit(prompt, queue, **sampling)
        return await drain(queue)

    def submit(self, prompt: str, queue: asyncio.Queue[TokenEvent], request_id: str = "r1",
               **sampling: Any) -> GenerationRequest:
        sampling.setdefault("max_tokens", 100)
        sampling.setdefault("temperature", 0)
        request = GenerationRequest(request_id, self.engine.tokenize_prompt(prompt), SamplingParams(**sampling))
        self.engine.validate(request)
        self.engine.submit(request, queue)
        return request


async def drain(queue: asyncio.Queue[TokenEvent]) -> list[TokenEvent]:
    out = []
    while True:
        event = await asyncio.wait_for(queue.get(), 10)
        out.append(event)
        if event.finish_reason is not None:
            return out


def run(engine: TrtLlmEngine, body: Callable[[Run], Awaitable[None]]) -> Run:
    state = Run(engine)

    async def main() -> None:
        engine.start(asyncio.get_running_loop(), EngineHooks(on_fatal=state.fatal.append))
        await asyncio.sleep(0)
        while engine.progress().pending_work:  # the engine's warm-up request
            await asyncio.sleep(0.01)
        try:
            await body(state)
        finally:
            await engine.stop()

    asyncio.run(main())
    return state


def loaded_engine(prof: config.Profile | None = None) -> TrtLlmEngine:
    engine = TrtLlmEngine("test", prof or profile(), CHECKPOINT, "tiny", RTX)
    engine.load()
    return engine


def text(events: list[TokenEvent]) -> str:
    return "".join(e.text for e in events)


def test_streams_text_diffs_and_maps_finish_reasons(fake: Any) -> None:
    engine = loaded_engine()
    assert engine.model.context_length == 4096  # the profile's 8192, capped by config.json

    async def body(r: Run) -> None:
        events = await r.events("Hello")
        assert text(events) == SCRIPT and events[-1].finish_reason == "stop"  # the end token
        assert sum(len(e.token_ids) for e in events) == len(SCRIPT)
        assert len([e for e in events if e.text]) > 5, "streamed, not one final answer"
        events = await r.events("Hello", max_tokens=5)
        assert text(events) == SCRIPT[:5] and events[-1].finish_reason == "length"
        # A stop string is cut by forged, and TensorRT-LLM stops there too.
        events = await r.events("Hello", stop=("fox",))
        assert text(events) == "The quick brown " and events[-1].finish_reason == "stop"
        events = await r.events("Hello", max_tokens=60, ignore_eos=True)
        assert len(text(events)) == 60 and events[-1].finish_reason == "length"

    state = run(engine, body)
    assert state.fatal == []
    assert {"event": "shutdown"} in fake._fake.EVENTS  # stop() called llm.shutdown()


def test_cancel_aborts_the_request(fake: Any) -> None:
    engine = loaded_engine()

    async def body(r: Run) -> None:
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        r.submit("Hello", queue, max_tokens=3000, ignore_eos=True)
        first = await queue.get()
        assert first.finish_reason is None
        assert engine.stats().running == 1
        engine.cancel("r1")
        events = await drain(queue)
        assert events[-1].finish_reason == "cancelled"
        assert engine.stats().running == 0 and not engine.progress().pending_work
        engine.cancel("r1")  # twice, or for an unknown id: nothing
        await asyncio.sleep(0.05)
        aborts = [e for e in fake._fake.EVENTS if e["event"] == "abort"]
        assert len(aborts) == 1
        executor = engine._llm._executor
        assert not executor.active and not executor.waiting

    run(engine, body)


def test_request_errors_are_400_or_503_with_the_real_message(fake: Any) -> None:
    engine = loaded_engine()

    async def body(r: Run) -> None:
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        r.submit("<<reject>>", queue)
        assert not queue.empty(), "a refusal at submission is there at once (the API answers 400 with it)"
        event = queue.get_nowait()
        assert (event.finish_reason, event.status) == ("error", 400)
        assert "refused at submission (injected by <<reject>>)" in str(event.error)
        events = await r.events("<<request-error>>")
        assert (events[-1].finish_reason, events[-1].status) == ("error", 503)
        assert "injected by <<request-error>>" in str(events[-1].error)
        assert text(await r.events("Hello")) == SCRIPT  # per-request errors leave the engine serving

    state = run(engine, body)
    assert state.fatal == []


def test_background_failure_fails_everything_and_calls_on_fatal(fake: Any) -> None:
    engine = loaded_engine()

    async def body(r: Run) -> None:
        queue: asyncio.Queue[TokenEvent] = asyncio.Queue()
        r.submit("Hello", queue, max_tokens=3000, ignore_eos=True)
        await queue.get()
        fake._fake.inject_background_failure(engine._llm, "CUDA error: an illegal memory access")
        events = await drain(queue)
        assert (events[-1].finish_reason, events[-1].status) == ("error", 503)
        assert "TensorRT-LLM failed and shut down" in str(events[-1].error)
        assert "illegal memory access" in str(events[-1].error) and "Stack trace" not in str(events[-1].error)
        assert len(r.fatal) == 1 and "illegal memory access" in r.fatal[0]
        later: asyncio.Queue[TokenEvent] = asyncio.Queue()
        r.submit("Hello", later, request_id="r2")
        assert later.get_nowait().status == 503

    run(engine, body)
    assert {"event": "shutdown"} in fake._fake.EVENTS


def test_stats_feed_kv_blocks_queue_and_memory(fake: Any) -> None:
    # GUARANTEED_NO_EVICT over 64 blocks of 32 tokens: two requests of 1500 tokens cannot both start.
    engine = loaded_engine(profile(kv_cache_max_tokens=2048))

    async def body(r: Run) -> None:
        await r.events("Hello", max_tokens=4)
        await asyncio.sleep(0.6)  # one stats poll
        stats = engine.stats()
        assert (stats.kv_blocks_total, stats.tokens_per_block, stats.kv_blocks_used) == (64, 32, 0)
        assert stats.device_memory_used_bytes == 6 << 30 and stats.steps > 0
        assert stats.prefill_tokens_per_s > 0 and stats.decode_tokens_per_s > 0
        a: asyncio.Queue[TokenEvent] = asyncio.Queue()
        b: asyncio.Queue[TokenEvent] = asyncio.Queue()
        r.submit("Hello", a, request_id="a", max_tokens=1500, ignore_eos=True)
        r.submit("Hello", b, request_id="b", max_tokens=1500, ignore_eos=True)
        for _ in range(100):
            await asyncio.sleep(0.05)
            stats = engine.stats()
            if stats.waiting:
                break
        assert stats.waiting == 1 and stats.kv_blocks_used == 48 and stats.running == 2
        engine.cancel("a")
        engine.cancel("b")

    run(engine, body)


def test_block_reuse_statistics_become_the_prefix_cache_counters(fake: Any) -> None:
    engine = loaded_engine(profile())
    document = "The keeper's log, night after night, the same lamp and the same sea. " * 20

    async def body(r: Run) -> None:
        await r.events(document, max_tokens=2)
        await asyncio.sleep(0.6)  # one stats poll
        first = engine.stats()
        assert first.prefix_cache_queries is not None and first.prefix_cache_hits == 0
        await r.events(document + " And tonight?", max_tokens=2)
        await asyncio.sleep(0.6)
        again = engine.stats()
        # The stand-in counts reusedBlocks and missedBlocks as TensorRT-LLM's kvCacheStats do, in
        # whole blocks; forged reports prompt tokens (blocks x tokens per block).
        assert again.prefix_cache_hits > 0 and again.prefix_cache_hits % again.tokens_per_block == 0
        assert again.prefix_cache_queries > first.prefix_cache_queries >= again.prefix_cache_hits

    run(engine, body)


def test_validate_refuses_what_tensorrt_llm_cannot_run(fake: Any) -> None:
    engine = loaded_engine(profile(kv_cache_max_tokens=2048, enable_chunked_context=False, max_num_tokens=256))

    def request(prompt_tokens: int, max_tokens: int) -> GenerationRequest:
        return GenerationRequest("x", [5] * prompt_tokens, SamplingParams(max_tokens=max_tokens))

    with pytest.raises(RequestRejected, match="maximum context length is 4096 tokens"):
        engine.validate(request(4096, 1))
    with pytest.raises(RequestRejected, match=r"more than max_num_tokens \(256\).*chunked context off"):
        engine.validate(request(300, 1))
    engine.validate(request(100, 3000))  # the KV cache's size is not known before the first stats

    async def body(r: Run) -> None:
        await r.events("Hello", max_tokens=2)
        await asyncio.sleep(0.6)
        with pytest.raises(RequestRejected, match="whole KV cache holds 2048 tokens"):
            engine.validate(request(100, 3000))

    run(engine, body)


def test_chat_goes_through_the_tokenizers_template(fake: Any) -> None:
    engine = loaded_engine()
    rendered = engine.render_chat([{"role": "user", "content": "Hi"}])
    assert rendered == "<bos><|user|>\nHi\n<|assistant|>\n"
    assert engine.tokenize(rendered, add_special=False, parse_special=True)[0] == 1  # <bos> parsed as special
    with pytest.raises(RequestRejected, match="roles must alternate"):
        engine.render_chat([{"role": "assistant", "content": "Hi"}])


def test_effective_config_is_exactly_what_llm_was_given(fake: Any) -> None:
    engine = loaded_engine()
    recorded = [e for e in fake._fake.EVENTS if e["event"] == "llm"][-1]
    config_doc = engine.effective_config()
    assert config_doc["llm_kwargs"] == recorded["kwargs"]
    assert config_doc["tensorrt_llm_version"] == "1.2.0"
    assert config_doc["llm_call"].startswith("LLM(model=") and "KvCacheConfig(dtype='fp8'" in config_doc["llm_call"]
    assert config_doc["mapping"]["inference.max_concurrent_sessions"] == "max_batch_size"
    engine._shutdown_llm()


def test_version_1_0_reads_the_block_size_back(fake: Any, monkeypatch: pytest.MonkeyPatch,
                                               caplog: pytest.LogCaptureFixture) -> None:
    fake._fake.select_version("1.0")
    monkeypatch.setenv("FAKE_TRTLLM_BUILTIN_TPB", "64")  # if 1.0's own block size is 64 after all
    engine = loaded_engine()
    assert "tokens_per_block" not in engine.effective_config()["llm_kwargs"]["kv_cache_config"]

    async def body(r: Run) -> None:
        await r.events("Hello", max_tokens=2)
        await asyncio.sleep(0.6)
        assert engine.stats().tokens_per_block == 64

    with caplog.at_level(logging.WARNING, logger="forged.engine.trtllm"):
        run(engine, body)
    assert any("runs 64 tokens per KV block, not the profile's 32" in m for m in caplog.messages)


def test_structured_output_and_penalties_map_to_sampling_params(fake: Any) -> None:
    engine = loaded_engine()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}

    async def body(r: Run) -> None:
        await r.events("Hello", max_tokens=3, constraint=OutputConstraint(schema=schema), presence_penalty=0.5,
                       repeat_penalty=1.2)
        await r.events("Hello", max_tokens=3, constraint=OutputConstraint())
        await r.events("Hello", max_tokens=3, temperature=0.7, min_p=0.1, frequency_penalty=-1.0)

    run(engine, body)
    generated = [e for e in fake._fake.EVENTS if e["event"] == "generate"][-3:]
    assert generated[0] == {"event": "generate", "guided_decoding": {"json": schema}, "presence_penalty": 0.5,
                            "repetition_penalty": 1.2}
    assert generated[1] == {"event": "generate", "guided_decoding": {"json_object": True}}
    assert generated[2] == {"event": "generate", "guided_decoding": None, "frequency_penalty": -1.0, "min_p": 0.1}
    # What TensorRT-LLM's API cannot take from forged yet is refused, naming it.
    for sampling, named in (({"logprobs": 2}, "logprobs"), ({"logit_bias": ((5, 1.0),)}, "logit_bias"),
                            ({"constraint": OutputConstraint(schema=schema, before="<tool_call>")}, "tool-call")):
        with pytest.raises(RequestRejected, match=named):
            engine.validate(GenerationRequest("x", [1, 2, 3], SamplingParams(max_tokens=4, **sampling)))
    with pytest.raises(RequestRejected, match="n: 3"):
        engine.validate(GenerationRequest("x", [1, 2, 3], SamplingParams(max_tokens=4), n=3))
    engine._shutdown_llm()


def test_without_a_guided_decoding_backend_constraints_are_refused(fake: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    engine = loaded_engine()
    assert engine.translation is not None
    monkeypatch.delitem(engine.translation.kwargs, "guided_decoding_backend")
    with pytest.raises(RequestRejected, match="guided_decoding_backend"):
        engine.validate(GenerationRequest("x", [1, 2, 3], SamplingParams(max_tokens=4,
                                                                          constraint=OutputConstraint())))
    engine._shutdown_llm()
