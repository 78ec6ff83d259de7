"""`forgectl bench`: the seed's load test against a running forged, and the one-lever-at-a-time diff.

    forgectl bench                                  20 users, 20k-token prompts, one request each
    forgectl bench --users 3 --prompt-tokens 50 --max-tokens 8 --requests 9
    forgectl bench --scale 0.05 --duration 60 --save a.json --plot a.png
    forgectl bench --compare a.json b.json          which levers differ, and how each metric moved

Every simulated user is a thread that streams completions back to back over its own connection
(the daemon's UNIX socket by default, TCP with --url). Prompts are built to a target token length:
two calibration requests measure how many tokens the filler text costs through the daemon's own
`usage.prompt_tokens`, and every streamed request reports its real prompt length the same way.
TTFT is measured from just before the request is sent to the first streamed token; per-user TPS is
(tokens - 1) / (last token - first token), the daemon's own definition. The run also reads the
daemon's forge_ttft_seconds histogram before and after, and reports both. A user refused with 503
waits as Retry-After asks (at most 1 s) before its next request.

This module runs the load; bench_report.py renders, plots and compares what a run saved.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from forged.ctl.bench_report import FORMAT, PlotUnavailable, compare, import_pyplot, load, plot, render, render_compare
from forged.ctl.client import BadAnswer, Client, DaemonUnreachable, sse_payloads
from forged.ctl.promtext import Histogram, Scrape
from forged.targets import percentile

TEXT = ("The harbour master walked along the old stone pier while the evening tide came in slowly. "
        "Fishing boats returned one by one, their engines humming under a sky the colour of copper. "
        "A child on the quay counted gulls and lost track somewhere after forty. "
        "In the workshop behind the lighthouse, a clock repaired last winter kept perfect time. "
        "Rain had been promised for the night, but the wind carried only salt and the smell of tar. "
        "Somebody was frying onions in a kitchen above the chandlery, and the window was open. ")
WORDS = TEXT.split()


def add_parser(sub: Any) -> None:
    p = sub.add_parser("bench", help="load test: N concurrent users against the running daemon; "
                       "--compare two saved runs", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--users", type=int, default=20, help="concurrent users (default 20)")
    p.add_argument("--prompt-tokens", type=int, default=20000,
                   help="mean prompt length in tokens (default 20000, the seed's load)")
    p.add_argument("--prompt-spread", type=float, default=0.1,
                   help="prompt lengths are uniform in mean x (1 +- spread) (default 0.1; 0: all equal)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the prompt length, for small machines (e.g. 0.05: 20000 -> 1000)")
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (default 128; "
                   "ignore_eos is set so that every request generates exactly this many)")
    amount = p.add_mutually_exclusive_group()
    amount.add_argument("--requests", type=int, help="total requests (default: one per user)")
    amount.add_argument("--duration", type=float, help="keep every user busy for this many seconds instead")
    p.add_argument("--timeout", type=float, default=900.0, help="per-request timeout in seconds (default 900)")
    p.add_argument("--seed", type=int, default=0, help="seed for prompt lengths and prompt text (default 0)")
    p.add_argument("--save", metavar="FILE.json", help="write the full results, the profile and the engine "
                   "config as JSON (input for --compare)")
    p.add_argument("--plot", metavar="FILE.png", help="write a TTFT CDF and latency-over-time plot "
                   "(needs matplotlib: pip install 'forged[plot]')")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="compare two saved runs instead of running one")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    as_json = getattr(args, "json", False)
    if args.compare:
        try:
            a, b = (load(Path(f)) for f in args.compare)
        except (OSError, ValueError) as exc:
            print(f"forgectl: bench --compare: {exc}", file=sys.stderr)
            return 2
        diff = compare(a, b, *args.compare)
        print(json.dumps(diff, indent=2) if as_json else render_compare(diff))
        return 0
    problem = _check_args(args)
    if problem:
        print(f"forgectl: bench: {problem}", file=sys.stderr)
        return 2
    if args.plot:
        try:
            import_pyplot()
        except PlotUnavailable as exc:
            print(f"forgectl: bench: {exc}", file=sys.stderr)
            return 2
    client = Client.from_args(args)
    try:
        doc = run(client, Workload.from_args(args), progress=not args.no_progress)
    except (DaemonUnreachable, BadAnswer, BenchError) as exc:
        print(f"forgectl: bench: {exc}", file=sys.stderr)
        return 1
    if args.save:
        Path(args.save).write_text(json.dumps(doc, indent=1) + "\n")
    if args.plot:
        plot(doc, Path(args.plot))
    print(json.dumps(doc, indent=2) if as_json else render(doc))
    if args.save and not as_json:
        print(f"saved {args.save}")
    if args.plot and not as_json:
        print(f"plot  {args.plot}")
    return 0


def _check_args(args: argparse.Namespace) -> str | None:
    if args.users < 1:
        return "--users must be at least 1"
    if args.max_tokens < 1:
        return "--max-tokens must be at least 1"
    if not 0 <= args.prompt_spread < 1:
        return "--prompt-spread must be in [0, 1)"
    if args.scale <= 0:
        return "--scale must be positive"
    if round(args.prompt_tokens * args.scale) < 8:
        return "the prompt must be at least 8 tokens (--prompt-tokens x --scale)"
    if args.requests is not None and args.requests < 1:
        return "--requests must be at least 1"
    if args.duration is not None and args.duration <= 0:
        return "--duration must be positive"
    return None


class BenchError(Exception):
    """The run cannot go ahead (the workload does not fit the daemon, calibration failed)."""


@dataclass(frozen=True)
class Workload:
    users: int = 20
    prompt_tokens: int = 20000  # after --scale
    prompt_spread: float = 0.1
    max_tokens: int = 128
    requests: int | None = None
    duration_s: float | None = None
    timeout_s: float = 900.0
    seed: int = 0
    endpoint: str = "/v1/completions"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Workload:
        return cls(users=args.users, prompt_tokens=max(8, round(args.prompt_tokens * args.scale)),
                   prompt_spread=args.prompt_spread, max_tokens=args.max_tokens,
                   requests=None if args.duration else (args.requests or args.users),
                   duration_s=args.duration, timeout_s=args.timeout, seed=args.seed)

    @property
    def longest_prompt(self) -> int:
        return math.ceil(self.prompt_tokens * (1 + self.prompt_spread))


# ------------------------------------------------------------------ prompts of a target token length

class PromptBuilder:
    """Filler text cut to a target token count, calibrated through the daemon's usage field."""

    def __init__(self, client: Client, seed: int = 0) -> None:
        self.client = client
        self.seed = seed
        self.per_word = 1.0
        self.offset = 0.0
        self.calibration: list[dict[str, Any]] = []

    def _measure(self, words: int) -> int:
        body = {"prompt": self._text(words, 0), "max_tokens": 1, "temperature": 0}
        for attempt in range(5):
            sent = time.perf_counter()
            status, doc = self.client.post_json("/v1/completions", body, timeout=300)
            latency = time.perf_counter() - sent
            if status != 503 or attempt == 4:
                break
            # A daemon still busy (or with no queue) right after another run: wait as it asks.
            time.sleep(0.5 * (attempt + 1))
        if status != 200:
            message = doc.get("error", {}).get("message") if isinstance(doc, dict) else doc
            raise BenchError(f"calibration request failed: HTTP {status}: {message}")
        tokens = int(doc["usage"]["prompt_tokens"])
        self.calibration.append({"words": words, "prompt_tokens": tokens, "latency_s": round(latency, 4)})
        return tokens

    def calibrate(self, words_a: int = 24, words_b: int = 120) -> None:
        """Two requests: tokens for a short and a longer filler; a line through them."""
        a = self._measure(words_a)
        b = self._measure(words_b)
        self.per_word = max(0.1, (b - a) / (words_b - words_a))
        self.offset = a - self.per_word * words_a

    def _text(self, n_words: int, start: int) -> str:
        return " ".join(WORDS[(start + i) % len(WORDS)] for i in range(n_words))

    def build(self, target_tokens: int, index: int) -> str:
        """About `target_tokens` tokens (the usage field of each request gives the exact count).

        Each request starts at another place in the filler and carries its number, so that no two
        prompts are the same."""
        tag = f"Request {index}."
        words = max(1, round((target_tokens - self.offset) / self.per_word) - 3)
        return f"{tag} {self._text(words, (index * 7 + self.seed) % len(WORDS))}"


