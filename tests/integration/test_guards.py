"""Session and queue guards under real concurrent load, and cleanup after disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import time

import httpx
from conftest import Daemon

LONG = {"prompt": "Tell me a very long story about the sea.", "max_tokens": 160, "temperature": 0,
        "ignore_eos": True, "stream": True}


async def _stream_one(client: httpx.AsyncClient, url: str) -> tuple[int, dict[str, str], str]:
    async with client.stream("POST", f"{url}/v1/completions", json=LONG) as r:
        body = (await r.aread()).decode()
        return r.status_code, dict(r.headers), body


def _wait_idle(daemon: Daemon, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = daemon.status()
        if (status["sessions"]["active"], status["queue"]["depth"], status["kv_cache"]["blocks_used"],
                status["engine"]["open_sequences"]) == (0, 0, 0, 0) or time.monotonic() > deadline:
            return status
        time.sleep(0.1)


def test_twenty_clients_four_sessions_queue_five(make_daemon) -> None:
    daemon: Daemon = make_daemon(profile={"inference": {"max_concurrent_sessions": 4},
                                          "thresholds": {"max_queue_depth": 5}}).start()

    async def run() -> list[tuple[int, dict[str, str], str]]:
        limits = httpx.Limits(max_connections=40)
        async with httpx.AsyncClient(timeout=300, limits=limits) as client:
            return await asyncio.gather(*(_stream_one(client, daemon.url) for _ in range(20)))

    results = asyncio.run(run())
    refused = [r for r in results if r[0] == 503]
    served = [r for r in results if r[0] == 200]
    assert len(refused) == 11, [r[0] for r in results]
    assert len(served) == 9
    for _, headers, body in refused:
        assert '"code": "queue_full"' in body and '"message": "Queue full"' in body
        assert int(headers["retry-after"]) >= 1
    for _, _, body in served:
        assert body.rstrip().endswith("data: [DONE]")
        assert '"finish_reason": "length"' in body
    status = _wait_idle(daemon)
    assert status["sessions"]["active"] == 0 and status["queue"]["depth"] == 0
    assert status["kv_cache"]["blocks_used"] == 0
    metrics = httpx.get(f"{daemon.url}/metrics").text
    assert 'forge_rejections_total{reason="queue_full"} 11.0' in metrics
    assert 'forge_requests_total{outcome="completed"} 9.0' in metrics


def test_fifty_disconnects_leak_nothing(make_daemon) -> None:
    daemon: Daemon = make_daemon(profile={"inference": {"max_concurrent_sessions": 4},
                                          "thresholds": {"max_queue_depth": 50}}).start()

    async def cut_after_first_token(client: httpx.AsyncClient) -> bool:
        async with client.stream("POST", f"{daemon.url}/v1/completions", json=LONG) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    return True  # leaving the block closes the connection mid-stream
        return False

    async def queued_then_cut(client: httpx.AsyncClient) -> None:
        with contextlib.suppress(TimeoutError):  # gave up while still queued
            await asyncio.wait_for(cut_after_first_token(client), timeout=0.5)

    async def run() -> None:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=60)) as client:
            got = await asyncio.gather(*(cut_after_first_token(client) for _ in range(25)))
            assert all(got)
            await asyncio.gather(*(queued_then_cut(client) for _ in range(25)))

    asyncio.run(run())
    status = _wait_idle(daemon)
    assert status["sessions"]["active"] == 0
    assert status["queue"]["depth"] == 0
    assert status["kv_cache"]["blocks_used"] == 0
    assert status["engine"]["open_sequences"] == 0
    metrics = httpx.get(f"{daemon.url}/metrics").text
    assert 'forge_requests_total{outcome="cancelled"} 50.0' in metrics
    # The daemon still serves normally afterwards.
    r = httpx.post(f"{daemon.url}/v1/completions", json={"prompt": "Hi", "max_tokens": 4}, timeout=60)
    assert r.status_code == 200
