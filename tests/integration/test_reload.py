"""SIGHUP under load: guards change live, running streams are not dropped, pending changes are reported."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from typing import Any

import httpx
from conftest import Daemon, sse_events

BODY = {"prompt": "Tell me about the sea.", "max_tokens": 120, "ignore_eos": True, "stream": True,
        "temperature": 0}


def _stream(daemon: Daemon, out: list) -> None:
    with httpx.stream("POST", f"{daemon.url}/v1/completions", json=BODY, timeout=600) as r:
        out.append((r.status_code, list(sse_events(r.iter_lines()))))


def test_sighup_lowers_the_session_limit_without_dropping_streams(make_daemon) -> None:
    daemon: Daemon = make_daemon(profile={"inference": {"max_concurrent_sessions": 10},
                                          "thresholds": {"max_queue_depth": 20}}).start()
    first: list = []
    threads = [threading.Thread(target=_stream, args=(daemon, first)) for _ in range(10)]
    for t in threads:
        t.start()
    while daemon.status()["sessions"]["active"] < 10:
        time.sleep(0.05)

    daemon.profiles["profiles"]["cpu"]["inference"]["max_concurrent_sessions"] = 4
    daemon.profiles["profiles"]["cpu"]["thresholds"]["max_queue_depth"] = 6
    daemon.profiles["profiles"]["cpu"]["tensorrt_llm"]["max_num_tokens"] = 512  # needs a restart
    daemon.write_config()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while daemon.status()["sessions"]["max"] != 4:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    status = daemon.status()
    assert status["queue"]["max"] == 6
    assert status["pending_restart"] == ["tensorrt_llm"]
    assert status["profile"]["tensorrt_llm"]["max_num_tokens"] == 128  # not half-applied

    later: list = []
    late_threads = [threading.Thread(target=_stream, args=(daemon, later)) for _ in range(3)]
    for t in late_threads:
        t.start()
    # The late three must queue behind the ten (limit 4); sample from the moment they have arrived.
    deadline = time.monotonic() + 30
    while daemon.status()["queue"]["depth"] < 3:
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.02)
    samples = []
    while any(t.is_alive() for t in threads + late_threads):
        samples.append(daemon.status())
        time.sleep(0.05)
    for t in threads + late_threads:
        t.join()

    # Nothing was dropped: every stream of the ten finished with all its tokens.
    assert [code for code, _ in first] == [200] * 10
    for _, events in first + later:
        assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    # The three late requests waited for the ten to drain below the new limit of four.
    assert any(s["queue"]["depth"] > 0 for s in samples)
    assert all(s["sessions"]["active"] <= 4 or s["queue"]["depth"] > 0 for s in samples)
    assert "reload: changes that need a restart are pending: tensorrt_llm" in daemon.log()


def test_broken_config_on_reload_keeps_the_running_one(make_daemon) -> None:
    daemon: Daemon = make_daemon().start()
    (daemon.config_dir / "sku_profiles.yaml").write_text("profiles: [not, a, mapping\n")
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload failed, keeping the running config" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    assert httpx.get(f"{daemon.url}/readyz").status_code == 200
    r = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=60)
    assert r.status_code == 200


def _strict_json(text: str) -> Any:
    def refuse(constant: str) -> Any:
        raise AssertionError(f"not JSON: bare {constant}")
    return json.loads(text, parse_constant=refuse)


def test_nan_target_on_reload_is_refused_and_the_running_config_kept(make_daemon) -> None:
    """YAML's .nan passed every range check: `ttft_p99_ms: .nan` applied by SIGHUP made /v1/status and
    /v1/performance/targets print a bare NaN, which no JSON parser accepts."""
    daemon: Daemon = make_daemon().start()
    before = daemon.status()["profile"]["targets"]["ttft_p99_ms"]
    daemon.profiles["profiles"]["cpu"]["targets"]["ttft_p99_ms"] = float("nan")
    daemon.write_config()
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 10
    while "reload failed, keeping the running config" not in daemon.log():
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)
    line = next(line for line in daemon.log().splitlines() if "reload failed" in line)
    assert "profiles.cpu.targets.ttft_p99_ms: expected a finite number" in line and "got nan" in line, line
    for route in ("/v1/status", "/v1/performance/targets"):
        _strict_json(httpx.get(f"{daemon.url}{route}", timeout=10).text)
    assert daemon.status()["profile"]["targets"]["ttft_p99_ms"] == before


def test_nan_memory_fraction_fails_check_config_in_one_line(make_daemon) -> None:
    """It passed check-config, and `forged run` then died after opening its listeners with a traceback."""
    daemon: Daemon = make_daemon(profile={"tensorrt_llm": {"free_gpu_memory_fraction": float("nan")}})
    for command in ("check-config", "run"):
        done = subprocess.run([sys.executable, "-m", "forged", "--config-dir", str(daemon.config_dir), command],
                              capture_output=True, text=True, timeout=60, env=daemon.env)
        assert done.returncode == 78, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
        assert "sku_profiles.yaml:" in lines[0] and "profiles.cpu.tensorrt_llm.free_gpu_memory_fraction: expected " \
            "a finite number in 0.01..1.0, got nan" in lines[0], lines[0]
