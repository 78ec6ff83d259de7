"""`forgectl doctor`: the seed's quick-wins checklist, evaluated against the running daemon.

Each line is pass, fail, warn or n.a., with the reason and, for a fail, the lever to change. The facts
come from the daemon itself: /v1/status (hardware, the profile in force, sessions, KV cache, memory
warning, who can reach the listeners), /v1/tensorrt-llm/config (the engine configuration as passed),
/metrics; and, for the alert rules, the Prometheus rules directory on this machine (--rules-dir).
Exit status 1 when a line fails; a warn (an exposure chosen by config, such as TCP without keys on a
shared machine) is shown but does not fail.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from forged.ctl.client import BadAnswer, Client, DaemonUnreachable
from forged.ctl.levers import apply_with, fp8_capable
from forged.ctl.promtext import Scrape

DEFAULT_RULES_DIRS = ("/etc/prometheus/rules.d",)
RULES_FILES = ("forged-alerts.yml", "forged-alerts.yaml")
ALERTS = ("ForgedTTFTP99AboveTarget", "ForgedGPUMemoryHigh", "ForgedSessionsNearLimit", "ForgedQueueNearLimit")
SEED_METRICS = ("forge_ttft_seconds_bucket", "forge_tokens_per_second_bucket", "forge_active_sessions",
                "forge_queue_depth", "forge_gpu_memory_used_bytes", "forge_gpu_memory_total_bytes",
                "forge_max_sessions", "forge_max_queue_depth", "forge_target_ttft_p99_ms")
# A queue deeper than this many times the sessions only makes the last in line wait past any target.
QUEUE_FACTOR = 2


@dataclass(frozen=True)
class Check:
    name: str
    result: str  # pass | fail | warn | n.a.
    reason: str
    lever: str | None = None  # the profile key to change when it fails
    suggest: Any = None
    apply: str | None = None  # reload | restart
    command: str | None = None  # a command that fixes it, when the fix is not a profile key


def add_parser(sub: Any) -> None:
    p = sub.add_parser("doctor", help="the seed's quick-wins checklist against the running daemon: "
                       "pass/fail/n.a. with reasons", description=__doc__)
    p.add_argument("--rules-dir", action="append", metavar="DIR",
                   help="where Prometheus loads rule files from; repeat for several "
                   f"(default: {', '.join(DEFAULT_RULES_DIRS)})")
    p.add_argument("--input-tokens", type=int, default=20000,
                   help="the prompt length the box must serve (default 20000, the seed's; capped at the context)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="machine-readable output")


def main(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    try:
        status = client.get_json("/v1/status")
        config = client.get_json("/v1/tensorrt-llm/config")
    except (DaemonUnreachable, BadAnswer) as exc:
        print(f"forgectl: doctor: {exc}", file=sys.stderr)
        return 1
    try:
        metrics_text: str | None = client.get_text("/metrics")
        metrics_error = None
    except (DaemonUnreachable, BadAnswer) as exc:
        metrics_text, metrics_error = None, str(exc)
    dirs = [Path(d) for d in (args.rules_dir or DEFAULT_RULES_DIRS)]
    checks = evaluate(status, config, metrics_text, metrics_error, dirs, args.input_tokens)
    failed = sum(c.result == "fail" for c in checks)
    if getattr(args, "json", False):
        print(json.dumps({"profile": status["profile"]["name"], "where": client.where,
                          "checks": [asdict(c) for c in checks], "failed": failed,
                          "pending_restart": status.get("pending_restart", [])}, indent=2))
    else:
        print(render(status, checks, client.where))
    return 1 if failed else 0


def evaluate(status: dict[str, Any], config: dict[str, Any], metrics_text: str | None, metrics_error: str | None,
             rules_dirs: list[Path], input_tokens: int = 20000) -> list[Check]:
    return [gpu_offload(status), fp8_kv(status, config), paged_kv(status), chunked_context(status, input_tokens),
            session_limit(status, input_tokens), queue_depth(status), metrics_exposed(metrics_text, metrics_error),
            alert_rules(rules_dirs), tcp_access(status)]


def _levers(status: dict[str, Any]) -> dict[str, Any]:
    return status["profile"]["tensorrt_llm"]


def gpu_offload(status: dict[str, Any]) -> Check:
    """The GPU does the work: every layer and the KV on it, from libllama's own load report."""
    name = "GPU offload"
    hw = status["hardware"]
    engine = status.get("engine", {})
    device = engine.get("device")
    if hw["kind"] == "cpu":
        return Check(name, "n.a.", "no GPU on this machine: the engine runs on the CPU")
    if device is None:
        return Check(name, "n.a.", f"the {engine.get('name')} engine runs on the GPU by itself")
    if engine.get("gpu_unused") or device["runs_on"] == "CPU":
        why = engine.get("gpu_unused") or (f"{hw['name']} is here, but the engine runs on the CPU "
                                           f"({device['library']})")
        return Check(name, "fail", why, command="sudo forgectl engine build, then systemctl restart forged")
    offloaded, total = device["layers_offloaded"], device["layers_total"]
    where = f"{offloaded}/{total} layers on {device['runs_on']}, KV on {', '.join(device['kv_on']) or '?'}"
    if total and offloaded < total:
        key = "llama_cpp.n_gpu_layers"
        return Check(name, "fail", f"only {where}: the layers left on the CPU set the pace", key, -1, apply_with(key))
    return Check(name, "pass", f"{where} (libllama {device['library']})")


