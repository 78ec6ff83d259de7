"""`forgectl diagnose`: read live metrics over a window, name the bottleneck and the ONE lever to change next.

Two /metrics scrapes --window seconds apart give the events of the window (TTFT and queue-wait
histograms, rejections by reason, preemptions, failures, tokens); the gauges (sessions, queue, KV
blocks, memory) are sampled every --interval seconds in between. forged exports no GPU utilization,
so the seed's "utilization" is read as session occupancy (forge_active_sessions / forge_max_sessions),
with KV blocks used/total as the memory pressure and queue wait's share of TTFT as where the time goes.

The seed's rules, first match wins:
  failed requests or memory >= 95%          -> out of memory: lower tensorrt_llm.free_gpu_memory_fraction
  preemptions                               -> KV exhausted: fewer inference.max_concurrent_sessions
  503s (queue_full, ttft_target_unmeetable) -> overload at the door: queue depth or sessions
  high TTFT, sessions busy, TTFT mostly queue wait -> queueing: deadline admission or a shorter queue
  high TTFT, sessions busy (high "utilization")   -> compute bound: reduce the batch
  high TTFT, sessions idle (low "utilization")    -> memory pressure: fewer sessions (KV full), else
                                                     prefill bound (the prompt alone takes too long)
  per-user TPS below target, sessions busy        -> compute bound (decode): fewer sessions
  otherwise                                       -> healthy (or idle)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from forged.ctl.client import BadAnswer, Client, DaemonUnreachable
from forged.ctl.levers import describe, fewer_sessions, lever, more_sessions
from forged.ctl.promtext import Scrape

BUSY = 0.75  # session occupancy at or above this counts as "high utilization"
KV_FULL = 0.85  # KV blocks used at or above this counts as memory pressure
MEMORY_FULL = 0.95


def add_parser(sub: Any) -> None:
    p = sub.add_parser("diagnose", help="read live metrics over a window; name the bottleneck and the one lever "
                       "to change next", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--window", type=float, default=30.0, help="seconds between the two scrapes (default 30)")
    p.add_argument("--interval", type=float, default=1.0,
                   help="seconds between gauge samples inside the window (default 1)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    if args.window <= 0 or args.interval <= 0:
        print("forgectl: diagnose: --window and --interval must be positive", file=sys.stderr)
        return 2
    client = Client.from_args(args)
    try:
        status = client.get_json("/v1/status")
        scrapes = collect(client, args.window, args.interval, progress=not getattr(args, "json", False))
    except (DaemonUnreachable, BadAnswer) as exc:
        print(f"forgectl: diagnose: {exc}", file=sys.stderr)
        return 1
    try:
        doc = analyze(status, scrapes)
    except ValueError as exc:
        print(f"forgectl: diagnose: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if getattr(args, "json", False) else render(doc))
    return 0


def collect(client: Client, window: float, interval: float, progress: bool = False) -> list[Scrape]:
    start = time.monotonic()
    end = start + window
    scrapes = [Scrape.parse(client.get_text("/metrics"))]
    if progress:
        print(f"reading /metrics from {client.where} for {window:g} s ...", file=sys.stderr, flush=True)
    while True:
        now = time.monotonic()
        if now >= end:
            break
        time.sleep(min(interval, end - now))
        scrapes.append(Scrape.parse(client.get_text("/metrics")))
    return scrapes


def _delta(first: Scrape, last: Scrape, name: str, **labels: str) -> float:
    return (last.value(name, 0.0, **labels) or 0.0) - (first.value(name, 0.0, **labels) or 0.0)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def analyze(status: dict[str, Any], scrapes: list[Scrape]) -> dict[str, Any]:
    """The verdict for a window of scrapes (pure: no I/O, so that it can be tested on made-up scrapes)."""
    if len(scrapes) < 2:
        raise ValueError("need at least two scrapes")
    first, last = scrapes[0], scrapes[-1]
    window = last.at - first.at
    ttft = last.histogram("forge_ttft_seconds").minus(first.histogram("forge_ttft_seconds"))
    wait = last.histogram("forge_queue_wait_seconds").minus(first.histogram("forge_queue_wait_seconds"))
    tps = last.histogram("forge_tokens_per_second").minus(first.histogram("forge_tokens_per_second"))
    if ttft.count < 0 or wait.count < 0:
        raise ValueError("the counters went backwards: forged restarted during the window; run it again")
    before = first.labelled("forge_rejections_total", "reason")
    rejections = {k: v - before.get(k, 0.0) for k, v in last.labelled("forge_rejections_total", "reason").items()}
    rejections = {k: v for k, v in sorted(rejections.items()) if v > 0}
    outcome = {k: _delta(first, last, "forge_requests_total", outcome=k)
               for k in ("completed", "cancelled", "failed", "rejected")}
    preemptions = _delta(first, last, "forge_preemptions_total")
    generated = _delta(first, last, "forge_generation_tokens_total")
    prompt_tokens = _delta(first, last, "forge_prompt_tokens_total")

    def series(name: str, **labels: str) -> list[float]:
        return [v for s in scrapes if (v := s.value(name, None, **labels)) is not None]

    active = series("forge_active_sessions")
    max_sessions = int(last.value("forge_max_sessions", 0.0) or status["sessions"]["max"])
    queue = series("forge_queue_depth")
    max_queue = int(last.value("forge_max_queue_depth", 0.0) or 0)
    kv_used, kv_total = series("forge_kv_cache_blocks", state="used"), series("forge_kv_cache_blocks", state="total")
    kv_frac = [u / t for u, t in zip(kv_used, kv_total, strict=False) if t]
    mem_used, mem_total = series("forge_gpu_memory_used_bytes"), series("forge_gpu_memory_total_bytes")
    mem_frac = [u / t for u, t in zip(mem_used, mem_total, strict=False) if t]
    profile = status["profile"]
    targets = profile["targets"]
    target_p99_ms = last.value("forge_target_ttft_p99_ms", None) or targets["ttft_p99_ms"]
    target_p50_ms = targets["ttft_ms"]
    target_tps = targets["tps"]

    def ms(x: float | None) -> float | None:
        return None if x is None else round(x * 1000, 1)

    stats: dict[str, Any] = {
        "window_s": round(window, 1), "samples": len(scrapes),
        "first_tokens": ttft.count, "ttft_mean_ms": ms(ttft.mean), "ttft_p50_ms": ms(ttft.quantile(0.5)),
        "ttft_p99_ms": ms(ttft.quantile(0.99)), "target_ttft_ms": target_p50_ms, "target_ttft_p99_ms": target_p99_ms,
        "queue_wait_mean_ms": ms(wait.mean), "sessions_started": wait.count,
        "queue_wait_share": None if wait.mean is None or not ttft.mean else round(min(1.0, wait.mean / ttft.mean), 3),
        "tps_per_request_p50": None if tps.count == 0 else round(tps.quantile(0.5) or 0, 1), "target_tps": target_tps,
        "aggregate_tps": round(generated / window, 1) if window > 0 else None,
        "prompt_tokens_per_request": round(prompt_tokens / wait.count, 1) if wait.count else None,
        "requests": outcome, "rejections": rejections, "preemptions": preemptions,
        "sessions_mean": round(sum(active) / len(active), 2) if active else 0.0,
        "sessions_peak": max(active, default=0),
        "max_sessions": max_sessions,
        "occupancy": round(sum(active) / len(active) / max_sessions, 3) if active and max_sessions else 0.0,
        "queue_mean": round(sum(queue) / len(queue), 2) if queue else 0.0, "queue_peak": max(queue, default=0),
        "max_queue_depth": max_queue,
        "kv_used_peak": round(max(kv_frac, default=0.0), 3), "kv_used_mean": round(sum(kv_frac) / len(kv_frac), 3)
        if kv_frac else 0.0, "kv_blocks_total": kv_total[-1] if kv_total else None,
        "memory_used_peak": round(max(mem_frac, default=0.0), 3),
        "prefill_tokens_per_s": status.get("engine", {}).get("prefill_tokens_per_s"),
    }
    verdict = _decide(stats, profile, status)
    return {"profile": status["profile"]["name"], **verdict, "stats": stats}


def _evidence(s: dict[str, Any]) -> list[str]:
    out = []
    if s["first_tokens"]:
        out.append(f"TTFT over {s['first_tokens']:g} first tokens: mean {s['ttft_mean_ms']:.0f} ms, "
                   f"P50 ~{s['ttft_p50_ms']:.0f} ms (target {s['target_ttft_ms']:g}), "
                   f"P99 ~{s['ttft_p99_ms']:.0f} ms (target {s['target_ttft_p99_ms']:g}) (histogram estimates)")
    else:
        out.append("no first tokens in the window")
    if s["queue_wait_mean_ms"] is not None:
        share = "" if s["queue_wait_share"] is None else f" = {s['queue_wait_share']:.0%} of mean TTFT"
        out.append(f"queue wait mean {s['queue_wait_mean_ms']:.0f} ms over {s['sessions_started']:g} session "
                   f"starts{share}")
    out.append(f"sessions mean {s['sessions_mean']:g} / max {s['max_sessions']} (occupancy {s['occupancy']:.0%}), "
               f"peak {s['sessions_peak']:g}; queue mean {s['queue_mean']:g}, peak {s['queue_peak']:g} / "
               f"{s['max_queue_depth']}")
    out.append(f"KV blocks used: peak {s['kv_used_peak']:.0%}, mean {s['kv_used_mean']:.0%} of "
               f"{s['kv_blocks_total']:g}" if s["kv_blocks_total"] else "KV blocks: no data")
    out.append(f"rejections: {', '.join(f'{k} {v:g}' for k, v in s['rejections'].items()) or 'none'}; "
               f"preemptions {s['preemptions']:g}; failed {s['requests']['failed']:g}; "
               f"memory used peak {s['memory_used_peak']:.0%}")
    if s["tps_per_request_p50"] is not None:
        out.append(f"decode P50 ~{s['tps_per_request_p50']:g} tok/s per request (target {s['target_tps']:g}), "
                   f"{s['aggregate_tps']:g} tok/s in aggregate")
    return out


def _decide(s: dict[str, Any], profile: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
    levers = profile["tensorrt_llm"]
    sessions = s["max_sessions"] or profile["inference"]["max_concurrent_sessions"]
    queue = s["max_queue_depth"]
    deadline_on = profile.get("admission", {}).get("mode") == "deadline"
    busy = s["occupancy"] >= BUSY or (s["sessions_peak"] >= sessions and s["queue_peak"] > 0)
    p99, p50 = s["ttft_p99_ms"], s["ttft_p50_ms"]
    ttft_high = s["first_tokens"] > 0 and (p99 > s["target_ttft_p99_ms"] or p50 > s["target_ttft_ms"])
    ttft_ok = s["first_tokens"] == 0 or not ttft_high
    share = s["queue_wait_share"] or 0.0

    def verdict(bottleneck: str, summary: str, change: dict[str, Any] | None) -> dict[str, Any]:
        return {"bottleneck": bottleneck, "summary": summary, "lever": change, "next": describe(change),
                "evidence": _evidence(s)}

    if s["requests"]["failed"] > 0 or s["memory_used_peak"] >= MEMORY_FULL:
        fraction = levers["free_gpu_memory_fraction"]
        return verdict("out_of_memory", f"{s['requests']['failed']:g} requests failed in the engine and memory peaked "
                       f"at {s['memory_used_peak']:.0%}: the KV cache takes more than the device can spare",
                       lever("tensorrt_llm.free_gpu_memory_fraction", fraction, round(max(0.05, fraction - 0.1), 2),
                             "a smaller KV cache leaves memory for activations and everything else on the device"))
    if s["preemptions"] > 0:
        new = fewer_sessions(sessions)
        return verdict("preemption", f"{s['preemptions']:g} sessions preempted in {s['window_s']:g} s: the KV blocks "
                       f"(peak {s['kv_used_peak']:.0%} used) cannot hold {sessions} sessions as they grow",
                       lever("inference.max_concurrent_sessions", sessions, new,
                             "fewer sessions share the same KV blocks, so a growing one no longer evicts another"))
    refused = s["rejections"].get("queue_full", 0) + s["rejections"].get("ttft_target_unmeetable", 0)
    if refused > 0:
        what = ", ".join(f"{k} {v:g}" for k, v in s["rejections"].items()
                         if k in ("queue_full", "ttft_target_unmeetable"))
        if queue == 0:
            change = lever("thresholds.max_queue_depth", 0, sessions,
                           "with no queue every request beyond the sessions is refused, even in a short burst")
        elif s["kv_used_peak"] < 0.8 and ttft_ok:
            change = lever("inference.max_concurrent_sessions", sessions, more_sessions(sessions),
                           f"TTFT meets its targets and KV peaked at {s['kv_used_peak']:.0%}: there is room for "
                           "more sessions")
        elif s["first_tokens"] and p99 <= 0.5 * s["target_ttft_p99_ms"]:
            change = lever("thresholds.max_queue_depth", queue, queue * 2,
                           "TTFT P99 is under half its target, so queued requests would still meet it")
        elif not deadline_on:
            change = lever("admission.mode", "off", "deadline",
                           "the box is saturated (TTFT at target, KV busy): refuse exactly the requests that would "
                           "miss the TTFT P99 target, instead of by queue length")
        else:
            change = None
        return verdict("overload", f"{refused:g} requests refused with 503 ({what}) in {s['window_s']:g} s"
                       + ("" if change else ": the box is saturated and the guards work as meant; no profile lever "
                          "adds capacity: fewer users or more hardware"), change)
    if ttft_high:
        if busy and share >= 0.5:
            change = (lever("admission.mode", "off", "deadline", "refuse at once what would miss the target instead "
                            "of letting it wait") if not deadline_on else
                      lever("thresholds.max_queue_depth", queue, max(1, queue // 2),
                            "a shorter queue refuses with Retry-After before the wait alone misses the target"))
            return verdict("queueing", f"TTFT above target and {share:.0%} of it is waiting for a session while "
                           f"every session is busy: more arrives than {sessions} sessions finish", change)
        if busy:
            if not levers["enable_chunked_context"]:
                change = lever("tensorrt_llm.enable_chunked_context", False, True,
                               "bounded steps let new prompts prefill between the running decodes")
            else:
                change = lever("inference.max_concurrent_sessions", sessions, fewer_sessions(sessions),
                               "a smaller batch: fewer sequences share each step, so each prefill gets more of it")
            return verdict("compute_bound", f"TTFT above target with sessions {s['occupancy']:.0%} busy and only "
                           f"{share:.0%} of TTFT spent queued: the steps are full, prefill competes with decodes",
                           change)
        if s["kv_used_peak"] >= KV_FULL or share >= 0.5:
            return verdict("memory_pressure", f"TTFT above target while sessions are only {s['occupancy']:.0%} busy "
                           f"and KV peaked at {s['kv_used_peak']:.0%}: requests wait for KV blocks, not for sessions",
                           lever("inference.max_concurrent_sessions", sessions, fewer_sessions(sessions),
                                 "fewer sessions leave each one the KV it needs (fp8 KV is the other way to "
                                 "make room)"))
        rate = s["prefill_tokens_per_s"]
        tokens = s["prompt_tokens_per_request"]
        alone = f"; {tokens:g}-token prompts at the measured {rate:g} tok/s prefill take {tokens / rate:.1f} s alone" \
            if rate and tokens else ""
        if tokens and levers["max_num_tokens"] < tokens / 2:
            change = lever("tensorrt_llm.max_num_tokens", levers["max_num_tokens"], levers["max_num_tokens"] * 2,
                           "fewer, larger steps per prompt: less per-step overhead in the prefill")
        else:
            change = None
        return verdict("prefill_bound", f"TTFT above target with sessions {s['occupancy']:.0%} busy, KV "
                       f"{s['kv_used_peak']:.0%} used and {share:.0%} queued: the prefill itself is slow{alone}"
                       + ("" if change else "; no profile lever speeds it up: shorter prompts or faster hardware"),
                       change)
    tps_p50 = s["tps_per_request_p50"]
    if tps_p50 is not None and tps_p50 < s["target_tps"]:
        if busy and sessions > 1:
            return verdict("compute_bound", f"decode ~{tps_p50:g} tok/s per request, under the {s['target_tps']:g} "
                           f"target, with sessions {s['occupancy']:.0%} busy: the batch shares the compute too thinly",
                           lever("inference.max_concurrent_sessions", sessions, fewer_sessions(sessions),
                                 "a smaller batch: each request gets a larger share of every step"))
        return verdict("hardware_limit", f"decode ~{tps_p50:g} tok/s per request, under the "
                       f"{s['target_tps']:g} target, "
                       f"with sessions only {s['occupancy']:.0%} busy: this is the single-stream rate of this hardware "
                       "and model; no profile lever raises it (targets.tps may be unrealistic here)", None)
    if s["first_tokens"] == 0 and s["sessions_peak"] > 0:
        return verdict("inconclusive", f"sessions were busy but no request got its first token in the "
                       f"{s['window_s']:g} s window: prompts take longer than the window; use a longer --window", None)
    if s["first_tokens"] == 0:
        return verdict("idle", f"no requests in the {s['window_s']:g} s window: nothing to diagnose; run "
                       "`forgectl bench` (or real traffic) while diagnosing", None)
    return verdict("healthy", "TTFT and decode rate meet the targets; no rejections, preemptions or failures", None)


def render(doc: dict[str, Any]) -> str:
    s = doc["stats"]
    lines = [f"forged diagnose: profile {doc['profile']}, {s['window_s']:g} s window, {s['samples']} scrapes",
             "", f"bottleneck: {doc['bottleneck']}", f"  {doc['summary']}", f"next lever: {doc['next']}"]
    if doc["lever"]:
        lines.append(f"  why: {doc['lever']['why']}")
    lines.append("evidence:")
    lines.extend(f"  - {e}" for e in doc["evidence"])
    return "\n".join(lines)
