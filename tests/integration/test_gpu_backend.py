"""No silent CPU: a real daemon with the CPU-only libllama on a machine that shows a GPU.

The GPU comes from the strict NVML stand-in (tests/fixtures/pynvml_stand_in, answering as the real
H200's NVML dump), which this machine cannot have; the libllama is the real vendored CPU build. The
profile wants GPU layers (llama_cpp.n_gpu_layers -1).
"""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Daemon

from forged.cli import forgectl_main

FIXTURES = REPO / "tests" / "fixtures"
WANTS_GPU = {"llama_cpp": {"n_gpu_layers": -1}}


def gpu_machine(tmp_path: Path, free_bytes: int | None = None) -> dict[str, str]:
    """The environment that shows a forged process the H200 (optionally with only `free_bytes` free)."""
    nvml = json.loads((FIXTURES / "machines" / "h200" / "nvml.json").read_text())
    if free_bytes is not None:
        memory = nvml["devices"][0]["memory_v2"]
        memory["free"] = free_bytes
        memory["used"] = memory["total"] - memory["reserved"] - free_bytes
    path = tmp_path / "nvml.json"
    path.write_text(json.dumps(nvml))
    return {"PYTHONPATH": f"{FIXTURES / 'pynvml_stand_in'}:{REPO}", "FORGED_TEST_NVML_JSON": str(path)}


def vendored_libllama() -> str:
    import llama_cpp

    return str(Path(llama_cpp.__file__).parent / "lib" / "libllama.so")


def test_cpu_library_on_a_gpu_machine_refuses_to_start_in_one_line(make_daemon: Any, tmp_path: Path) -> None:
    daemon: Daemon = make_daemon(profile=WANTS_GPU, env=gpu_machine(tmp_path))
    daemon.start(wait_ready=False)
    assert daemon.proc is not None
    assert daemon.proc.wait(60) == 1, daemon.log()
    lines = [line for line in daemon.log().splitlines() if line.startswith("forged: ")]
    assert len(lines) == 1, daemon.log()
    line = lines[0]
    assert line.startswith("forged: cannot start: profile cpu wants GPU layers (llama_cpp.n_gpu_layers -1) on "
                           "NVIDIA H200, but "), line
    assert f"{vendored_libllama()} has no GPU backend (ggml backends: CPU)" in line
    assert "fix: sudo forgectl engine build" in line and "llama_cpp.allow_cpu_fallback: true" in line
    # Refused before anything listened or any model loaded.
    assert not daemon.socket_path.exists()
    assert "model loaded" not in daemon.log()


def test_allow_cpu_fallback_runs_on_the_cpu_and_says_so_everywhere(
        make_daemon: Any, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    notify = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify))
    # 64 MiB free on the GPU: sized from that, the KV cache could not hold one context and forged
    # would refuse to start; sized from host memory, as it must be on the CPU, it starts.
    env = {**gpu_machine(tmp_path, free_bytes=64 * 2**20), "NOTIFY_SOCKET": str(notify)}
    daemon: Daemon = make_daemon(profile={"llama_cpp": {"n_gpu_layers": -1, "allow_cpu_fallback": True}}, env=env)
    daemon.start(wait_ready=False)
    # Read the notifications as they come (a unix datagram queue holds 10; a full one blocks the sender).
    deadline, texts = time.monotonic() + 180, []
    while time.monotonic() < deadline and not any("READY=1" in t for t in texts):
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        texts.append(sock.recv(4096).decode())
    ready = next(t for t in texts if "READY=1" in t)
    assert "STATUS=profile cpu, ready" in ready and "WARNING GPU unused: NVIDIA H200 is here" in ready
    daemon.wait_ready()
    status = daemon.status()
    engine = status["engine"]
    assert status["hardware"]["kind"] == "gpu" and status["hardware"]["name"] == "NVIDIA H200"
    assert engine["gpu_unused"].startswith("GPU unused: NVIDIA H200 is here, but ")
    assert "no GPU backend" in engine["gpu_unused"] and "forgectl engine build" in engine["gpu_unused"]
    device = engine["device"]
    assert device["runs_on"] == "CPU" and device["layers_offloaded"] == 0
    assert device["layers_total"] == 31  # SmolLM2-135M-Instruct: 30 blocks and the output layer
    assert device["library"] == vendored_libllama() and device["gpu_offload"] is False
    assert [d["type"] for d in device["devices"]] == ["cpu"] and device["kv_on"] == ["CPU"]
    assert status["kv_cache"]["blocks_total"] > 0
    assert "GPU unused" in daemon.log() and "on CPU (0/31 layers offloaded)" in daemon.log()

    capsys.readouterr()
    assert forgectl_main(["--url", daemon.url, "status"]) == 0
    out = capsys.readouterr().out
    assert "WARNING   GPU unused: NVIDIA H200 is here" in out
    assert "device    CPU: 0/31 layers offloaded, KV on CPU" in out
    assert forgectl_main(["--url", daemon.url, "doctor", "--rules-dir", str(tmp_path / "none")]) == 1
    out = capsys.readouterr().out
    assert "FAIL  GPU offload" in out and "-> run: sudo forgectl engine build" in out


def test_cpu_profile_on_a_cpu_box_reports_the_cpu(shared_daemon: Daemon) -> None:
    device = shared_daemon.status()["engine"]["device"]
    assert device["runs_on"] == "CPU" and device["gpu_unused"] is None
    assert device["library_source"] == "vendored with forged (CPU)" and device["backends"] == ["CPU"]


def test_forged_probe_through_the_stand_in_sees_the_gpu(tmp_path: Path) -> None:
    """The stand-in reaches a forged subprocess as `pynvml` (what the tests above rely on)."""
    import os
    import sys

    out = subprocess.run([sys.executable, "-m", "forged", "--config-dir", str(REPO / "etc" / "forged"), "probe",
                          "--json"], capture_output=True, text=True, env={**os.environ, **gpu_machine(tmp_path)})
    assert json.loads(out.stdout)["hardware"]["name"] == "NVIDIA H200", out.stderr
