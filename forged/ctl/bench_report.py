"""`forgectl bench`'s results: the text report, the --plot figure, and --compare of two saved runs.

A run (bench.py) produces one JSON document of format FORMAT; everything here reads only that
document, so a saved run renders, plots and compares the same as a live one.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

FORMAT = "forged-bench/1"
# Levers: the profile sections an operator tunes (targets are compared separately), and the workload
# keys two runs must share to be compared.
LEVER_SECTIONS = ("engine", "tensorrt_llm", "inference", "thresholds", "admission", "llama_cpp")
WORKLOAD_KEYS = ("users", "prompt_tokens", "prompt_spread", "max_tokens", "requests", "duration_s", "endpoint")


# ------------------------------------------------------------------ human output

def _fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:.0f}{unit}"
        return f"{value:.1f}{unit}" if abs(value) >= 10 else f"{value:.2f}{unit}"
    return f"{value}{unit}"


def render(doc: dict[str, Any]) -> str:
    s, w, d = doc["summary"], doc["workload"], doc["daemon"]
    amount = f"{w['duration_s']:g} s" if w["duration_s"] else f"{w['requests']} requests"
    lines = [
        f"forged bench: profile {d['profile']['name']}, model {d['model']['id']}, {d['hardware']['kind']}: "
        f"{d['hardware']['name']}",
        f"workload: {w['users']} users, prompts ~{w['prompt_tokens']} tokens (+-{w['prompt_spread']:.0%}; "
        f"measured mean {_fmt(s['prompt_tokens_mean'])}, "
        f"{_fmt(s['prompt_tokens_min'])}..{_fmt(s['prompt_tokens_max'])}),"
        f" {w['max_tokens']} output tokens, {amount}",
        f"requests: {s['requests']} sent, {s['ok']} ok, {s['rejected_503']} refused (503), {s['errors']} errors, "
        f"in {s['wall_s']:.1f} s" + ("  [interrupted]" if doc.get("interrupted") else ""),
    ]
    if s["rejected_by_reason"]:
        lines.append("503 by reason: " + ", ".join(f"{k} {v}" for k, v in s["rejected_by_reason"].items()))
    if s["errors_by_code"]:
        lines.append("errors: " + ", ".join(f"{k}: {v}" for k, v in s["errors_by_code"].items()))
    lines.append("")
    lines.append(f"{'metric':<18} {'measured':>12}   {'target':>14}   result")
    marks = {True: "met", False: "UNMET", None: "n.a."}
    units = {"aggregate_tps": " tok/s", "tps_per_user_p50": " tok/s"}
    for c in doc["checks"]:
        unit = units.get(c["name"], " ms" if c["name"].endswith("_ms") else "")
        target = "-" if c["target"] is None else f"{c['comparison']} {_fmt(c['target'])}"
        lines.append(f"{c['name']:<18} {_fmt(c['value']) + unit:>12}   {target:>14}   {marks[c['met']]:<6} "
                     f"({c['note']})")
    dm = doc["daemon_metrics"]
    lines.append("")
    lines.append(f"daemon's forge_ttft_seconds over the run: {dm['ttft_count']:g} observations, mean "
                 f"{_fmt(dm['ttft_mean_ms'], ' ms')} (bench mean {_fmt(s['ttft_mean_ms'], ' ms')}); queue wait mean "
                 f"{_fmt(dm['queue_wait_mean_ms'], ' ms')}; preemptions {dm['preemptions']:g}")
    if dm["ttft_count"] != s["ok"]:
        lines.append(f"note: the daemon saw {dm['ttft_count']:g} first tokens, the bench {s['ok']}: other clients "
                     "were using the daemon during the run")
    if d.get("pending_restart"):
        lines.append(f"note: changes pending a restart: {', '.join(d['pending_restart'])}")
    return "\n".join(lines)


# ------------------------------------------------------------------ --plot

class PlotUnavailable(Exception):
    pass


def import_pyplot() -> Any:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("--plot needs matplotlib, which is not installed: "
                              "pip install 'forged[plot]' (or pip install matplotlib)") from None
    return plt


def plot(doc: dict[str, Any], path: Path) -> None:
    plt = import_pyplot()
    requests = doc["requests"]
    ok = [r for r in requests if r["status"] == 200 and r["ttft_s"] is not None and r["code"] is None]
    targets = doc["daemon"]["profile"]["targets"]
    fig, (cdf, timeline) = plt.subplots(1, 2, figsize=(12, 4.5))
    ttft = sorted(r["ttft_s"] for r in ok)
    if ttft:
        cdf.step([0.0, *ttft], [0.0] + [(i + 1) / len(ttft) for i in range(len(ttft))], where="post",
                 label="TTFT")
    cdf.set_xlim(left=0)
    cdf.axvline(targets["ttft_ms"] / 1000, color="tab:green", linestyle=":", label="P50 target")
    cdf.axvline(targets["ttft_p99_ms"] / 1000, color="tab:red", linestyle="--", label="P99 target")
    cdf.axhline(0.99, color="grey", linewidth=0.5)
    cdf.set(xlabel="time to first token (s)", ylabel="fraction of requests", ylim=(0, 1.02),
            title=f"TTFT CDF ({len(ttft)} requests)")
    cdf.legend(loc="lower right")
    timeline.scatter([r["sent_s"] for r in ok], [r["ttft_s"] for r in ok], s=14, label="TTFT")
    timeline.scatter([r["sent_s"] for r in ok], [r["latency_s"] for r in ok], s=14, marker="^",
                     label="end-to-end latency")
    refused = [r for r in requests if r["status"] == 503]
    if refused:
        timeline.scatter([r["sent_s"] for r in refused], [0] * len(refused), marker="x", color="tab:red",
                         label="503 " + "/".join(sorted({r["code"] or "?" for r in refused})))
    timeline.axhline(targets["ttft_p99_ms"] / 1000, color="tab:red", linestyle="--", label="TTFT P99 target")
    timeline.set_ylim(bottom=0)
    timeline.set(xlabel="request sent at (s since start)", ylabel="seconds", title="latency over the run")
    timeline.legend(loc="upper left", fontsize="small")
    w = doc["workload"]
    fig.suptitle(f"forged bench: profile {doc['daemon']['profile']['name']}, {w['users']} users, "
                 f"~{w['prompt_tokens']} prompt tokens, {w['max_tokens']} output tokens")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ------------------------------------------------------------------ --compare

def load(path: Path) -> dict[str, Any]:
    doc = json.loads(path.read_text())
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a `forgectl bench --save` file ({FORMAT})")
    return doc


def _flatten(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else k))
        return out
    return {prefix: value}


def levers(doc: dict[str, Any]) -> dict[str, Any]:
    """The profile's levers in force during a run, flattened: {'tensorrt_llm.max_num_tokens': 256, ...}."""
    profile = doc["daemon"]["profile"]
    section = doc["daemon"].get("engine_config", {}).get("profile_section", {})
    out: dict[str, Any] = {}
    for key in LEVER_SECTIONS:
        if key in profile:
            out.update(_flatten(profile[key], key))
    # The engine's own record of what it was started with wins over the live profile for the levers
    # that need a restart (after a reload the profile shows values that are still pending). A lower
    # session limit is applied by a reload, so the live profile's stands.
    for key, value in _flatten(section, "").items():
        if key != "inference.max_concurrent_sessions":
            out[key] = value
    if doc["daemon"]["sessions"]["max"] != out.get("inference.max_concurrent_sessions"):
        out[IN_FORCE] = doc["daemon"]["sessions"]["max"]
    return out


