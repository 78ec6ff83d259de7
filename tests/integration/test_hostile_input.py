"""Malformed and abusive input against a real daemon: each gets a clear, specific 4xx (or, for a
client that never finishes, a closed connection), and the daemon serves normally afterwards."""

from __future__ import annotations

import contextlib
import json
import resource
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import Daemon

BODY_TIMEOUT_S = 2.0
KEEPALIVE_TIMEOUT_S = 3.0
MAX_BODY = 64 * 1024
MAX_HEADER_BYTES = 4096
MAX_HEADERS = 50
# Each limit is asserted to act within this much beyond its configured time: generous, for a busy machine.
GRACE_S = 10.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("hostile")
    server = {"body_timeout_s": BODY_TIMEOUT_S, "keepalive_timeout_s": KEEPALIVE_TIMEOUT_S, "max_body_bytes": MAX_BODY,
              "max_header_bytes": MAX_HEADER_BYTES, "max_headers": MAX_HEADERS}
    # One engine thread: libllama's spinning thread pool is slow on 2 cores shared with other daemons.
    d = Daemon(root, model_path, settings={"server": server},
               profile={"inference": {"max_seq_len": 256}, "llama_cpp": {"n_threads": 1}}).start()
    yield d
    d.stop()


def assert_unharmed(daemon: Daemon) -> None:
    """Ready, answers a normal request, and holds no session, queued request or KV block."""
    assert httpx.get(f"{daemon.url}/readyz", timeout=10).status_code == 200
    r = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=60)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 30
    while True:
        status = daemon.status()
        if (status["sessions"]["active"], status["queue"]["depth"], status["kv_cache"]["blocks_used"]) == (0, 0, 0):
            return
        assert time.monotonic() < deadline, f"not back to idle: {status['sessions']} {status['queue']}"
        time.sleep(0.2)


def assert_error(response: httpx.Response, status: int, code: str, param: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    error = body["error"]
    assert error["code"] == code and error["param"] == param and error["message"], error
    return error


def post_raw(daemon: Daemon, route: str, body: bytes, **headers: str) -> httpx.Response:
    return httpx.post(f"{daemon.url}{route}", content=body, timeout=60,
                      headers={"content-type": "application/json", **headers})


@pytest.mark.parametrize(("route", "body", "param", "says"), [
    ("/v1/completions", b'{"prompt": "x",', None, "not valid JSON"),
    ("/v1/completions", b"[1, 2]", None, "must be a JSON object"),
    ("/v1/completions", b"[" * 20_000 + b"]" * 20_000, None, "nested too deeply"),
    ("/v1/completions", b'{"prompt": 5}', "prompt", "prompt"),
    ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}', "temperature", "must be a number"),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', "stream", "true or false"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 2.5}', "max_tokens", "integer"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', "max_tokens", ">= 1"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 0}', "max_tokens", ">= 1"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1e400}', "max_tokens", "integer"),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1' + b"0" * 5000 + b"}", None, "not valid JSON"),
    ("/v1/completions", b'{"prompt": "x", "top_p": NaN}', "top_p", "<= 1"),
    ("/v1/completions", b'{"prompt": "x", "frobnicate": 1}', "frobnicate", "unknown field 'frobnicate'"),
    ("/v1/completions", b'{"prompt": "x", "max_token": 5}', "max_token", "unknown field"),
    ("/v1/completions", b'{"prompt": "x", "n": 5}', "n", "n is 5"),  # the cpu profile runs 4 at once
    ("/v1/completions", b'{"prompt": "x", "n": 17}', "n", "<= 16"),
    ("/v1/completions", b'{"prompt": "x", "n": true}', "n", "integer"),
    ("/v1/completions", b'{"prompt": [1, "a"]}', "prompt", "token ids"),
    ("/v1/chat/completions", b'{"messages": "hi"}', "messages", "non-empty list"),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "x"}]}', "messages[0].role", "role"),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "max_completion_tokens": -5}',
     "max_completion_tokens", ">= 1"),
])
def test_malformed_bodies_get_a_specific_400(daemon: Daemon, route: str, body: bytes, param: str | None,
                                             says: str) -> None:
    error = assert_error(post_raw(daemon, route, body), 400, "invalid_request", param)
    assert says in error["message"], error
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body", [
    b'{"prompt": "caf\xe9"}',                      # Latin-1, not UTF-8
    b'{"prompt": "\xff\xfe\xfd"}',
    b'{"prompt": "ok", "user": "\xed\xa0\x80"}',  # an encoded surrogate: invalid in UTF-8
])
def test_invalid_utf8_body_is_refused(daemon: Daemon, body: bytes) -> None:
    error = assert_error(post_raw(daemon, "/v1/completions", body), 400, "invalid_request")
    assert "UTF-8" in error["message"]


@pytest.mark.parametrize("prompt", ["\ud800 lone surrogate", "nul \u0000 byte", "\U0010ffff"])
def test_odd_but_valid_json_strings_do_not_break_the_tokenizer(daemon: Daemon, prompt: str) -> None:
    body = json.dumps({"prompt": prompt, "max_tokens": 2}).encode()  # ensure_ascii: escapes, valid JSON
    r = post_raw(daemon, "/v1/completions", body)
    assert r.status_code in (200, 400), r.text
    if r.status_code == 400:
        assert_error(r, 400, "invalid_request", "prompt")


