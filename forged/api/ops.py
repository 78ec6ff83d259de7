"""Operator routes: health, readiness, status, targets, engine config, metrics."""

from __future__ import annotations

import json
import time
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from forged.api.openai import STATE, WINDOW
from forged.api.requests import BadRequest
from forged.engine.base import EngineError, EngineStats, Fault
from forged.schema import to_plain
from forged.state import ServiceState
from forged.systemd import watchdog_interval
from forged.targets import evaluate

# A step loop with work pending that has not completed a step for this long is stalled.
STALL_AFTER_S = 30.0


def stall_after_s() -> float:
    """STALL_AFTER_S, or under a systemd watchdog half its ping interval: the watchdog withholds its
    ping after one interval without a step and systemd restarts forged after two, so /readyz must
    say so before then."""
    interval = watchdog_interval()
    return min(STALL_AFTER_S, interval / 2) if interval else STALL_AFTER_S


def engine_stalled(state: ServiceState, now: float | None = None) -> bool:
    progress = state.engine.progress()
    now = time.monotonic() if now is None else now
    return progress.pending_work and now - progress.last_step_monotonic > stall_after_s()


async def healthz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    return web.json_response({"status": "ok", "phase": state.phase})


async def readyz(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.phase != "ready":
        return web.json_response({"status": state.phase, "reason": state.failure}, status=503)
    if engine_stalled(state):
        return web.json_response({"status": "stalled", "reason": "the engine step loop has made no progress "
                                  f"for over {stall_after_s():g} s with work pending"}, status=503)
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
        # The GPUs the engine spreads the model over, each one's share and memory now (forged.gpus).
        "placement": {"engine": state.placement.engine, **state.placement.status(hw)},
        "profile": {"name": state.profile_name, **to_plain(state.profile)},
        "engine": {"name": state.engine.name, "profile_engine": state.profile.engine,
                   "fallback": state.engine_note, "gpu_unused": state.gpu_unused,
                   "device": state.engine.device(),
                   "steps": stats.steps, "open_sequences": stats.open_sequences,
                   "running": stats.running, "preemptions": stats.preemptions,
                   "waiting": stats.waiting, "paused": stats.paused,
                   "device_memory_used_bytes": stats.device_memory_used_bytes,
                   "prefilled_tokens_total": stats.prefilled_tokens,
                   "prefill_tokens_per_s": round(stats.prefill_tokens_per_s, 1),
                   "decode_tokens_per_s": round(stats.decode_tokens_per_s, 1)},
        "model": {"id": state.model_id, "path": state.engine.model.path,
                  "context_length": state.engine.model.context_length, "n_params": state.engine.model.n_params,
                  "size_bytes": state.engine.model.size_bytes},
        "sessions": {"active": live.active_sessions if live else 0, "max": live.max_sessions if live else 0,
                     "profile_max": state.profile.inference.max_concurrent_sessions,
                     "memory_warning": state.memory_warning},
        "queue": {"depth": live.queue_depth if live else 0, "max": live.max_queue_depth if live else 0},
        "access": state.access,
        "kv_cache": {"blocks_total": stats.kv_blocks_total, "blocks_used": stats.kv_blocks_used,
                     "blocks_cached": stats.kv_blocks_cached,
                     "blocks_free": stats.kv_blocks_free,
                     "tokens_per_block": stats.tokens_per_block,
                     "cells_used": stats.kv_cells_used, "bytes": stats.kv_cache_bytes,
                     "dtype": state.profile.tensorrt_llm.kv_cache_dtype,
                     "policy": state.profile.tensorrt_llm.scheduler_policy},
        "prefix_cache": _prefix_cache(stats),
    }


def _prefix_cache(stats: EngineStats) -> dict[str, Any] | None:
    """Prompt tokens looked up and found since start, and the share found (None before any)."""
    if stats.prefix_cache_queries is None:
        return None
    queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits or 0
    return {"queries_tokens": queries, "hits_tokens": hits,
            "hit_rate": round(hits / queries, 4) if queries else None, **stats.prefix_cache_detail}


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
    """Test hook, registered only with FORGED_TEST_HOOKS=1 (docs/architecture.md, Test hooks): arm a
    fault in the engine's step loop."""
    fault = parse_fault(await request.read())
    try:
        request.app[STATE].engine.inject_fault(fault)
    except EngineError as exc:
        raise BadRequest(str(exc), "kind") from None
    armed: dict[str, Any] = {name: getattr(fault, name) for name in sorted(FAULT_FIELDS[fault.kind])}
    if "request_id" in armed and fault.request_id is None:
        armed["target"] = "the next request the engine starts"
    return web.json_response({"injected": fault.kind, **armed})


# Each fault kind (engine.base.FaultKind) and the Fault fields its body may set.
FAULT_FIELDS: dict[str, set[str]] = {"hang": {"seconds"}, "sample_error": {"request_id"},
                                     "decode_error": {"request_id", "status"}}


def parse_fault(raw: bytes) -> Fault:
    """The body of POST /_test/fault (docs/architecture.md, Test hooks); BadRequest names the field."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    kind = body.get("kind")
    if kind not in FAULT_FIELDS:
        raise BadRequest(f"kind must be one of {', '.join(FAULT_FIELDS)}, got {kind!r}", "kind")
    unknown = sorted(set(body) - FAULT_FIELDS[kind] - {"kind"})
    if unknown:
        raise BadRequest(f"{unknown[0]} is not a field of a {kind} fault", unknown[0])
    seconds = body.get("seconds", 10.0)
    if kind == "hang" and (isinstance(seconds, bool) or not isinstance(seconds, (int, float))
                           or not 0 < seconds <= 86400):
        raise BadRequest("seconds must be a number above 0 and at most 86400", "seconds")
    request_id = body.get("request_id")
    if request_id is not None and (not isinstance(request_id, str) or not request_id):
        raise BadRequest("request_id must be a non-empty string (the id of a running request)", "request_id")
    status = body.get("status", -3)
    if isinstance(status, bool) or not isinstance(status, int) or status == 0 or not -2**31 <= status < 2**31:
        raise BadRequest("status must be a non-zero 32-bit integer, as llama_decode returns on failure",
                         "status")
    return Fault(kind, seconds=float(seconds) if kind == "hang" else 0.0, request_id=request_id, status=status)
