#!/usr/bin/env python3
"""Serving benchmarks for forged on this machine (the numbers in docs/benchmarks.md).

Every scenario starts a real daemon (the packaged cpu profile plus the overrides shown), drives it
over its real sockets, and compares ratios measured in the same run. Run with:

    .venv/bin/python bench/bench_serving.py [--only NAME ...] [--json out.json] [--llama-server PATH]

Scenarios: ttft_overhead, decode_scaling, prefill_interference, reject_latency, policies,
deadline, kv_memory, grammar_interference; and, beside llama-server in the same run (same GGUF, slots, context per slot
and threads; docs/benchmarks.md says how to build one): multi_turn, single_stream,
prefill_interference_8. Without a llama-server binary those run forged alone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import yaml
from loadgen import (
    PREFIX_CACHE_COUNTERS,
    counter_deltas,
    metric_totals,
    prose,
    run_conversations,
    stream,
    summarize_turns,
)
from servers import start_llama_server

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import Daemon  # noqa: E402  (the same harness the integration tests use)

from forged.config import ModelSettings  # noqa: E402
from forged.engine.model_files import resolve_model  # noqa: E402
from forged.targets import percentile  # noqa: E402

SHORT_PROMPT = "Write one sentence about lighthouses and the sea at night."
FILLER = "The quick brown fox jumps over the lazy dog while the river keeps flowing to the sea. "
DEFAULT_LLAMA_SERVER = REPO / "build" / "llama-server" / "bin" / "llama-server"
FORGED, LLAMA_SERVER, LLAMA_SERVER_NO_RAM_CACHE = "forged", "llama-server", "llama-server --cache-ram 0"


def model() -> Path:
    path, _ = resolve_model(ModelSettings(), REPO / "build" / "test-state")
    return path


def cpu_profile() -> dict[str, Any]:
    return yaml.safe_load((REPO / "etc/forged/sku_profiles.yaml").read_text())["profiles"]["cpu"]


def start(profile: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> Daemon:
    root = Path(tempfile.mkdtemp(prefix="forged-bench-"))
    return Daemon(root, model(), profile=profile, settings=settings).start()


async def completion(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed /v1/completions request (loadgen.stream): status, TTFT, token arrival times."""
    return await stream(client, url, "/v1/completions", body)


def p(values: list[float], q: float) -> float:
    return percentile(values, q)


@dataclass
class Endpoint:
    """A running server of one configuration: forged (a Daemon) or llama-server (a Server)."""

    name: str
    url: str
    config: dict[str, Any]  # what the report shows about how it was started
    daemon: Daemon | None = None  # forged's, for its /metrics

    def counters(self) -> dict[str, float]:
        """forged's prefix-cache counters, where its /metrics has them."""
        if self.daemon is None:
            return {}
        return metric_totals(httpx.get(f"{self.url}/metrics", timeout=10).text, PREFIX_CACHE_COUNTERS)


@dataclass(frozen=True)
class Peers:
    """How the side-by-side scenarios start their servers."""

    llama_server: Path | None = None  # the binary; None or missing: forged alone
    # Engine threads of both (forged's llama_cpp.n_threads, llama-server's -t and -tb); 0: every core
    # the process may use, forged's default.
    threads: int = 0

    def configs(self, *names: str) -> list[str]:
        """forged, then the llama-server configurations named, where the llama-server binary exists."""
        if self.llama_server is None or not self.llama_server.exists():
            print(f"(no llama-server at {self.llama_server}: forged alone; docs/benchmarks.md says how to "
                  f"build one)", flush=True)
            return [FORGED]
        return [FORGED, *names]