# ------------------------------------------------------------------ one request

@dataclass
class Result:
    index: int
    user: int
    target_prompt_tokens: int
    sent_s: float  # since the start of the run
    status: int = 0
    code: str | None = None
    message: str | None = None
    retry_after: str | None = None
    ttft_s: float | None = None
    latency_s: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    tps: float | None = None
    token_times_s: list[float] | None = None  # each token's arrival, seconds after sending

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.code is None and self.ttft_s is not None


def one_request(client: Client, workload: Workload, prompt: str, result: Result, t0: float) -> Result:
    body = {"prompt": prompt, "max_tokens": workload.max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}
    conn = client.connection(timeout=workload.timeout_s)
    sent = time.perf_counter()
    result.sent_s = sent - t0
    first = last = None
    times: list[float] = []
    try:
        conn.request("POST", workload.endpoint, body=json.dumps(body),
                     headers={**client.auth_headers(), "Content-Type": "application/json"})
        response = conn.getresponse()
        result.status = response.status
        if response.status != 200:
            data = response.read()
            result.retry_after = response.getheader("Retry-After")
            try:
                error = json.loads(data).get("error", {})
                result.code, result.message = error.get("code"), error.get("message")
            except (ValueError, AttributeError):
                result.code, result.message = None, data[:200].decode(errors="replace")
            result.code = result.code or f"http_{response.status}"
        else:
            for payload in sse_payloads(response):
                if payload == "[DONE]":
                    break
                if "error" in payload:
                    result.code = payload["error"].get("code") or "stream_error"
                    result.message = payload["error"].get("message")
                    break
                if payload.get("usage"):
                    result.prompt_tokens = payload["usage"]["prompt_tokens"]
                    result.completion_tokens = payload["usage"]["completion_tokens"]
                for choice in payload.get("choices", []):
                    if choice.get("token_ids"):
                        now = time.perf_counter()
                        first = now if first is None else first
                        last = now
                        times.append(now - sent)
    except OSError as exc:
        result.code = result.code or ("timeout" if "timed out" in str(exc) else "connection_error")
        result.message = str(exc)
    finally:
        conn.close()
    end = time.perf_counter()
    result.latency_s = end - sent
    if first is not None:
        result.ttft_s = first - sent
        result.completion_tokens = result.completion_tokens or len(times)
        if last is not None and len(times) > 1 and last > first:
            result.tps = (len(times) - 1) / (last - first)
    result.token_times_s = [round(t, 4) for t in times]
    return result