def fp8_kv(status: dict[str, Any], config: dict[str, Any]) -> Check:
    name = "FP8 KV cache"
    dtype = _levers(status)["kv_cache_dtype"]
    engine = status.get("engine", {}).get("name") or status["profile"]["engine"]
    capable, hw = fp8_capable(status["hardware"])
    mapped = config.get("mapping", {}).get("kv_cache_dtype")
    as_passed = f" ({mapped})" if mapped else ""
    key = "tensorrt_llm.kv_cache_dtype"
    if dtype == "fp32":
        better = "fp8" if capable or engine == "llama_cpp" else "fp16"
        return Check(name, "fail", f"kv_cache_dtype fp32{as_passed}: 4 bytes a value, twice fp16 and four times "
                     f"fp8, for no gain in serving; {hw}", key, better, apply_with(key))
    if capable:
        if dtype == "fp8":
            return Check(name, "pass", f"fp8{as_passed} on {hw}")
        return Check(name, "fail", f"{hw} supports FP8, but the KV cache is {dtype}{as_passed}: fp8 halves the KV "
                     "bytes per token, so twice the sessions' context fits", key, "fp8", apply_with(key))
    if dtype == "fp8":
        if engine == "llama_cpp":
            return Check(name, "pass", f"fp8 maps to q8_0 on llama_cpp{as_passed}, a 1-byte type that needs no FP8 "
                         f"hardware ({hw})")
        return Check(name, "fail", f"TensorRT-LLM's FP8 KV cache needs compute capability 8.9 or later: {hw}",
                     key, "fp16", apply_with(key))
    return Check(name, "n.a.", f"{hw}: no FP8 hardware, so {dtype}{as_passed} is right"
                 + (" (on llama_cpp fp8 would mean q8_0, a quantized 1-byte KV: a memory saving, not FP8)"
                    if engine == "llama_cpp" else ""))


def paged_kv(status: dict[str, Any]) -> Check:
    levers = _levers(status)
    key = "tensorrt_llm.use_paged_kv_cache"
    if levers["use_paged_kv_cache"]:
        return Check("paged KV cache", "pass", f"blocks of {levers['tokens_per_block']} tokens, taken as sessions "
                     f"grow ({status['kv_cache']['policy']})")
    return Check("paged KV cache", "fail", "use_paged_kv_cache false: every session reserves a whole context "
                 f"({status['profile']['inference']['max_seq_len']} tokens) up front, however short its prompt",
                 key, True, apply_with(key))


def _input_len(status: dict[str, Any], input_tokens: int) -> tuple[int, str]:
    context = int(status["model"]["context_length"] or 0)
    if context and input_tokens > context:
        return context, f" (the {input_tokens}-token inputs capped at the served context, {context})"
    return input_tokens, ""