@contextlib.contextmanager
def serving(name: str, sessions: int, context: int, peers: Peers = Peers()) -> Iterator[Endpoint]:
    """One configuration with `sessions` sessions (llama-server: slots) of `context` tokens each.

    forged: the packaged cpu profile with those limits. llama-server: the same GGUF, -np sessions,
    -c sessions x context, forged's thread count and chat template, and otherwise its defaults;
    LLAMA_SERVER_NO_RAM_CACHE adds --cache-ram 0 (no host-RAM prompt cache; slots still keep their KV).
    """
    if name == FORGED:
        daemon = start(profile={"inference": {"max_concurrent_sessions": sessions, "max_seq_len": context},
                                "llama_cpp": {"n_threads": peers.threads}})
        try:
            params = daemon.get("/v1/tensorrt-llm/config")["llama_context_params"]
            yield Endpoint(name, daemon.url, {"llama_context_params": params}, daemon=daemon)
        finally:
            daemon.stop()
        return
    assert peers.llama_server is not None
    extra = chat_template_args() + (("--cache-ram", "0") if name == LLAMA_SERVER_NO_RAM_CACHE else ())
    log = Path(tempfile.mkdtemp(prefix="llama-server-bench-")) / "llama-server.log"
    server = start_llama_server(peers.llama_server, model(), log, slots=sessions, ctx_per_slot=context,
                                threads=peers.threads or len(os.sched_getaffinity(0)), extra=extra)
    try:
        server.wait_ready(timeout=300)
        yield Endpoint(name, server.url, {"argv": " ".join(server.argv[1:]), "log": str(log)})
    finally:
        server.stop()


def chat_template_args() -> tuple[str, ...]:
    """llama-server arguments that make it render chats as forged does. With a template in the GGUF both
    use it (nothing to add). Without one, forged uses libllama's built-in template for the model family
    (gemma for Gemma 3) and llama-server would use ChatML; --no-jinja --chat-template NAME makes it call
    the same libllama function with the same name, so both prefill the same tokens."""
    from forged.engine.llama_cpp.model import _builtin_template_for  # the engine's own choice, not a copy
    from forged.engine.shapes import read_gguf_metadata

    meta, _ = read_gguf_metadata(model())
    if "tokenizer.chat_template" in meta:
        return ()
    return ("--no-jinja", "--chat-template", _builtin_template_for(meta.get("general.architecture", "")))


def tokens_per_char(url: str, sample: str) -> float:
    """This model's tokens per character of `sample`, from a server's usage (one 1-token completion)."""
    r = httpx.post(f"{url}/v1/completions", json={"prompt": sample, "max_tokens": 1}, timeout=120).json()
    return r["usage"]["prompt_tokens"] / len(sample)


# ------------------------------------------------------------------ scenarios

def ttft_overhead(n: int = 40, threads: int = 0) -> dict[str, Any]:
    """Single-request TTFT through the UNIX socket against the same prompt's TTFT on libllama."""
    daemon = start(profile={"llama_cpp": {"n_threads": threads}} if threads else None)
    try:
        config = daemon.get("/v1/tensorrt-llm/config")["llama_context_params"]
        body = {"prompt": SHORT_PROMPT, "max_tokens": 1, "temperature": 0, "stream": True}

        async def run() -> list[float]:
            transport = httpx.AsyncHTTPTransport(uds=str(daemon.socket_path))
            async with httpx.AsyncClient(transport=transport, timeout=60) as client:
                for _ in range(3):
                    await completion(client, "http://forged", body)
                return [(await completion(client, "http://forged", body))["ttft"] for _ in range(n)]

        served = asyncio.run(run())
    finally:
        daemon.stop()
    direct = _direct_ttft(config, n)
    return {"daemon_ttft_p50_ms": p(served, 50) * 1000, "libllama_ttft_p50_ms": p(direct, 50) * 1000,
            "overhead_p50_ms": (p(served, 50) - p(direct, 50)) * 1000,
            "daemon_ttft_p90_ms": p(served, 90) * 1000, "libllama_ttft_p90_ms": p(direct, 90) * 1000}


