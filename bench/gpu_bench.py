#!/usr/bin/env python3
"""The seed scenario at full scale on a CUDA machine: 20 users x ~20k-token prompts, 64 new tokens;
and the same users holding multi-turn conversations about their own ~20k-token documents.

Not part of CI. One command on a machine with an NVIDIA GPU, the CUDA libllama and llama-server
from the GPU kit (../shared/gpu), and llama-cpp-python's Python package on PYTHONPATH:

    python3 bench/gpu_bench.py --kit-lib DIR --llama-server DIR/llama-server --gguf-py DIR/gguf-py \\
        --out results/ [--scenarios auto burst multi_turn decode] [--shapes 1b 8b] [--users 20] \\
        [--prompt-tokens 20000] [--turns 4] [--budget-s 540]

For each model shape it writes a random-weight Llama GGUF (speed depends on shape, not values), then:
  auto        forged started unchanged (auto profile, READY over a real NOTIFY_SOCKET) and one
              prompt's prefill rate alone (the physical floor of the burst)
  burst       each of --configs, once per --spreads (all users at once; arrivals spread over 10 s)
  multi_turn  each of --turn-configs: every user holds a conversation about its own document for
              --turns turns, resending the whole history each turn (bench/loadgen.py)
  decode      each of --decode-configs: 128-token prompts, --decode-tokens new tokens, all at once
The configurations:
  untuned   forged, fp16 KV, no chunking, no session limit, no queue limit (the 85 s shape)
  tuned     forged, the Thor-like profile: fp8->q8_0 KV, chunked context, session limit, queue depth
  deadline  tuned + deadline admission against the 2 s TTFT P99 target
  tuned-fp16  tuned with llama-server's KV dtype
  llama-server  the kit's llama-server, same model, same load, -np = users, f16 KV, flash attention
  llama-server-q8  the same with q8_0 KV, tuned's KV dtype
  llama-server-nocache  llama-server with --cache-ram 0 (no host-RAM prompt cache; its slots keep their KV)
and reports TTFT P50/P99 (multi_turn: turn 1 and later turns apart), TPS per user, aggregate tok/s,
rejections by reason, goodput (answers within the 2 s target per second), peak GPU memory (NVML), the
worst inter-token gap against the median, and the physical floor; then a compact table of it all.
The device allows 10 minutes a command: a run does not start once --budget-s seconds have passed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import yaml
from loadgen import (
    PREFIX_CACHE_COUNTERS,
    counter_deltas,
    metric_totals,
    pct,
    run_conversations,
    stream,
    summarize_turns,
)
from servers import Server, free_port, llama_server_argv

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 2.0
# Each llama-server configuration: its arguments beyond the shared ones (start_server).
LLAMA_SERVER_CONFIGS = {"llama-server": (), "llama-server-q8": ("-ctk", "q8_0", "-ctv", "q8_0"),
                        "llama-server-nocache": ("--cache-ram", "0")}
FORGED_CONFIGS = ("untuned", "tuned", "deadline", "tuned-fp16")  # profile_for's
FORGED_COUNTERS = ("forge_preemptions_total", *PREFIX_CACHE_COUNTERS)


class GpuMemorySampler:
    """Peak used GPU memory (NVML v2) over a run, sampled every 100 ms: `peaks` per visible GPU (NVML
    order), and `peak`, the highest sum over them (GPU 0's on a one-GPU machine)."""

    def __init__(self) -> None:
        import pynvml
        self.nvml = pynvml
        self.peak = 0
        self.peaks: list[int] = []
        try:
            pynvml.nvmlInit()
            self.handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        except pynvml.NVMLError:
            self.handles = []  # no GPU (a dry run on a CPU box): peak memory reads 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def used(self) -> list[int]:
        out = []
        for handle in self.handles:
            try:
                out.append(self.nvml.nvmlDeviceGetMemoryInfo(handle, version=self.nvml.nvmlMemory_v2).used)
            except self.nvml.NVMLError:
                out.append(self.nvml.nvmlDeviceGetMemoryInfo(handle).used)
        return out

    def _sample(self) -> None:
        used = self.used()
        self.peaks = [max(a, b) for a, b in zip(self.peaks, used, strict=True)] if self.peaks else used
        self.peak = max(self.peak, sum(used))

    def __enter__(self) -> GpuMemorySampler:
        self.peak, self.peaks = 0, []
        self._sample()
        self._stop.clear()

        def run() -> None:
            while not self._stop.is_set():
                self._sample()
                time.sleep(0.1)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()


def prompts(users: int, tokens: int) -> list[str]:
    # The random models' vocabulary is byte fallback: one non-space character is about one token.
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [(f"user{i}:" + "".join(letters[(i + j) % 26] for j in range(tokens)))[:tokens] for i in range(users)]


def run_load(url: str, texts: list[str], new_tokens: int, spread_s: float, llama_server: bool
             ) -> tuple[list[dict[str, Any]], float]:
    body_extra = {"n_predict": new_tokens} if llama_server else {}

    async def one(client: httpx.AsyncClient, i: int, text: str) -> dict[str, Any]:
        await asyncio.sleep(spread_s * i / max(len(texts) - 1, 1))
        return await stream(client, url, "/v1/completions", {"prompt": text, "max_tokens": new_tokens,
                                                             "temperature": 0, "ignore_eos": True, **body_extra})

    async def go() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=len(texts) + 8)
        async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
            return await asyncio.gather(*(one(client, i, t) for i, t in enumerate(texts)))

    started = time.perf_counter()
    results = asyncio.run(go())
    return results, time.perf_counter() - started


