"""Hostile clients, round two (issue 20), each against a real daemon over real sockets: a client that
stops reading, SIGTERM while one is connected, Retry-After after a quiet spell, a flood of large
bodies, and clients that close mid-body, half-close, or send more than the limit.

Clients that must fill socket buffers quickly are served a model id of MODEL_ID_CHARS characters
(`model.name`): every SSE chunk carries it, so a few dozen tokens make hundreds of kilobytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon, sse_events
from prometheus_client.parser import text_string_to_metric_families

from forged.cli import forgectl_main
from forged.metrics import ADMITTED_OUTCOMES

MODEL_ID_CHARS = 32 * 1024
ONE_THREAD = {"llama_cpp": {"n_threads": 1}}
# Enough output to fill any socket buffers many times over at MODEL_ID_CHARS a chunk.
ENDLESS = {"prompt": "Write a long story about the sea.", "max_tokens": 2000, "ignore_eos": True, "stream": True,
           "temperature": 0}
# forge_generation_tokens_total counts tokens as their handler takes them from the engine, so while
# every handler is blocked writing to a client that does not read, it stands still (the engine's own
# rate is several tokens a second). Standing still this long means every write has blocked.
STILL_S = 6.0


def metrics(daemon: Daemon) -> dict[str, float]:
    text = httpx.get(f"{daemon.url}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[f"{sample.name}{{{labels}}}" if labels else sample.name] = sample.value
    return out


def outcome(m: dict[str, float], name: str) -> float:
    return m[f'forge_requests_total{{outcome="{name}"}}']


def assert_accounted(m: dict[str, float]) -> None:
    """At a quiet moment every admitted request has ended in exactly one outcome."""
    assert m["forge_requests_admitted_total"] == sum(outcome(m, o) for o in ADMITTED_OUTCOMES), m


def wait_for(check: Callable[[], bool], timeout: float, what: str, daemon: Daemon) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}:\n{daemon.log()}"
        time.sleep(0.1)


def wait_idle(daemon: Daemon, timeout: float = 60) -> dict[str, Any]:
    def idle() -> bool:
        s = daemon.status()
        return (s["sessions"]["active"], s["queue"]["depth"], s["kv_cache"]["blocks_used"]) == (0, 0, 0)
    wait_for(idle, timeout, "the daemon to be idle", daemon)
    return daemon.status()


def connect(daemon: Daemon, transport: str, rcvbuf: int | None = None) -> socket.socket:
    if transport == "unix":
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.connect(str(daemon.socket_path))
    else:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.connect(("127.0.0.1", daemon.port))
    sock.settimeout(60)
    return sock


def request_bytes(body: bytes, route: str = "/v1/completions", **headers: str) -> bytes:
    head = {"Host": "forged", "Content-Type": "application/json", "Content-Length": str(len(body)), **headers}
    return (f"POST {route} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in head.items()) + "\r\n").encode() + body


def stalled_reader(daemon: Daemon, transport: str) -> socket.socket:
    """A streamed request whose client reads the first bytes of the answer and then never reads again,
    keeping the connection open."""
    sock = connect(daemon, transport, rcvbuf=4096)
    sock.sendall(request_bytes(json.dumps(ENDLESS).encode()))
    assert sock.recv(12) == b"HTTP/1.1 200"
    return sock


def wait_until_every_write_blocks(daemon: Daemon, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    last, since = -1.0, time.monotonic()
    while True:
        tokens = metrics(daemon)["forge_generation_tokens_total"]
        if tokens != last:
            last, since = tokens, time.monotonic()
        elif tokens > 0 and time.monotonic() - since >= STILL_S:
            return
        assert time.monotonic() < deadline, f"the writes never blocked:\n{daemon.log()}"
        time.sleep(0.5)


def read_until_closed(sock: socket.socket) -> bytes:
    received = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := sock.recv(65536):
            received += chunk
    return received


# ------------------------------------------------------------------ a client that stops reading

def test_a_client_that_stops_reading_loses_its_session_and_others_are_served(make_daemon: Any) -> None:
    write_timeout = 2.0
    daemon: Daemon = make_daemon(settings={"model": {"name": "m" * MODEL_ID_CHARS},
                                           "server": {"write_timeout_s": write_timeout}},
                                 profile={"inference": {"max_concurrent_sessions": 2},
                                          "thresholds": {"max_queue_depth": 2}, **ONE_THREAD}).start()
    # Both sessions taken by clients that stop reading, one on each listener.
    stalled = [stalled_reader(daemon, "tcp"), stalled_reader(daemon, "unix")]
    try:
        wait_for(lambda: outcome(metrics(daemon), "client_stalled") == 2, 180,
                 "both stalled clients to be hung up on", daemon)
        # They are still connected (they never read, never closed), and service goes on, on both
        # listeners, for more requests than there are sessions.
        body = {"prompt": "Say hello.", "max_tokens": 4}
        for _ in range(2):
            assert httpx.post(f"{daemon.url}/v1/completions", json=body, timeout=120).status_code == 200
            with daemon.unix_client(timeout=120) as unix:
                assert unix.post("/v1/completions", json=body).status_code == 200
        status = wait_idle(daemon)
        assert status["engine"]["open_sequences"] == 0 and status["kv_cache"]["cells_used"] == 0
    finally:
        for sock in stalled:
            sock.close()
    m = metrics(daemon)
    assert outcome(m, "client_stalled") == 2 and outcome(m, "completed") == 4 and outcome(m, "failed") == 0
    assert_accounted(m)
    log = daemon.log_path.read_text()
    assert log.count(f"the client took none of its answer for {write_timeout:g} s") == 2, log[-3000:]
    assert "Traceback" not in log


def test_sigterm_with_clients_that_stopped_reading_exits_within_the_drain_timeout(make_daemon: Any) -> None:
    """The write timeout is long here, so only the drain can end them: SIGTERM must not wait for the
    clients to read (it did for 150 s, until systemd's SIGKILL)."""
    drain = 3
    daemon: Daemon = make_daemon(settings={"model": {"name": "m" * MODEL_ID_CHARS},
                                           "server": {"drain_timeout_s": drain, "write_timeout_s": 600}},
                                 profile={"inference": {"max_concurrent_sessions": 2}, **ONE_THREAD}).start()
    stalled = [stalled_reader(daemon, "tcp"), stalled_reader(daemon, "unix")]
    try:
        wait_until_every_write_blocks(daemon)
        assert daemon.status()["sessions"]["active"] == 2
        assert daemon.proc is not None
        started = time.monotonic()
        daemon.proc.send_signal(signal.SIGTERM)
        # A few seconds past the drain timeout: the hang-up grace (2 + 2 s) and the exit itself.
        assert daemon.proc.wait(drain + 10) == 0, daemon.log()
        print(f"\nexit {time.monotonic() - started:.1f} s after SIGTERM (drain_timeout_s {drain})")
    finally:
        for sock in stalled:
            sock.close()
    log = daemon.log_path.read_text()
    assert "drain: hung up on 2 clients" in log, log[-3000:]
    line = next(line for line in log.splitlines() if "requests at exit:" in line)
    totals = {k: int(v) for k, v in (part.split() for part in line.split("requests at exit: ")[1].split(", "))}
    assert totals["admitted"] == 2 and totals["cancelled"] == 2, totals


# ------------------------------------------------------------------ Retry-After after a quiet spell

def test_retry_after_is_within_2x_of_the_time_the_queue_takes_to_drain(make_daemon: Any) -> None:
    """Two requests some seconds apart, then a burst that fills the sessions and the queue: the 503's
    Retry-After against the time the queue really took to empty. A rate of sessions finished per
    wall-clock second counted the quiet spell and said many times too long."""
    sessions, queue, idle_s = 2, 4, 15
    daemon: Daemon = make_daemon(profile={"inference": {"max_concurrent_sessions": sessions},
                                          "thresholds": {"max_queue_depth": queue}, **ONE_THREAD}).start()
    # Requests of about 3 s at the decode rate the warm-up measured: Retry-After is whole seconds.
    rate = daemon.status()["engine"]["decode_tokens_per_s"]
    body = {"prompt": "Tell me about the sea.", "max_tokens": max(16, int(3 * rate)), "ignore_eos": True,
            "temperature": 0}
    url = f"{daemon.url}/v1/completions"
    assert httpx.post(url, json=body, timeout=120).status_code == 200
    time.sleep(idle_s)
    assert httpx.post(url, json=body, timeout=120).status_code == 200

    burst = [threading.Thread(target=httpx.post, args=(url,), kwargs={"json": body, "timeout": 300})
             for _ in range(sessions + queue)]
    for t in burst:
        t.start()
    wait_for(lambda: daemon.status()["queue"]["depth"] == queue, 60, "the queue to fill", daemon)
    refused = httpx.post(url, json=body, timeout=60)
    refused_at = time.monotonic()
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "queue_full", refused.text
    retry_after = int(refused.headers["Retry-After"])
    wait_for(lambda: daemon.status()["queue"]["depth"] == 0, 300, "the queue to drain", daemon)
    drained = time.monotonic() - refused_at
    for t in burst:
        t.join()
    print(f"\nRetry-After {retry_after} s; the queue drained in {drained:.1f} s")
    assert drained / 2 <= retry_after <= drained * 2


# ------------------------------------------------------------------ many large bodies at once

def _peak_rss_bytes(daemon: Daemon) -> int:
    assert daemon.proc is not None
    for line in Path(f"/proc/{daemon.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_a_flood_of_large_bodies_is_bounded_and_a_stream_goes_on(make_daemon: Any) -> None:
    """100 clients at once each send a 3 MB body (valid JSON, an invalid request). At most
    max_body_bytes_in_flight of them are received and parsed at once; the rest get 503 server_busy
    at once. Before the budget all 100 were read at once, and the peak RSS grew 378 MiB here (the
    issue saw 1.2 GiB under 200)."""
    budget, clients, size = 8 * 2**20, 100, 3 * 2**20
    daemon: Daemon = make_daemon(settings={"server": {"max_body_bytes_in_flight": budget}},
                                 profile=ONE_THREAD).start()
    stream_body = {"prompt": "Tell me about the sea.", "max_tokens": 64, "ignore_eos": True, "stream": True}
    peak_before = _peak_rss_bytes(daemon)
    big = json.dumps({"prompt": "a" * size, "max_tokens": "many"}).encode()

    async def flood() -> tuple[list[Any], list[httpx.Response]]:
        limits = httpx.Limits(max_connections=clients + 1)
        async with httpx.AsyncClient(base_url=daemon.url, timeout=120, limits=limits) as client:
            async def stream() -> list[Any]:
                async with client.stream("POST", "/v1/completions", json=stream_body) as r:
                    assert r.status_code == 200
                    return [e async for e in _aevents(r)]

            streaming = asyncio.ensure_future(stream())
            await asyncio.sleep(0.5)  # under way
            answers = await asyncio.gather(*(client.post("/v1/completions", content=big,
                                                         headers={"Content-Type": "application/json"})
                                             for _ in range(clients)))
            return await streaming, list(answers)

    events, answers = asyncio.run(flood())
    peak_growth = _peak_rss_bytes(daemon) - peak_before
    codes = Counter(r.status_code for r in answers)
    print(f"\n{clients} bodies of {size} bytes: {dict(codes)}; peak RSS grew {peak_growth / 2**20:.0f} MiB")
    assert set(codes) <= {400, 503} and codes[503] > 0, codes
    for r in answers:
        if r.status_code == 503:
            assert r.json()["error"]["code"] == "server_busy" and int(r.headers["Retry-After"]) >= 1
        else:
            assert r.json()["error"]["param"] == "max_tokens"
    m = metrics(daemon)
    assert m['forge_rejections_total{reason="server_busy"}'] == codes[503]
    assert m['forge_rejections_total{reason="invalid_request"}'] == codes[400]
    # The stream under way got every token.
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    # Memory: at most `budget` of bodies held at once, each parsed into a string of the same size:
    # far below the clients' 300 MB.
    assert peak_growth < 128 * 2**20
    assert_accounted(m)
    wait_idle(daemon)


async def _aevents(response: httpx.Response) -> Any:
    async for line in response.aiter_lines():
        for event in sse_events(iter([line])):
            yield event


# ------------------------------------------------------------------ closes, half-closes, oversized bodies

MAX_BODY = 64 * 1024


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("hostile-clients")
    d = Daemon(root, model_path, settings={"server": {"max_body_bytes": MAX_BODY}}, profile=ONE_THREAD).start()
    yield d
    d.stop()


def test_a_client_closing_mid_body_is_counted_and_logs_no_error(daemon: Daemon) -> None:
    before = metrics(daemon)
    for transport in ("tcp", "unix"):
        with connect(daemon, transport) as sock:
            sock.sendall(request_bytes(b'{"prompt": "' + b"x" * 30_000 + b'"}')[:5_000])
            time.sleep(0.3)  # the daemon is reading the body
    wait_for(lambda: outcome(metrics(daemon), "abandoned") == outcome(before, "abandoned") + 2, 30,
             "both to be counted", daemon)
    log = daemon.log_path.read_text()
    assert "Traceback" not in log and "Error handling request" not in log and "ERROR" not in log, log[-3000:]
    assert metrics(daemon)['forge_requests_total{outcome="rejected"}'] == outcome(before, "rejected")


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_half_close_right_after_the_request_is_counted(daemon: Daemon, transport: str) -> None:
    """A server cannot tell a half-close (shutdown(SHUT_WR)) from a client that left: both are EOF.
    forged, like nginx (499), takes it as leaving, so a client that gives up mid-request stops costing
    at once; what it must not do is lose the request uncounted."""
    before = metrics(daemon)
    with connect(daemon, transport) as sock:
        sock.sendall(request_bytes(json.dumps({"prompt": "Say hi.", "max_tokens": 200, "ignore_eos": True}).encode()))
        sock.shutdown(socket.SHUT_WR)
        answer = read_until_closed(sock)
    wait_idle(daemon)
    after = metrics(daemon)
    counted = {o: outcome(after, o) - outcome(before, o) for o in (*ADMITTED_OUTCOMES, "rejected", "abandoned")}
    print(f"\n{transport}: {len(answer)} bytes answered; counted {({o: n for o, n in counted.items() if n})}")
    if answer:  # answered in full before the EOF was seen
        assert answer.startswith(b"HTTP/1.1 200") and counted["completed"] == 1, answer[:200]
    else:  # counted: before a verdict (abandoned) or after admission (cancelled)
        assert counted["abandoned"] + counted["cancelled"] == 1, counted
    assert sum(counted.values()) == 1, counted
    assert_accounted(after)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
def test_a_413_does_not_read_the_body(daemon: Daemon, transport: str) -> None:
    """A declared gigabyte is refused on its headers, and the connection closes instead of reading the
    rest (aiohttp would read and discard it for 10 s: a gigabyte on loopback)."""
    sent, chunk = 0, b"x" * 2**20
    with connect(daemon, transport) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: forged\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\n\r\n")
        sock.settimeout(2)  # blocked this long: nobody reads
        with contextlib.suppress(OSError):
            while sent < 10**9:
                sent += sock.send(chunk)
        sock.settimeout(10)
        answer = read_until_closed(sock)
    print(f"\n{transport}: {sent} bytes of the refused gigabyte accepted")
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"request_too_large"' in answer
    assert sent < 64 * 2**20, f"the daemon took {sent} bytes of a refused body"


def test_expect_100_continue_is_answered_only_for_a_body_that_will_be_read(daemon: Daemon) -> None:
    with connect(daemon, "tcp") as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: forged\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000000000\r\nExpect: 100-continue\r\n\r\n")
        answer = read_until_closed(sock)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]  # never "100 Continue" first
    assert b"100 Continue" not in answer
    body = json.dumps({"prompt": "Hi", "max_tokens": 2}).encode()
    with connect(daemon, "tcp") as sock:
        sock.sendall(request_bytes(body, Expect="100-continue")[: -len(body)])
        assert sock.recv(100) == b"HTTP/1.1 100 Continue\r\n\r\n"
        sock.sendall(body)
        assert sock.recv(12) == b"HTTP/1.1 200"
    with connect(daemon, "tcp") as sock:
        sock.sendall(request_bytes(body, Expect="something-else"))
        assert sock.recv(12) == b"HTTP/1.1 417"


# ------------------------------------------------------------------ top_k as a C int

@pytest.mark.parametrize("top_k", [2**31, 2**32 + 1, 2**63])
def test_top_k_beyond_a_c_int_is_refused_naming_it(daemon: Daemon, top_k: int) -> None:
    r = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 2, "top_k": top_k}, timeout=60)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "top_k" and "2147483647" in r.json()["error"]["message"]