def _direct_ttft(params: dict[str, Any], n: int) -> list[float]:
    """The floor: tokenize, one llama_decode of the prompt, sample greedily, detokenize; same params."""
    import llama_cpp as ll

    from forged.engine.llama_cpp.model import LlamaModel
    m = LlamaModel(model(), 0)
    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch, cp.n_seq_max = (params["n_ctx"], params["n_batch"], params["n_ubatch"],
                                                       params["n_seq_max"])
    cp.n_threads = cp.n_threads_batch = params["n_threads"]
    cp.kv_unified, cp.swa_full, cp.flash_attn_type = True, False, params["flash_attn_type"]
    ctx = ll.llama_init_from_model(m.ptr, cp)
    mem = ll.llama_get_memory(ctx)
    batch = ll.llama_batch_init(params["n_batch"], 0, 1)
    sampler = ll.llama_sampler_chain_init(ll.llama_sampler_chain_default_params())
    ll.llama_sampler_chain_add(sampler, ll.llama_sampler_init_greedy())
    times = []
    for i in range(n + 3):
        started = time.perf_counter()
        tokens = m.tokenize(SHORT_PROMPT, add_special=True, parse_special=True)
        for j, tok in enumerate(tokens):
            batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = tok, j, 1, 0
            batch.seq_id[j][0] = 0
        batch.logits[len(tokens) - 1] = 1
        batch.n_tokens = len(tokens)
        assert ll.llama_decode(ctx, batch) == 0
        token = ll.llama_sampler_sample(sampler, ctx, len(tokens) - 1)
        m.piece(token).decode("utf-8", "replace")
        if i >= 3:
            times.append(time.perf_counter() - started)
        ll.llama_memory_seq_rm(mem, 0, -1, -1)
    ll.llama_sampler_free(sampler)
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    m.free()
    return times


def decode_scaling(tokens: int = 128) -> dict[str, Any]:
    """Aggregate decode tokens/s of 8 concurrent streams against one stream, same daemon."""
    daemon = start(profile={"inference": {"max_concurrent_sessions": 8}})
    body = {"prompt": SHORT_PROMPT, "max_tokens": tokens, "ignore_eos": True, "temperature": 0}

    def rate(results: list[dict[str, Any]]) -> float:
        first = min(r["arrivals"][0] for r in results)
        last = max(r["arrivals"][-1] for r in results)
        return sum(len(r["arrivals"]) - 1 for r in results) / (last - first)

    async def run(k: int) -> float:
        async with httpx.AsyncClient(timeout=600) as client:
            return rate(await asyncio.gather(*(completion(client, daemon.url, body) for _ in range(k))))

    try:
        asyncio.run(run(1))
        single = asyncio.run(run(1))
        eight = asyncio.run(run(8))
    finally:
        daemon.stop()
    return {"single_stream_tok_s": single, "eight_streams_aggregate_tok_s": eight, "ratio": eight / single}


def prefill_interference(long_tokens: int = 4096, sessions: int = 5, runners: int = 4,
                         peers: Peers = Peers(), beside: tuple[str, ...] = ()) -> dict[str, Any]:
    """Worst inter-token gap of `runners` running streams while a 4k-token prompt prefills, against their
    median gap; and that prompt's TTFT against its TTFT on an idle server. With `beside`, the same on each
    llama-server configuration named, in the same run (the result is then one entry per server)."""
    out: dict[str, Any] = {}
    prompt = None
    for name in peers.configs(*beside) if beside else [FORGED]:
        with serving(name, sessions, 8192, peers) as ep:
            prompt = prompt or _prompt_of(ep.url, long_tokens)
            out[name] = _interference(ep.url, prompt, runners)
            out[name]["long_prompt_tokens"] = long_tokens
    if LLAMA_SERVER in out:
        out["worst_gap_forged_over_llama_server"] = (out[FORGED]["worst_gap_during_prefill_ms"]
                                                     / out[LLAMA_SERVER]["worst_gap_during_prefill_ms"])
    return out if beside else out[FORGED]


def prefill_interference_8(peers: Peers) -> dict[str, Any]:
    """prefill_interference with the KV pool sized for 8 sessions, beside llama-server -np 8."""
    return prefill_interference(sessions=8, peers=peers, beside=(LLAMA_SERVER,))