def summarize(results: list[dict[str, Any]], wall: float, prefill_tok_s: float | None, prompt_tokens: int
              ) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == 200 and not r.get("code") and r["arrivals"]]
    ttfts = sorted(r["arrivals"][0] - r["sent"] for r in ok)
    rejected: dict[str, int] = {}
    for r in results:
        if r["status"] != 200 or r.get("code"):
            rejected[r["code"]] = rejected.get(r["code"], 0) + 1
    tps_user = [(len(r["arrivals"]) - 1) / (r["arrivals"][-1] - r["arrivals"][0])
                for r in ok if len(r["arrivals"]) > 1 and r["arrivals"][-1] > r["arrivals"][0]]
    tokens = sum(len(r["arrivals"]) for r in ok)
    gaps = [b - a for r in ok for a, b in itertools.pairwise(r["arrivals"])]
    # Aggregate decode rate while every served stream is past its first token.
    decode_rate = None
    if ok:
        start = max(r["arrivals"][0] for r in ok)
        end = min(r["arrivals"][-1] for r in ok)
        if end > start:
            n = sum(sum(1 for t in r["arrivals"] if start <= t <= end) for r in ok)
            decode_rate = n / (end - start)

    within = sum(1 for t in ttfts if t <= TARGET_S)
    floor = None
    if prefill_tok_s:
        # Request k (in arrival order) cannot see its first token before k prompts are prefilled.
        floor = [prompt_tokens * (k + 1) / prefill_tok_s for k in range(len(results))]
    return {
        "served": len(ok), "rejected": rejected, "wall_s": round(wall, 2),
        "ttft_p50_s": pct(ttfts, 50), "ttft_p99_s": pct(ttfts, 99), "ttft_max_s": ttfts[-1] if ttfts else None,
        "within_2s": within, "goodput_per_s": round(within / wall, 3),
        "tps_per_user_p50": statistics.median(tps_user) if tps_user else None,
        "aggregate_tok_s": round(tokens / wall, 1), "decode_tok_s_all_streams": decode_rate,
        "median_gap_ms": statistics.median(gaps) * 1000 if gaps else None,
        "worst_gap_ms": max(gaps) * 1000 if gaps else None,
        "worst_over_median": (max(gaps) / statistics.median(gaps)) if gaps else None,
        "floor_ttft_p50_s": statistics.median(floor) if floor else None,
    }


def forged_config(root: Path, port: int, model: Path, profile: dict[str, Any] | None) -> Path:
    cfg = root / "etc"
    cfg.mkdir(parents=True, exist_ok=True)
    profiles = yaml.safe_load((REPO / "etc/forged/sku_profiles.yaml").read_text())
    settings: dict[str, Any] = {"listen": {"http": {"port": port}, "unix": {"path": str(root / "forged.sock")}},
                                "model": {"path": str(model)}, "server": {"drain_timeout_s": 5}}
    if profile is not None:
        profiles["profiles"]["bench"] = profile
        settings["profile"] = "bench"
    (cfg / "forged.yaml").write_text(yaml.safe_dump(settings))
    (cfg / "sku_profiles.yaml").write_text(yaml.safe_dump(profiles))
    return cfg


