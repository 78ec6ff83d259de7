"""`forgectl plan`: the seed's KV table for a real model and a SKU profile."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from forged import config as config_mod
from forged.engine.kv import KvShape, kv_budget_bytes, plan_capacity
from forged.engine.shapes import shape_from_path
from forged.schema import EXIT_CONFIG, ConfigError

GIB = 2**30
# Device memory of the seed's SKUs (platform.md): Thor's unified 128 GB, the RTX 4000 Ada's NVML total.
NOMINAL_MEMORY = {"jetson_thor": 128 * 10**9, "rtx_4000_pro": 20475 * 2**20}
DTYPES = ("fp32", "fp16", "fp8")


def add_parser(sub: Any) -> None:
    p = sub.add_parser("plan", help="KV bytes and sessions that fit, per KV dtype, for a model and a SKU profile")
    p.add_argument("--sku", required=True, help="profile name in sku_profiles.yaml")
    p.add_argument("--model", required=True, type=Path, help="GGUF file, config.json or checkpoint directory")
    p.add_argument("--context", type=int, default=20000, help="tokens per session (default 20000)")
    p.add_argument("--sessions", type=int, help="sessions wanted (default: the profile's max_concurrent_sessions)")
    p.add_argument("--memory-gib", type=float, help="device memory (default: the SKU's, see forged/ctl/plan.py)")
    p.add_argument("--weights-gib", type=float, help="weights size when the model path has no weight files")
    p.add_argument("--config-dir", help="directory with sku_profiles.yaml (default: $FORGED_CONFIG_DIR or /etc/forged)")


def main(args: argparse.Namespace) -> int:
    as_json = args.json
    try:
        profiles = config_mod.load(config_mod.resolve_config_dir(args.config_dir)).profiles
    except ConfigError as exc:
        print(f"forgectl: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.sku not in profiles:
        print(f"forgectl: unknown profile {args.sku!r}; known: {', '.join(sorted(profiles))}", file=sys.stderr)
        return 2
    memory = int(args.memory_gib * GIB) if args.memory_gib else NOMINAL_MEMORY.get(args.sku)
    if memory is None:
        print(f"forgectl: give --memory-gib for profile {args.sku!r}", file=sys.stderr)
        return 2
    try:
        shape = shape_from_path(args.model)
    except (OSError, ValueError) as exc:
        print(f"forgectl: {exc}", file=sys.stderr)
        return 1
    if args.weights_gib is not None:
        shape = dataclasses.replace(shape, weights_bytes=int(args.weights_gib * GIB))
    doc = build(shape, profiles[args.sku], args.sku, memory, args.context, args.sessions)
    print(json.dumps(doc, indent=2) if as_json else render(doc))
    return 0


def build(shape: KvShape, profile: config_mod.Profile, sku: str, memory: int, context: int,
          sessions: int | None) -> dict[str, Any]:
    levers = profile.tensorrt_llm
    wanted = sessions or profile.inference.max_concurrent_sessions
    budget = shape.weights_bytes + kv_budget_bytes(memory, shape.weights_bytes, levers.free_gpu_memory_fraction)
    rows = []
    for dtype in DTYPES:
        plan = plan_capacity(shape, int(budget), dtype, levers.tokens_per_block, context, wanted,
                             engine=profile.engine)
        rows.append({"dtype": dtype, "bytes_per_token": plan.bytes_per_token,
                     "bytes_per_session": plan.bytes_per_session, "sessions_fit": plan.sessions_fit,
                     "headroom_bytes": plan.headroom_bytes})
    fp32 = rows[0]["bytes_per_session"]
    for row in rows:
        row["saving_vs_fp32"] = 1 - row["bytes_per_session"] / fp32 if fp32 else 0.0
    chosen = next(r for r in rows if r["dtype"] == (levers.kv_cache_dtype if levers.kv_cache_dtype in DTYPES
                                                     else "fp16"))
    return {"sku": sku, "engine": profile.engine, "model": shape.name, "layers": shape.n_layers,
            "kv_heads": shape.n_kv_heads, "head_dim": shape.head_dim_k, "sliding_window_layers": shape.swa_layers,
            "sliding_window": shape.sliding_window, "weights_bytes": shape.weights_bytes, "memory_bytes": memory,
            "kv_budget_bytes": budget - shape.weights_bytes, "context": context, "sessions_wanted": wanted,
            "profile_dtype": levers.kv_cache_dtype, "rows": rows,
            "profile_fits": chosen["sessions_fit"] >= wanted}


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"{doc['model']} on {doc['sku']} ({doc['engine']}): {doc['layers']} layers x {doc['kv_heads']} KV heads x "
        f"{doc['head_dim']} head dim" + (f", {doc['sliding_window_layers']} layers with a "
                                         f"{doc['sliding_window']}-token sliding window"
                                         if doc["sliding_window_layers"] else ""),
        f"memory {doc['memory_bytes'] / GIB:.1f} GiB, weights {doc['weights_bytes'] / GIB:.2f} GiB, KV budget "
        f"{doc['kv_budget_bytes'] / GIB:.2f} GiB; {doc['sessions_wanted']} sessions of {doc['context']} tokens wanted",
        "",
        f"{'KV dtype':<9}{'bytes/token':>13}{'per ' + str(doc['context']) + ' ctx':>16}{'vs fp32':>9}"
        f"{'sessions fit':>14}{'headroom':>12}",
    ]
    for r in doc["rows"]:
        lines.append(f"{r['dtype']:<9}{_size(r['bytes_per_token']):>13}{_size(r['bytes_per_session']):>16}"
                     f"{-r['saving_vs_fp32'] * 100:>8.0f}%{r['sessions_fit']:>14}{_size(r['headroom_bytes']):>12}")
    lines.append("")
    row = next(r for r in doc["rows"] if r["dtype"] == doc["profile_dtype"]) if \
        doc["profile_dtype"] in DTYPES else doc["rows"][1]
    if doc["profile_fits"]:
        lines.append(f"OK: with its {doc['profile_dtype']} KV, {doc['sku']} holds {doc['sessions_wanted']} sessions "
                     f"of {doc['context']} tokens ({row['sessions_fit']} fit).")
    else:
        lines.append(f"DOES NOT FIT: with its {doc['profile_dtype']} KV, {doc['sku']} holds only {row['sessions_fit']} "
                     f"sessions of {doc['context']} tokens, not its {doc['sessions_wanted']}. Lower "
                     f"max_concurrent_sessions or the context, or use a smaller KV dtype.")
    return "\n".join(lines)


def _size(n: float) -> str:
    sign = "-" if n < 0 else ""
    n = abs(n)
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{sign}{n / scale:.2f} {unit}"
    return f"{sign}{n:.0f} B"
