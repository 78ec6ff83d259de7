"""Operator routes: health, readiness, status, targets, engine config, metrics."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from forged.api.openai import STATE, WINDOW
from forged.engine.base import EngineError
from forged.schema import to_plain
from forged.state import ServiceState
from forged.targets import evaluate

# A step loop with work pending that has not completed a step for this long is stalled.
STALL_AFTER_S = 30.0


def engine_stalled(state: ServiceState, now: float | None = None) -> bool:
    progress = state.engine.progress()
    now = time.monotonic() if now is None else now
    return progress.pending_work and now - progress.last_step_monotonic > STALL_AFTER_S


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"status": "ok", "phase": state.phase})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.phase != "ready":
        return web.json_response({"status": state.phase, "reason": state.failure}, status=503)
    if engine_stalled(state):
        return web.json_response({"status": "stalled", "reason": "the engine step loop has made no progress "
                                  f"for over {STALL_AFTER_S:.0f} s with work pending"}, status=503)
    return web.json_response({"status": "ready"})


def status_document(state: ServiceState) -> dict[str, Any]:
    stats = state.engine.stats()
    live = state.live()
    hw = state.hardware
    return {
        "sku": state.profile_name,
        "phase": state.phase,
        "failure": state.failure,
        "pending_restart": state.pending_restart,
        "uptime_s": round(time.monotonic() - state.started_monotonic, 3),
        "hardware": {**to_plain(hw), "memory_used_bytes": live.memory_used_bytes if live else None},
        "profile": {"name": state.profile_name, **to_plain(state.profile)},
        "engine": {"name": state.engine.name, "profile_engine": state.profile.engine,
                   "fallback": state.engine_note, "steps": stats.steps, "open_sequences": stats.open_sequences,
                   "running": stats.running, "preemptions": stats.preemptions,
                   "waiting": stats.waiting, "paused": stats.paused,
                   "device_memory_used_bytes": stats.device_memory_used_bytes,
                   "prefill_tokens_per_s": round(stats.prefill_tokens_per_s, 1),
                   "decode_tokens_per_s": round(stats.decode_tokens_per_s, 1)},
        "model": {"id": state.model_id, "path": state.engine.model.path,
                  "context_length": state.engine.model.context_length, "n_params": state.engine.model.n_params,
                  "size_bytes": state.engine.model.size_bytes},
        "sessions": {"active": live.active_sessions if live else 0, "max": live.max_sessions if live else 0,
                     "profile_max": state.profile.inference.max_concurrent_sessions,
                     "memory_warning": state.memory_warning},
        "queue": {"depth": live.queue_depth if live else 0, "max": live.max_queue_depth if live else 0},
        "kv_cache": {"blocks_total": stats.kv_blocks_total, "blocks_used": stats.kv_blocks_used,
                     "blocks_free": stats.kv_blocks_free, "tokens_per_block": stats.tokens_per_block,
                     "cells_used": stats.kv_cells_used, "bytes": stats.kv_cache_bytes,
                     "dtype": state.profile.tensorrt_llm.kv_cache_dtype,
                     "policy": state.profile.tensorrt_llm.scheduler_policy},
    }


async def status(request: web.Request) -> web.Response:
    return web.json_response(status_document(request.app[STATE]))


async def performance_targets(request: web.Request) -> web.Response:
    state = request.app[STATE]
    live = state.live()
    assert live is not None
    doc = evaluate(state.profile.targets, request.app[WINDOW], live.active_sessions, live.max_sessions,
                   live.queue_depth, live.max_queue_depth)
    return web.json_response({"profile": state.profile_name, **doc})


async def engine_config(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"profile": state.profile_name, **state.engine.effective_config()})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.Response(body=state.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE_LATEST})


async def test_fault(request: web.Request) -> web.Response:
    """Test hook, registered only with FORGED_TEST_HOOKS=1 (docs/architecture.md, Test hooks): stall the engine."""
    body = await request.json()
    state = request.app[STATE]
    def json_error(message: str) -> web.Response:
        return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                            "param": "kind", "code": None}}, status=400)

    if body.get("kind") != "hang":
        return json_error("kind must be hang")
    try:
        state.engine.inject_hang(float(body.get("seconds", 10)))
    except EngineError as exc:
        return json_error(str(exc))
    return web.json_response({"injected": "hang", "seconds": float(body.get("seconds", 10))})
