"""Client side of the benchmarks: streamed OpenAI requests and the multi-turn conversation load.

Shared by bench_serving.py (CPU box) and gpu_bench.py (device), so it needs only the standard library
and httpx, and speaks to forged and llama-server alike: both stream `data: {json}` events with
`choices[0].text` (/v1/completions) or `choices[0].delta.content` (/v1/chat/completions), and a last
chunk with `usage` when asked for it (`stream_options.include_usage`).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from typing import Any

import httpx

SYSTEM_PROMPT = "You are a careful assistant. Answer questions about the document the user pasted, briefly."
QUESTIONS = ("What is this document mainly about?", "Which place does it mention first, and why?",
             "Summarize its second paragraph in one sentence.", "Who is named most often?",
             "What happens at the end?", "List three facts it states about the river.",
             "Which numbers does it give?", "Does it contradict itself anywhere?")
WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "the river harbor lighthouse keeper morning storm village road market bridge winter council "
    "letter ship north south east west island mountain forest field farmer teacher doctor child "
    "record engine lamp tower garden stone bread salt copper wool year month evening summer "
    "report station signal cargo captain crew anchor tide current shore cliff valley mill "
    "spring autumn harvest rain wind snow fire smoke window door table chair book map clock "
    "Anna Marek Tomas Ilse Pieter Sofia Jonas Clara Emil Greta Hugo Lena Oskar Rosa Viktor "
    "walked carried opened wrote counted measured repaired painted watched followed built sold "
    "bought found lost kept moved changed closed crossed reached left returned answered asked "
    "quietly slowly early late twice again always never often together alone nearby above "
    "old new small large long short bright dark cold warm heavy light narrow wide quiet busy").split()


def pct(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def prose(seed: int, n_chars: int) -> str:
    """Distinct English-like text of about n_chars characters: a numbered report of short sentences.

    The first words differ between seeds, so two documents share no prefix beyond what precedes them.
    """
    rng = random.Random(seed)
    parts = [f"Report {seed} of the harbor archive, file {rng.randrange(10**6):06d}. "]
    size = len(parts[0])
    while size < n_chars:
        sentence = " ".join(rng.choice(WORDS) for _ in range(rng.randrange(6, 16))).capitalize()
        if rng.random() < 0.2:
            sentence += f" {rng.randrange(1, 2000)}"
        sentence += ".\n\n" if rng.random() < 0.15 else ". "
        parts.append(sentence)
        size += len(sentence)
    return "".join(parts)[:n_chars].rstrip()


async def stream(client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """One streamed request. Returns status, the send time, the arrival time of every event that
    carries text (the first is the TTFT), the text, and the usage and llama-server timings if sent."""
    sent = time.perf_counter()
    try:
        return await _stream(client, url, path, body, sent)
    except httpx.TransportError as exc:  # the connection failed or closed: a result, not the end of the run
        return {"status": 0, "code": type(exc).__name__, "error": str(exc)[:200], "sent": sent,
                "latency": time.perf_counter() - sent}


async def _stream(client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any], sent: float
                  ) -> dict[str, Any]:
    arrivals: list[float] = []
    parts: list[str] = []
    usage: dict[str, Any] | None = None
    timings: dict[str, Any] | None = None
    async with client.stream("POST", url + path, json=dict(body, stream=True)) as r:
        if r.status_code != 200:
            data = await r.aread()
            try:
                code = json.loads(data)["error"].get("code") or str(r.status_code)
            except (ValueError, KeyError, TypeError, AttributeError):
                code = str(r.status_code)
            return {"status": r.status_code, "code": code, "sent": sent, "latency": time.perf_counter() - sent}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                return {"status": 200, "code": "stream_error", "error": event["error"], "sent": sent,
                        "arrivals": arrivals, "latency": time.perf_counter() - sent}
            usage = event.get("usage") or usage
            timings = event.get("timings") or timings
            choices = event.get("choices") or []
            if not choices:
                continue
            text = choices[0].get("text") or (choices[0].get("delta") or {}).get("content")
            if text:
                arrivals.append(time.perf_counter())
                parts.append(text)
            elif choices[0].get("finish_reason") and not arrivals:
                arrivals.append(time.perf_counter())  # an answer with no text still ends its wait
    end = time.perf_counter()
    return {"status": 200, "sent": sent, "end": end, "arrivals": arrivals, "text": "".join(parts),
            "ttft": arrivals[0] - sent if arrivals else None, "usage": usage, "timings": timings}


def cached_tokens(result: dict[str, Any]) -> int | None:
    """Prompt tokens the server says it did not prefill: OpenAI's usage.prompt_tokens_details.cached_tokens
    (forged, llama-server), else llama-server's timings.cache_n; None where neither is sent."""
    details = (result.get("usage") or {}).get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        return int(details["cached_tokens"])
    cache_n = (result.get("timings") or {}).get("cache_n")
    return None if cache_n is None else int(cache_n)


# ------------------------------------------------------------------ multi-turn conversations

