"""Command lines: `forged` (run, probe, check-config, show-profile) and `forgectl`. This module only
parses and dispatches: every command but `forged run` (forged/daemon.py) is a module of forged/ctl/."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

from forged import config as config_mod


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
    from forged.ctl import probe  # each command's module is imported when it runs, not at every start
    if args.command == "probe":
        return probe.probe_main(config_dir, as_json=args.json)
    if args.command == "check-config":
        return probe.check_config_main(config_dir)
    return probe.show_profile_main(config_dir)


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
    from forged.ctl import bench, diagnose, doctor, engine, model, plan, status
    commands = {"status": status.main, "model": model.main, "plan": plan.main, "bench": bench.main,
                "doctor": doctor.main, "diagnose": diagnose.main, "engine": engine.main}
    for module in (status, model, plan, bench, doctor, diagnose, engine):
        module.add_parser(sub)
    args = parser.parse_args(argv)
    from forged.ctl.client import read_api_key
    try:
        args.api_key = read_api_key(args.api_key_file)
    except ValueError as exc:
        print(f"forgectl: {exc}", file=sys.stderr)
        return 2
    return commands[args.command](args)


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
