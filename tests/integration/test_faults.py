"""Engine faults on the real daemon and model: a request whose sampling fails, a failed llama_decode,
a hung step loop, and model files that cannot be loaded.

Faults are armed through the test-only hook POST /_test/fault (FORGED_TEST_HOOKS=1; see
docs/architecture.md, Test hooks). A fault targets one request: by id, or the next request the
engine starts after arming, so which request it hits never depends on timing.
"""

from __future__ import annotations

import contextlib
import json
import random
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, sse_events

# The daemon thinks systemd watches it: one WATCHDOG=1 per second while the engine progresses, and
# /readyz reports a stall after half of that.
WATCHDOG_USEC = 2_000_000
LONG_PROMPT = " ".join(["The quick brown fox jumps over the lazy dog."] * 30)  # ~300 tokens: 3 steps of prefill


class Notifications:
    """sd_notify datagrams from the daemon, with the time each arrived (drained by a thread so that
    the daemon never blocks on a full socket)."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            with contextlib.suppress(TimeoutError, OSError):
                self.messages.append((time.monotonic(), self.sock.recv(4096).decode()))

    def pings(self, since: float, until: float = float("inf")) -> list[float]:
        return [t for t, m in list(self.messages) if m == "WATCHDOG=1" and since <= t < until]

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[tuple[Daemon, Notifications]]:
    """One daemon with the packaged cpu profile (4 sessions, 128 tokens a step), the fault hook on,
    and a watchdog as systemd would arm it."""
    root = tmp_path_factory.mktemp("faults")
    notifications = Notifications(root / "notify.sock")
    daemon = Daemon(root, model_path, env={"FORGED_TEST_HOOKS": "1", "NOTIFY_SOCKET": str(root / "notify.sock"),
                                           "WATCHDOG_USEC": str(WATCHDOG_USEC)}).start()
    yield daemon, notifications
    daemon.stop()
    notifications.close()


@pytest.fixture
def daemon(hooked: tuple[Daemon, Notifications]) -> Daemon:
    return hooked[0]


def body(max_tokens: int, prompt: str = "Write a story about the sea.", stream: bool = True) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, "stream": stream, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True}


class Stream:
    """One streamed completion, consumed in a thread: its id once the first chunk is in, every event."""

    def __init__(self, daemon: Daemon, request: dict[str, Any]) -> None:
        self.url = daemon.url
        self.request = request
        self.events: list[Any] = []
        self.status_code = 0
        self.id: str | None = None
        self.started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.request, timeout=180) as r:
                self.status_code = r.status_code
                for event in sse_events(r.iter_lines()):
                    self.events.append(event)
                    if isinstance(event, dict) and event.get("id") and self.id is None:
                        self.id = event["id"]
                        self.started.set()
        finally:
            self.started.set()

    def wait_started(self) -> str:
        assert self.started.wait(120) and self.id, (self.status_code, self.events)
        return self.id

    def join(self) -> Stream:
        self._thread.join(180)
        assert not self._thread.is_alive(), "the stream did not end"
        return self

    @property
    def error(self) -> dict[str, Any] | None:
        return next((e["error"] for e in self.events if isinstance(e, dict) and "error" in e), None)

    @property
    def tokens(self) -> int:
        return sum(len(c.get("token_ids", [])) for e in self.events if isinstance(e, dict)
                   for c in e.get("choices", []))

    @property
    def finish_reason(self) -> str | None:
        return next((c["finish_reason"] for e in self.events if isinstance(e, dict)
                     for c in e.get("choices", []) if c.get("finish_reason")), None)

    def assert_completed(self) -> None:
        assert self.status_code == 200 and self.error is None, self.events[-3:]
        assert self.finish_reason == "length" and self.tokens == self.request["max_tokens"], self.events[-3:]
        assert self.events[-1] == "[DONE]"

    def assert_failed(self, message: str) -> None:
        assert self.status_code == 200, self.events
        assert self.error is not None and message in self.error["message"], self.events[-3:]
        assert self.error["code"] == "engine_error" and self.error["type"] == "server_error"
        assert self.finish_reason is None and self.events[-1] == "[DONE]"


def arm(daemon: Daemon, **fault: Any) -> dict[str, Any]:
    response = httpx.post(f"{daemon.url}/_test/fault", json=fault, timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def outcomes(daemon: Daemon) -> dict[str, float]:
    text = httpx.get(f"{daemon.url}/metrics", timeout=10).text
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^forge_requests_total\{outcome="(\w+)"\} (\S+)$', text, re.MULTILINE)}


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] != before.get(k, 0.0)}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        last = predicate()
        if last:
            return last
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what} (last: {last!r})"
        time.sleep(0.05)


def wait_idle(daemon: Daemon) -> None:
    """Every session, sequence, KV block and cell is back: nothing a failed request held is left."""
    def idle() -> bool:
        s = daemon.status()
        return (s["sessions"]["active"], s["queue"]["depth"], s["engine"]["open_sequences"],
                s["kv_cache"]["blocks_used"], s["kv_cache"]["cells_used"]) == (0, 0, 0, 0, 0)
    wait_for(idle, 30, "the daemon to be idle with every KV block free")


def complete_concurrently(daemon: Daemon, n: int, max_tokens: int) -> list[httpx.Response]:
    """n non-streamed completions at once: with n = max sessions every sequence slot is reused, so a
    slot whose KV cells a failed request left behind would make libllama refuse the batch."""
    responses: list[httpx.Response] = []

    def one() -> None:
        responses.append(httpx.post(f"{daemon.url}/v1/completions", json=body(max_tokens, stream=False), timeout=180))

    threads = [threading.Thread(target=one) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    return responses


def test_sampling_fault_fails_only_the_targeted_stream(daemon: Daemon) -> None:
    before = outcomes(daemon)
    streams = [Stream(daemon, body(48)) for _ in range(3)]
    ids = [s.wait_started() for s in streams]
    status = daemon.status()
    assert status["engine"]["open_sequences"] == 3, status["engine"]
    per_request = status["kv_cache"]["blocks_used"] // 3  # the same prompt and max_tokens reserve the same
    assert per_request > 0 and status["kv_cache"]["blocks_used"] == 3 * per_request, status["kv_cache"]

    victim, *others = streams
    armed = arm(daemon, kind="sample_error", request_id=ids[0])
    assert armed == {"injected": "sample_error", "request_id": ids[0]}
    victim.join().assert_failed(f"injected sample_error fault in request {ids[0]}")
    assert victim.tokens < 48

    # Its sequence and blocks are gone while the others still hold theirs.
    def victim_freed() -> bool:
        s = daemon.status()
        open_now = s["engine"]["open_sequences"]
        return open_now <= 2 and s["kv_cache"]["blocks_used"] == per_request * open_now
    wait_for(victim_freed, 10, "the failed request's sequence and KV blocks to be freed")
    for stream in others:
        stream.join().assert_completed()
    wait_idle(daemon)
    responses = complete_concurrently(daemon, 4, 8)
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    wait_idle(daemon)
    assert delta(before, outcomes(daemon)) == {"failed": 1, "completed": 6}
    assert f"sampling failed for request {ids[0]}" in daemon.log_path.read_text()


def test_sampling_fault_in_a_non_streamed_request_is_a_500_naming_it(daemon: Daemon) -> None:
    before = outcomes(daemon)
    bystander = Stream(daemon, body(32))
    bystander.wait_started()
    armed = arm(daemon, kind="sample_error")
    assert armed == {"injected": "sample_error", "request_id": None, "target": "the next request the engine starts"}
    failed = httpx.post(f"{daemon.url}/v1/completions", json=body(16, stream=False), timeout=120)
    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert "injected sample_error fault" in error["message"] and error["message"].startswith("generation failed")
    assert (error["type"], error["code"]) == ("server_error", "engine_error")
    bystander.join().assert_completed()
    # The fault fired once: the next request is served.
    again = httpx.post(f"{daemon.url}/v1/completions", json=body(16, stream=False), timeout=120)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 16, again.text
    wait_idle(daemon)
    assert delta(before, outcomes(daemon)) == {"failed": 1, "completed": 2}


def test_failed_decode_fails_only_the_requests_in_its_batch(daemon: Daemon) -> None:
    """A decodes; L (a long prompt) and S (a shorter one) are admitted while the step loop is held
    by a hang, so both start together once it ends. The next batch holds A's decode token and the
    first 127 tokens of L's prompt (128 a step); S, behind L in the prefill order and longer than a
    quarter of a step (so not a short remainder that goes first), gets none. That batch's
    llama_decode fails with -3 (after writing its KV, the worst case): A and L fail, S and
    everything after run normally, reusing the failed requests' sequence slots."""
    before = outcomes(daemon)
    decoding = Stream(daemon, body(100))
    decoding.wait_started()
    arm(daemon, kind="hang", seconds=10)
    wait_for(lambda: _steps_stand_still(daemon), 10, "the step loop to hang")
    long_prompt = Stream(daemon, body(8, prompt=LONG_PROMPT))
    wait_for(lambda: daemon.status()["sessions"]["active"] == 2, 10, "the long prompt to be admitted")
    short_prompt = Stream(daemon, body(16, prompt="Write a story about the sea. " * 8))
    wait_for(lambda: daemon.status()["sessions"]["active"] == 3, 10, "the short prompt to be admitted")
    armed = arm(daemon, kind="decode_error", status=-3)
    assert armed == {"injected": "decode_error", "request_id": None, "status": -3,
                     "target": "the next request the engine starts"}
    # Both were admitted and handed to the engine, which has not started them yet: the fault's
    # target is the long prompt, and the two start in the same step once the hang ends.
    assert daemon.status()["engine"]["open_sequences"] == 1, "the hang ended before the test was set up"

    decoding.join().assert_failed("llama_decode failed with status -3")
    long_prompt.join().assert_failed("llama_decode failed with status -3")
    assert long_prompt.tokens == 0
    short_prompt.join().assert_completed()
    assert "llama_decode failed with status -3; failing the 2 requests in that batch" in daemon.log_path.read_text()
    wait_idle(daemon)
    responses = complete_concurrently(daemon, 4, 8)
    assert [r.status_code for r in responses] == [200] * 4, [r.text for r in responses]
    assert all(r.json()["usage"]["completion_tokens"] == 8 for r in responses)
    wait_idle(daemon)
    assert delta(before, outcomes(daemon)) == {"failed": 2, "completed": 5}


