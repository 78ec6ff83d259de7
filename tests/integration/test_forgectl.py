"""forgectl status, bench, doctor and diagnose against real daemons serving the real model.

The CLI is called in-process (forged.cli.forgectl_main) with --url, or --socket for the UNIX socket.
Daemons: the shared one runs the packaged cpu profile (the "good" one); `noqueue` differs from it by
one lever (thresholds.max_queue_depth: 0) and a lenient TPS target; `bad` breaks every quick win
doctor checks; `tiny_kv` runs max_utilization over a KV cache too small for its sessions, so that it
preempts.
"""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import REPO, Daemon

from forged.cli import forgectl_main
from forged.ctl.promtext import Scrape

SMALL_BENCH = ["--users", "3", "--prompt-tokens", "50", "--max-tokens", "8", "--no-progress"]
BAD_PROFILE = {"tensorrt_llm": {"kv_cache_dtype": "fp32", "use_paged_kv_cache": False,
                                "enable_chunked_context": False, "max_num_tokens": 64},
               "thresholds": {"max_queue_depth": 1000}}
# One unified pool, smaller than the sessions' contexts: the KV cache, not the guard, is the limit.
TINY_KV = {"inference": {"max_concurrent_sessions": 3, "max_seq_len": 256},
           "tensorrt_llm": {"kv_cache_max_tokens": 256, "tokens_per_block": 16, "max_num_tokens": 256,
                            "scheduler_policy": "max_utilization"},
           "llama_cpp": {"kv_unified": True}}


def _daemon(tmp_path_factory: pytest.TempPathFactory, model_path: Path, name: str, **kw: Any) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp(name)
    daemon = Daemon(root, model_path, **kw).start()
    yield daemon
    daemon.stop()
    shutil.rmtree(root / "state", ignore_errors=True)


@pytest.fixture(scope="module")
def noqueue(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Daemon]:
    yield from _daemon(tmp_path_factory, model_path, "noqueue",
                       profile={"thresholds": {"max_queue_depth": 0}, "targets": {"tps": 2}})