def test_huge_max_tokens_and_prompt_over_context_name_the_numbers(daemon: Daemon) -> None:
    context = daemon.status()["model"]["context_length"]
    r = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "x", "max_tokens": 10**12}, timeout=60)
    error = assert_error(r, 400, "context_length_exceeded")
    assert str(10**12) in error["message"] and str(context) in error["message"]
    r = httpx.post(f"{daemon.url}/v1/chat/completions",
                   json={"messages": [{"role": "user", "content": "word " * (context + 10)}]}, timeout=60)
    error = assert_error(r, 400, "context_length_exceeded")
    assert str(context) in error["message"]
    assert_unharmed(daemon)


def test_body_over_the_limit_gets_413(daemon: Daemon) -> None:
    big = json.dumps({"prompt": "x" * MAX_BODY}).encode()
    error = assert_error(post_raw(daemon, "/v1/completions", big), 413, "request_too_large")
    assert str(MAX_BODY) in error["message"]

    def chunks() -> Iterator[bytes]:  # chunked: no Content-Length to refuse it by, so the read stops at the limit
        for _ in range(MAX_BODY // 1024 + 2):
            yield b" " * 1024

    chunked = httpx.post(f"{daemon.url}/v1/completions", content=chunks(), timeout=60,
                         headers={"content-type": "application/json"})
    assert_error(chunked, 413, "request_too_large")
    assert_unharmed(daemon)


@contextlib.contextmanager
def raw_connection(daemon: Daemon) -> Iterator[socket.socket]:
    sock = socket.create_connection(("127.0.0.1", daemon.port), timeout=KEEPALIVE_TIMEOUT_S + GRACE_S)
    try:
        yield sock
    finally:
        sock.close()


def read_until_closed(sock: socket.socket) -> bytes:
    """Everything the daemon sends until it closes the connection (socket timeout: it never did)."""
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_header_line_over_the_limit_is_refused_and_closed(daemon: Daemon) -> None:
    with raw_connection(daemon) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10) + b"\r\n\r\n")
        answer = read_until_closed(sock)
    # Refused by aiohttp's HTTP parser before forged's application sees a request (docs/api.md, Limits).
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:200]
    assert f"Got more than {MAX_HEADER_BYTES} bytes".encode() in answer
    assert_unharmed(daemon)


def test_too_many_headers_are_refused_and_closed(daemon: Daemon) -> None:
    headers = b"".join(b"X-H%d: v\r\n" % i for i in range(MAX_HEADERS + 5))
    with raw_connection(daemon) as sock:
        sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n" + headers + b"\r\n")
        answer = read_until_closed(sock)
    assert answer.split(b"\r\n", 1)[0].endswith(b" 400 Bad Request"), answer[:200]
    assert b"Too many headers" in answer
    # Within the limit the same request is served.
    ok = httpx.get(f"{daemon.url}/v1/models", headers={f"X-H{i}": "v" for i in range(MAX_HEADERS // 2)}, timeout=10)
    assert ok.status_code == 200
    assert_unharmed(daemon)


def test_stalled_body_gets_408_and_the_connection_is_closed(daemon: Daemon) -> None:
    with raw_connection(daemon) as sock:
        started = time.monotonic()
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\": \"par")
        answer = read_until_closed(sock)
        waited = time.monotonic() - started
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 "), answer[:300]
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert BODY_TIMEOUT_S <= waited < BODY_TIMEOUT_S + GRACE_S
    assert_unharmed(daemon)


@pytest.mark.parametrize("sent", [b"", b"GET /v1/mod"], ids=["nothing", "half-a-request-line"])
def test_a_connection_that_never_sends_a_request_is_closed(daemon: Daemon, sent: bytes) -> None:
    with raw_connection(daemon) as sock:
        started = time.monotonic()
        sock.sendall(sent)
        answer = read_until_closed(sock)
        waited = time.monotonic() - started
    assert answer == b""
    assert KEEPALIVE_TIMEOUT_S - 0.5 <= waited < KEEPALIVE_TIMEOUT_S + GRACE_S


def _timed_completion(url: str) -> float:
    started = time.monotonic()
    r = httpx.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 4, "temperature": 0}, timeout=120)
    assert r.status_code == 200, r.text
    return time.monotonic() - started


def test_a_thousand_idle_connections_do_not_starve_a_request(make_daemon: Any) -> None:
    idle = 1000
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < idle + 200:
        pytest.fail(f"the hard open-files limit {hard} is too low for {idle} connections on this machine")
    # The daemon starts with a soft limit that 1000 connections exceed: it must raise it itself.
    low = 512
    d = make_daemon(settings={"server": {"keepalive_timeout_s": 600}},
                    profile={"llama_cpp": {"n_threads": 1}})
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        d.start(wait_ready=False)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # this process holds the other ends
    d.wait_ready()
    assert f"open files limit raised from {low} to {hard}" in d.log()
    baseline = min(_timed_completion(d.url) for _ in range(3))
    sockets = []
    try:
        for _ in range(idle):
            sockets.append(socket.create_connection(("127.0.0.1", d.port), timeout=10))
        loaded = min(_timed_completion(d.url) for _ in range(3))
        assert loaded < baseline * 5 + 1.0, f"baseline {baseline:.3f} s, with {idle} idle connections {loaded:.3f} s"
        # The daemon really holds them all open.
        assert httpx.get(f"{d.url}/healthz", timeout=10).status_code == 200
        alive = sum(1 for s in sockets[:50] if _still_open(s))
        assert alive == 50
    finally:
        for s in sockets:
            s.close()
    assert_unharmed(d)


def _still_open(sock: socket.socket) -> bool:
    sock.setblocking(False)
    try:
        return sock.recv(1) != b""
    except BlockingIOError:
        return True  # nothing to read and not closed
    finally:
        sock.setblocking(True)
