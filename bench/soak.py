#!/usr/bin/env python3
"""Soak: hold mixed traffic at the profile's session limit for a long time and watch for leaks.

Starts a real daemon (the packaged cpu profile, as in bench_serving.py) and keeps one well-behaved
client per session busy with completions and chat, streamed and not, over TCP and the UNIX socket.
On top of that it injects trouble: streams cut mid-answer, requests abandoned by a client timeout,
and bursts that overflow the queue. Every interval it samples the daemon's RSS and open FDs
(/proc/PID), the p99 TTFT of the streams that started in that interval, the requests done, and the
errors by kind: *expected* (what was injected: cuts, timeouts, 503 queue_full during a burst) and
*unexpected* (anything else: a 5xx, a malformed answer, a refusal with no burst to explain it, a
transport error, a traceback in the daemon's log, counters that do not add up at the end).

    .venv/bin/python bench/soak.py [--duration 30m] [--interval 30] [--json out.json]

Exit status: 0 when RSS and FDs stayed flat (the least-squares trend after the warm-up projects less
than --rss-bound-mib and --fd-bound of growth over the measured span) and nothing unexpected
happened; 1 otherwise. Not run in CI: docs/benchmarks.md (Soak) has the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from conftest import Daemon, sse_events  # noqa: E402  (the same harness the integration tests use)

from forged.config import ModelSettings  # noqa: E402
from forged.engine.model_files import resolve_model  # noqa: E402
from forged.metrics import ADMITTED_OUTCOMES, OUTCOMES  # noqa: E402
from forged.targets import percentile  # noqa: E402

# Cut and abandoned requests in flight at once. With one client per session this keeps the queue
# far from full, so a queue_full outside a burst is a real finding, not the injector's own doing.
MAX_INJECTED_IN_FLIGHT = 2
PROMPTS = ["Write two sentences about lighthouses.", "List three colours of the sea.",
           "Explain rain to a child.", "Describe a quiet harbour at dawn.", "Name four birds of the coast."]


@dataclass
class Window:
    """What happened since the last sample."""

    done: int = 0  # well-behaved answers complete and valid
    ttft_s: list[float] = field(default_factory=list)
    expected: Counter[str] = field(default_factory=Counter)
    unexpected: Counter[str] = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)  # the first few unexpected errors, for the log


class Soak:
    def __init__(self, daemon: Daemon, clients: dict[str, httpx.AsyncClient], rng: random.Random,
                 stop_at: float) -> None:
        self.daemon = daemon
        self.clients = clients
        self.rng = rng
        self.stop_at = stop_at
        self.window = Window()
        self.bursts_in_flight = 0
        self.sent = 0
        self.side_tasks: set[asyncio.Future[None]] = set()  # injected requests still in flight
        status = daemon.status()
        # Enough at once to fill every session and the queue, and then some.
        self.burst_size = status["sessions"]["max"] + status["queue"]["max"] + 8

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    def unexpected(self, kind: str, detail: str) -> None:
        self.window.unexpected[kind] += 1
        if len(self.window.examples) < 5:
            self.window.examples.append(f"{kind}: {detail[:300]}")

    def request(self, *, stream: bool, max_tokens: int, ignore_eos: bool = False) -> tuple[str, str, dict[str, Any]]:
        rng = self.rng
        body: dict[str, Any] = {"max_tokens": max_tokens, "stream": stream, "ignore_eos": ignore_eos,
                                "temperature": rng.choice((0, 0.7)), "seed": rng.randrange(2**31)}
        if stream:
            body["stream_options"] = {"include_usage": True}
        if rng.random() < 0.5:
            route, body["messages"] = "chat/completions", [{"role": "user", "content": rng.choice(PROMPTS)}]
        else:
            route, body["prompt"] = "completions", rng.choice(PROMPTS)
        return rng.choice(("tcp", "unix")), route, body

    # ------------------------------------------------------------ traffic

    async def well_behaved(self) -> None:
        """One per session: keeps a session busy, backs off by Retry-After when refused."""
        while self.running():
            transport, route, body = self.request(stream=self.rng.random() < 0.6,
                                                  max_tokens=self.rng.randint(8, 48))
            retry_after = await self.one(transport, route, body, burst=False)
            if retry_after:
                await asyncio.sleep(min(retry_after, 10))

    async def injector(self) -> None:
        """Trouble every few seconds: a cut stream, an abandoned request, now and then a burst."""
        last_burst = time.monotonic()
        while self.running():
            await asyncio.sleep(self.rng.uniform(1.0, 4.0))
            if time.monotonic() - last_burst > 60:
                last_burst = time.monotonic()
                task = asyncio.ensure_future(self.burst())
            elif len(self.side_tasks) >= MAX_INJECTED_IN_FLIGHT:
                continue  # a slow machine must not pile injected requests into the queue
            elif self.rng.random() < 0.6:
                task = asyncio.ensure_future(self.cut())
            else:
                task = asyncio.ensure_future(self.abandon())
            self.side_tasks.add(task)
            task.add_done_callback(self.side_tasks.discard)

    async def burst(self) -> None:
        self.bursts_in_flight += 1
        try:
            await asyncio.gather(*(self.one(*self.request(stream=False, max_tokens=2), burst=True)
                                   for _ in range(self.burst_size)))
        finally:
            self.bursts_in_flight -= 1

    async def cut(self) -> None:
        transport, route, body = self.request(stream=True, max_tokens=64, ignore_eos=True)
        after = self.rng.randint(0, 40)
        self.sent += 1
        try:
            async with self.clients[transport].stream("POST", f"/v1/{route}", json=body) as r:
                if r.status_code != 200:
                    self.refused(r.status_code, r.headers, await r.aread(), burst=False)
                    return
                seen = 0
                async for line in r.aiter_lines():
                    if seen >= after:
                        break
                    seen += line.startswith("data: ")
            self.window.expected["cut_stream"] += 1
        except httpx.HTTPError as exc:
            self.unexpected("transport", repr(exc))

    async def abandon(self) -> None:
        transport, route, body = self.request(stream=False, max_tokens=64, ignore_eos=True)
        self.sent += 1
        try:
            r = await asyncio.wait_for(self.clients[transport].post(f"/v1/{route}", json=body),
                                       self.rng.uniform(0.5, 3.0))
        except TimeoutError:
            self.window.expected["client_timeout"] += 1
            return
        except httpx.HTTPError as exc:
            self.unexpected("transport", repr(exc))
            return
        if r.status_code != 200:
            self.refused(r.status_code, r.headers, r.content, burst=False)

    async def one(self, transport: str, route: str, body: dict[str, Any], *, burst: bool) -> int | None:
        """One request read to its end. Returns Retry-After when refused with 503."""
        self.sent += 1
        client = self.clients[transport]
        sent = time.monotonic()
        ttft: float | None = None
        try:
            if body["stream"]:
                lines: list[str] = []
                async with client.stream("POST", f"/v1/{route}", json=body) as r:
                    if r.status_code != 200:
                        return self.refused(r.status_code, r.headers, await r.aread(), burst)
                    async for line in r.aiter_lines():
                        if ttft is None and _has_token(line):
                            ttft = time.monotonic() - sent
                        lines.append(line)
                problem = _stream_problem(lines, body["max_tokens"])
            else:
                r = await client.post(f"/v1/{route}", json=body)
                if r.status_code != 200:
                    return self.refused(r.status_code, r.headers, r.content, burst)
                problem = _answer_problem(r.json(), route, body["max_tokens"])
        except httpx.HTTPError as exc:
            self.unexpected("transport", repr(exc))
            return None
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            problem = f"unparseable answer: {exc!r}"
        if problem:
            self.unexpected("malformed_answer", problem)
        elif not burst:
            self.window.done += 1
            if ttft is not None:
                self.window.ttft_s.append(ttft)
        else:
            self.window.expected["burst_served"] += 1
        return None

    def refused(self, status: int, headers: httpx.Headers, body: bytes, burst: bool) -> int | None:
        try:
            code = json.loads(body)["error"]["code"]
        except (ValueError, KeyError, TypeError):
            self.unexpected(f"http_{status}", body.decode(errors="replace"))
            return None
        retry_after = headers.get("retry-after", "")
        if status == 503 and code == "queue_full" and retry_after.isdigit():
            if burst:
                self.window.expected["queue_full_in_burst"] += 1
                return int(retry_after)
            if self.bursts_in_flight:
                self.window.expected["queue_full_behind_burst"] += 1
                return int(retry_after)
            self.unexpected("queue_full_without_burst", f"Retry-After {retry_after}")
            return int(retry_after)
        self.unexpected(f"http_{status}_{code}", body.decode(errors="replace"))
        return None

    def take_window(self) -> Window:
        window, self.window = self.window, Window()
        return window


def _has_token(line: str) -> bool:
    if not line.startswith("data: {"):
        return False
    payload = json.loads(line[len("data: "):])
    choices = payload.get("choices") or [{}]
    return bool(choices[0].get("text") or choices[0].get("delta", {}).get("content"))


def _usage_problem(usage: dict[str, int], max_tokens: int, finish: str) -> str | None:
    if usage["prompt_tokens"] < 1 or not 1 <= usage["completion_tokens"] <= max_tokens \
            or usage["total_tokens"] != usage["prompt_tokens"] + usage["completion_tokens"]:
        return f"bad usage {usage}"
    if finish == "length" and usage["completion_tokens"] != max_tokens:
        return f"finish_reason length after {usage['completion_tokens']} of {max_tokens} tokens"
    return None


def _answer_problem(answer: dict[str, Any], route: str, max_tokens: int) -> str | None:
    choice = answer["choices"][0]
    text = choice["message"]["content"] if route == "chat/completions" else choice["text"]
    if not isinstance(text, str) or choice["finish_reason"] not in ("stop", "length"):
        return f"incomplete answer {answer}"
    return _usage_problem(answer["usage"], max_tokens, choice["finish_reason"])


def _stream_problem(lines: list[str], max_tokens: int) -> str | None:
    events = list(sse_events(iter(lines)))
    if not events or events[-1] != "[DONE]":
        return f"stream does not end with [DONE]: {events[-2:]}"
    payloads = events[:-1]
    if any("error" in e for e in payloads):
        return f"error event in a stream: {[e for e in payloads if 'error' in e]}"
    finishes = [c["finish_reason"] for e in payloads for c in e["choices"] if c["finish_reason"]]
    usage = [e["usage"] for e in payloads if e.get("usage")]
    if len(finishes) != 1 or finishes[0] not in ("stop", "length") or len(usage) != 1:
        return f"stream without one finish_reason and one usage: {finishes}, {usage}"
    return _usage_problem(usage[0], max_tokens, finishes[0])


# ------------------------------------------------------------ the daemon process


def proc_sample(pid: int) -> tuple[int, int]:
    """RSS in bytes and open file descriptors of a process, from /proc."""
    rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return rss, len(os.listdir(f"/proc/{pid}/fd"))


def trend(ts: list[float], values: list[float]) -> float:
    """Least-squares slope of values over ts (units per second); 0 for fewer than 3 points."""
    if len(ts) < 3:
        return 0.0
    mt, mv = sum(ts) / len(ts), sum(values) / len(values)
    var = sum((t - mt) ** 2 for t in ts)
    return sum((t - mt) * (v - mv) for t, v in zip(ts, values, strict=True)) / var if var else 0.0


def metrics(daemon: Daemon) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(f"{daemon.url}/metrics", timeout=10).text):
        for s in family.samples:
            key = s.name + ("{" + ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items())) + "}" if s.labels else "")
            out[key] = s.value
    return out


def wait_idle(daemon: Daemon, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        status = daemon.status()
        if (status["sessions"]["active"], status["queue"]["depth"], status["kv_cache"]["blocks_used"],
                status["engine"]["open_sequences"]) == (0, 0, 0, 0) or time.monotonic() > deadline:
            return status
        time.sleep(0.5)


# ------------------------------------------------------------ the run


def parse_duration(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"expected seconds or a number with s, m or h, got {text!r}")
    return float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]]


async def run(daemon: Daemon, args: argparse.Namespace) -> dict[str, Any]:
    assert daemon.proc is not None
    pid = daemon.proc.pid
    sessions = daemon.status()["sessions"]["max"]
    limits = httpx.Limits(max_connections=128, max_keepalive_connections=32)
    samples: list[dict[str, Any]] = []
    started = time.monotonic()
    async with httpx.AsyncClient(base_url=daemon.url, timeout=300, limits=limits) as tcp, \
            httpx.AsyncClient(base_url="http://forged", timeout=300,
                              transport=httpx.AsyncHTTPTransport(uds=str(daemon.socket_path), limits=limits)) as unix:
        soak = Soak(daemon, {"tcp": tcp, "unix": unix}, random.Random(args.seed), started + args.duration)
        tasks = [asyncio.ensure_future(soak.well_behaved()) for _ in range(sessions)]
        tasks.append(asyncio.ensure_future(soak.injector()))
        total_done = 0
        print(f"{'t_s':>6} {'rss_MiB':>8} {'fds':>4} {'ttft_p99_ms':>11} {'done':>5} {'total':>6} "
              f"{'expected':>8} {'unexpected':>10}  sessions/queue")
        while soak.running():
            await asyncio.sleep(min(args.interval, max(soak.stop_at - time.monotonic(), 0.1)))
            if daemon.proc.poll() is not None:
                soak.unexpected("daemon_exited", f"exit status {daemon.proc.returncode}")
                samples.append({"t_s": round(time.monotonic() - started, 1), "daemon_exited": True})
                break
            window = soak.take_window()
            rss, fds = proc_sample(pid)
            status = await asyncio.to_thread(daemon.status)
            total_done += window.done
            sample = {"t_s": round(time.monotonic() - started, 1), "rss_bytes": rss, "fds": fds,
                      "ttft_p99_ms": round(percentile(window.ttft_s, 99) * 1000, 1) if window.ttft_s else None,
                      "done": window.done, "total_done": total_done, "requests_sent": soak.sent,
                      "sessions": status["sessions"]["active"], "queue": status["queue"]["depth"],
                      "expected": dict(window.expected), "unexpected": dict(window.unexpected),
                      "unexpected_examples": window.examples}
            samples.append(sample)
            ttft = "-" if sample["ttft_p99_ms"] is None else f"{sample['ttft_p99_ms']:.0f}"
            print(f"{sample['t_s']:>6.0f} {rss / 2**20:>8.1f} {fds:>4} {ttft:>11} {window.done:>5} {total_done:>6} "
                  f"{sum(window.expected.values()):>8} {sum(window.unexpected.values()):>10}  "
                  f"{sample['sessions']}/{sample['queue']}", flush=True)
            for example in window.examples:
                print(f"       unexpected: {example}", flush=True)
        # Let what is in flight finish or time out.
        await asyncio.wait(tasks, timeout=300)
        if soak.side_tasks:
            await asyncio.wait(soak.side_tasks, timeout=300)
        await asyncio.sleep(4)
        late = soak.take_window()
    return {"samples": samples, "late": {"done": late.done, "expected": dict(late.expected),
                                         "unexpected": dict(late.unexpected), "examples": late.examples},
            "requests_sent": soak.sent}


def verdict(daemon: Daemon, result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    """Why the soak failed; empty when it passed."""
    reasons: list[str] = []
    samples = [s for s in result["samples"] if "rss_bytes" in s]
    unexpected: Counter[str] = Counter(result["late"]["unexpected"])
    for s in result["samples"]:
        unexpected.update(s.get("unexpected", {}))
    if unexpected:
        reasons.append(f"unexpected errors: {dict(unexpected)}")
    measured = [s for s in samples if s["t_s"] >= args.warmup]
    if len(measured) >= 3:
        ts = [s["t_s"] for s in measured]
        span = ts[-1] - ts[0]
        rss_growth = trend(ts, [s["rss_bytes"] for s in measured]) * span
        fd_growth = trend(ts, [s["fds"] for s in measured]) * span
        result["trend"] = {"span_s": span, "rss_growth_mib": round(rss_growth / 2**20, 2),
                           "fd_growth": round(fd_growth, 2)}
        if rss_growth > args.rss_bound_mib * 2**20:
            reasons.append(f"RSS trends up: {rss_growth / 2**20:.1f} MiB over {span:.0f} s "
                           f"(bound {args.rss_bound_mib} MiB)")
        if fd_growth > args.fd_bound:
            reasons.append(f"open FDs trend up: {fd_growth:.1f} over {span:.0f} s (bound {args.fd_bound})")
    else:
        reasons.append(f"fewer than 3 samples after the {args.warmup:.0f} s warm-up: no trend can be measured")
    if daemon.proc is not None and daemon.proc.poll() is None:
        status = wait_idle(daemon)
        left = {k: v for k, v in (("sessions", status["sessions"]["active"]), ("queue", status["queue"]["depth"]),
                                  ("kv_blocks", status["kv_cache"]["blocks_used"]),
                                  ("open_sequences", status["engine"]["open_sequences"])) if v}
        if left:
            reasons.append(f"not idle after the run: {left}")
        m = metrics(daemon)
        outcomes = {o: m[f'forge_requests_total{{outcome="{o}"}}'] for o in OUTCOMES}
        result["daemon_counters"] = {"admitted": m["forge_requests_admitted_total"], **outcomes,
                                     "preemptions": m["forge_preemptions_total"]}
        if m["forge_requests_admitted_total"] != sum(outcomes[o] for o in ADMITTED_OUTCOMES):
            reasons.append(f"admitted != {' + '.join(ADMITTED_OUTCOMES)}: {result['daemon_counters']}")
        if outcomes["failed"]:
            reasons.append(f"{outcomes['failed']:.0f} requests failed in the engine")
    log = daemon.log_path.read_text(errors="replace")
    if "Traceback" in log:
        reasons.append("the daemon log has a traceback")
    return reasons


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=parse_duration, default=parse_duration("30m"),
                        help="how long to hold the traffic: seconds, or 90s / 30m / 2h (default 30m)")
    parser.add_argument("--interval", type=parse_duration, default=30.0, help="seconds between samples (30)")
    parser.add_argument("--warmup", type=parse_duration, default=None,
                        help="samples before this are left out of the trend (default: 10%% of the duration, "
                             "at least one interval)")
    parser.add_argument("--rss-bound-mib", type=float, default=16.0,
                        help="fail when RSS trends up by more than this over the measured span (16)")
    parser.add_argument("--fd-bound", type=float, default=4.0,
                        help="fail when open FDs trend up by more than this over the measured span (4)")
    parser.add_argument("--seed", type=int, default=1, help="seed of the traffic mix (1)")
    parser.add_argument("--profile", type=json.loads, default=None,
                        help='JSON overrides of the cpu profile, e.g. \'{"llama_cpp": {"n_threads": 1}}\'')
    parser.add_argument("--json", type=Path, help="write the samples and the verdict here")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = max(args.interval, args.duration / 10)

    model, _ = resolve_model(ModelSettings(), REPO / "build" / "test-state")
    daemon = Daemon(Path(tempfile.mkdtemp(prefix="forged-soak-")), model, profile=args.profile).start()
    began = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    try:
        print(f"soak: {args.duration:.0f} s, sample every {args.interval:.0f} s, warm-up {args.warmup:.0f} s; "
              f"daemon pid {daemon.proc.pid if daemon.proc else '?'}, log {daemon.log_path}", flush=True)
        result = asyncio.run(run(daemon, args))
        reasons = verdict(daemon, result, args)
    finally:
        daemon.stop()
    report = {"command": " ".join(sys.argv), "date": began,
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                         f"load average at the end {os.getloadavg()[0]:.1f}",
              "args": {k: v for k, v in vars(args).items() if k != "json"}, **result,
              "verdict": "pass" if not reasons else "fail", "reasons": reasons}
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    print(f"\nrequests sent {result['requests_sent']}; daemon counters {result.get('daemon_counters')}; "
          f"trend {result.get('trend')}")
    print(f"verdict: {report['verdict']}" + "".join(f"\n  - {r}" for r in reasons))
    return 0 if not reasons else 1


if __name__ == "__main__":
    sys.exit(main())