def notify_socket(path: Path) -> tuple[socket.socket, list[str]]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    got: list[str] = []

    def read() -> None:
        while True:
            try:
                got.append(sock.recv(4096).decode())
            except OSError:
                return

    threading.Thread(target=read, daemon=True).start()
    return sock, got


def profile_for(name: str, users: int, context: int, split_mode: str | None = None) -> dict[str, Any]:
    split = {"split_mode": split_mode} if split_mode else {}
    common = {"engine": "llama_cpp", "llama_cpp": {"n_gpu_layers": -1, "n_ubatch": 512, **split},
              "targets": {"ttft_ms": 500, "ttft_p99_ms": 2000, "tps": 60}}
    if name == "untuned":
        return {**common, "tensorrt_llm": {"kv_cache_dtype": "fp16", "tokens_per_block": 64,
                                           "enable_chunked_context": False, "max_num_tokens": 65536,
                                           "scheduler_policy": "guaranteed_no_evict"},
                "inference": {"max_concurrent_sessions": users, "max_seq_len": context},
                "thresholds": {"max_queue_depth": 1000}}
    # Thor-like: fp8 (q8_0) KV, chunked context, a session limit and a queue depth. On the H200 a
    # 2048-token chunk is a ~55 ms step, which keeps running streams smooth; per-session KV streams
    # keep each sequence's attention to its own 20k cells.
    tuned = {**common, "tensorrt_llm": {"kv_cache_dtype": "fp8", "tokens_per_block": 64,
                                        "enable_chunked_context": True, "max_num_tokens": 2048,
                                        "scheduler_policy": "max_utilization"},
             "inference": {"max_concurrent_sessions": users, "max_seq_len": context},
             "thresholds": {"max_queue_depth": 10},
             "llama_cpp": {"n_gpu_layers": -1, "n_ubatch": 512, "kv_unified": False, **split}}
    if name == "deadline":
        tuned["admission"] = {"mode": "deadline"}
    if name == "tuned-fp16":  # the tuned scheduler with llama-server's KV dtype: separates the two effects
        tuned["tensorrt_llm"] = {**tuned["tensorrt_llm"], "kv_cache_dtype": "fp16"}
    return tuned


def start_server(args: argparse.Namespace, name: str, model: Path, root: Path, env: dict[str, str],
                 context: int) -> Server:
    """One configuration's server on a free port, with `context` tokens per session (slot), logging to
    the results folder."""
    port = free_port()
    log = args.out / f"{root.name}.log"
    if name in LLAMA_SERVER_CONFIGS:
        argv = llama_server_argv(args.llama_server, model, port, slots=args.users, ctx_per_slot=context,
                                 extra=("-fa", "on", "-ngl", "99", "--no-warmup", *LLAMA_SERVER_CONFIGS[name],
                                        *(("-sm", args.split_mode) if args.split_mode else ())))
        return Server(argv, env, port, log, "/health")
    cfg = forged_config(root, port, model, profile_for(name, args.users, context, args.split_mode))
    return Server([sys.executable, "-m", "forged", "--config-dir", str(cfg), "run"],
                  dict(env, FORGED_RUN_DIR=str(root), FORGED_STATE_DIR=str(root / "state")), port, log, "/readyz")


@contextlib.contextmanager
def serving(args: argparse.Namespace, name: str, model: Path, root: Path, env: dict[str, str], context: int
            ) -> Iterator[Server]:
    """A configuration's server, started and ready; with --py-spy, the tuned configuration's step loop
    is profiled while it serves (folded stacks next to the results)."""
    server = start_server(args, name, model, root, env, context)
    profiler = None
    try:
        server.wait_ready()
        if args.py_spy and name == "tuned":
            profiler = start_profile(args.py_spy, server, args.out / f"{root.name}.folded")
        yield server
    finally:
        stop_profile(profiler)
        server.stop()


def forged_counters(server: Server) -> dict[str, float]:
    """forged's preemption and prefix-cache counters (those its /metrics has); {} for llama-server."""
    if server.ready_route != "/readyz":
        return {}
    with contextlib.suppress(httpx.HTTPError, ValueError):
        return metric_totals(httpx.get(server.url + "/metrics", timeout=10).text, FORGED_COUNTERS)
    return {}


