"""`forged probe`, `forged check-config` and `forged show-profile`: what this machine is, which
profile it gets and why, without starting the daemon.

`forged probe` shows the hardware even when the config does not load (then it exits 78); the
selection itself (`explain`, `select`) is forged/profiles.py's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from forged import config as config_mod
from forged import hardware as hardware_mod
from forged.config import LoadedConfig
from forged.engine.llama_cpp.library import cuda_architecture
from forged.hardware import HardwareInfo
from forged.profiles import Selection, explain, select
from forged.schema import EXIT_CONFIG, ConfigError, to_plain


def probe_main(config_dir: Path, as_json: bool = False) -> int:
    """`forged probe [--json]`: the hardware, every profile tried, the winner."""
    hw = hardware_mod.probe()
    try:
        loaded: LoadedConfig | None = config_mod.load(config_dir)
        error = None
    except ConfigError as exc:
        loaded, error = None, str(exc)
    doc = report(hw, loaded, error)
    print(json.dumps(doc, indent=2) if as_json else render(doc))
    return EXIT_CONFIG if "config_error" in doc else 0


def check_config_main(config_dir: Path) -> int:
    """`forged check-config`: the config loads and a profile is selected for this machine."""
    selection = _selection(config_dir)
    if selection is None:
        return EXIT_CONFIG
    loaded, chosen = selection
    print(f"{config_dir}: OK ({len(loaded.profiles)} profiles; this machine uses {chosen.name})")
    return 0


def show_profile_main(config_dir: Path) -> int:
    """`forged show-profile`: the profile this machine would use, as JSON."""
    selection = _selection(config_dir)
    if selection is None:
        return EXIT_CONFIG
    _, chosen = selection
    print(json.dumps({"profile": chosen.name, "reason": chosen.reason, **to_plain(chosen.profile)}, indent=2))
    return 0


def _selection(config_dir: Path) -> tuple[LoadedConfig, Selection] | None:
    try:
        loaded = config_mod.load(config_dir)
        return loaded, select(loaded, hardware_mod.probe())
    except ConfigError as exc:
        print(f"forged: config error: {exc}", file=sys.stderr)
        return None


def report(hardware: HardwareInfo, config: LoadedConfig | None, error: str | None = None) -> dict[str, object]:
    """What `forged probe --json` prints: the hardware, every profile tried, the winner."""
    out: dict[str, object] = {"hardware": to_plain(hardware)}
    if config is None:
        out["config_error"] = error
        return out
    out["profile_files"] = list(config.profile_files)
    out["profiles"] = [
        {"name": c.name, "defined_at": list(c.defined_at), "verdict": c.verdict, "matched_rule": c.matched_rule,
         "rules": [{"index": r.index, "rule": r.rule, "matched": r.matched, "checks": list(r.checks)}
                   for r in c.rules]}
        for c in explain(config, hardware)]
    try:
        selection = select(config, hardware)
    except ConfigError as exc:  # nothing matches and there is no fallback profile
        out["selected"] = None
        out["config_error"] = str(exc)
        return out
    out["selected"] = {"name": selection.name, "reason": selection.reason, "pinned": selection.pinned,
                       "fallback": selection.fallback}
    out["cuda"] = cuda_target(hardware, selection)
    return out


def cuda_target(hardware: HardwareInfo, selection: Selection) -> dict[str, object]:
    """The CUDA architecture `forgectl engine build` compiles for here: the probe's compute capability
    as sm_XX, and the selected profile's `llama_cpp.cuda_architecture`; they must agree."""
    probed = cuda_architecture(hardware.compute_capability) if hardware.kind != "cpu" else None
    pinned = selection.profile.llama_cpp.cuda_architecture
    return {"compute_capability": hardware.compute_capability if probed else None, "probe_architecture": probed,
            "profile_architecture": pinned,
            "agree": None if probed is None or pinned is None else probed == pinned}


def _bytes(value: object) -> str:
    if not isinstance(value, int):
        return "?"
    return f"{value / 2**30:.1f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


def render(doc: dict[str, object]) -> str:
    """The same report for a person."""
    hw = doc["hardware"]
    assert isinstance(hw, dict)
    lines = [f"hardware: {hw['kind']}: {hw['name']}"]
    memory = "unified" if hw["unified_memory"] else "device"
    cc = f", compute capability {hw['compute_capability']}" if hw.get("compute_capability") else ""
    lines.append(f"  memory {_bytes(hw['memory_total_bytes'])} ({memory}){cc}")
    lines.append(f"  cpu {hw['cpu_model']}, {hw['cores']} cores, {_bytes(hw['system_memory_total_bytes'])} RAM")
    if hw.get("driver_version") or hw.get("nvml_version"):
        lines.append(f"  driver {hw.get('driver_version') or '?'}, CUDA {hw.get('cuda_driver_version') or '?'}, "
                     f"NVML {hw.get('nvml_version') or '?'}")
    jetson = hw.get("jetson")
    if isinstance(jetson, dict):
        lines.append(f"  jetson: SoC {jetson['soc'] or '?'}, L4T {jetson['l4t'] or '?'} "
                     f"(from {jetson['l4t_source'] or 'nowhere'}), JetPack {jetson['jetpack'] or '?'}"
                     + (f", module {jetson['module']}" if jetson.get("module") else ""))
        lines.append(f"  jtop {jetson['jtop']}")
    for gpu in hw.get("gpus") or []:
        engine = "  <- engine's device" if gpu["index"] == hw.get("device_index") else ""
        memory_text = (f"{_bytes(gpu['memory_total_bytes'])} total, {_bytes(gpu['memory_used_bytes'])} used, "
                       f"{_bytes(gpu['memory_reserved_bytes'])} reserved ({gpu['memory_source']})"
                       if gpu.get("memory_total_bytes") is not None else f"memory {gpu['memory_source']}")
        lines.append(f"  GPU {gpu['index']}: {gpu['name']}, compute capability {gpu['compute_capability'] or '?'}, "
                     f"{memory_text}{engine}")
    for note in hw.get("notes") or []:
        lines.append(f"  note: {note}")
    if "profiles" not in doc:
        lines.append(f"config error: {doc['config_error']}")
        return "\n".join(lines)
    lines.append("profile files (lowest layer first): " + ", ".join(doc["profile_files"]))  # type: ignore[arg-type]
    lines.append("profiles, in the order tried:")
    for c in doc["profiles"]:  # type: ignore[attr-defined]
        lines.append(f"  {c['name']}: {c['verdict']}  [{', '.join(c['defined_at'])}]")
        for r in c["rules"]:
            mark = "holds" if r["matched"] else "fails"
            lines.append(f"    rule {r['index'] + 1} {mark}: {'; '.join(r['checks'])}")
    selected = doc["selected"]
    if isinstance(selected, dict):
        lines.append(f"selected: {selected['name']} ({selected['reason']})")
        cuda = doc["cuda"]
        assert isinstance(cuda, dict)
        if cuda["probe_architecture"] or cuda["profile_architecture"]:
            arch = cuda["probe_architecture"] or cuda["profile_architecture"]
            verdict = {True: f"profile {selected['name']} agrees", None: "",
                       False: f"but profile {selected['name']} says {cuda['profile_architecture']}: FIX ONE"}
            cc = f"compute capability {cuda['compute_capability']} -> " if cuda["compute_capability"] else ""
            lines.append(f"CUDA engine: {cc}sm_{arch} (forgectl engine build)"
                         + (f"; {verdict[cuda['agree']]}" if verdict[cuda["agree"]] else ""))
    else:
        lines.append(f"selected: none: {doc['config_error']}")
    return "\n".join(lines)
