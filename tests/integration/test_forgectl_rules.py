"""forgectl diagnose's and doctor's rules on made-up inputs: the cases a 2-core CPU box cannot provoke.

No daemon here: `diagnose.analyze` and `doctor.evaluate` are pure functions of the scrapes and the
status document. The real-daemon tests are in test_forgectl.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from forged.ctl import diagnose, doctor
from forged.ctl.levers import apply_with
from forged.ctl.promtext import Histogram, Scrape
from forged.metrics import QUEUE_BUCKETS, TPS_BUCKETS, TTFT_BUCKETS


def _hist(name: str, bounds: tuple[float, ...], values: list[float]) -> list[str]:
    lines = [f"# TYPE {name} histogram"]
    for b in bounds:
        lines.append(f'{name}_bucket{{le="{b}"}} {sum(v <= b for v in values)}')
    lines.append(f'{name}_bucket{{le="+Inf"}} {len(values)}')
    lines.append(f"{name}_count {len(values)}")
    lines.append(f"{name}_sum {sum(values)}")
    return lines


def _scrape(at: float, *, ttft: list[float] = (), wait: list[float] = (), tps: list[float] = (),
            sessions: int = 0, max_sessions: int = 4, queue: int = 0, max_queue: int = 8, kv_used: int = 0,
            kv_total: int = 1000, preemptions: int = 0, failed: int = 0, queue_full: int = 0,
            memory: float = 0.1) -> Scrape:
    lines = [*_hist("forge_ttft_seconds", TTFT_BUCKETS, list(ttft)),
             *_hist("forge_queue_wait_seconds", QUEUE_BUCKETS, list(wait)),
             *_hist("forge_tokens_per_second", TPS_BUCKETS, list(tps)),
             "# TYPE forge_requests counter", f'forge_requests_total{{outcome="failed"}} {failed}',
             f'forge_requests_total{{outcome="completed"}} {len(ttft)}',
             "# TYPE forge_rejections counter", f'forge_rejections_total{{reason="queue_full"}} {queue_full}',
             "# TYPE forge_preemptions counter", f"forge_preemptions_total {preemptions}",
             "# TYPE forge_generation_tokens counter", f"forge_generation_tokens_total {10 * len(ttft)}",
             "# TYPE forge_prompt_tokens counter", f"forge_prompt_tokens_total {100 * len(wait)}",
             f"forge_active_sessions {sessions}", f"forge_max_sessions {max_sessions}", f"forge_queue_depth {queue}",
             f"forge_max_queue_depth {max_queue}", "forge_target_ttft_p99_ms 5000",
             f'forge_kv_cache_blocks{{state="used"}} {kv_used}', f'forge_kv_cache_blocks{{state="total"}} {kv_total}',
             f"forge_gpu_memory_used_bytes {memory * 1e9}", "forge_gpu_memory_total_bytes 1e9"]
    return Scrape.parse("\n".join(lines) + "\n", at=at)


STATUS: dict[str, Any] = {
    "sessions": {"max": 4, "profile_max": 4, "active": 0, "memory_warning": None},
    "engine": {"name": "llama_cpp", "prefill_tokens_per_s": 100.0},
    "profile": {"name": "cpu", "engine": "llama_cpp",
                "tensorrt_llm": {"kv_cache_dtype": "fp16", "use_paged_kv_cache": True, "tokens_per_block": 32,
                                 "enable_chunked_context": True, "max_num_tokens": 256,
                                 "scheduler_policy": "guaranteed_no_evict", "free_gpu_memory_fraction": 0.9},
                "inference": {"max_concurrent_sessions": 4, "max_seq_len": 8192},
                "thresholds": {"max_queue_depth": 8}, "targets": {"ttft_ms": 1000, "ttft_p99_ms": 5000, "tps": 20},
                "admission": {"mode": "off"}},
}


def _analyze(first: Scrape, *rest: Scrape) -> dict[str, Any]:
    return diagnose.analyze(STATUS, [first, *rest])


def test_healthy_and_idle() -> None:
    assert _analyze(_scrape(0), _scrape(30))["bottleneck"] == "idle"
    doc = _analyze(_scrape(0), _scrape(15, sessions=1, kv_used=10), _scrape(30, ttft=[0.3, 0.4], wait=[0.0, 0.0],
                                                                        tps=[30, 30]))
    assert doc["bottleneck"] == "healthy" and doc["lever"] is None


def test_compute_bound_reduces_the_batch() -> None:
    """Slow TTFT, every session busy, little of it queued: too many sequences share each step."""
    doc = _analyze(_scrape(0, sessions=4), _scrape(15, sessions=4, kv_used=200),
                   _scrape(30, sessions=4, kv_used=200, ttft=[6.0, 7.0, 8.0], wait=[0.5, 0.5, 0.5], tps=[25] * 3))
    assert doc["bottleneck"] == "compute_bound"
    assert doc["lever"]["key"] == "inference.max_concurrent_sessions" and doc["lever"]["to"] == 3
    assert doc["stats"]["occupancy"] == 1.0


def test_compute_bound_with_chunking_off_turns_it_on() -> None:
    status = {**STATUS, "profile": {**STATUS["profile"], "tensorrt_llm": {**STATUS["profile"]["tensorrt_llm"],
                                                                          "enable_chunked_context": False}}}
    doc = diagnose.analyze(status, [_scrape(0, sessions=4), _scrape(30, sessions=4, ttft=[9.0] * 3, wait=[1.0] * 3)])
    assert doc["lever"]["key"] == "tensorrt_llm.enable_chunked_context" and doc["lever"]["apply"] == "restart"


def test_memory_pressure_when_sessions_idle_but_kv_full() -> None:
    doc = _analyze(_scrape(0, sessions=1, kv_used=950), _scrape(30, sessions=1, kv_used=950, ttft=[8.0, 9.0],
                                                                wait=[6.0, 7.0]))
    assert doc["bottleneck"] == "memory_pressure"
    assert doc["lever"]["key"] == "inference.max_concurrent_sessions"
    assert any("KV blocks used: peak 95%" in e for e in doc["evidence"])


def test_queueing_when_ttft_is_mostly_waiting() -> None:
    doc = _analyze(_scrape(0, sessions=4, queue=6), _scrape(30, sessions=4, queue=6, ttft=[9.0] * 4,
                                                            wait=[8.0] * 4))
    assert doc["bottleneck"] == "queueing" and doc["lever"]["key"] == "admission.mode"
    assert doc["lever"]["apply"] == "reload"


def test_out_of_memory_lowers_the_kv_fraction() -> None:
    doc = _analyze(_scrape(0), _scrape(30, failed=2, ttft=[0.3], memory=0.97))
    assert doc["bottleneck"] == "out_of_memory"
    assert doc["lever"] == {"key": "tensorrt_llm.free_gpu_memory_fraction", "from": 0.9, "to": 0.8,
                            "apply": "restart", "why": doc["lever"]["why"]}


def test_rejections_with_headroom_raise_sessions() -> None:
    doc = _analyze(_scrape(0, sessions=4, kv_used=100), _scrape(30, sessions=4, kv_used=100, queue_full=5,
                                                                ttft=[0.5] * 4, wait=[0.1] * 4, tps=[30] * 4))
    assert doc["bottleneck"] == "overload"
    assert doc["lever"]["key"] == "inference.max_concurrent_sessions" and doc["lever"]["to"] == 5
    assert doc["lever"]["apply"] == "restart"  # above the starting limit


def test_restarted_daemon_is_reported() -> None:
    try:
        _analyze(_scrape(0, ttft=[1.0, 2.0]), _scrape(30))
    except ValueError as exc:
        assert "restarted" in str(exc)
    else:
        raise AssertionError("expected ValueError")


def test_histogram_quantile_matches_promql() -> None:
    h = Histogram(((0.5, 2.0), (1.0, 4.0), (float("inf"), 4.0)), 4.0, 2.4)
    assert h.quantile(0.5) == 0.5 and h.quantile(0.75) == 0.75 and h.quantile(1.0) == 1.0
    assert Histogram(((1.0, 0.0), (float("inf"), 2.0)), 2.0, 5.0).quantile(0.5) == 1.0


def test_apply_with() -> None:
    assert apply_with("thresholds.max_queue_depth") == "reload"
    assert apply_with("inference.max_concurrent_sessions", 4, 3) == "reload"
    assert apply_with("inference.max_concurrent_sessions", 4, 5) == "restart"
    assert apply_with("tensorrt_llm.kv_cache_dtype") == "restart"


def _doctor_status(**over: Any) -> dict[str, Any]:
    status = {**STATUS,
              "hardware": {"kind": "gpu", "name": "NVIDIA RTX 4000 Ada Generation", "compute_capability": "8.9"},
              "model": {"context_length": 32768}, "queue": {"max": 5},
              "kv_cache": {"blocks_total": 25000, "tokens_per_block": 32, "dtype": "fp8", "bytes": 2**30,
                           "policy": "guaranteed_no_evict"},
              "engine": {"name": "tensorrt_llm"}, "pending_restart": []}
    status["sessions"] = {"max": 8, "profile_max": 8, "active": 0, "memory_warning": None}
    status["profile"] = {**STATUS["profile"], "engine": "tensorrt_llm",
                         "tensorrt_llm": {**STATUS["profile"]["tensorrt_llm"], "kv_cache_dtype": "fp8",
                                          "max_num_tokens": 4096}}
    for key, value in over.items():
        section, _, name = key.partition("__")
        status[section] = {**status[section], name: value}
    return status


def _results(status: dict[str, Any], tmp_path: Path) -> dict[str, str]:
    checks = doctor.evaluate(status, {}, None, "unreachable", [tmp_path / "none"])
    return {c.name: c.result for c in checks}


def test_doctor_fp8_rules(tmp_path: Path) -> None:
    assert _results(_doctor_status(), tmp_path)["FP8 KV cache"] == "pass"
    ampere = _doctor_status(hardware__compute_capability="8.6")
    assert _results(ampere, tmp_path)["FP8 KV cache"] == "fail"  # TensorRT-LLM fp8 on 8.6
    ampere["profile"]["tensorrt_llm"] = {**ampere["profile"]["tensorrt_llm"], "kv_cache_dtype": "fp16"}
    assert _results(ampere, tmp_path)["FP8 KV cache"] == "n.a."
    ada_fp16 = _doctor_status()
    ada_fp16["profile"]["tensorrt_llm"] = {**ada_fp16["profile"]["tensorrt_llm"], "kv_cache_dtype": "fp16"}
    assert _results(ada_fp16, tmp_path)["FP8 KV cache"] == "fail"


def test_doctor_session_limit_against_memory(tmp_path: Path) -> None:
    ok = _results(_doctor_status(), tmp_path)
    assert ok["session limit vs memory"] == "pass" and ok["metrics exposed"] == "fail"
    assert ok["alert rules installed"] == "n.a."
    small = _doctor_status(kv_cache__blocks_total=2000)  # 64000 tokens: three 20k prompts, not eight
    assert _results(small, tmp_path)["session limit vs memory"] == "fail"
    warned = _doctor_status(sessions__memory_warning="weights + 8 sessions x 32768 tokens do not fit")
    assert _results(warned, tmp_path)["session limit vs memory"] == "fail"
