"""Test harness: real forged daemons in subprocesses, with their own temp config dirs and sockets."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
PACKAGED_CONFIG = REPO / "etc" / "forged"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in override.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) \
            else value
    return out


TEST_STATE = Path(os.environ.get("FORGED_TEST_STATE", REPO / "build" / "test-state"))


@pytest.fixture(scope="session")
def model_path() -> Path:
    """The real default model (SmolLM2-135M-Instruct), from its PyPI package; FORGED_TEST_MODEL names
    another GGUF (the device run of docs/benchmarks.md: a random-weight 1B model on the GPU)."""
    from forged.config import ModelSettings
    from forged.engine.model_files import resolve_model

    if os.environ.get("FORGED_TEST_MODEL"):
        return Path(os.environ["FORGED_TEST_MODEL"])

    path, _ = resolve_model(ModelSettings(), TEST_STATE)
    return path


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M by name: the packaged model with sliding-window attention, assembled once per machine."""
    from forged.engine.model_files import GEMMA3_270M, packaged_model_path

    return packaged_model_path(GEMMA3_270M, TEST_STATE)


class Daemon:
    """One real `forged run` process. `profile` entries override the cpu profile's values."""

    def __init__(self, root: Path, model: Path, settings: dict[str, Any] | None = None,
                 profile: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> None:
        self.root = root
        self.config_dir = root / "etc"
        self.run_dir = root / "run"
        self.config_dir.mkdir(parents=True, exist_ok=True)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.socket_path = self.run_dir / "forged.sock"
        base = {"listen": {"http": {"port": self.port}, "unix": {"path": str(self.socket_path)}},
                "model": {"path": str(model)}, "server": {"drain_timeout_s": 20}, "profile": "cpu"}
        self.settings = deep_merge(base, settings or {})
        profiles = yaml.safe_load((PACKAGED_CONFIG / "sku_profiles.yaml").read_text())
        if os.environ.get("FORGED_TEST_THREADS"):
            # On a box shared with other busy processes, two ggml threads spin-wait on each other and
            # throughput collapses; this pins the engine's threads unless the test sets them itself.
            profile = deep_merge({"llama_cpp": {"n_threads": int(os.environ["FORGED_TEST_THREADS"])}}, profile or {})
        if os.environ.get("FORGED_TEST_GPU_LAYERS"):
            # The device run: the same tests with the model's layers and KV on the GPU.
            layers = int(os.environ["FORGED_TEST_GPU_LAYERS"])
            profile = deep_merge({"llama_cpp": {"n_gpu_layers": layers}}, profile or {})
        if os.environ.get("FORGED_TEST_PROFILE"):
            # The device run: a model whose tokenizer takes a token per character needs more context.
            profile = deep_merge(profile or {}, json.loads(os.environ["FORGED_TEST_PROFILE"]))
        profiles["profiles"]["cpu"] = deep_merge(profiles["profiles"]["cpu"], profile or {})
        self.profiles = profiles
        self.write_config()
        self.env = dict(os.environ, FORGED_RUN_DIR=str(self.run_dir), FORGED_STATE_DIR=str(root / "state"),
                        PYTHONUNBUFFERED="1", **(env or {}))
        for key in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS", "LISTEN_PID"):
            if key not in (env or {}):
                self.env.pop(key, None)
        self.log_path = root / "forged.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def write_config(self) -> None:
        (self.config_dir / "forged.yaml").write_text(yaml.safe_dump(self.settings))
        (self.config_dir / "sku_profiles.yaml").write_text(yaml.safe_dump(self.profiles))

    def start(self, wait_ready: bool = True) -> Daemon:
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "forged", "--config-dir", str(self.config_dir), "run"],
                                     env=self.env, stdout=self._log, stderr=subprocess.STDOUT)
        if wait_ready:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"forged exited with {self.proc.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise AssertionError(f"forged not ready after {timeout} s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def get(self, route: str) -> Any:
        response = httpx.get(f"{self.url}{route}", timeout=10)
        return response.json()

    def status(self) -> dict[str, Any]:
        return self.get("/v1/status")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"forged did not stop within {timeout} s:\n{self.log()}") from None

    def unix_client(self, **kw: Any) -> httpx.Client:
        return httpx.Client(transport=httpx.HTTPTransport(uds=str(self.socket_path)), base_url="http://forged",
                            **kw)


@pytest.fixture
def make_daemon(tmp_path: Path, model_path: Path) -> Iterator[Any]:
    started: list[Daemon] = []

    def factory(model: Path | None = None, **kw: Any) -> Daemon:
        root = tmp_path / f"d{len(started)}"
        daemon = Daemon(root, model or model_path, **kw)
        started.append(daemon)
        return daemon

    yield factory
    for daemon in started:
        with contextlib.suppress(Exception):
            daemon.stop(signal.SIGKILL, timeout=10)


@pytest.fixture(scope="module")
def shared_daemon(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Daemon]:
    """One daemon with the packaged cpu profile, for tests that do not change its config."""
    root = tmp_path_factory.mktemp("shared")
    daemon = Daemon(root, model_path).start()
    yield daemon
    daemon.stop()
    shutil.rmtree(root / "state", ignore_errors=True)


def sse_events(lines: Iterator[str]) -> Iterator[Any]:
    """Parse an SSE body into JSON payloads; '[DONE]' is yielded as the string."""
    for line in lines:
        if line.startswith("data: "):
            data = line[len("data: "):]
            yield data if data == "[DONE]" else json.loads(data)