# Sessions enforced below the profile's limit because the memory does not hold more (sanity check).
IN_FORCE = "sessions enforced (memory limit)"


# Which way is better, for the metric table.
METRICS = (("ttft_p50_ms", "lower"), ("ttft_p90_ms", "lower"), ("ttft_p99_ms", "lower"),
           ("tps_per_user_p50", "higher"), ("aggregate_tps", "higher"), ("latency_p99_ms", "lower"),
           ("ok", "higher"), ("rejected_503", "lower"), ("errors", "lower"))
NOISE = 0.05  # changes smaller than 5% are reported as "same"


def compare(a: dict[str, Any], b: dict[str, Any], name_a: str = "A", name_b: str = "B") -> dict[str, Any]:
    la, lb = levers(a), levers(b)
    changed = [{"lever": k, "a": la.get(k), "b": lb.get(k)} for k in sorted(set(la) | set(lb))
               if la.get(k) != lb.get(k) and k != IN_FORCE]
    if la.get(IN_FORCE) != lb.get(IN_FORCE) and not changed:
        changed.append({"lever": IN_FORCE, "a": la.get(IN_FORCE), "b": lb.get(IN_FORCE)})
    ta = _flatten(a["daemon"]["profile"].get("targets", {}), "targets")
    tb = _flatten(b["daemon"]["profile"].get("targets", {}), "targets")
    targets_changed = [{"key": k, "a": ta.get(k), "b": tb.get(k)} for k in sorted(set(ta) | set(tb))
                       if ta.get(k) != tb.get(k)]
    wa, wb = a["workload"], b["workload"]
    workload_changed = [{"key": k, "a": wa.get(k), "b": wb.get(k)} for k in WORKLOAD_KEYS if wa.get(k) != wb.get(k)]
    ca = a["daemon"].get("engine_config", {}).get("llama_context_params", {})
    cb = b["daemon"].get("engine_config", {}).get("llama_context_params", {})
    engine_changed = [{"key": k, "a": ca.get(k), "b": cb.get(k)} for k in sorted(set(ca) | set(cb))
                      if ca.get(k) != cb.get(k)]
    setup_changed = [what for what, x, y in (
        ("hardware", a["daemon"]["hardware"].get("name"), b["daemon"]["hardware"].get("name")),
        ("model", a["daemon"]["model"].get("id"), b["daemon"]["model"].get("id"))) if x != y]
    metrics = []
    for key, better in METRICS:
        va, vb = a["summary"].get(key), b["summary"].get(key)
        row: dict[str, Any] = {"metric": key, "a": va, "b": vb, "change": None, "change_pct": None, "verdict": None}
        if va is not None and vb is not None:
            row["change"] = round(vb - va, 3)
            if va:
                row["change_pct"] = round((vb - va) / abs(va) * 100, 1)
            rel = (vb - va) / abs(va) if va else (0.0 if vb == va else math.copysign(1.0, vb - va))
            if abs(rel) < NOISE:
                row["verdict"] = "same"
            else:
                row["verdict"] = "better" if (rel < 0) == (better == "lower") else "worse"
        metrics.append(row)
    met_a = {c["name"]: c["met"] for c in a["checks"]}
    met_b = {c["name"]: c["met"] for c in b["checks"]}
    n = len(changed)
    if n == 0 and workload_changed:
        verdict = "no lever changed, but the workload did: the differences below are the workload's"
    elif n == 0:
        verdict = ("no lever changed between the runs: the differences below are run-to-run noise "
                   "(or load from elsewhere)")
    elif n == 1:
        verdict = f"one lever changed ({changed[0]['lever']}): the differences below are its effect"
    else:
        verdict = (f"WARNING: {n} levers changed ({', '.join(c['lever'] for c in changed)}): the effect cannot be "
                   "attributed to any one of them. Change one lever at a time.")
    warnings = []
    if workload_changed:
        warnings.append("the workloads differ (" + ", ".join(f"{c['key']} {c['a']} -> {c['b']}"
                                                             for c in workload_changed)
                        + "): compare runs of the same workload")
    if setup_changed:
        warnings.append(f"the {' and '.join(setup_changed)} differ: this is not a lever comparison")
    if targets_changed:
        warnings.append("targets differ (" + ", ".join(f"{c['key']} {c['a']} -> {c['b']}" for c in targets_changed)
                        + "): met/unmet is judged against different numbers")
    return {"a": name_a, "b": name_b, "profile_a": a["daemon"]["profile"]["name"],
            "profile_b": b["daemon"]["profile"]["name"], "levers_changed": changed, "one_lever": n == 1,
            "verdict": verdict, "warnings": warnings, "engine_config_changed": engine_changed,
            "targets_changed": targets_changed, "workload_changed": workload_changed, "metrics": metrics,
            "targets_met": {k: {"a": met_a.get(k), "b": met_b.get(k)} for k in sorted(set(met_a) | set(met_b))}}