def _interference(url: str, prompt: str, runners: int) -> dict[str, Any]:
    # Every long prompt starts with its own words, so none is answered from the KV of another.
    bodies = [{"prompt": f"Request {k}: {prompt}", "max_tokens": 1, "temperature": 0} for k in range(3)]
    running_body = {"prompt": SHORT_PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0}

    async def idle(body: dict[str, Any]) -> float:
        async with httpx.AsyncClient(timeout=600) as client:
            return (await completion(client, url, body))["ttft"]

    async def loaded() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=600) as client:
            tasks = [asyncio.create_task(completion(client, url, running_body)) for _ in range(runners)]
            await asyncio.sleep(3.0)  # all of them decoding
            t0 = time.perf_counter()
            result = await completion(client, url, bodies[2])
            t1 = time.perf_counter()
            done = await asyncio.gather(*tasks)
            return {"long": result, "runners": done, "window": (t0, t1)}

    idle_ttft = min(asyncio.run(idle(body)) for body in bodies[:2])
    out = asyncio.run(loaded())
    gaps_all: list[float] = []
    gaps_window: list[float] = []
    t0, t1 = out["window"]
    for r in out["runners"]:
        arr = r["arrivals"]
        for a, b in itertools.pairwise(arr):
            gaps_all.append(b - a)
            if t0 <= b <= t1 + 0.5:
                gaps_window.append(b - a)
    median = statistics.median(gaps_all)
    worst = max(gaps_window) if gaps_window else max(gaps_all)
    loaded_ttft = out["long"]["ttft"]
    return {"median_gap_ms": median * 1000, "worst_gap_during_prefill_ms": worst * 1000,
            "worst_over_median": worst / median, "long_ttft_idle_s": idle_ttft, "long_ttft_loaded_s": loaded_ttft,
            "ttft_loaded_over_idle": loaded_ttft / idle_ttft}