# ------------------------------------------------------------------ the run

class _Progress:
    """A plain-text progress bar on stderr: redrawn in place on a terminal, a line every 10 s otherwise."""

    def __init__(self, workload: Workload, results: list[Result], in_flight: list[int], enabled: bool) -> None:
        self.workload = workload
        self.results = results
        self.in_flight = in_flight
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.stop = threading.Event()
        self.t0 = time.monotonic()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        if self.enabled:
            self.thread.start()

    def line(self) -> str:
        w = self.workload
        elapsed = time.monotonic() - self.t0
        done = len(self.results)
        if w.duration_s:
            frac, count = min(1.0, elapsed / w.duration_s), f"{elapsed:5.0f}/{w.duration_s:.0f} s"
        else:
            total = w.requests or 1
            frac, count = done / total, f"{done}/{total}"
        width = 24
        bar = "#" * int(frac * width) + "-" * (width - int(frac * width))
        ok = [r for r in list(self.results) if r.ok]
        rejected = sum(1 for r in list(self.results) if r.status == 503)
        ttft = percentile([r.ttft_s for r in ok if r.ttft_s is not None], 50)
        return (f"bench [{bar}] {count}  ok {len(ok)}  503 {rejected}  "
                f"err {done - len(ok) - rejected}  in flight {self.in_flight[0]}  "
                f"ttft p50 {ttft:.2f} s  {elapsed:.0f} s")

    def _loop(self) -> None:
        last_line = time.monotonic()
        while not self.stop.wait(0.25 if self.tty else 1.0):
            if self.tty:
                sys.stderr.write("\r" + self.line() + "\x1b[K")
                sys.stderr.flush()
            elif time.monotonic() - last_line >= 10:
                last_line = time.monotonic()
                print(self.line(), file=sys.stderr, flush=True)

    def finish(self) -> None:
        if not self.enabled:
            return
        self.stop.set()
        self.thread.join()
        sys.stderr.write(("\r" if self.tty else "") + self.line() + ("\x1b[K\n" if self.tty else "\n"))
        sys.stderr.flush()


def _ttft_histogram(client: Client) -> tuple[Scrape, Histogram]:
    scrape = Scrape.parse(client.get_text("/metrics"))
    return scrape, scrape.histogram("forge_ttft_seconds")


