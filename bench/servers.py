"""Server processes for the benchmarks: a forged or llama-server process on a free loopback port.

Shared by bench_serving.py (CPU box) and gpu_bench.py (device); standard library and httpx only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process (its own process group) logging to a file, reachable at `url`."""

    def __init__(self, argv: list[str], env: dict[str, str], port: int, log: Path, ready_route: str) -> None:
        self.argv = argv
        self.port = port
        self.url = f"http://127.0.0.1:{port}"
        self.log = log
        self.ready_route = ready_route
        self.proc = subprocess.Popen(argv, env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def wait_ready(self, timeout: float = 600) -> float:
        """Seconds until `ready_route` answered 200; raises with the log's tail if the process exits first."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}: {self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + self.ready_route, timeout=2).status_code == 200:
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


def llama_server_argv(binary: Path, model: Path, port: int, *, slots: int, ctx_per_slot: int,
                      threads: int | None = None, extra: tuple[str, ...] = ()) -> list[str]:
    """llama-server with `slots` slots of `ctx_per_slot` tokens each (-c is the total it divides by -np).

    Everything else is llama-server's default (prompt cache on with --cache-ram 8192 MiB, f16 KV, batch
    2048 / ubatch 512, flash attention auto) unless `extra` says otherwise.
    """
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-np", str(slots), "-c", str(slots * ctx_per_slot)]
    if threads:
        argv += ["-t", str(threads), "-tb", str(threads)]
    return argv + list(extra)


def start_llama_server(binary: Path, model: Path, log: Path, *, slots: int, ctx_per_slot: int,
                       threads: int | None = None, extra: tuple[str, ...] = (),
                       env: dict[str, str] | None = None) -> Server:
    port = free_port()
    argv = llama_server_argv(binary, model, port, slots=slots, ctx_per_slot=ctx_per_slot, threads=threads,
                             extra=extra)
    return Server(argv, env if env is not None else dict(os.environ), port, log, "/health")