async def conversation(client: httpx.AsyncClient, url: str, user: int, document: str, turns: int,
                       new_tokens: int, delay_s: float, extra: dict[str, Any]) -> list[dict[str, Any]]:
    """One user's conversation: turn 1 pastes the document and asks; every later turn resends the whole
    history (system prompt, document, every question and the answer the server gave) plus a new
    question, as a chat client does. Stops at the first failed turn (the next would lack its answer)."""
    await asyncio.sleep(delay_s)
    messages: list[dict[str, str]] = [{"role": "system", "content": SYSTEM_PROMPT}]
    records = []
    for turn in range(turns):
        question = QUESTIONS[(user + turn) % len(QUESTIONS)]
        messages.append({"role": "user", "content": f"{document}\n\n{question}" if turn == 0 else question})
        body = {"messages": messages, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
                "stream_options": {"include_usage": True}, **extra}
        result = await stream(client, url, "/v1/chat/completions", body)
        retried = result.get("code") == "RemoteProtocolError"
        if retried:
            # Seen once from llama-server (its prompt cache on): it closed the connection of a request it
            # had just started without answering. A client would resend; the retry is counted.
            result = await stream(client, url, "/v1/chat/completions", body)
        result.update(user=user, turn=turn, retried=retried)
        records.append(result)
        if result["status"] != 200 or result.get("code") or not result.get("arrivals"):
            break
        messages.append({"role": "assistant", "content": result["text"]})
    return records


def run_conversations(url: str, documents: list[str], turns: int, new_tokens: int, spread_s: float = 0.0,
                      extra: dict[str, Any] | None = None, timeout: float = 3600
                      ) -> tuple[list[dict[str, Any]], float]:
    """Every user's conversation at once (user i starts at spread_s * i / (users - 1)); returns every
    turn's record and the wall time."""
    users = len(documents)

    async def go() -> list[list[dict[str, Any]]]:
        limits = httpx.Limits(max_connections=users + 8)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:
            return await asyncio.gather(*(
                conversation(client, url, i, doc, turns, new_tokens, spread_s * i / max(users - 1, 1), extra or {})
                for i, doc in enumerate(documents)))

    started = time.perf_counter()
    per_user = asyncio.run(go())
    return [r for records in per_user for r in records], time.perf_counter() - started


def summarize_turns(records: list[dict[str, Any]], wall: float, target_s: float) -> dict[str, Any]:
    """Turn-1 and later-turn TTFT, answers within the target per second, and the prompt tokens sent and
    reported cached."""
    ok = [r for r in records if r["status"] == 200 and not r.get("code") and r.get("ttft") is not None]
    first = [r["ttft"] for r in ok if r["turn"] == 0]
    later = [r["ttft"] for r in ok if r["turn"] > 0]
    answered = {id(r) for r in ok}
    failed: dict[str, int] = {}
    for r in records:
        if id(r) not in answered:
            code = r.get("code") or ("no_text" if r["status"] == 200 else str(r["status"]))
            failed[code] = failed.get(code, 0) + 1
    within = sum(1 for r in ok if r["ttft"] <= target_s)
    cached = [c for c in (cached_tokens(r) for r in ok) if c is not None]
    prompt = [r["usage"]["prompt_tokens"] for r in ok if (r.get("usage") or {}).get("prompt_tokens") is not None]
    by_turn = {}
    for turn in sorted({r["turn"] for r in ok}):
        these = [r for r in ok if r["turn"] == turn]
        ttfts = [r["ttft"] for r in these]
        by_turn[turn + 1] = {"ttft_p50_s": pct(ttfts, 50), "ttft_max_s": max(ttfts),
                             "prompt_tokens_max": max((r.get("usage") or {}).get("prompt_tokens") or 0 for r in these)}
    t1, tl = pct(first, 50), pct(later, 50)
    return {
        "turns_answered": len(ok), "turns_failed": failed, "turns_retried": sum(1 for r in records if r["retried"]),
        "wall_s": round(wall, 2),
        "turn1_ttft_p50_s": t1, "turn1_ttft_p99_s": pct(first, 99),
        "later_ttft_p50_s": tl, "later_ttft_p99_s": pct(later, 99),
        "later_over_turn1_p50": tl / t1 if t1 and tl is not None else None,
        "target_s": target_s, "within_target": within, "within_target_per_s": round(within / wall, 3),
        "prompt_tokens_sent": sum(prompt) if prompt else None,
        "cached_tokens_reported": sum(cached) if cached else None,
        "by_turn": by_turn,
    }


def metric_totals(exposition: str, names: tuple[str, ...]) -> dict[str, float]:
    """The sum over labels of each named counter in a Prometheus text exposition (absent ones left out)."""
    out: dict[str, float] = {}
    for line in exposition.splitlines():
        if line.startswith("#"):
            continue
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in names:
            out[name] = out.get(name, 0.0) + float(line.rsplit(" ", 1)[-1])
    return out


PREFIX_CACHE_COUNTERS = ("forge_prefix_cache_queries_total", "forge_prefix_cache_hits_total")


def counter_deltas(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {name: after[name] - before.get(name, 0.0) for name in after}