def chunked_context(status: dict[str, Any], input_tokens: int) -> Check:
    levers = _levers(status)
    n, capped = _input_len(status, input_tokens)
    name = f"chunked context for {input_tokens // 1000}k inputs" if input_tokens >= 1000 else \
        f"chunked context for {input_tokens}-token inputs"
    mnt = levers["max_num_tokens"]
    if levers["enable_chunked_context"]:
        if mnt < n:
            return Check(name, "pass", f"a {n}-token prompt prefills in {math.ceil(n / mnt)} steps of at most "
                         f"max_num_tokens {mnt}, running decodes first in each{capped}")
        return Check(name, "fail", f"chunking is on, but max_num_tokens {mnt} >= {n}: a whole prompt is one step, "
                     f"so every running stream stalls for its prefill{capped}", "tensorrt_llm.max_num_tokens",
                     max(tpb := levers["tokens_per_block"], (n // 4) // tpb * tpb),
                     "restart")
    key = "tensorrt_llm.enable_chunked_context"
    if mnt < n:
        return Check(name, "fail", f"chunking is off and max_num_tokens is {mnt}: prompts longer than that are "
                     f"refused with 400, so {n}-token inputs cannot be served{capped}", key, True, apply_with(key))
    return Check(name, "fail", f"chunking is off: each prompt is prefilled in one step of up to {n} tokens, and "
                 f"every running stream stalls meanwhile{capped}", key, True, apply_with(key))


def session_limit(status: dict[str, Any], input_tokens: int) -> Check:
    sessions = status["sessions"]
    kv = status["kv_cache"]
    name = "session limit vs memory"
    key = "inference.max_concurrent_sessions"
    if sessions.get("memory_warning"):
        return Check(name, "fail", f"forged warns: {sessions['memory_warning']}", key,
                     sessions["max"], apply_with(key, sessions["profile_max"], sessions["max"]))
    if sessions["max"] < sessions["profile_max"]:
        return Check(name, "fail", f"the profile asks for {sessions['profile_max']} sessions, forged enforces "
                     f"{sessions['max']}", key, sessions["max"],
                     apply_with(key, sessions["profile_max"], sessions["max"]))
    cells = int(kv["blocks_total"]) * int(kv["tokens_per_block"])
    n, _ = _input_len(status, input_tokens)
    fit = cells // n if n else 0
    detail = (f"{sessions['max']} sessions; KV {kv['blocks_total']} blocks x {kv['tokens_per_block']} = {cells} "
              f"tokens ({kv['dtype']}, {kv['bytes'] / 2**20:.0f} MiB), {n}-token prompts for {fit} sessions at once")
    if fit < sessions["max"]:
        return Check(name, "fail", f"{detail}: the other {sessions['max'] - fit} sessions would wait for KV "
                     "(or be preempted) with every slot busy", key, max(1, fit),
                     apply_with(key, sessions["max"], max(1, fit)))
    return Check(name, "pass", f"{detail}; no memory warning")


def queue_depth(status: dict[str, Any]) -> Check:
    q, s = int(status["queue"]["max"]), int(status["sessions"]["max"])
    name = "queue depth bounded"
    key = "thresholds.max_queue_depth"
    deadline = status["profile"].get("admission", {}).get("mode") == "deadline"
    if q == 0:
        return Check(name, "fail", f"max_queue_depth 0: every request beyond the {s} sessions gets 503 at once, "
                     "even in a burst that would drain in seconds", key, s, apply_with(key))
    if q > QUEUE_FACTOR * s:
        return Check(name, "fail", f"max_queue_depth {q} behind {s} sessions: the last in line waits about "
                     f"{q / s:.0f} session lifetimes before its first token; beyond {QUEUE_FACTOR}x the sessions a "
                     "503 with Retry-After serves users better than a wait past the target", key, s, apply_with(key))
    return Check(name, "pass", f"at most {q} waiting ({q / s:.2g}x the {s} sessions), then 503 queue_full with "
                 "Retry-After" + ("; deadline admission also refuses what would miss the TTFT P99 target"
                                  if deadline else ""))


def metrics_exposed(text: str | None, error: str | None) -> Check:
    name = "metrics exposed"
    if text is None:
        return Check(name, "fail", f"/metrics: {error}")
    try:
        names = Scrape.parse(text).names()
    except ValueError as exc:
        return Check(name, "fail", f"/metrics is not valid Prometheus text: {exc}")
    forge = {n for n in names if n.startswith("forge_")}
    missing = [m for m in SEED_METRICS if m not in names]
    if not forge:
        return Check(name, "fail", "/metrics answers but has no forge_ series")
    if missing:
        return Check(name, "fail", f"/metrics lacks {', '.join(missing)}")
    return Check(name, "pass", f"/metrics answers with {len(forge)} forge_ series, the seed's metrics among them")


def alert_rules(dirs: list[Path]) -> Check:
    name = "alert rules installed"
    for d in dirs:
        for fname in RULES_FILES:
            path = d / fname
            if not path.is_file():
                continue
            try:
                doc = yaml.safe_load(path.read_text())
                rules = [r for g in doc.get("groups", []) for r in g.get("rules", [])]
            except (OSError, yaml.YAMLError, AttributeError, TypeError) as exc:
                return Check(name, "fail", f"{path}: not a readable rule file: {exc}")
            present = {r.get("alert") for r in rules if isinstance(r, dict)}
            missing = [a for a in ALERTS if a not in present]
            if missing:
                return Check(name, "fail", f"{path} lacks {', '.join(missing)}: install the current "
                             "monitoring/prometheus/forged-alerts.yml")
            return Check(name, "pass", f"{path}: the {len(ALERTS)} forged alerts")
    existing = [str(d) for d in dirs if d.is_dir()]
    if existing:
        return Check(name, "fail", f"no {RULES_FILES[0]} in {', '.join(existing)}: install -m 0644 "
                     f"monitoring/prometheus/forged-alerts.yml {existing[0]}/ and reload Prometheus")
    return Check(name, "n.a.", f"no Prometheus rules directory here ({', '.join(str(d) for d in dirs)}); where "
                 "Prometheus runs, install monitoring/prometheus/forged-alerts.yml into its rules directory "
                 "(or give --rules-dir)")


def tcp_access(status: dict[str, Any]) -> Check:
    name = "TCP access control"
    access = status.get("access") or {}
    if not access:
        return Check(name, "n.a.", "the daemon does not report its listeners (a forged before this check)")
    tcp, unix = access.get("tcp") or [], access.get("unix") or []
    sockets = ", ".join(unix) or "none"
    if not tcp:
        return Check(name, "pass", f"no TCP listener: only the UNIX socket's owner and group can connect ({sockets})")
    if access.get("tcp_api_keys"):
        return Check(name, "pass", f"TCP {', '.join(tcp)} needs an API key on every request but the probes")
    return Check(name, "warn", f"TCP {', '.join(tcp)} serves generation without a key to every user of this "
                 f"machine, whatever the UNIX socket's mode and group allow; on a shared machine set "
                 f"listen.http.api_keys_file and listen.http.require_keys_on_loopback: true in forged.yaml, or "
                 f"listen.http.enabled: false (and no TCP ListenStream in forged.socket), then restart")


def render(status: dict[str, Any], checks: list[Check], where: str) -> str:
    hw = status["hardware"]
    engine = status.get("engine", {}).get("name") or status["profile"]["engine"]
    lines = [f"forged doctor: profile {status['profile']['name']} ({engine}), "
             f"{hw['kind']}: {hw['name']}, via {where}"]
    width = max(len(c.name) for c in checks)
    for c in checks:
        lines.append(f"{c.result.upper() if c.result != 'n.a.' else 'n.a.':<5} {c.name:<{width}}  {c.reason}")
        if c.result == "fail" and c.lever:
            lines.append(f"{'':<5} {'':<{width}}  -> set {c.lever}: {json.dumps(c.suggest)} "
                         f"(then `systemctl {c.apply} forged`)")
        elif c.result == "fail" and c.command:
            lines.append(f"{'':<5} {'':<{width}}  -> run: {c.command}")
    counts = {r: sum(c.result == r for c in checks) for r in ("pass", "fail", "warn", "n.a.")}
    lines.append(f"{counts['pass']} pass, {counts['fail']} fail, {counts['warn']} warn, {counts['n.a.']} n.a.")
    if status.get("pending_restart"):
        lines.append(f"note: changes pending a restart: {', '.join(status['pending_restart'])}")
    return "\n".join(lines)