GRAMMAR_CASES = {
    # Greedy, and the grammar mostly agrees with the model: one token checked per step.
    "grammar_greedy": ({"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 64},
                       "A list of words, as JSON:", 0.0),
    # Sampled, and the grammar (digits) refuses most of what the model would write after "story":
    # the chain runs again over the whole vocabulary, grammar applied, on most steps.
    "grammar_sampled_refusing": ({"type": "array", "items": {"type": "integer"}, "minItems": 64},
                                 "Write a story about the sea:", 1.0),
}


# The step loop's debug line for a step of four decodes (worker.py): its llama_decode and its sampling.
STEP_LOG = re.compile(r"step \d+: 4 decodes, \d+ prefill tokens.*decode ([\d.]+) ms, sample and deliver ([\d.]+) ms")


def grammar_interference(tokens: int = 96, rounds: int = 2) -> dict[str, Any]:
    """What a grammar costs the other sequences of a batch. Three plain greedy streams run while a
    fourth runs plain, or under a grammar (GRAMMAR_CASES); the three's inter-token gaps while the
    fourth runs are compared. The step loop samples its sequences one after another, so a grammar's
    cost lands on every sequence's step. Also timed in-process, per sampled token: each sampling
    path on the same logits row (_sampling_costs). The gaps move with whatever else the box runs; the
    step log (logging.level debug) splits each step into its llama_decode and its sampling, and the
    sampling part is what a grammar adds to every sequence of the batch."""
    daemon = start(settings={"logging": {"level": "debug"}})  # the cpu profile: 4 sessions
    plain = {"prompt": SHORT_PROMPT, "max_tokens": 2 * tokens, "ignore_eos": True, "temperature": 0}
    fourths: dict[str, dict[str, Any]] = {"plain": dict(plain, max_tokens=tokens)}
    for name, (schema, prompt, temperature) in GRAMMAR_CASES.items():
        fourths[name] = {"prompt": prompt, "max_tokens": tokens, "temperature": temperature, "seed": 1,
                         "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}

    async def run(body: dict[str, Any]) -> dict[str, float]:
        async with httpx.AsyncClient(timeout=600) as client:
            runners = [asyncio.create_task(stream(client, daemon.url, "/v1/completions", plain)) for _ in range(3)]
            await asyncio.sleep(1.0)  # the three decoding
            logged = len(daemon.log_path.read_text().splitlines())
            fourth = await stream(client, daemon.url, "/v1/completions", body)
            steps = [tuple(float(x) for x in m.groups()) for line in daemon.log_path.read_text().splitlines()[logged:]
                     if (m := STEP_LOG.search(line))]
            done = await asyncio.gather(*runners)
        start_s, end_s = fourth["arrivals"][0], fourth["arrivals"][-1]
        gaps = [b - a for r in done for a, b in itertools.pairwise(r["arrivals"]) if start_s <= a and b <= end_s]
        return {"median_gap_ms": statistics.median(gaps) * 1000, "mean_gap_ms": statistics.fmean(gaps) * 1000,
                "fourth_tokens": len(fourth["arrivals"]),
                "step_decode_ms": statistics.fmean(d for d, _ in steps) if steps else None,
                "step_sampling_ms": statistics.fmean(s for _, s in steps) if steps else None}

    runs: dict[str, list[dict[str, float]]] = {name: [] for name in fourths}
    try:
        asyncio.run(run(fourths["plain"]))  # warm
        for _ in range(rounds):  # interleaved, so drift on a shared box hits every case alike
            for name, body in fourths.items():
                runs[name].append(run_result := asyncio.run(run(body)))
                assert run_result["fourth_tokens"] > tokens // 2, (name, run_result)
        config = daemon.get("/v1/tensorrt-llm/config")["llama_context_params"]
    finally:
        daemon.stop()
    out: dict[str, Any] = {}
    base = statistics.median(r["mean_gap_ms"] for r in runs["plain"])
    for name, results in runs.items():
        mean = statistics.median(r["mean_gap_ms"] for r in results)
        out[name] = {"mean_gap_ms": mean, "median_gap_ms": statistics.median(r["median_gap_ms"] for r in results),
                     "mean_gap_over_plain": mean / base, "added_ms_per_step": mean - base,
                     "step_decode_ms": statistics.median(r["step_decode_ms"] for r in results),
                     "step_sampling_ms": statistics.median(r["step_sampling_ms"] for r in results)}
    out["sampling_cost_per_token_ms"] = _sampling_costs(config)
    return out


def _sampling_costs(params: dict[str, Any], repeats: int = 50) -> dict[str, float]:
    """Each sampling path's time for one token, on the same logits row of the served model: what it
    adds to a step of the whole batch."""
    import llama_cpp as ll

    from forged.engine.base import OutputConstraint, SamplingParams
    from forged.engine.llama_cpp.model import LlamaModel
    from forged.engine.llama_cpp.sampling import Sampler
    m = LlamaModel(model(), 0)
    cp = ll.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 512, 512, 512
    cp.n_threads = cp.n_threads_batch = params["n_threads"]
    ctx = ll.llama_init_from_model(m.ptr, cp)
    batch = ll.llama_batch_init(512, 0, 1)
    tokens = m.tokenize("A list of words, as JSON:", add_special=True, parse_special=True)
    for j, tok in enumerate(tokens):
        batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = tok, j, 1, 0
        batch.seq_id[j][0] = 0
    batch.logits[len(tokens) - 1] = 1
    batch.n_tokens = len(tokens)
    assert ll.llama_decode(ctx, batch) == 0
    idx = len(tokens) - 1
    digits = OutputConstraint(schema={"type": "array", "items": {"type": "integer"}})
    words = OutputConstraint(schema={"type": "array", "items": {"type": "string"}})

    def timed(fn: Any) -> float:
        fn()
        started = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - started) / repeats * 1000

    def make(**kw: Any) -> Sampler:
        return Sampler(m, SamplingParams(max_tokens=64, **kw))

    logits = np.ctypeslib.as_array(ll.llama_get_logits_ith(ctx, idx), shape=(m.n_vocab,))
    greedy_grammar, sampled_grammar = make(temperature=0, constraint=words), make(temperature=1.0,
                                                                                 constraint=digits)
    chain, penalised = make(temperature=0.8, top_k=40, top_p=0.9), make(temperature=0.8, presence_penalty=1.0)
    logprobs = make(temperature=0, logprobs=5)
    costs = {
        "argmax (plain greedy)": timed(lambda: int(logits.argmax())),
        "grammar check of one token": timed(lambda: greedy_grammar._allows(int(logits.argmax()))),
        # The model's first pick here is not "[": refused, then found among the 256 most likely.
        "greedy, pick refused, grammar over the top 256": timed(lambda: greedy_grammar._greedy_in_grammar(logits)),
        "sampling chain (top_k 40, top_p 0.9, temperature)": timed(lambda: chain._run_chain(logits, grammar=False)),
        "sampled, every draw refused: whole vocabulary through the grammar": timed(
            lambda: sampled_grammar._run_chain(logits, grammar=True)),
        "sampled with a grammar (draws, then the whole vocabulary if need be)": timed(
            lambda: sampled_grammar.choose(logits)),
        "penalties + sampling chain": timed(lambda: penalised._run_chain(logits, grammar=False)),
        "logprobs (top 5)": timed(lambda: logprobs._with_logprobs(logits, 0)),
    }
    for sampler in (greedy_grammar, sampled_grammar, chain, penalised, logprobs):
        sampler.free()
    ll.llama_batch_free(batch)
    ll.llama_free(ctx)
    m.free()
    return {k: round(v, 3) for k, v in costs.items()}


def _prompt_of(url: str, n_tokens: int) -> str:
    """A prompt of about n_tokens tokens for this model (measured through a server's usage)."""
    text = FILLER * (n_tokens // 10)
    r = httpx.post(f"{url}/v1/completions", json={"prompt": text[:50], "max_tokens": 1}, timeout=60).json()
    per_char = r["usage"]["prompt_tokens"] / 50
    return text[: int(n_tokens / per_char)]


def single_stream(sessions: int = 8, context: int = 8192, decode_tokens: int = 128, long_tokens: int = 3300,
                  runs: int = 3, peers: Peers = Peers()) -> dict[str, Any]:
    """One stream alone on a server sized for `sessions` sessions of `context` tokens, beside llama-server
    with as many slots: (a) its decode rate (a short prompt, `decode_tokens` new tokens; after one
    warm-up request, the median of `runs`), and (b) the TTFT of a ~3.3k-token prompt on the idle server
    (the best of `runs`, each prompt a different text from its first token, so no cache answers it)."""
    out: dict[str, Any] = {"sessions": sessions, "context": context, "decode_tokens": decode_tokens}
    long_prompts: list[str] = []
    for name in peers.configs(LLAMA_SERVER):
        with serving(name, sessions, context, peers) as ep:
            if not long_prompts:
                chars = int(long_tokens / tokens_per_char(ep.url, prose(-1, 6000)))
                long_prompts = [prose(10_000 + k, chars) for k in range(runs)]

            async def one(body: dict[str, Any], url: str = ep.url) -> dict[str, Any]:
                async with httpx.AsyncClient(timeout=600) as client:
                    return await completion(client, url, body)

            decode_body = {"prompt": SHORT_PROMPT, "max_tokens": decode_tokens, "ignore_eos": True, "temperature": 0}
            asyncio.run(one(decode_body))
            rates = []
            for _ in range(runs):
                arr = asyncio.run(one(decode_body))["arrivals"]
                rates.append((len(arr) - 1) / (arr[-1] - arr[0]))
            ttfts, prompt_tokens = [], []
            for text in long_prompts:
                r = asyncio.run(one({"prompt": text, "max_tokens": 1, "temperature": 0,
                                     "stream_options": {"include_usage": True}}))
                ttfts.append(r["ttft"])
                prompt_tokens.append((r.get("usage") or {}).get("prompt_tokens"))
            out[name] = {"decode_tok_s": statistics.median(rates), "decode_tok_s_runs": rates,
                         "long_prompt_ttft_s": min(ttfts), "long_prompt_ttft_s_runs": ttfts,
                         "long_prompt_tokens": prompt_tokens, **ep.config}
    if LLAMA_SERVER in out:
        out["decode_forged_over_llama_server"] = out[FORGED]["decode_tok_s"] / out[LLAMA_SERVER]["decode_tok_s"]
        out["long_ttft_forged_over_llama_server"] = (out[FORGED]["long_prompt_ttft_s"]
                                                     / out[LLAMA_SERVER]["long_prompt_ttft_s"])
    return out


def multi_turn(users: int = 4, doc_tokens: int = 3000, turns: int = 3, new_tokens: int = 32,
               context: int = 8192, peers: Peers = Peers()) -> dict[str, Any]:
    """`users` users at once, each holding a conversation about its own ~doc_tokens-token document
    (loadgen.conversation: every turn resends the whole history plus a new question, streamed over
    /v1/chat/completions, greedy, `new_tokens` new tokens). forged with `users` sessions of `context`
    tokens, then llama-server with as many slots (its host-RAM prompt cache on, its default; and off).

    Per server: turn-1 and later-turn TTFT P50/P99, answers within the cpu profile's TTFT P99 target per
    second, prompt tokens sent, the cached tokens the server reported (usage.prompt_tokens_details.
    cached_tokens, or llama-server's timings.cache_n), and forged's prefix-cache counters' deltas.
    """
    target_s = cpu_profile()["targets"]["ttft_p99_ms"] / 1000
    out: dict[str, Any] = {"users": users, "doc_tokens": doc_tokens, "turns": turns, "new_tokens": new_tokens,
                           "context": context}
    documents: list[str] = []
    for name in peers.configs(LLAMA_SERVER, LLAMA_SERVER_NO_RAM_CACHE):
        with serving(name, users, context, peers) as ep:
            if not documents:
                chars = int(doc_tokens / tokens_per_char(ep.url, prose(-1, 6000)))
                documents = [prose(user, chars) for user in range(users)]
            before = ep.counters()
            records, wall = run_conversations(ep.url, documents, turns, new_tokens)
            summary = summarize_turns(records, wall, target_s)
            if ep.daemon is not None:
                summary["prefix_cache_counters"] = counter_deltas(before, ep.counters())
            out[name] = {**summary, **ep.config}
    return out


def reject_latency(n: int = 300) -> dict[str, Any]:
    """Latency of the 503 answer while sessions and queue are full."""
    daemon = start(profile={"inference": {"max_concurrent_sessions": 2}, "thresholds": {"max_queue_depth": 2}})
    hold = {"prompt": SHORT_PROMPT, "max_tokens": 2000, "ignore_eos": True}

    async def run() -> list[float]:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=32)) as client:
            holders = [asyncio.create_task(completion(client, daemon.url, hold)) for _ in range(4)]
            await asyncio.sleep(2.0)
            latencies = []
            for _ in range(n):
                r = await completion(client, daemon.url, {"prompt": "x", "max_tokens": 1})
                assert r["status"] == 503 and r["code"] == "queue_full", r
                latencies.append(r["latency"])
            for h in holders:
                h.cancel()
            return latencies

    try:
        latencies = asyncio.run(run())
    finally:
        daemon.stop()
    return {"n": n, "p50_ms": p(latencies, 50) * 1000, "p99_ms": p(latencies, 99) * 1000,
            "max_ms": max(latencies) * 1000}


