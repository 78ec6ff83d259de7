#!/usr/bin/env python3
"""Serving benchmarks for forged on this machine (the numbers in docs/benchmarks.md).

Every scenario starts a real daemon (the packaged cpu profile plus the overrides shown), drives it
over its real sockets, and compares ratios measured in the same run. Run with:

    .venv/bin/python bench/bench_serving.py [--only NAME ...] [--json out.json]

Scenarios: ttft_overhead, decode_scaling, prefill_interference, reject_latency, policies,
deadline, kv_memory.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import Daemon  # noqa: E402  (the same harness the integration tests use)

from forged.config import ModelSettings  # noqa: E402
from forged.models import resolve_model  # noqa: E402
from forged.targets import percentile  # noqa: E402

SHORT_PROMPT = "Write one sentence about lighthouses and the sea at night."
FILLER = "The quick brown fox jumps over the lazy dog while the river keeps flowing to the sea. "


def model() -> Path:
    path, _ = resolve_model(ModelSettings(), REPO / "build" / "test-state")
    return path


def start(profile: dict[str, Any] | None = None, settings: dict[str, Any] | None = None) -> Daemon:
    root = Path(tempfile.mkdtemp(prefix="forged-bench-"))
    return Daemon(root, model(), profile=profile, settings=settings).start()


async def stream(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed completion; returns status, TTFT, token arrival times."""
    sent = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", f"{url}/v1/completions", json=dict(body, stream=True)) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "latency": time.perf_counter() - sent,
                    "code": r.json()["error"]["code"]}
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"text": ""' not in line:
                arrivals.append(time.perf_counter())
    return {"status": 200, "ttft": arrivals[0] - sent if arrivals else None, "arrivals": arrivals, "sent": sent,
            "end": time.perf_counter()}


def p(values: list[float], q: float) -> float:
    return percentile(values, q)


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
                    await stream(client, "http://forged", body)
                return [(await stream(client, "http://forged", body))["ttft"] for _ in range(n)]

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
            return rate(await asyncio.gather(*(stream(client, daemon.url, body) for _ in range(k))))

    try:
        asyncio.run(run(1))
        single = asyncio.run(run(1))
        eight = asyncio.run(run(8))
    finally:
        daemon.stop()
    return {"single_stream_tok_s": single, "eight_streams_aggregate_tok_s": eight, "ratio": eight / single}


def prefill_interference(long_tokens: int = 4096) -> dict[str, Any]:
    """Worst inter-token gap of 4 running streams while a 4k-token prompt prefills, against their
    median gap; and that prompt's TTFT against its TTFT on an idle daemon."""
    daemon = start(profile={"inference": {"max_concurrent_sessions": 5, "max_seq_len": 8192}})
    long_prompt = _prompt_of(daemon, long_tokens)
    long_body = {"prompt": long_prompt, "max_tokens": 1, "temperature": 0}
    running_body = {"prompt": SHORT_PROMPT, "max_tokens": 400, "ignore_eos": True, "temperature": 0}

    async def idle() -> float:
        async with httpx.AsyncClient(timeout=600) as client:
            return (await stream(client, daemon.url, long_body))["ttft"]

    async def loaded() -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=600) as client:
            runners = [asyncio.create_task(stream(client, daemon.url, running_body)) for _ in range(4)]
            await asyncio.sleep(3.0)  # all four decoding
            t0 = time.perf_counter()
            result = await stream(client, daemon.url, long_body)
            t1 = time.perf_counter()
            done = await asyncio.gather(*runners)
            return {"long": result, "runners": done, "window": (t0, t1)}

    try:
        idle_ttft = min(asyncio.run(idle()) for _ in range(2))
        out = asyncio.run(loaded())
    finally:
        daemon.stop()
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
            "worst_over_median": worst / median, "long_prompt_tokens": long_tokens,
            "long_ttft_idle_s": idle_ttft, "long_ttft_loaded_s": loaded_ttft,
            "ttft_loaded_over_idle": loaded_ttft / idle_ttft}


def _prompt_of(daemon: Daemon, n_tokens: int) -> str:
    """A prompt of about n_tokens tokens for this model (measured through the daemon's usage)."""
    text = FILLER * (n_tokens // 10)
    r = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": text[:50], "max_tokens": 1}, timeout=60).json()
    per_char = r["usage"]["prompt_tokens"] / 50
    return text[: int(n_tokens / per_char)]


def reject_latency(n: int = 300) -> dict[str, Any]:
    """Latency of the 503 answer while sessions and queue are full."""
    daemon = start(profile={"inference": {"max_concurrent_sessions": 2}, "thresholds": {"max_queue_depth": 2}})
    hold = {"prompt": SHORT_PROMPT, "max_tokens": 2000, "ignore_eos": True}

    async def run() -> list[float]:
        async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=32)) as client:
            holders = [asyncio.create_task(stream(client, daemon.url, hold)) for _ in range(4)]
            await asyncio.sleep(2.0)
            latencies = []
            for _ in range(n):
                r = await stream(client, daemon.url, {"prompt": "x", "max_tokens": 1})
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
        return await stream(client, daemon.url, body)

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
            prompt = _prompt_of(daemon, 300)
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
            prompt = _prompt_of(daemon, prompt_tokens)
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


async def _fill(url: str, prompt: str, sessions: int) -> None:
    async with httpx.AsyncClient(timeout=1200) as client:
        await asyncio.gather(*(client.post(f"{url}/v1/completions", json={"prompt": f"{i} {prompt}", "max_tokens": 1})
                               for i in range(sessions)))


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


SCENARIOS = {"ttft_overhead": ttft_overhead, "decode_scaling": decode_scaling,
             "prefill_interference": prefill_interference, "reject_latency": reject_latency,
             "policies": policies, "deadline": deadline, "kv_memory": kv_memory}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--only", nargs="*", choices=sorted(SCENARIOS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    for name in args.only or SCENARIOS:
        started = time.perf_counter()
        results[name] = SCENARIOS[name]()
        print(f"== {name} ({time.perf_counter() - started:.0f} s)\n{json.dumps(results[name], indent=2)}",
              flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