def start_profile(py_spy: Path, server: Server, out: Path) -> subprocess.Popen[bytes]:
    """Sample every thread of the forged process, Python and native frames, idle included, until stopped."""
    return subprocess.Popen([str(py_spy), "record", "--native", "--threads", "--idle", "--format", "raw",
                             "--rate", "200", "--output", str(out), "--pid", str(server.proc.pid)],
                            stdout=subprocess.DEVNULL, stderr=out.with_suffix(".pyspy.log").open("wb"))


def stop_profile(profiler: subprocess.Popen[bytes] | None) -> None:
    if profiler is not None and profiler.poll() is None:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            profiler.wait(60)
        except subprocess.TimeoutExpired:
            profiler.kill()


def auto_probe(args: argparse.Namespace, model: Path, root: Path, env: dict[str, str], text: str
               ) -> dict[str, Any]:
    """forged started unchanged: auto profile (generic_gpu by NVML), READY over a real NOTIFY_SOCKET; and
    one prompt's TTFT on the idle daemon (the prefill rate alone, the burst's physical floor)."""
    port = free_port()
    cfg = forged_config(root, port, model, None)
    sock, notes = notify_socket(root / "notify.sock")
    server = Server([sys.executable, "-m", "forged", "--config-dir", str(cfg), "run"],
                    dict(env, NOTIFY_SOCKET=str(root / "notify.sock"), FORGED_RUN_DIR=str(root),
                         FORGED_STATE_DIR=str(root / "state")), port, args.out / f"forged-{root.name}.log", "/readyz")
    try:
        load_s = server.wait_ready()
        time.sleep(0.5)
        status = httpx.get(server.url + "/v1/status", timeout=10).json()
        config = httpx.get(server.url + "/v1/tensorrt-llm/config", timeout=10).json()
        r = run_load(server.url, [text], 1, 0.0, False)[0][0]
        alone_ttft = r["arrivals"][0] - r["sent"]
    finally:
        server.stop()
        sock.close()
    return {"profile": status["profile"]["name"], "hardware": status["hardware"],
            "kv_cache": status["kv_cache"], "ready_after_s": round(load_s, 1),
            "notify": [n.split("\n")[0] for n in notes][:6], "ready_seen": any("READY=1" in n for n in notes),
            "llama_context_params": config.get("llama_context_params"),
            "llama_model_params": config.get("llama_model_params"), "placement": status.get("placement"),
            "alone_ttft_s": alone_ttft, "prefill_tok_s_alone": args.prompt_tokens / alone_ttft}


def decode_summary(results: list[dict[str, Any]], wall: float) -> dict[str, Any]:
    """Aggregate decode tok/s while every stream is past its first token."""
    ok = [r for r in results if r["status"] == 200 and not r.get("code") and len(r["arrivals"]) > 1]
    first = max(r["arrivals"][0] for r in ok)
    last = min(r["arrivals"][-1] for r in ok)
    inside = sum(sum(1 for t in r["arrivals"] if first <= t <= last) for r in ok)
    return {"served": len(ok), "wall_s": round(wall, 2),
            "aggregate_decode_tok_s": round(inside / (last - first), 1) if last > first else None,
            "tokens": sum(len(r["arrivals"]) for r in ok)}


def turn_context(args: argparse.Namespace) -> int:
    """Tokens per session for a conversation: the document, every question and answer, and a margin.
    A random model's answer can take more tokens when the client resends it as text than it took to
    generate (its pieces re-tokenize into bytes), hence 8 per generated token."""
    return args.doc_tokens + args.turns * (8 * args.new_tokens + 64) + 512