def _overload(daemon: Daemon, users: int, prompt: str, max_tokens: int, spread_s: float = 0.0
              ) -> dict[str, Any]:
    body = {"prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0}

    async def user(client: httpx.AsyncClient, i: int) -> dict[str, Any]:
        await asyncio.sleep(spread_s * i / max(users - 1, 1))
        return await completion(client, daemon.url, body)

    async def run() -> list[dict[str, Any]]:
        async with httpx.AsyncClient(timeout=1200, limits=httpx.Limits(max_connections=users + 4)) as client:
            return await asyncio.gather(*(user(client, i) for i in range(users)))

    started = time.perf_counter()
    results = asyncio.run(run())
    wall = time.perf_counter() - started
    ok = [r for r in results if r["status"] == 200]
    ttfts = [r["ttft"] for r in ok]
    tokens = sum(len(r["arrivals"]) for r in ok)
    rejected: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
            rejected[r["code"]] = rejected.get(r["code"], 0) + 1
    return {"users": users, "served": len(ok), "rejected": rejected, "wall_s": wall,
            "ttft_p50_s": p(ttfts, 50), "ttft_p99_s": p(ttfts, 99), "throughput_tok_s": tokens / wall,
            "ttfts": ttfts}


def policies() -> dict[str, Any]:
    """The same overload under guaranteed_no_evict and max_utilization, with a KV cache too small
    for every session to reach its end."""
    out = {}
    for policy in ("guaranteed_no_evict", "max_utilization"):
        daemon = start(profile={"inference": {"max_concurrent_sessions": 8, "max_seq_len": 1024},
                                "thresholds": {"max_queue_depth": 32},
                                "tensorrt_llm": {"scheduler_policy": policy, "kv_cache_max_tokens": 2048}})
        try:
            prompt = _prompt_of(daemon.url, 300)
            result = _overload(daemon, users=16, prompt=prompt, max_tokens=200)
            result["preemptions"] = daemon.status()["engine"]["preemptions"]
        finally:
            daemon.stop()
        result.pop("ttfts")
        out[policy] = result
    return out


def deadline(users: int = 20, prompt_tokens: int = 1000, target_ms: int = 6000) -> dict[str, Any]:
    """The seed scenario scaled to 2 CPU cores: 20 users at once, prompts long enough that queueing
    dominates. Queue-only admission against deadline admission, same target."""
    out = {}
    for mode in ("off", "deadline"):
        daemon = start(profile={"inference": {"max_concurrent_sessions": 4, "max_seq_len": 2048},
                                "thresholds": {"max_queue_depth": 20}, "admission": {"mode": mode},
                                "targets": {"ttft_p99_ms": target_ms}})
        try:
            prompt = _prompt_of(daemon.url, prompt_tokens)
            result = _overload(daemon, users=users, prompt=prompt, max_tokens=32)
        finally:
            daemon.stop()
        ttfts = result.pop("ttfts")
        within = sum(1 for t in ttfts if t <= target_ms / 1000)
        result.update(target_ms=target_ms, within_target=within, goodput_per_s=within / result["wall_s"],
                      rejection_rate=1 - result["served"] / users)
        out[mode] = result
    return out


def kv_memory(context: int = 4096, sessions: int = 4) -> dict[str, Any]:
    """KV memory per session at a 4k context, by dtype, measured against the plan (forged.engine.kv).

    libllama clears its KV buffer when it creates the context, so the whole cache is resident from
    the start: the measurement is the daemon's RSS with `sessions` x 4k-token contexts minus its RSS
    with a 64-token context (everything else equal), divided by the sessions. The engine's own
    figure (/v1/status kv_cache.bytes) is shown beside it.
    """
    from forged.engine.kv import LLAMA_CPP_DTYPE_BYTES
    from forged.engine.shapes import shape_from_path
    shape = shape_from_path(model())
    out = {}

    def rss_with(dtype: str, seq_len: int) -> tuple[int, int]:
        daemon = start(profile={"tensorrt_llm": {"kv_cache_dtype": dtype},
                                "inference": {"max_concurrent_sessions": sessions, "max_seq_len": seq_len}})
        try:
            httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
            assert daemon.proc is not None
            return _rss(daemon.proc.pid), daemon.status()["kv_cache"]["bytes"]
        finally:
            daemon.stop()

    for dtype in ("fp32", "fp16", "fp8"):
        base_rss, base_bytes = rss_with(dtype, 64)
        full_rss, full_bytes = rss_with(dtype, context)
        plan = shape.context_bytes(context, LLAMA_CPP_DTYPE_BYTES[dtype])
        measured = (full_rss - base_rss) / sessions
        out[dtype] = {"planned_bytes_per_session": plan, "measured_rss_bytes_per_session": measured,
                      "engine_reported_bytes_per_session": (full_bytes - base_bytes) / sessions,
                      "measured_over_plan": measured / plan}
    return out


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


SCENARIOS = {"ttft_overhead": ttft_overhead, "decode_scaling": decode_scaling,
             "prefill_interference": prefill_interference, "reject_latency": reject_latency,
             "policies": policies, "deadline": deadline, "kv_memory": kv_memory,
             "grammar_interference": grammar_interference}
# Beside llama-server: run only when asked (--only), and given the llama-server binary.
SIDE_BY_SIDE = {"multi_turn": multi_turn, "single_stream": single_stream,
                "prefill_interference_8": prefill_interference_8}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", choices=sorted({**SCENARIOS, **SIDE_BY_SIDE}))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--llama-server", type=Path, default=DEFAULT_LLAMA_SERVER,
                        help="llama-server binary for the side-by-side scenarios (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="engine threads of forged and llama-server in the side-by-side scenarios "
                        "(default: every core; on a loaded box 1 stalls less)")
    args = parser.parse_args()
    peers = Peers(args.llama_server, args.threads)
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    for name in args.only or SCENARIOS:
        started, load = time.perf_counter(), os.getloadavg()[0]
        results[name] = SIDE_BY_SIDE[name](peers=peers) if name in SIDE_BY_SIDE \
            else SCENARIOS[name]()
        # The box is shared: what else ran shows in the load average around the scenario.
        results[f"{name}_load_average_1m"] = [load, os.getloadavg()[0]]
        results[f"{name}_wall_s"] = round(time.perf_counter() - started)
        print(f"== {name} ({time.perf_counter() - started:.0f} s)\n{json.dumps(results[name], indent=2)}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