def run(client: Client, workload: Workload, progress: bool = True) -> dict[str, Any]:
    status = client.get_json("/v1/status")
    if status.get("phase") != "ready":
        raise BenchError(f"forged is {status.get('phase')}, not ready")
    config = client.get_json("/v1/tensorrt-llm/config")
    context = int(status["model"]["context_length"])
    if workload.longest_prompt + workload.max_tokens > context:
        raise BenchError(f"prompts up to {workload.longest_prompt} tokens + {workload.max_tokens} output tokens "
                         f"do not fit the served context ({context} tokens); use a smaller --prompt-tokens or "
                         f"--scale (e.g. --scale {max(0.01, (context // 2) / max(workload.prompt_tokens, 1)):.2g})")
    builder = PromptBuilder(client, workload.seed)
    builder.calibrate()
    rng = random.Random(workload.seed)
    lo = workload.prompt_tokens * (1 - workload.prompt_spread)
    hi = workload.prompt_tokens * (1 + workload.prompt_spread)

    before_scrape, ttft_before = _ttft_histogram(client)
    results: list[Result] = []
    lock = threading.Lock()
    counter = [0]
    in_flight = [0]
    t0 = time.perf_counter()
    deadline = None if workload.duration_s is None else time.monotonic() + workload.duration_s
    bar = _Progress(workload, results, in_flight, progress)
    wall_start = time.time()

    total = workload.requests or workload.users

    def next_index() -> int | None:
        with lock:
            if deadline is not None:
                if time.monotonic() >= deadline:
                    return None
            elif counter[0] >= total:
                return None
            counter[0] += 1
            in_flight[0] += 1
            return counter[0] - 1

    def user(u: int) -> None:
        while True:
            index = next_index()
            if index is None:
                return
            with lock:
                target = round(rng.uniform(lo, hi)) if workload.prompt_spread else workload.prompt_tokens
            prompt = builder.build(target, index)
            result = one_request(client, workload, prompt, Result(index, u, target, 0.0), t0)
            with lock:
                results.append(result)
                in_flight[0] -= 1
            with lock:
                more = deadline is not None or counter[0] < total
            if result.status == 503 and more:
                # A refused user backs off as Retry-After asks (at most 1 s here), as a client should,
                # instead of spending the remaining requests on a daemon that just said it is full.
                time.sleep(_backoff(result.retry_after))

    threads = [threading.Thread(target=user, args=(u,), daemon=True, name=f"bench-user-{u}")
               for u in range(workload.users)]
    bar.start()
    interrupted = False
    try:
        for t in threads:
            t.start()
        for t in threads:
            while t.is_alive():
                t.join(0.2)
    except KeyboardInterrupt:
        interrupted = True
    finally:
        bar.finish()
    wall = time.perf_counter() - t0
    after_scrape, ttft_after = _ttft_histogram(client)
    targets = client.get_json("/v1/performance/targets")
    results.sort(key=lambda r: r.index)
    summary = summarize(results, wall)
    daemon_side = _daemon_side(before_scrape, after_scrape, ttft_before, ttft_after)
    doc = {
        "format": FORMAT,
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(wall_start)),
        "interrupted": interrupted,
        "daemon": {"where": client.where, "profile": status["profile"], "hardware": status["hardware"],
                   "model": status["model"], "sessions": status["sessions"], "queue": status["queue"],
                   "kv_cache": status["kv_cache"], "pending_restart": status.get("pending_restart", []),
                   "engine_config": config, "performance_targets": targets},
        "workload": asdict(workload),
        "calibration": {"tokens_per_word": round(builder.per_word, 4), "offset_tokens": round(builder.offset, 2),
                        "requests": builder.calibration},
        "summary": summary,
        "daemon_metrics": daemon_side,
        "checks": checks(summary, status["profile"]["targets"], workload, status),
        "requests": [asdict(r) for r in results],
    }
    return doc


def _backoff(retry_after: str | None) -> float:
    try:
        return min(1.0, max(0.0, float(retry_after or 1)))
    except ValueError:
        return 1.0