def test_top_k_above_the_vocabulary_keeps_every_token(daemon: Daemon) -> None:
    def text(top_k: int) -> str:
        r = httpx.post(f"{daemon.url}/v1/completions", timeout=60, json={
            "prompt": "Once upon a time", "max_tokens": 8, "temperature": 1.0, "seed": 7, "top_k": top_k})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["text"]
    # The largest C int and a million are both above the vocabulary: each keeps every token, so with
    # the same seed they sample the same text.
    assert text(2**31 - 1) == text(1_000_000)


# ------------------------------------------------------------------ replacing the served model file

def _served_copy(model_path: Path, tmp_path: Path) -> Path:
    models = tmp_path / "models"
    models.mkdir()
    served = models / model_path.name
    shutil.copyfile(model_path, served)
    return served


def test_model_install_over_the_served_file_keeps_the_daemon_serving(make_daemon: Any, model_path: Path,
                                                                      tmp_path: Path) -> None:
    served = _served_copy(model_path, tmp_path)
    daemon: Daemon = make_daemon(settings={"model": {"path": str(served)}}, profile=ONE_THREAD).start()
    events: list[Any] = []
    body = {"prompt": "Tell me about the sea.", "max_tokens": 64, "ignore_eos": True, "stream": True}

    def stream() -> None:
        with httpx.stream("POST", f"{daemon.url}/v1/completions", json=body, timeout=300) as r:
            events.extend(sse_events(r.iter_lines()))

    reader = threading.Thread(target=stream)
    reader.start()
    wait_for(lambda: daemon.status()["sessions"]["active"] == 1, 60, "the stream to start", daemon)
    assert forgectl_main(["model", "install", "--force", "--dest", str(served.parent), str(model_path)]) == 0
    reader.join(300)
    assert events[-1] == "[DONE]" and events[-2]["choices"][0]["finish_reason"] == "length"
    r = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200
    assert daemon.proc is not None and daemon.proc.poll() is None
    assert [p.name for p in served.parent.iterdir()] == [served.name]


def test_overwriting_the_served_file_in_place_kills_the_daemon_and_says_so(make_daemon: Any, model_path: Path,
                                                                           tmp_path: Path) -> None:
    """Why the test above matters and docs/operations.md says to rename, never copy over: the weights
    are mmap'd, and a file cut under them (cp truncates before it writes) is SIGBUS on the next step.
    forged cannot survive it; the journal at least says what happened."""
    served = _served_copy(model_path, tmp_path)
    daemon: Daemon = make_daemon(settings={"model": {"path": str(served)}}, profile=ONE_THREAD).start()
    with served.open("r+b") as f:
        f.truncate(0)
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
    assert daemon.proc is not None and daemon.proc.wait(60) == -signal.SIGBUS
    assert "Fatal Python error: Bus error" in daemon.log()