def _steps_stand_still(daemon: Daemon) -> bool:
    first = daemon.status()["engine"]["steps"]
    time.sleep(1)
    return daemon.status()["engine"]["steps"] == first


def test_hung_step_loop_fails_readiness_and_withholds_the_watchdog(hooked: tuple[Daemon, Notifications]) -> None:
    daemon, notifications = hooked
    started = time.monotonic()
    wait_for(lambda: len(notifications.pings(started)) >= 2, 10, "watchdog pings while idle")
    assert httpx.get(f"{daemon.url}/readyz", timeout=5).status_code == 200
    arm(daemon, kind="hang", seconds=6)
    request = Stream(daemon, body(4))
    wait_for(lambda: daemon.status()["sessions"]["active"] == 1, 10, "the request to be admitted")

    stalled = wait_for(lambda: _readyz(daemon, 503), 5, "/readyz to report the stall")
    assert stalled["status"] == "stalled" and "no progress for over 0.5 s" in stalled["reason"], stalled
    seen_stall = time.monotonic()
    time.sleep(2)  # two watchdog periods, still inside the hang
    assert daemon.status()["engine"]["open_sequences"] == 1, "the hang ended early: the test proves nothing"
    assert notifications.pings(seen_stall, time.monotonic()) == [], "WATCHDOG=1 sent while the engine was stuck"
    assert "withholding WATCHDOG=1" in daemon.log_path.read_text()

    request.join().assert_completed()  # the hang ends: the request completes, nothing was lost
    wait_for(lambda: _readyz(daemon, 200), 5, "/readyz to recover")
    recovered = time.monotonic()
    wait_for(lambda: notifications.pings(recovered), 5, "watchdog pings to resume")


