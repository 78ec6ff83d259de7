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