def print_table(report: dict[str, Any]) -> None:
    """The compact summary: one line per run, the figures the issues and docs/benchmarks.md compare."""
    def f(value: Any, digits: int = 2) -> str:
        return "-" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)

    for shape, shape_report in report["shapes"].items():
        runs = shape_report["runs"]
        print(f"\n== {shape}: {report['users']} users, {report['prompt_tokens']}-token prompts, "
              f"{report['new_tokens']} new tokens", flush=True)
        if "auto" in shape_report:
            a = shape_report["auto"]
            print(f"auto: profile {a['profile']}, one prompt alone TTFT {f(a['alone_ttft_s'], 3)} s "
                  f"({f(a['prefill_tok_s_alone'], 0)} tok/s)")
        rows = [(k, v) for k, v in runs.items() if "/turns" not in k and "/decode" not in k]
        if rows:
            print(f"{'burst run':34} {'served':>6} {'TTFT P50':>9} {'TTFT P99':>9} {'<=2s/s':>7} {'gap/median':>11}")
        for key, r in rows:
            if "error" in r or "skipped" in r:
                print(f"{key:34} {r.get('error') or r.get('skipped')}")
                continue
            print(f"{key:34} {r['served']:>6} {f(r['ttft_p50_s']):>9} {f(r['ttft_p99_s']):>9} "
                  f"{f(r['goodput_per_s'], 3):>7} {f(r['worst_over_median'], 1):>11}")
        rows = [(k, v) for k, v in runs.items() if "/turns" in k]
        if rows:
            print(f"{'multi-turn run':34} {'turn-1 P50/P99':>15} {'later P50/P99':>15} {'<=2s/s':>7} "
                  f"{'prompt tok':>10} {'cached':>9} {'prefix hits':>11}")
        for key, r in rows:
            if "error" in r or "skipped" in r:
                print(f"{key:34} {r.get('error') or r.get('skipped')}")
                continue
            hits = r.get("forged_counters", {}).get("forge_prefix_cache_hits_total")
            print(f"{key:34} {f(r['turn1_ttft_p50_s']):>7}/{f(r['turn1_ttft_p99_s']):<7} "
                  f"{f(r['later_ttft_p50_s'], 3):>7}/{f(r['later_ttft_p99_s'], 3):<7} "
                  f"{f(r['within_target_per_s'], 3):>7} {f(r['prompt_tokens_sent']):>10} "
                  f"{f(r['cached_tokens_reported']):>9} {f(hits, 0):>11}")
        for key, r in runs.items():
            if "/decode" in key:
                print(f"{key:34} decode {f(r.get('aggregate_decode_tok_s'), 1)} tok/s"
                      + (f" {r.get('error') or r.get('skipped')}" if "error" in r or "skipped" in r else ""))