def _readyz(daemon: Daemon, status: int) -> dict[str, Any] | None:
    response = httpx.get(f"{daemon.url}/readyz", timeout=5)
    return response.json() if response.status_code == status else None


@pytest.mark.parametrize(("fault", "param"), [
    ({"kind": "explode"}, "kind"),
    ({"kind": "hang", "seconds": -1}, "seconds"),
    ({"kind": "hang", "seconds": "10"}, "seconds"),
    ({"kind": "decode_error", "status": 0}, "status"),
    ({"kind": "decode_error", "status": True}, "status"),
    ({"kind": "sample_error", "request_id": 7}, "request_id"),
    ({"kind": "sample_error", "seconds": 3}, "seconds"),
    ([{"kind": "hang"}], None),
    (b'{"kind": "hang"', None),
])
def test_bad_fault_requests_are_400_naming_the_field(daemon: Daemon, fault: Any, param: str | None) -> None:
    content = fault if isinstance(fault, bytes) else json.dumps(fault).encode()
    response = httpx.post(f"{daemon.url}/_test/fault", content=content, timeout=10)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_fault_route_exists_only_with_the_test_hooks(shared_daemon: Daemon) -> None:
    response = httpx.post(f"{shared_daemon.url}/_test/fault", json={"kind": "hang", "seconds": 1}, timeout=10)
    assert response.status_code == 404 and response.json()["error"]["code"] == "not_found"