def render_compare(diff: dict[str, Any]) -> str:
    lines = [f"A: {diff['a']} (profile {diff['profile_a']})", f"B: {diff['b']} (profile {diff['profile_b']})", ""]
    if diff["levers_changed"]:
        lines.append("levers changed:")
        for c in diff["levers_changed"]:
            lines.append(f"  {c['lever']}: {c['a']} -> {c['b']}")
    else:
        lines.append("levers changed: none")
    if diff["engine_config_changed"]:
        lines.append("  engine config as passed: " + ", ".join(f"{c['key']} {c['a']} -> {c['b']}"
                                                             for c in diff["engine_config_changed"]))
    lines.append(diff["verdict"])
    for w in diff["warnings"]:
        lines.append(f"WARNING: {w}")
    lines.append("")
    lines.append(f"{'metric':<18} {'A':>10} {'B':>10} {'change':>16}   verdict")
    for m in diff["metrics"]:
        pct = "" if m["change_pct"] is None else f" ({m['change_pct']:+.0f}%)"
        change = "-" if m["change"] is None else f"{m['change']:+g}{pct}"
        lines.append(f"{m['metric']:<18} {_fmt(m['a']):>10} {_fmt(m['b']):>10} {change:>16}   {m['verdict'] or '-'}")
    marks = {True: "met", False: "UNMET", None: "n.a."}
    lines.append("")
    lines.append("targets: " + ", ".join(f"{k} {marks[v['a']]} -> {marks[v['b']]}"
                                         for k, v in diff["targets_met"].items()))
    return "\n".join(lines)