class Bench:
    """One command's runs: the servers it starts, the time budget, and the report, written after every run."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.started = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="gpubench-"))
        self.env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(args.kit_lib), PYTHONUNBUFFERED="1",
                        LD_LIBRARY_PATH=f"{args.kit_lib}:{os.environ.get('LD_LIBRARY_PATH', '')}")
        self.sampler = GpuMemorySampler()
        self.report: dict[str, Any] = {
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "users": args.users,
            "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "turns": args.turns,
            "doc_tokens": args.doc_tokens, "shapes": {}}

    def save(self) -> None:
        (self.args.out / "gpu_bench.json").write_text(json.dumps(self.report, indent=2))

    def run(self, shape: str, key: str, name: str, model: Path, context: int,
            measure: Callable[[Server], dict[str, Any]]) -> None:
        """One run on a fresh server of configuration `name`, unless the time budget is spent."""
        args = self.args
        if args.budget_s and time.monotonic() - self.started > args.budget_s:
            summary: dict[str, Any] = {"skipped": f"past --budget-s {args.budget_s:g}"}
        else:
            try:
                root = self.work / f"{shape}-{key.replace('/', '-')}"
                with serving(args, name, model, root, self.env, context) as server:
                    before = forged_counters(server)
                    with self.sampler:
                        summary = measure(server)
                    summary["forged_counters"] = counter_deltas(before, forged_counters(server))
                    summary["peak_gpu_memory_gib"] = round(self.sampler.peak / 2**30, 2)
                    summary["peak_gpu_memory_gib_per_gpu"] = [round(b / 2**30, 2) for b in self.sampler.peaks]
            except Exception as exc:  # keep the other runs going; the report says what failed
                summary = {"error": repr(exc)[:500]}
        self.report["shapes"][shape]["runs"][key] = summary
        print(key, json.dumps(summary), flush=True)
        self.save()

    def shape(self, shape: str) -> None:
        """Every scenario asked for, on a random-weight GGUF of this shape."""
        args = self.args
        gguf_dir = args.gguf_dir or self.work
        gguf_dir.mkdir(parents=True, exist_ok=True)
        model = gguf_dir / f"random-{shape}.gguf"
        t0 = time.monotonic()
        if not model.exists():
            subprocess.run([sys.executable, str(args.random_gguf), str(args.gguf_py), str(model), shape],
                           check=True, stdout=subprocess.DEVNULL)
        shape_report: dict[str, Any] = {"gguf_write_s": round(time.monotonic() - t0, 1), "runs": {}}
        self.report["shapes"][shape] = shape_report
        texts = prompts(args.users, args.prompt_tokens)
        prefill_tok_s = None
        if "auto" in args.scenarios:
            shape_report["auto"] = auto_probe(args, model, self.work / f"auto-{shape}", self.env, texts[0])
            prefill_tok_s = shape_report["auto"]["prefill_tok_s_alone"]
            print(json.dumps(shape_report["auto"], indent=1)[:3000], flush=True)
        for name in args.configs if "burst" in args.scenarios else []:
            for spread in args.spreads:
                def burst(server: Server, name: str = name, spread: float = spread) -> dict[str, Any]:
                    results, wall = run_load(server.url, texts, args.new_tokens, spread, name in LLAMA_SERVER_CONFIGS)
                    return summarize(results, wall, prefill_tok_s, args.prompt_tokens)
                arrivals = "burst" if spread == 0 else f"spread{spread:g}s"
                self.run(shape, f"{name}/{arrivals}", name, model, args.prompt_tokens + 256, burst)
        documents = prompts(args.users, args.doc_tokens)
        for name in args.turn_configs if "multi_turn" in args.scenarios else []:
            def turns(server: Server) -> dict[str, Any]:
                records, wall = run_conversations(server.url, documents, args.turns, args.new_tokens)
                return summarize_turns(records, wall, TARGET_S)
            self.run(shape, f"{name}/turns{args.turns}", name, model, turn_context(args), turns)
        # Decode at full concurrency: short prompts, long answers, everyone at once.
        short = prompts(args.users, 128)
        for name in args.decode_configs if "decode" in args.scenarios else []:
            def decode(server: Server, name: str = name) -> dict[str, Any]:
                return decode_summary(*run_load(server.url, short, args.decode_tokens, 0.0,
                                                name in LLAMA_SERVER_CONFIGS))
            self.run(shape, f"{name}/decode{args.users}", name, model, args.prompt_tokens + 256, decode)
        if args.gguf_dir is None:
            model.unlink(missing_ok=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kit-lib", type=Path, required=True)
    ap.add_argument("--llama-server", type=Path, required=True)
    ap.add_argument("--gguf-py", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--random-gguf", type=Path, default=REPO / ".gpu/random_gguf.py",
                    help="the GPU kit's random-weight GGUF writer (default: %(default)s)")
    ap.add_argument("--gguf-dir", type=Path, help="keep the random GGUFs here and reuse them in later commands "
                    "(default: a temporary folder, deleted at the end)")
    ap.add_argument("--scenarios", nargs="+", default=["auto", "burst", "multi_turn", "decode"],
                    choices=["auto", "burst", "multi_turn", "decode"])
    ap.add_argument("--shapes", nargs="+", default=["1b"])
    ap.add_argument("--split-mode", choices=["none", "layer", "row"],
                    help="several GPUs: forged's llama_cpp.split_mode and llama-server's -sm (default: each one's own, "
                         "layer over every GPU CUDA_VISIBLE_DEVICES shows)")
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=20000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=256)
    configs = [*FORGED_CONFIGS, *LLAMA_SERVER_CONFIGS]
    ap.add_argument("--configs", nargs="+", choices=configs,
                    default=["untuned", "tuned", "deadline", "llama-server", "llama-server-q8"])
    ap.add_argument("--spreads", nargs="+", type=float, default=[0.0, 10.0])
    ap.add_argument("--turn-configs", nargs="+", choices=configs,
                    default=["tuned", "llama-server-nocache", "llama-server"])
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--doc-tokens", type=int, help="each conversation's document (default: --prompt-tokens)")
    ap.add_argument("--decode-configs", nargs="+", choices=configs,
                    default=["tuned", "tuned-fp16", "llama-server", "llama-server-q8"])
    ap.add_argument("--budget-s", type=float, default=540,
                    help="start no run after this many seconds (the device stops a command at 600); 0: no limit")
    ap.add_argument("--py-spy", type=Path, help="py-spy binary: profile forged's step loop in the tuned runs "
                    "(folded stacks, --native, written next to the results)")
    args = ap.parse_args()
    args.doc_tokens = args.doc_tokens or args.prompt_tokens
    args.out.mkdir(parents=True, exist_ok=True)
    bench = Bench(args)
    for shape in args.shapes:
        bench.shape(shape)
    bench.save()
    print_table(bench.report)


if __name__ == "__main__":
    main()
