"""`forgectl status`: profile, model, sessions, queue, KV and targets at a glance."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from forged.ctl.client import BadAnswer, Client, DaemonUnreachable


def add_parser(sub: Any) -> None:
    sub.add_parser("status", help="profile, model, sessions, queue, KV and targets at a glance")


def main(args: argparse.Namespace) -> int:
    client = Client.from_args(args)
    try:
        status = client.get_json("/v1/status")
        targets = client.get_json("/v1/performance/targets")
    except (DaemonUnreachable, BadAnswer) as exc:
        print(f"forgectl: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"status": status, "targets": targets}, indent=2))
        return 0
    kv = status["kv_cache"]
    print(f"forged {status['phase']}  profile {status['profile']['name']}  up {status['uptime_s']:.0f} s")
    hw = status["hardware"]
    cc = f", compute capability {hw['compute_capability']}" if hw.get("compute_capability") else ""
    print(f"hardware  {hw['kind']}: {hw['name']} ({hw['memory_total_bytes'] / 2**30:.1f} GiB{cc})")
    print(f"model     {status['model']['id']} (context {status['model']['context_length']})")
    levers = status["profile"]["tensorrt_llm"]
    print(f"engine    {status['engine']['name']}: KV {kv['dtype']}, {kv['policy']}, "
          f"chunked context {'on' if levers['enable_chunked_context'] else 'off'} "
          f"(max_num_tokens {levers['max_num_tokens']})")
    device = status["engine"].get("device")
    if device:
        print(f"device    {device['runs_on']}: {device['layers_offloaded']}/{device['layers_total']} layers offloaded, "
              f"KV on {', '.join(device['kv_on']) or '?'} (libllama {device['library']})")
    print(f"sessions  {status['sessions']['active']}/{status['sessions']['max']}   "
          f"queue {status['queue']['depth']}/{status['queue']['max']}   "
          f"KV blocks {kv['blocks_used']}/{kv['blocks_total']} used, {kv.get('blocks_cached', 0)} cached")
    cache = status.get("prefix_cache")
    if cache:
        rate = "-" if cache["hit_rate"] is None else f"{100 * cache['hit_rate']:.1f}%"
        print(f"prefix    {rate} of {cache['queries_tokens']} prompt tokens found cached")
    for warning in filter(None, [status["engine"].get("gpu_unused"), status["sessions"].get("memory_warning"),
                                 status["engine"].get("fallback")]):
        print(f"WARNING   {warning}")
    if status.get("pending_restart"):
        print(f"pending   needs a restart: {', '.join(status['pending_restart'])}")
    for name, check in targets["targets"].items():
        mark = {True: "met", False: "UNMET", None: "no data"}[check["met"]]
        live = "-" if check["live"] is None else f"{check['live']:.1f}"
        print(f"  {name:<12} live {live:>8} {check['comparison']} target {check['target']:<8g} {mark}")
    return 0