def summarize(results: list[Result], wall_s: float) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    ttft = [r.ttft_s for r in ok if r.ttft_s is not None]
    tps = [r.tps for r in ok if r.tps is not None]
    latency = [r.latency_s for r in ok if r.latency_s is not None]
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    targets = [r.target_prompt_tokens for r in results]
    rejected = Counter(r.code or "unknown" for r in results if r.status == 503)
    errors = Counter(f"{r.status or 'no answer'} {r.code}" for r in results if not r.ok and r.status != 503)
    tokens = sum(r.completion_tokens for r in ok)

    def ms(values: list[float], q: float) -> float | None:
        return round(percentile(values, q) * 1000, 1) if values else None

    return {
        "requests": len(results), "ok": len(ok), "rejected_503": sum(rejected.values()),
        "rejected_by_reason": dict(sorted(rejected.items())), "errors": sum(errors.values()),
        "errors_by_code": dict(sorted(errors.items())), "wall_s": round(wall_s, 3),
        "ttft_p50_ms": ms(ttft, 50), "ttft_p90_ms": ms(ttft, 90), "ttft_p99_ms": ms(ttft, 99),
        "ttft_mean_ms": round(sum(ttft) / len(ttft) * 1000, 1) if ttft else None,
        "ttft_max_ms": round(max(ttft) * 1000, 1) if ttft else None,
        "tps_per_user_p50": round(percentile(tps, 50), 2) if tps else None,
        "tps_per_user_p10": round(percentile(tps, 10), 2) if tps else None,
        "tps_per_user_min": round(min(tps), 2) if tps else None,
        "aggregate_tps": round(tokens / wall_s, 2) if wall_s > 0 else None,
        "completion_tokens": tokens,
        "latency_p50_ms": ms(latency, 50), "latency_p99_ms": ms(latency, 99),
        "prompt_tokens_target_mean": round(sum(targets) / len(targets), 1) if targets else None,
        "prompt_tokens_mean": round(sum(prompts) / len(prompts), 1) if prompts else None,
        "prompt_tokens_min": min(prompts) if prompts else None,
        "prompt_tokens_max": max(prompts) if prompts else None,
    }


def _daemon_side(before: Scrape, after: Scrape, ttft_before: Histogram, ttft_after: Histogram) -> dict[str, Any]:
    ttft = ttft_after.minus(ttft_before)
    wait = after.histogram("forge_queue_wait_seconds").minus(before.histogram("forge_queue_wait_seconds"))
    rejections = {k: v - before.labelled("forge_rejections_total", "reason").get(k, 0.0)
                  for k, v in after.labelled("forge_rejections_total", "reason").items()}
    return {
        "ttft_count": ttft.count, "ttft_sum_s": round(ttft.sum, 4),
        "ttft_mean_ms": None if ttft.mean is None else round(ttft.mean * 1000, 1),
        "ttft_p50_ms_estimate": None if ttft.count == 0 else round((ttft.quantile(0.5) or 0) * 1000, 1),
        "ttft_p99_ms_estimate": None if ttft.count == 0 else round((ttft.quantile(0.99) or 0) * 1000, 1),
        "ttft_buckets": [[("+Inf" if math.isinf(le) else le), c] for le, c in ttft.buckets],
        "queue_wait_mean_ms": None if wait.mean is None else round(wait.mean * 1000, 1),
        "preemptions": (after.value("forge_preemptions_total", 0.0) or 0.0)
        - (before.value("forge_preemptions_total", 0.0) or 0.0),
        "rejections_by_reason": {k: v for k, v in sorted(rejections.items()) if v},
    }


def checks(summary: dict[str, Any], targets: dict[str, Any], workload: Workload,
           status: dict[str, Any]) -> list[dict[str, Any]]:
    sessions = int(status["sessions"]["max"])
    queue = int(status["queue"]["max"])
    concurrent = min(workload.users, sessions)

    def check(name: str, value: Any, comparison: str, target: Any, note: str = "") -> dict[str, Any]:
        met = None
        if value is not None and target is not None:
            met = value <= target if comparison == "<=" else value >= target
        return {"name": name, "value": value, "comparison": comparison, "target": target, "met": met,
                "note": note}

    out = [
        check("ttft_p50_ms", summary["ttft_p50_ms"], "<=", targets["ttft_ms"], "targets.ttft_ms"),
        check("ttft_p90_ms", summary["ttft_p90_ms"], "<=", targets["ttft_p99_ms"],
              "no P90 target: checked against targets.ttft_p99_ms"),
        check("ttft_p99_ms", summary["ttft_p99_ms"], "<=", targets["ttft_p99_ms"], "targets.ttft_p99_ms"),
        check("tps_per_user_p50", summary["tps_per_user_p50"], ">=", targets["tps"], "targets.tps"),
        check("aggregate_tps", summary["aggregate_tps"], ">=", round(targets["tps"] * concurrent, 2),
              f"targets.tps x {concurrent} concurrent sessions"),
    ]
    if workload.users <= sessions + queue:
        out.append(check("rejected_503", summary["rejected_503"], "<=", 0,
                         f"{workload.users} users fit {sessions} sessions + {queue} queued"))
    else:
        out.append(check("rejected_503", summary["rejected_503"], "<=", None,
                         f"{workload.users} users exceed {sessions} sessions + {queue} queued: "
                         "queue_full 503s are the guard working"))
    return out
