"""The tensorrt_llm engine through the real daemon: HTTP streaming, abort, stats, errors, failures.

TensorRT-LLM cannot be installed on these machines: the daemon runs here against a STAND-IN for the
`tensorrt_llm` package (tests/fixtures/fake_tensorrt_llm, put on the daemon's PYTHONPATH). It accepts
exactly the LLM API arguments that ../shared/reference/trtllm-llm-api.md gives for the selected
version and refuses any other; its "model" answers every prompt with SCRIPT. What these tests prove
is forged's side of the LLM API as that reference describes it, not TensorRT-LLM itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import openai
from conftest import Daemon, sse_events

REPO = Path(__file__).resolve().parents[2]
FAKE = REPO / "tests" / "fixtures" / "fake_tensorrt_llm"
CHECKPOINT = FAKE / "tiny-checkpoint"
SCRIPT = "The quick brown fox jumps over the lazy dog."


def trt_daemon(make_daemon: Any, tmp_path: Path, *, version: str = "1.2", profile: dict[str, Any] | None = None,
               fake: bool = True, settings: dict[str, Any] | None = None) -> Daemon:
    """A daemon pinned to the cpu profile switched to engine tensorrt_llm, serving the tiny checkpoint."""
    env = {"FAKE_TRTLLM_VERSION": version, "FAKE_TRTLLM_RECORD": str(tmp_path / "record.jsonl"),
           "FAKE_TRTLLM_FAULT_FILE": str(tmp_path / "fault"), "FAKE_TRTLLM_ITER_S": "0.01"}
    if fake:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(FAKE), os.environ.get("PYTHONPATH")) if p)
    return make_daemon(profile={"engine": "tensorrt_llm", **(profile or {})},
                       settings=settings or {"model": {"path": str(CHECKPOINT)}}, env=env)


def recorded(tmp_path: Path) -> list[dict[str, Any]]:
    path = tmp_path / "record.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_forged(daemon: Daemon) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forged", "--config-dir", str(daemon.config_dir), "run"],
                          capture_output=True, text=True, timeout=60, env=daemon.env)


def metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not in /metrics")


def test_streams_through_the_full_http_path(make_daemon: Any, tmp_path: Path) -> None:
    daemon = trt_daemon(make_daemon, tmp_path).start()
    client = openai.OpenAI(base_url=f"{daemon.url}/v1", api_key="unused", max_retries=0)
    assert client.models.list().data[0].id == "tiny-checkpoint"
    chunks = list(client.chat.completions.create(
        model="tiny-checkpoint", messages=[{"role": "user", "content": "Hi"}], stream=True, temperature=0,
        stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == SCRIPT
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.completion_tokens == len(SCRIPT)
    done = client.completions.create(model="tiny-checkpoint", prompt="Hello", max_tokens=5)
    assert (done.choices[0].text, done.choices[0].finish_reason) == (SCRIPT[:5], "length")
    stopped = client.completions.create(model="tiny-checkpoint", prompt="Hello", max_tokens=60, stop=["fox"])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == ("The quick brown ", "stop")

    # /v1/tensorrt-llm/config: exactly the kwargs the LLM API received (the stand-in recorded them).
    config = daemon.get("/v1/tensorrt-llm/config")
    llm = [e for e in recorded(tmp_path) if e["event"] == "llm"]
    assert len(llm) == 1 and config["llm_kwargs"] == llm[0]["kwargs"]
    assert config["engine"] == "tensorrt_llm" and config["tensorrt_llm_version"] == "1.2.0"
    assert config["llm_kwargs"]["kv_cache_config"] == {"dtype": "auto", "free_gpu_memory_fraction": 0.9,
                                                       "tokens_per_block": 32, "enable_block_reuse": True}
    assert config["llm_kwargs"]["max_batch_size"] == 4 and config["llm_kwargs"]["max_seq_len"] == 4096
    status = daemon.status()
    assert status["engine"]["name"] == status["engine"]["profile_engine"] == "tensorrt_llm"
    assert status["model"]["context_length"] == 4096
    assert daemon.stop() == 0
    assert recorded(tmp_path)[-1] == {"event": "shutdown"}


def test_client_disconnect_aborts_the_request(make_daemon: Any, tmp_path: Path) -> None:
    daemon = trt_daemon(make_daemon, tmp_path).start()
    body = {"prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{daemon.url}/v1/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        for _ in range(3):
            next(line for line in lines if line.startswith("data: "))
        assert daemon.status()["sessions"]["active"] == 1
    deadline = time.monotonic() + 10
    while daemon.status()["sessions"]["active"] or daemon.status()["engine"]["running"]:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    aborts = [e for e in recorded(tmp_path) if e["event"] == "abort"]
    assert len(aborts) == 1, recorded(tmp_path)
    again = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=30)
    assert again.json()["choices"][0]["text"] == SCRIPT[:3]


def test_stats_reach_metrics_and_status(make_daemon: Any, tmp_path: Path) -> None:
    # 64 KV blocks of 32 tokens, guaranteed_no_evict: two requests of 1500 tokens cannot run together,
    # so TensorRT-LLM queues the second one itself.
    daemon = trt_daemon(make_daemon, tmp_path, profile={"tensorrt_llm": {"kv_cache_max_tokens": 2048}}).start()
    deadline = time.monotonic() + 10
    while daemon.status()["kv_cache"]["blocks_total"] == 0:  # the warm-up request brings the first stats
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.1)
    body = {"prompt": "Hello", "max_tokens": 1500, "ignore_eos": True, "stream": True}
    readers = []
    for _ in range(2):
        def consume() -> None:
            # The daemon is killed at teardown with these streams still open.
            with contextlib.suppress(httpx.HTTPError), \
                    httpx.stream("POST", f"{daemon.url}/v1/completions", json=body, timeout=60) as r:
                for _line in r.iter_lines():
                    pass
        readers.append(threading.Thread(target=consume, daemon=True))
        readers[-1].start()
    deadline = time.monotonic() + 10
    while True:
        status = daemon.status()
        if status["engine"]["waiting"] == 1 and status["kv_cache"]["blocks_used"] > 0:
            break
        assert time.monotonic() < deadline, status
        time.sleep(0.05)
    text = httpx.get(f"{daemon.url}/metrics", timeout=10).text
    kv = daemon.status()["kv_cache"]
    assert metric(text, 'forge_kv_cache_blocks{state="total"}') == kv["blocks_total"] == 64
    assert kv["tokens_per_block"] == 32 and kv["blocks_used"] == 48  # ceil(1502 / 32) for the running one
    assert metric(text, 'forge_kv_cache_blocks{state="used"}') == 48
    assert metric(text, 'forge_kv_cache_blocks{state="free"}') == 16
    assert metric(text, "forge_active_sessions") == 2
    assert 'forge_info{engine="tensorrt_llm"' in text
    assert status["engine"]["device_memory_used_bytes"] == 6 << 30
    assert status["engine"]["steps"] > 0 and status["engine"]["paused"] == 0


def test_request_errors_answer_400_and_503_with_the_real_message(make_daemon: Any, tmp_path: Path) -> None:
    daemon = trt_daemon(make_daemon, tmp_path).start()
    refused = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "<<reject>>"}, timeout=30)
    assert refused.status_code == 400, refused.text
    assert "refused at submission (injected by <<reject>>)" in refused.json()["error"]["message"]
    streamed = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "<<reject>>", "stream": True}, timeout=30)
    assert streamed.status_code == 400  # refused before the stream began: a status, not an SSE error
    failed = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "<<request-error>>"}, timeout=30)
    assert failed.status_code == 503 and failed.headers["retry-after"]
    assert "injected by <<request-error>>" in failed.json()["error"]["message"]
    assert httpx.get(f"{daemon.url}/readyz", timeout=5).status_code == 200  # per-request errors only
    too_long = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "x" * 5000}, timeout=30)
    assert too_long.status_code == 400 and "4096" in too_long.json()["error"]["message"]


def test_background_failure_turns_not_ready_and_exits_nonzero(make_daemon: Any, tmp_path: Path) -> None:
    daemon = trt_daemon(make_daemon, tmp_path).start()
    seen: list[int] = []
    stop = threading.Event()

    def poll_readyz() -> None:
        while not stop.is_set():
            try:
                seen.append(httpx.get(f"{daemon.url}/readyz", timeout=2).status_code)
            except httpx.HTTPError:
                if seen and seen[-1] != 200:
                    return  # listeners closed after the 503s
            time.sleep(0.01)

    poller = threading.Thread(target=poll_readyz, daemon=True)
    poller.start()
    # The fault must come after the poller's first answer, or a slow first request on a loaded
    # machine sees only the 503s.
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    body = {"prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{daemon.url}/v1/completions", json=body, timeout=30) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        (tmp_path / "fault").write_text("CUDA error: an illegal memory access was encountered")
        events = []
        for event in sse_events(lines):
            events.append(event)
            if isinstance(event, dict) and "error" in event:
                # The daemon turned not-ready before this error event was written: ask now, while
                # its listeners are still open (the poller may miss the short window under load).
                with contextlib.suppress(httpx.HTTPError):
                    seen.append(httpx.get(f"{daemon.url}/readyz", timeout=2).status_code)
    assert events[-1] == "[DONE]"
    error = events[-2]["error"]
    assert error["code"] == "engine_error" and "illegal memory access" in error["message"]
    assert daemon.proc is not None
    assert daemon.proc.wait(30) == 1, daemon.log()
    stop.set()
    poller.join(5)
    assert 200 in seen and 503 in seen[seen.index(200):], seen
    assert "exiting so that the service manager restarts forged" in daemon.log()


def test_not_installed_fails_at_startup_in_one_line(make_daemon: Any, tmp_path: Path) -> None:
    daemon = trt_daemon(make_daemon, tmp_path, fake=False)
    result = run_forged(daemon)
    assert result.returncode == 78, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("forged: config error: ") and "sku_profiles.yaml:" in last
    assert "package tensorrt_llm, which is not installed" in last and "pip install --extra-index-url" in last
    assert "Traceback" not in result.stderr


def test_engine_fallback_runs_llama_cpp(make_daemon: Any, tmp_path: Path) -> None:
    daemon = trt_daemon(make_daemon, tmp_path, fake=False, profile={"engine_fallback": True}, settings={})
    daemon.start()
    engine = daemon.status()["engine"]
    assert engine["name"] == "llama_cpp" and engine["profile_engine"] == "tensorrt_llm"
    assert "engine_fallback: true" in engine["fallback"]
    done = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 3}, timeout=60)
    assert done.status_code == 200
    assert 'engine="llama_cpp"' in httpx.get(f"{daemon.url}/metrics", timeout=10).text


def test_version_1_0_serves_and_refuses_what_it_lacks(make_daemon: Any, tmp_path: Path) -> None:
    refused = trt_daemon(make_daemon, tmp_path, version="1.0", profile={"tensorrt_llm": {"tokens_per_block": 64}})
    result = run_forged(refused)
    assert result.returncode == 78, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "sku_profiles.yaml:" in last and "profiles.cpu.tensorrt_llm.tokens_per_block" in last
    assert "1.0.0" in last and "Traceback" not in result.stderr
    daemon = trt_daemon(make_daemon, tmp_path, version="1.0").start()
    config = daemon.get("/v1/tensorrt-llm/config")
    assert config["tensorrt_llm_version"] == "1.0.0"
    assert "tokens_per_block" not in config["llm_kwargs"]["kv_cache_config"]
    done = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=30)
    assert done.json()["choices"][0]["text"] == SCRIPT[:4]
