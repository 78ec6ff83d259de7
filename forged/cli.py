"""Command lines: `forged` (run, probe, check-config, show-profile) and `forgectl` (status, and the
subcommands in forged/ctl/, modelctl.py and plan.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from forged import config as config_mod
from forged import hardware, profiles
from forged.schema import ConfigError, to_plain


def _setup_logging(level: str = "INFO") -> None:
    # Under systemd the journal stamps time itself; a terminal gets timestamps.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt, stream=sys.stderr)


def forged_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forged", description="Local LLM appliance daemon.")
    parser.add_argument("--config-dir", help="directory with forged.yaml and sku_profiles.yaml "
                        "(default: $FORGED_CONFIG_DIR, else /etc/forged)")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("run", help="run the daemon in the foreground (the default)")
    sub.add_parser("check-config", help="validate the configuration and exit")
    sub.add_parser("show-profile", help="print the profile this machine would use, as JSON")
    probe_parser = sub.add_parser("probe", help="show the hardware found, every profile tried and the winner")
    probe_parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    config_dir = config_mod.resolve_config_dir(args.config_dir)
    _setup_logging()
    if args.command in (None, "run"):
        from forged.daemon import main  # imports libllama; keep it off the other commands' path
        return main(config_dir)
    if args.command == "probe":
        return profiles.probe_command(config_dir, as_json=args.json)
    try:
        loaded = config_mod.load(config_dir)
        selection = profiles.select(loaded, hardware.probe())
    except ConfigError as exc:
        print(f"forged: config error: {exc}", file=sys.stderr)
        return 78
    if args.command == "check-config":
        print(f"{config_dir}: OK ({len(loaded.profiles)} profiles; this machine uses {selection.name})")
        return 0
    print(json.dumps({"profile": selection.name, "reason": selection.reason, **to_plain(selection.profile)},
                     indent=2))
    return 0


# ---------------------------------------------------------------- forgectl

def forgectl_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="forgectl", description="Talk to a running forged.")
    parser.add_argument("--socket", default=None, help="UNIX socket (default: the daemon's run dir)")
    parser.add_argument("--url", default=None, help="use TCP instead, e.g. http://127.0.0.1:8000")
    parser.add_argument("--api-key-file", default=None,
                        help="file whose first key is sent over TCP as Authorization: Bearer "
                        "(default: $FORGED_API_KEY); the UNIX socket needs none")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="profile, model, sessions, queue, KV and targets at a glance")
    from forged import modelctl, plan
    modelctl.add_parser(sub)
    plan.add_parser(sub)
    from forged.ctl import bench, diagnose, doctor, engine
    bench.add_parser(sub)
    doctor.add_parser(sub)
    diagnose.add_parser(sub)
    engine.add_parser(sub)
    args = parser.parse_args(argv)
    from forged.ctl.client import BadAnswer, Client, DaemonUnreachable, read_api_key
    try:
        args.api_key = read_api_key(args.api_key_file)
    except ValueError as exc:
        print(f"forgectl: {exc}", file=sys.stderr)
        return 2
    if args.command == "model":
        return modelctl.main(args)
    if args.command == "plan":
        return plan.main(args, as_json=args.json)
    if args.command in ("bench", "doctor", "diagnose", "engine"):
        return {"bench": bench.main, "doctor": doctor.main, "diagnose": diagnose.main,
                "engine": engine.main}[args.command](args)
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


def _entry(fn: Any) -> None:
    try:
        code = fn()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`forgectl status | head`): not an error worth a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    except KeyboardInterrupt:
        code = 130
    sys.exit(code)


def forged_entry() -> None:
    _entry(forged_main)


def forgectl_entry() -> None:
    _entry(forgectl_main)