def ctl(capsys: pytest.CaptureFixture[str], daemon: Daemon, *argv: str, socket: bool = False) -> tuple[int, str, str]:
    capsys.readouterr()
    where = ["--socket", str(daemon.socket_path)] if socket else ["--url", daemon.url]
    rc = forgectl_main([*where, *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def ctl_json(capsys: pytest.CaptureFixture[str], daemon: Daemon, *argv: str) -> tuple[int, Any]:
    rc, out, err = ctl(capsys, daemon, "--json", *argv)
    assert out, err
    return rc, json.loads(out)


def scrape(daemon: Daemon) -> Scrape:
    return Scrape.parse(httpx.get(f"{daemon.url}/metrics", timeout=10).text)


def rules_dir(tmp_path: Path) -> Path:
    d = tmp_path / "rules.d"
    d.mkdir()
    shutil.copy(REPO / "monitoring" / "prometheus" / "forged-alerts.yml", d)
    return d


# ------------------------------------------------------------------ status

def test_status_over_socket_and_tcp(shared_daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = ctl(capsys, shared_daemon, "status", socket=True)
    assert rc == 0
    for text in ("profile cpu", "hardware  cpu:", "model     smollm2-135m-instruct-q4_1", "KV fp16", "sessions  0/4",
                 "queue 0/8", "ttft_p99_ms", "target 5000", "cached", "prompt tokens found cached"):
        assert text in out, out
    rc, doc = ctl_json(capsys, shared_daemon, "status")
    assert rc == 0 and doc["status"]["profile"]["name"] == "cpu"
    assert set(doc["targets"]["targets"]) >= {"ttft_p50_ms", "ttft_p99_ms", "tps", "sessions", "queue_depth"}


# ------------------------------------------------------------------ bench

_SCRAPES: dict[str, tuple[Scrape, Scrape]] = {}


@pytest.fixture(scope="module")
def bench_a(shared_daemon: Daemon, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small bench on the packaged cpu profile, saved; the test also scrapes /metrics around it."""
    out = tmp_path_factory.mktemp("bench") / "a.json"
    before = scrape(shared_daemon)
    assert forgectl_main(["--url", shared_daemon.url, "bench", *SMALL_BENCH, "--requests", "6",
                          "--save", str(out)]) == 0
    _SCRAPES[str(out)] = (before, scrape(shared_daemon))
    return out


def test_bench_reports_against_targets(bench_a: Path, shared_daemon: Daemon) -> None:
    doc = json.loads(bench_a.read_text())
    s = doc["summary"]
    assert s["requests"] == 6 and s["ok"] == 6 and s["rejected_503"] == 0 and s["errors"] == 0
    # Prompts were built to ~50 tokens by measuring through the daemon's usage field.
    assert 40 <= s["prompt_tokens_min"] <= s["prompt_tokens_max"] <= 62, s
    assert all(r["completion_tokens"] == 8 for r in doc["requests"])
    assert s["completion_tokens"] == 48
    assert 0 < s["ttft_p50_ms"] <= s["ttft_p90_ms"] <= s["ttft_p99_ms"]
    assert s["tps_per_user_p50"] > 0 and s["aggregate_tps"] > 0
    checks = {c["name"]: c for c in doc["checks"]}
    assert checks["ttft_p99_ms"]["target"] == 5000 and checks["ttft_p50_ms"]["target"] == 1000
    assert checks["tps_per_user_p50"]["target"] == 20
    assert checks["ttft_p99_ms"]["met"] == (s["ttft_p99_ms"] <= 5000)
    assert checks["rejected_503"]["met"] is True
    # The profile and the engine config travel with the results, for --compare.
    assert doc["daemon"]["profile"]["tensorrt_llm"]["max_num_tokens"] == 128
    # A step holds max_num_tokens while anything decodes, a whole ubatch when nothing does.
    assert doc["daemon"]["engine_config"]["llama_context_params"]["n_batch"] == 512


def test_bench_ttft_agrees_with_the_daemons_histogram(bench_a: Path) -> None:
    """Client-side TTFT (send -> first streamed token) brackets the daemon's forge_ttft_seconds.

    The daemon starts its clock after the client does and stops it before the client reads the
    token, so each daemon TTFT d and client TTFT c satisfy d <= c <= d + slack. Then for every bucket
    bound b: #{c <= b} <= daemon's cumulative count at b <= #{c <= b + slack}. The bench's two
    calibration requests (max_tokens 1, TTFT ~ their latency) are observed too and counted in."""
    doc = json.loads(bench_a.read_text())
    before, after = _SCRAPES[str(bench_a)]
    hist = after.histogram("forge_ttft_seconds").minus(before.histogram("forge_ttft_seconds"))
    ok = [r for r in doc["requests"] if r["status"] == 200]
    client = [r["ttft_s"] for r in ok] + [c["latency_s"] for c in doc["calibration"]["requests"]]
    assert hist.count == len(client) == 8
    # Sum: equal up to the transport overhead of 8 requests over loopback.
    assert 0 <= sum(client) - hist.sum <= 0.05 * len(client) + 0.1 * sum(client), (sum(client), hist.sum)
    slack = 0.25
    for bound, cumulative in hist.buckets:
        assert sum(c <= bound for c in client) <= cumulative <= sum(c <= bound + slack for c in client), \
            (bound, cumulative, sorted(client))
    # And the bench's own reading of the histogram (taken after calibration) says the same.
    dm = doc["daemon_metrics"]
    assert dm["ttft_count"] == 6
    assert abs(dm["ttft_mean_ms"] - doc["summary"]["ttft_mean_ms"]) <= 50 + 0.1 * doc["summary"]["ttft_mean_ms"]


def test_bench_human_output_and_progress(shared_daemon: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = ctl(capsys, shared_daemon, "bench", "--users", "2", "--prompt-tokens", "1000", "--scale", "0.04",
                       "--max-tokens", "4")
    assert rc == 0, err
    assert "workload: 2 users, prompts ~40 tokens" in out
    for name in ("ttft_p50_ms", "ttft_p90_ms", "ttft_p99_ms", "tps_per_user_p50", "aggregate_tps", "rejected_503"):
        assert name in out
    assert "daemon's forge_ttft_seconds over the run: 2 observations" in out
    assert "bench [########################] 2/2  ok 2" in err  # the final state of the progress bar


def test_bench_refuses_prompts_longer_than_the_context(shared_daemon: Daemon,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = ctl(capsys, shared_daemon, "bench", "--users", "1")  # the seed's 20k tokens > 8192
    assert rc == 1
    assert "do not fit the served context (8192 tokens)" in err and "--scale" in err


def test_bench_counts_503s_by_reason(noqueue: Daemon, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """6 users against 4 sessions and no queue: 2 are refused with queue_full, and bench says so."""
    out = tmp_path / "b.json"
    rc, text, err = ctl(capsys, noqueue, "bench", "--users", "6", "--prompt-tokens", "50", "--max-tokens", "24",
                        "--no-progress", "--save", str(out))
    assert rc == 0, err
    doc = json.loads(out.read_text())
    s = doc["summary"]
    assert s["rejected_by_reason"] == {"queue_full": 2} and s["ok"] == 4, s
    refused = [r for r in doc["requests"] if r["status"] == 503]
    assert all(r["retry_after"] for r in refused)
    assert "503 by reason: queue_full 2" in text
    check = next(c for c in doc["checks"] if c["name"] == "rejected_503")
    assert check["met"] is None and "exceed 4 sessions + 0 queued" in check["note"]


def test_bench_compare_one_lever_and_several(bench_a: Path, noqueue: Daemon, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    b = tmp_path / "b.json"
    assert forgectl_main(["--url", noqueue.url, "bench", *SMALL_BENCH, "--requests", "6", "--save", str(b)]) == 0
    capsys.readouterr()
    assert forgectl_main(["bench", "--compare", str(bench_a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "thresholds.max_queue_depth: 8 -> 0" in out
    assert "one lever changed (thresholds.max_queue_depth)" in out
    assert "targets differ (targets.tps 20.0 -> 2.0)" in out
    for metric in ("ttft_p50_ms", "ttft_p99_ms", "tps_per_user_p50", "aggregate_tps", "rejected_503"):
        assert metric in out
    assert forgectl_main(["--json", "bench", "--compare", str(bench_a), str(b)]) == 0
    diff = json.loads(capsys.readouterr().out)
    assert diff["one_lever"] is True and not diff["workload_changed"]
    assert {m["metric"] for m in diff["metrics"]} >= {"ttft_p99_ms", "aggregate_tps"}

    # A second lever changed (as if the KV dtype had been switched in the same restart): flagged.
    doc = json.loads(b.read_text())
    doc["daemon"]["engine_config"]["profile_section"]["tensorrt_llm"]["kv_cache_dtype"] = "fp8"
    c = tmp_path / "c.json"
    c.write_text(json.dumps(doc))
    assert forgectl_main(["bench", "--compare", str(bench_a), str(c)]) == 0
    out = capsys.readouterr().out
    assert "WARNING: 2 levers changed" in out and "Change one lever at a time" in out
    # The same run against itself: nothing changed.
    assert forgectl_main(["bench", "--compare", str(bench_a), str(bench_a)]) == 0
    assert "no lever changed" in capsys.readouterr().out


def test_bench_plot(bench_a: Path, shared_daemon: Daemon, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    png = tmp_path / "run.png"
    assert forgectl_main(["--url", shared_daemon.url, "bench", *SMALL_BENCH, "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_bench_plot_without_matplotlib_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rc = forgectl_main(["--socket", "/nonexistent.sock", "bench", "--plot", "x.png"])
    assert rc == 2
    assert "pip install 'forged[plot]'" in capsys.readouterr().err


# ------------------------------------------------------------------ doctor

def test_doctor_passes_the_packaged_cpu_profile(shared_daemon: Daemon, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = ctl_json(capsys, shared_daemon, "doctor", "--rules-dir", str(rules_dir(tmp_path)))
    results = {c["name"]: c["result"] for c in doc["checks"]}
    assert results == {"GPU offload": "n.a.", "FP8 KV cache": "n.a.", "paged KV cache": "pass",
                       "chunked context for 20k inputs": "pass",
                       "session limit vs memory": "pass", "queue depth bounded": "pass", "metrics exposed": "pass",
                       "alert rules installed": "pass", "TCP access control": "warn"}, doc
    assert rc == 0  # a warn is shown, not failed: TCP without keys on loopback is the packaged choice
    fp8 = next(c for c in doc["checks"] if c["name"] == "FP8 KV cache")
    assert "no GPU" in fp8["reason"] and "q8_0" in fp8["reason"]
    tcp = next(c for c in doc["checks"] if c["name"] == "TCP access control")
    assert f"127.0.0.1:{shared_daemon.port}" in tcp["reason"] and "require_keys_on_loopback" in tcp["reason"]
    rc, out, _ = ctl(capsys, shared_daemon, "doctor", "--rules-dir", str(tmp_path / "nowhere"))
    assert rc == 0 and "5 pass, 0 fail, 1 warn, 3 n.a." in out
    assert "n.a.  alert rules installed" in out and "WARN  TCP access control" in out


def test_doctor_fails_a_bad_profile_with_reasons(make_daemon: Any, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    daemon: Daemon = make_daemon(profile=BAD_PROFILE).start()
    empty = tmp_path / "rules.d"
    empty.mkdir()
    rc, doc = ctl_json(capsys, daemon, "doctor", "--rules-dir", str(empty))
    assert rc == 1
    checks = {c["name"]: c for c in doc["checks"]}
    assert {n: c["result"] for n, c in checks.items()} == {
        "GPU offload": "n.a.", "FP8 KV cache": "fail", "paged KV cache": "fail",
        "chunked context for 20k inputs": "fail", "session limit vs memory": "pass", "queue depth bounded": "fail",
        "metrics exposed": "pass", "alert rules installed": "fail", "TCP access control": "warn"}
    assert "fp32" in checks["FP8 KV cache"]["reason"] and checks["FP8 KV cache"]["lever"] == \
        "tensorrt_llm.kv_cache_dtype"
    assert "refused with 400" in checks["chunked context for 20k inputs"]["reason"]
    assert checks["chunked context for 20k inputs"]["lever"] == "tensorrt_llm.enable_chunked_context"
    assert "reserves a whole context" in checks["paged KV cache"]["reason"]
    assert "max_queue_depth 1000 behind 4 sessions" in checks["queue depth bounded"]["reason"]
    assert checks["queue depth bounded"]["apply"] == "reload"
    assert f"no forged-alerts.yml in {empty}" in checks["alert rules installed"]["reason"]
    rc, out, _ = ctl(capsys, daemon, "doctor", "--rules-dir", str(empty))
    assert rc == 1 and "FAIL  paged KV cache" in out and "-> set tensorrt_llm.use_paged_kv_cache: true" in out
    assert "2 pass, 5 fail, 1 warn, 1 n.a." in out


def test_doctor_fails_a_queue_of_zero(noqueue: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = ctl_json(capsys, noqueue, "doctor")
    check = next(c for c in doc["checks"] if c["name"] == "queue depth bounded")
    assert rc == 1 and check["result"] == "fail" and "max_queue_depth 0" in check["reason"]
    assert check["suggest"] == 4


# ------------------------------------------------------------------ diagnose

def _load(daemon: Daemon, n: int, max_tokens: int, delay: float = 0.5, rounds: int = 1,
          prompt: str = "Tell me a story about a lighthouse keeper and the sea.") -> threading.Thread:
    """`rounds` bursts of n concurrent requests, starting after `delay` (once diagnose has scraped)."""
    def one() -> None:
        httpx.post(f"{daemon.url}/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens,
                   "temperature": 0, "ignore_eos": True}, timeout=300)

    def go() -> None:
        time.sleep(delay)
        for _ in range(rounds):
            threads = [threading.Thread(target=one) for _ in range(n)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    return thread


def test_diagnose_idle_and_healthy(noqueue: Daemon, capsys: pytest.CaptureFixture[str]) -> None:
    rc, doc = ctl_json(capsys, noqueue, "diagnose", "--window", "2", "--interval", "0.5")
    assert rc == 0 and doc["bottleneck"] == "idle" and doc["lever"] is None
    load = _load(noqueue, 1, 12, delay=0.3, rounds=2)  # one user at a time: well within the targets
    rc, doc = ctl_json(capsys, noqueue, "diagnose", "--window", "5", "--interval", "0.5")
    load.join()
    assert rc == 0 and doc["bottleneck"] == "healthy", doc
    assert doc["lever"] is None and doc["stats"]["first_tokens"] >= 1 and not doc["stats"]["rejections"]


def test_diagnose_names_the_queue_when_requests_are_refused(noqueue: Daemon,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    load = _load(noqueue, 6, 16)  # 6 at once against 4 sessions and no queue
    rc, out, _ = ctl(capsys, noqueue, "diagnose", "--window", "4", "--interval", "0.5")
    load.join()
    assert rc == 0
    assert "bottleneck: overload" in out and "queue_full 2" in out
    assert "next lever: thresholds.max_queue_depth: 0 -> 4" in out and "systemctl reload forged" in out
    assert "evidence:" in out and "rejections: queue_full 2" in out


def test_diagnose_names_sessions_when_the_kv_cache_preempts(make_daemon: Any,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    daemon: Daemon = make_daemon(profile=TINY_KV).start()
    prompt = "Once upon a time, " + "the lighthouse keeper counted ships in the harbour, " * 6
    load = _load(daemon, 3, 60, prompt=prompt)
    rc, doc = ctl_json(capsys, daemon, "diagnose", "--window", "12", "--interval", "0.5")
    load.join()
    assert rc == 0
    assert doc["bottleneck"] == "preemption", doc
    assert doc["stats"]["preemptions"] >= 1
    assert doc["lever"]["key"] == "inference.max_concurrent_sessions"
    assert doc["lever"]["from"] == 3 and doc["lever"]["to"] == 2 and doc["lever"]["apply"] == "reload"
    assert any("preemptions" in e for e in doc["evidence"])
