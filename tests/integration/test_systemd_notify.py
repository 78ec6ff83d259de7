"""sd_notify over a real datagram socket: READY after load, STATUS, WATCHDOG only while progressing."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import httpx
from conftest import Daemon


def _receive(sock: socket.socket, seconds: float) -> list[tuple[float, str]]:
    got: list[tuple[float, str]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            data = sock.recv(4096)
        except TimeoutError:
            break
        got.append((time.monotonic(), data.decode()))
    return got


def test_ready_status_watchdog_and_stall(make_daemon, tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    daemon: Daemon = make_daemon(env={"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1000000",
                                      "FORGED_TEST_HOOKS": "1"})
    daemon.start(wait_ready=False)
    messages = _receive(sock, 8)
    texts = [m for _, m in messages]
    ready_at = next(i for i, m in enumerate(texts) if "READY=1" in m)
    assert any("EXTEND_TIMEOUT_USEC=" in m for m in texts[:ready_at]), texts
    assert "STATUS=profile cpu, ready" in texts[ready_at]
    pings = [t for t, m in messages[ready_at:] if m == "WATCHDOG=1"]
    assert len(pings) >= 8, texts  # every 0.5 s for the rest of the 8 s
    # The daemon was already serving when READY came.
    assert httpx.get(f"{daemon.url}/readyz").status_code == 200

    # Wedge the step loop with work pending: the pings must stop.
    httpx.post(f"{daemon.url}/_test/fault", json={"kind": "hang", "seconds": 5}).raise_for_status()
    def hung_request() -> None:
        with contextlib.suppress(httpx.HTTPError):
            httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=30)

    worker = threading.Thread(target=hung_request)
    worker.start()
    while daemon.status()["sessions"]["active"] == 0:  # the request is now pending in the engine
        time.sleep(0.02)
    _receive(sock, 0.6)  # drop a ping that was already due when the work arrived
    during = _receive(sock, 2.5)
    assert [m for _, m in during if m == "WATCHDOG=1"] == [], during
    assert httpx.get(f"{daemon.url}/readyz").status_code in (200, 503)
    worker.join(30)
    after = _receive(sock, 3)
    assert any(m == "WATCHDOG=1" for _, m in after), "pings did not resume once the engine moved again"
    assert daemon.stop() == 0
    final = _receive(sock, 2)
    assert any(m.startswith("STOPPING=1") for _, m in final), final
    sock.close()