def _truncated_model(model: Path, target: Path) -> None:
    """The real GGUF cut in half: header and metadata intact, tensor data missing."""
    with model.open("rb") as src:
        target.write_bytes(src.read(model.stat().st_size // 2))


BAD_MODELS: dict[str, tuple[Callable[[Path, Path], None], str]] = {
    "random bytes": (lambda model, p: p.write_bytes(random.Random(1).randbytes(4096)),
                     "not a GGUF model file (bad magic"),
    "GGUF magic then garbage": (lambda model, p: p.write_bytes(b"GGUF" + (3).to_bytes(4, "little")
                                                               + random.Random(2).randbytes(4096)),
                                "libllama could not load this model file (corrupt or unsupported GGUF): "
                                "gguf_init_from_reader:"),
    "truncated real GGUF": (_truncated_model, "libllama could not load this model file (corrupt or unsupported "
                                              "GGUF): llama_model_load: error loading model: tensor"),
}


@pytest.mark.parametrize("kind", BAD_MODELS)
def test_bad_model_file_refuses_to_start_quickly_in_one_line(make_daemon, model_path: Path, tmp_path: Path,
                                                             kind: str) -> None:
    make, expected = BAD_MODELS[kind]
    bad = tmp_path / "model.gguf"
    make(model_path, bad)
    daemon: Daemon = make_daemon(settings={"model": {"path": str(bad)}})
    # Bounded: a daemon that hung instead of refusing fails with TimeoutExpired (startup takes a few s).
    result = subprocess.run([sys.executable, "-m", "forged", "--config-dir", str(daemon.config_dir), "run"],
                            capture_output=True, text=True, timeout=30, env=daemon.env)
    assert result.returncode == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"forged: cannot start: {bad}: {expected}"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "libllama:" not in result.stderr
