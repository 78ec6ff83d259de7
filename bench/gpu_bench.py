#!/usr/bin/env python3
"""The seed scenario at full scale on a CUDA machine: 20 users x ~20k-token prompts, 64 new tokens.

Not part of CI. One command on a machine with an NVIDIA GPU, the CUDA libllama and llama-server
from the GPU kit (../shared/gpu), and llama-cpp-python's Python package on PYTHONPATH:

    python3 bench/gpu_bench.py --kit-lib DIR --llama-server DIR/llama-server --gguf-py DIR/gguf-py \\
        --out results/ [--shapes 1b 8b] [--users 20] [--prompt-tokens 20000]

For each model shape it writes a random-weight Llama GGUF (speed depends on shape, not values),
then runs each configuration twice (all users at once; arrivals spread over 10 s):
  untuned   forged, fp16 KV, no chunking, no session limit, no queue limit (the 85 s shape)
  tuned     forged, the Thor-like profile: fp8->q8_0 KV, chunked context, session limit, queue depth
  deadline  tuned + deadline admission against the 2 s TTFT P99 target
  llama-server  the kit's llama-server, same model, same load, -np = users, f16 KV, flash attention
  llama-server-q8  the same with q8_0 KV, tuned's KV dtype
and reports TTFT P50/P99, TPS per user, aggregate tok/s, rejections by reason, goodput (answers
within the 2 s target per second), peak GPU memory (NVML), the worst inter-token gap against the
median, and the physical floor (prefill tok/s measured alone x tokens ahead).
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
from pathlib import Path
from typing import Any

import httpx
import yaml

REPO = Path(__file__).resolve().parent.parent
TARGET_S = 2.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


class Server:
    """A forged or llama-server process on a free port."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path) -> None:
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.proc = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, route: str, timeout: float = 600) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + route, timeout=2).status_code == 200:
                    return time.monotonic() - started
            time.sleep(0.2)
        raise RuntimeError(f"not ready in {timeout} s: {self.log.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def prompts(users: int, tokens: int) -> list[str]:
    # The random models' vocabulary is byte fallback: one non-space character is about one token.
    letters = "abcdefghijklmnopqrstuvwxyz"
    return [(f"user{i}:" + "".join(letters[(i + j) % 26] for j in range(tokens)))[:tokens] for i in range(users)]


async def one(client: httpx.AsyncClient, url: str, path: str, body: dict[str, Any], delay: float
              ) -> dict[str, Any]:
    await asyncio.sleep(delay)
    sent = time.perf_counter()
    arrivals: list[float] = []
    async with client.stream("POST", url + path, json=body) as r:
        if r.status_code != 200:
            data = await r.aread()
            try:
                code = json.loads(data)["error"].get("code") or str(r.status_code)
            except (ValueError, KeyError):
                code = str(r.status_code)
            return {"status": r.status_code, "code": code, "sent": sent}
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            choices = event.get("choices") or []
            if not choices:
                continue
            has_text = choices[0].get("text") or choices[0].get("delta", {}).get("content")
            if has_text or (choices[0].get("finish_reason") and not arrivals):
                arrivals.append(time.perf_counter())
    return {"status": 200, "sent": sent, "arrivals": arrivals}


def run_load(url: str, texts: list[str], new_tokens: int, spread_s: float, llama_server: bool
             ) -> tuple[list[dict[str, Any]], float]:
    body_extra = {"n_predict": new_tokens, "ignore_eos": True} if llama_server else {"ignore_eos": True}

    async def go() -> list[dict[str, Any]]:
        limits = httpx.Limits(max_connections=len(texts) + 8)
        async with httpx.AsyncClient(timeout=3600, limits=limits) as client:
            return await asyncio.gather(*(
                one(client, url, "/v1/completions",
                    {"prompt": t, "max_tokens": new_tokens, "temperature": 0, "stream": True, **body_extra},
                    spread_s * i / max(len(texts) - 1, 1))
                for i, t in enumerate(texts)))

    started = time.perf_counter()
    results = asyncio.run(go())
    return results, time.perf_counter() - started


def summarize(results: list[dict[str, Any]], wall: float, peak_bytes: int, prefill_tok_s: float | None,
              prompt_tokens: int) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == 200 and r["arrivals"]]
    ttfts = sorted(r["arrivals"][0] - r["sent"] for r in ok)
    rejected: dict[str, int] = {}
    for r in results:
        if r["status"] != 200:
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

    def pct(q: float) -> float | None:
        if not ttfts:
            return None
        return ttfts[min(len(ttfts) - 1, max(0, round(q / 100 * len(ttfts) + 0.5) - 1))]

    within = sum(1 for t in ttfts if t <= TARGET_S)
    floor = None
    if prefill_tok_s:
        # Request k (in arrival order) cannot see its first token before k prompts are prefilled.
        floor = [prompt_tokens * (k + 1) / prefill_tok_s for k in range(len(results))]
    return {
        "served": len(ok), "rejected": rejected, "wall_s": round(wall, 2),
        "ttft_p50_s": pct(50), "ttft_p99_s": pct(99), "ttft_max_s": ttfts[-1] if ttfts else None,
        "within_2s": within, "goodput_per_s": round(within / wall, 3),
        "tps_per_user_p50": statistics.median(tps_user) if tps_user else None,
        "aggregate_tok_s": round(tokens / wall, 1), "decode_tok_s_all_streams": decode_rate,
        "median_gap_ms": statistics.median(gaps) * 1000 if gaps else None,
        "worst_gap_ms": max(gaps) * 1000 if gaps else None,
        "worst_over_median": (max(gaps) / statistics.median(gaps)) if gaps else None,
        "peak_gpu_memory_gib": round(peak_bytes / 2**30, 2),
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


def profile_for(name: str, users: int, prompt_tokens: int, split_mode: str | None = None) -> dict[str, Any]:
    ctx = prompt_tokens + 256
    split = {"split_mode": split_mode} if split_mode else {}
    common = {"engine": "llama_cpp", "llama_cpp": {"n_gpu_layers": -1, "n_ubatch": 512, **split},
              "targets": {"ttft_ms": 500, "ttft_p99_ms": 2000, "tps": 60}}
    if name == "untuned":
        return {**common, "tensorrt_llm": {"kv_cache_dtype": "fp16", "tokens_per_block": 64,
                                           "enable_chunked_context": False, "max_num_tokens": 65536,
                                           "scheduler_policy": "guaranteed_no_evict"},
                "inference": {"max_concurrent_sessions": users, "max_seq_len": ctx},
                "thresholds": {"max_queue_depth": 1000}}
    # Thor-like: fp8 (q8_0) KV, chunked context, a session limit and a queue depth. On the H200 a
    # 2048-token chunk is a ~55 ms step, which keeps running streams smooth; per-session KV streams
    # keep each sequence's attention to its own 20k cells.
    tuned = {**common, "tensorrt_llm": {"kv_cache_dtype": "fp8", "tokens_per_block": 64,
                                        "enable_chunked_context": True, "max_num_tokens": 2048,
                                        "scheduler_policy": "max_utilization"},
             "inference": {"max_concurrent_sessions": users, "max_seq_len": ctx},
             "thresholds": {"max_queue_depth": 10},
             "llama_cpp": {"n_gpu_layers": -1, "n_ubatch": 512, "kv_unified": False, **split}}
    if name == "deadline":
        tuned["admission"] = {"mode": "deadline"}
    if name == "tuned-fp16":  # the tuned scheduler with llama-server's KV dtype: separates the two effects
        tuned["tensorrt_llm"] = {**tuned["tensorrt_llm"], "kv_cache_dtype": "fp16"}
    return tuned


def start_server(args: argparse.Namespace, name: str, model: Path, root: Path, env: dict[str, str]
                 ) -> tuple[Server, str]:
    """One configuration's server on a free port, logging to the results folder; and its ready route."""
    port = free_port()
    log = args.out / f"{root.name}.log"
    if name.startswith("llama-server"):
        argv = [str(args.llama_server), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
                "-np", str(args.users), "-c", str(args.users * (args.prompt_tokens + 512)), "-fa", "on",
                "-ngl", "99", "--no-warmup"]
        if name == "llama-server-q8":
            argv += ["-ctk", "q8_0", "-ctv", "q8_0"]
        if args.split_mode:
            argv += ["-sm", args.split_mode]
        return Server(argv, env, port, log), "/health"
    cfg = forged_config(root, port, model, profile_for(name, args.users, args.prompt_tokens, args.split_mode))
    return Server([sys.executable, "-m", "forged", "--config-dir", str(cfg), "run"],
                  dict(env, FORGED_RUN_DIR=str(root), FORGED_STATE_DIR=str(root / "state")), port, log), "/readyz"


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kit-lib", type=Path, required=True)
    ap.add_argument("--llama-server", type=Path, required=True)
    ap.add_argument("--gguf-py", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", nargs="+", default=["1b"])
    ap.add_argument("--split-mode", choices=["none", "layer", "row"],
                    help="several GPUs: forged's llama_cpp.split_mode and llama-server's -sm (default: each one's own, "
                         "layer over every GPU CUDA_VISIBLE_DEVICES shows)")
    ap.add_argument("--users", type=int, default=20)
    ap.add_argument("--prompt-tokens", type=int, default=20000)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--decode-tokens", type=int, default=256)
    ap.add_argument("--configs", nargs="+", default=["untuned", "tuned", "deadline", "llama-server",
                                                     "llama-server-q8"])
    ap.add_argument("--decode-configs", nargs="+", default=["tuned", "tuned-fp16", "llama-server",
                                                            "llama-server-q8"])
    ap.add_argument("--spreads", nargs="+", type=float, default=[0.0, 10.0])
    ap.add_argument("--py-spy", type=Path, help="py-spy binary: profile forged's step loop in the tuned runs "
                    "(folded stacks, --native, written next to the results)")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="gpubench-"))
    env = dict(os.environ, LLAMA_CPP_LIB_PATH=str(args.kit_lib),
               LD_LIBRARY_PATH=f"{args.kit_lib}:{os.environ.get('LD_LIBRARY_PATH', '')}", PYTHONUNBUFFERED="1")
    texts = prompts(args.users, args.prompt_tokens)
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "users": args.users,
                              "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "shapes": {}}
    sampler = GpuMemorySampler()
    for shape in args.shapes:
        model = work / f"random-{shape}.gguf"
        t0 = time.monotonic()
        subprocess.run([sys.executable, str(REPO / ".gpu/random_gguf.py"), str(args.gguf_py), str(model), shape],
                       check=True, stdout=subprocess.DEVNULL)
        shape_report: dict[str, Any] = {"gguf_write_s": round(time.monotonic() - t0, 1), "runs": {}}
        # 1. forged unchanged: auto profile (generic_gpu by NVML), READY over a real NOTIFY_SOCKET.
        root = work / f"auto-{shape}"
        port = free_port()
        cfg = forged_config(root, port, model, None)
        sock, notes = notify_socket(root / "notify.sock")
        server = Server([sys.executable, "-m", "forged", "--config-dir", str(cfg), "run"],
                        dict(env, NOTIFY_SOCKET=str(root / "notify.sock"), FORGED_RUN_DIR=str(root),
                             FORGED_STATE_DIR=str(root / "state")), port, args.out / f"forged-auto-{shape}.log")
        try:
            load_s = server.wait_ready("/readyz")
            time.sleep(0.5)
            status = httpx.get(server.url + "/v1/status", timeout=10).json()
            config = httpx.get(server.url + "/v1/tensorrt-llm/config", timeout=10).json()
            # Prefill rate measured alone: one prompt, idle daemon (the physical floor's rate).
            r = run_load(server.url, texts[:1], 1, 0.0, False)[0][0]
            alone_ttft = r["arrivals"][0] - r["sent"]
        finally:
            server.stop()
            sock.close()
        prefill_tok_s = args.prompt_tokens / alone_ttft
        shape_report["auto"] = {"profile": status["profile"]["name"], "hardware": status["hardware"],
                                "kv_cache": status["kv_cache"], "ready_after_s": round(load_s, 1),
                                "notify": [n.split("\n")[0] for n in notes][:6],
                                "ready_seen": any("READY=1" in n for n in notes),
                                "llama_context_params": config.get("llama_context_params"),
                                "llama_model_params": config.get("llama_model_params"),
                                "placement": status.get("placement"),
                                "alone_ttft_s": alone_ttft, "prefill_tok_s_alone": prefill_tok_s}
        print(json.dumps(shape_report["auto"], indent=1)[:3000], flush=True)
        for name in args.configs:
            for spread in args.spreads:
                key = f"{name}/{'burst' if spread == 0 else f'spread{spread:g}s'}"
                server, route = start_server(args, name, model, work / f"{shape}-{name}-{int(spread)}", env)
                profiler = None
                try:
                    server.wait_ready(route)
                    if args.py_spy and name == "tuned":
                        profiler = start_profile(args.py_spy, server, args.out / f"{shape}-{name}-{int(spread)}.folded")
                    with sampler:
                        results, wall = run_load(server.url, texts, args.new_tokens, spread,
                                                 name.startswith("llama-server"))
                    summary = summarize(results, wall, sampler.peak, prefill_tok_s, args.prompt_tokens)
                    summary["peak_gpu_memory_gib_per_gpu"] = [round(b / 2**30, 2) for b in sampler.peaks]
                    if not name.startswith("llama-server"):
                        with contextlib.suppress(httpx.HTTPError, ValueError):
                            metrics = httpx.get(server.url + "/metrics", timeout=10).text
                            summary["preemptions"] = next((float(line.split()[-1]) for line in metrics.splitlines()
                                                           if line.startswith("forge_preemptions_total ")), None)
                except Exception as exc:  # keep the other runs going; the report says what failed
                    summary = {"error": repr(exc)[:500]}
                finally:
                    stop_profile(profiler)
                    server.stop()
                shape_report["runs"][key] = summary
                print(key, json.dumps(summary), flush=True)
                report["shapes"][shape] = shape_report
                (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
        # Decode at full concurrency: short prompts, long answers, everyone at once.
        short = prompts(args.users, 128)
        for name in args.decode_configs:
            server, route = start_server(args, name, model, work / f"{shape}-{name}-decode", env)
            profiler = None
            try:
                server.wait_ready(route)
                if args.py_spy and name == "tuned":
                    profiler = start_profile(args.py_spy, server, args.out / f"{shape}-{name}-decode.folded")
                results, wall = run_load(server.url, short, args.decode_tokens, 0.0, name.startswith("llama-server"))
                ok = [r for r in results if r["status"] == 200 and len(r["arrivals"]) > 1]
                first = max(r["arrivals"][0] for r in ok)
                last = min(r["arrivals"][-1] for r in ok)
                inside = sum(sum(1 for t in r["arrivals"] if first <= t <= last) for r in ok)
                summary = {"served": len(ok), "wall_s": round(wall, 2),
                           "aggregate_decode_tok_s": round(inside / (last - first), 1) if last > first else None,
                           "tokens": sum(len(r["arrivals"]) for r in ok)}
            except Exception as exc:
                summary = {"error": repr(exc)[:500]}
            finally:
                stop_profile(profiler)
                server.stop()
            shape_report["runs"][f"{name}/decode{args.users}"] = summary
            print(f"{name}/decode", json.dumps(summary), flush=True)
        report["shapes"][shape] = shape_report
        model.unlink(missing_ok=True)
        (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2))
    (args.out / "gpu_bench.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
