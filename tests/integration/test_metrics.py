"""/metrics: every seed metric under its exact name, valid for promtool, truthful about memory."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import httpx
from conftest import Daemon

SEED_METRICS = ["forge_ttft_seconds_bucket", "forge_tokens_per_second_bucket", "forge_active_sessions",
                "forge_queue_depth", "forge_gpu_memory_used_bytes", "forge_gpu_memory_total_bytes",
                "forge_max_sessions", "forge_max_queue_depth", "forge_target_ttft_p99_ms",
                "forge_requests_total", "forge_rejections_total", "forge_preemptions_total",
                "forge_kv_cache_blocks", "forge_prompt_tokens_total", "forge_generation_tokens_total",
                "forge_queue_wait_seconds_bucket", "forge_inter_token_latency_seconds_bucket", "forge_info"]


def _scrape(daemon: Daemon) -> str:
    httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hello there", "max_tokens": 6}, timeout=60)
    r = httpx.get(f"{daemon.url}/metrics", timeout=10)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return r.text


def _value(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{sample} not in /metrics")


def test_every_seed_metric_is_exported(shared_daemon: Daemon) -> None:
    text = _scrape(shared_daemon)
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if not line.startswith("#")}
    missing = [m for m in SEED_METRICS if m not in names]
    assert not missing, missing
    profile = shared_daemon.status()["profile"]
    assert _value(text, "forge_max_sessions") == profile["inference"]["max_concurrent_sessions"]
    assert _value(text, "forge_max_queue_depth") == profile["thresholds"]["max_queue_depth"]
    assert _value(text, "forge_target_ttft_p99_ms") == profile["targets"]["ttft_p99_ms"]
    assert 'forge_info{engine="llama_cpp"' in text


def test_memory_gauges_read_system_ram(shared_daemon: Daemon) -> None:
    text = _scrape(shared_daemon)
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    total = int(meminfo["MemTotal"].split()[0]) * 1024
    assert _value(text, "forge_gpu_memory_total_bytes") == total
    used = _value(text, "forge_gpu_memory_used_bytes")
    available_now = int(meminfo["MemAvailable"].split()[0]) * 1024
    assert abs(used - (total - available_now)) < 0.05 * total


def test_kv_blocks_match_status(shared_daemon: Daemon) -> None:
    text = _scrape(shared_daemon)
    kv = shared_daemon.status()["kv_cache"]
    assert _value(text, 'forge_kv_cache_blocks{state="total"}') == kv["blocks_total"] > 0
    assert _value(text, 'forge_kv_cache_blocks{state="used"}') == kv["blocks_used"] == 0


def test_promtool_check_metrics(shared_daemon: Daemon) -> None:
    assert shutil.which("promtool"), "promtool missing: `make test` unpacks it into build/tools"
    text = _scrape(shared_daemon)
    result = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    # DESIGN.md fixes the seed's name forge_target_ttft_p99_ms, which promtool's naming lint flags
    # for its "ms" unit (exit 3 = lint findings only; a malformed exposition exits 1). That one
    # finding is accepted deliberately; any other finding, or any parse error, fails.
    findings = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    known = "forge_target_ttft_p99_ms metric names should not contain abbreviated units"
    assert result.returncode in (0, 3), result.stdout + result.stderr
    assert [f for f in findings if f != known] == [], findings


def test_gateway_gauges_follow_the_kv_blocks_in_use(shared_daemon: Daemon) -> None:
    """forge_kv_cache_usage_ratio is used/total blocks and rises while a session holds blocks;
    forge_kv_cache_config_info carries the block size and block count that /v1/status reports."""
    text = _scrape(shared_daemon)
    kv = shared_daemon.status()["kv_cache"]
    assert _value(text, "forge_kv_cache_usage_ratio") == 0.0
    config = (f'forge_kv_cache_config_info{{block_size="{kv["tokens_per_block"]}",'
              f'num_gpu_blocks="{kv["blocks_total"]}"}}')
    assert _value(text, config) == 1.0
    body = {"prompt": "Count slowly: one, two, three,", "max_tokens": 4000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{shared_daemon.url}/v1/completions", json=body, timeout=60) as response:
        # The session now holds blocks, and 4000 tokens keep it running until the client leaves. The
        # line iterator is kept: closing it (as garbage collection would) closes the connection.
        lines = response.iter_lines()
        next(line for line in lines if line.startswith("data: "))
        during = httpx.get(f"{shared_daemon.url}/metrics", timeout=10).text
    assert _value(during, "forge_active_sessions") == 1
    # One scrape is one snapshot: the ratio and the block gauges agree within it.
    blocks_used = _value(during, 'forge_kv_cache_blocks{state="used"}')
    assert blocks_used > 0
    assert _value(during, "forge_kv_cache_usage_ratio") == blocks_used / kv["blocks_total"]


def test_status_and_engine_config_say_where_the_model_is(shared_daemon: Daemon) -> None:
    """On this CPU box no GPU holds the model: /v1/status says so, the memory gauges are system RAM
    (above), and libllama got no split (tests/unit/test_gpus.py covers several GPUs)."""
    placement = shared_daemon.status()["placement"]
    assert placement == {"engine": "llama_cpp", "split_mode": None, "main_gpu": None, "shares_from": None,
                         "gpus": []}
    config = shared_daemon.get("/v1/tensorrt-llm/config")
    assert config["llama_model_params"] == {"n_gpu_layers": 0}
