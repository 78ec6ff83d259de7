"""Startup, readiness, configuration errors, and SIGTERM draining, on real processes."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import httpx
from conftest import Daemon, sse_events


def test_readyz_and_healthz_through_load_ready_and_drain(make_daemon) -> None:
    daemon: Daemon = make_daemon(env={"FORGED_TEST_HOOKS": "1", "FORGED_TEST_LOAD_DELAY_S": "3"})
    daemon.start(wait_ready=False)
    deadline = time.monotonic() + 30
    while True:
        try:
            health = httpx.get(f"{daemon.url}/healthz", timeout=2)
            break
        except httpx.HTTPError:
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
    assert health.status_code == 200 and health.json()["phase"] == "loading"
    ready = httpx.get(f"{daemon.url}/readyz", timeout=2)
    assert ready.status_code == 503 and ready.json()["status"] == "loading"
    # A request that arrives while the model loads is held, then served.
    held = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4}, timeout=60)
    assert held.status_code == 200, held.text
    assert httpx.get(f"{daemon.url}/readyz", timeout=2).status_code == 200

    # SIGTERM with a stream in flight: readyz turns 503, new work is refused, the stream finishes.
    body = {"prompt": "Write a long poem.", "max_tokens": 120, "ignore_eos": True, "stream": True,
            "temperature": 0}
    events: list = []

    def consume() -> None:
        with httpx.stream("POST", f"{daemon.url}/v1/completions", json=body, timeout=120) as r:
            events.extend(sse_events(r.iter_lines()))

    reader = threading.Thread(target=consume)
    reader.start()
    while daemon.status()["sessions"]["active"] == 0:
        time.sleep(0.02)
    assert daemon.proc is not None
    daemon.proc.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    assert httpx.get(f"{daemon.url}/readyz", timeout=5).status_code == 503
    refused = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "shutting_down"
    reader.join(120)
    assert events[-1] == "[DONE]"
    assert events[-2]["choices"][0]["finish_reason"] == "length"
    assert daemon.proc.wait(60) == 0


def test_drain_timeout_cancels_what_is_left_and_exits_zero(make_daemon) -> None:
    daemon: Daemon = make_daemon(settings={"server": {"drain_timeout_s": 1}}).start()
    body = {"prompt": "Write a long poem.", "max_tokens": 3000, "ignore_eos": True, "stream": True}
    events: list = []

    def consume() -> None:
        with httpx.stream("POST", f"{daemon.url}/v1/completions", json=body, timeout=120) as r:
            events.extend(sse_events(r.iter_lines()))

    reader = threading.Thread(target=consume)
    reader.start()
    while daemon.status()["sessions"]["active"] == 0:
        time.sleep(0.02)
    assert daemon.stop(signal.SIGTERM, timeout=30) == 0
    reader.join(30)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "shutting_down"


def _run_forged(config_dir, env=None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "forged", "--config-dir", str(config_dir), "run"],
                          capture_output=True, text=True, timeout=60, env=env)


def test_config_error_is_one_line_and_nonzero(make_daemon) -> None:
    daemon: Daemon = make_daemon()
    daemon.settings["listen"]["http"]["port"] = 70000
    daemon.write_config()
    result = _run_forged(daemon.config_dir, daemon.env)
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "forged.yaml:" in lines[0] and "listen.http.port" in lines[0] and "0..65535" in lines[0]
    assert "Traceback" not in result.stderr


def test_unknown_profile_key_names_the_file_line_and_key(make_daemon) -> None:
    daemon: Daemon = make_daemon(profile={"thresholds": {"max_queue_dpeth": 3}})
    result = _run_forged(daemon.config_dir, daemon.env)
    assert result.returncode == 78
    line = result.stderr.strip()
    assert "sku_profiles.yaml:" in line and "profiles.cpu.thresholds.max_queue_dpeth" in line
    assert "unknown key" in line and "max_queue_depth" in line


def test_missing_and_corrupt_model_refuse_to_start_with_the_file_named(make_daemon, tmp_path) -> None:
    daemon: Daemon = make_daemon()
    missing = tmp_path / "nope.gguf"
    daemon.settings["model"]["path"] = str(missing)
    daemon.write_config()
    result = _run_forged(daemon.config_dir, daemon.env)
    assert result.returncode == 1
    # Startup logs what it found before failing; the failure itself is the one last line.
    assert result.stderr.strip().splitlines()[-1] == f"forged: cannot start: {missing}: model file not found"
    assert "Traceback" not in result.stderr
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\0" * 64)
    daemon.settings["model"]["path"] = str(corrupt)
    daemon.write_config()
    result = _run_forged(daemon.config_dir, daemon.env)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"forged: cannot start: {corrupt}: libllama could not load this model file")
    assert "Traceback" not in result.stderr and "libllama:" not in result.stderr
