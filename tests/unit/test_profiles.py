"""Profile selection: probe -> profile for each fixture machine, the layering of profile files
(packaged defaults < /etc < conf.d), the pin, and errors that name file:line.

The fixture machines' NVML is a strict stand-in (tests/fixtures/fake_nvml.py); see its docstring.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))

from machine import FIXTURES, machine

from forged import cli, config, hardware, profiles, sanity
from forged.engine.kv import KvShape
from forged.hardware import HardwareInfo
from forged.hardware.nvml import NvmlSession
from forged.schema import ConfigError

REPO = Path(__file__).resolve().parents[2]
PACKAGED = REPO / "etc" / "forged"
# The profiles of the recorded H200 run (h200_probe.json); those added since are compared apart.
RECORDED = {p["name"] for p in json.loads((FIXTURES / "h200_probe.json").read_text())["profiles"]}


@pytest.fixture(autouse=True)
def _no_system_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGED_PROFILES_DIR", "")  # never read /usr/share/forged/profiles of this machine


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    for name in ("forged.yaml", "sku_profiles.yaml"):
        shutil.copy(PACKAGED / name, etc / name)
    return etc


@pytest.fixture
def layered(tmp_path: Path) -> tuple[Path, Path]:
    """A packaged defaults dir holding the shipped profiles, and a config dir with only forged.yaml."""
    share = tmp_path / "share"
    share.mkdir()
    shutil.copy(PACKAGED / "sku_profiles.yaml", share / "sku_profiles.yaml")
    etc = tmp_path / "etc"
    etc.mkdir()
    shutil.copy(PACKAGED / "forged.yaml", etc / "forged.yaml")
    return share, etc


def probed(name: str, env: dict[str, str] | None = None) -> HardwareInfo:
    root, nvml = machine(name)
    return hardware.probe(root, nvml=NvmlSession(nvml), env=env or {})


def line_of(path: Path, text: str) -> int:
    return next(i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line)


# ---------------------------------------------------------------- probe -> profile, per machine

@pytest.mark.parametrize(("machine_name", "expected"), [
    ("thor", "jetson_thor"),
    ("rtx4000ada", "rtx_4000_pro"),
    ("h200", "generic_gpu"),
    ("h200_x4", "multi_gpu"),
    ("cpu", "cpu"),
])
def test_each_fixture_machine_gets_its_profile(cfg_dir: Path, machine_name: str, expected: str) -> None:
    selection = profiles.select(config.load(cfg_dir), probed(machine_name))
    assert selection.name == expected
    assert not selection.pinned and not selection.fallback
    assert selection.reason.startswith("match rule ")


def test_generic_gpu_for_the_h200_has_fp8_kv(cfg_dir: Path) -> None:
    selection = profiles.select(config.load(cfg_dir), probed("h200"))
    assert selection.profile.tensorrt_llm.kv_cache_dtype == "fp8"
    assert selection.reason == ("match rule 1: kind gpu (needs gpu): ok; memory 140.401 GiB (needs >= 39.5): ok; "
                                "compute capability 9.0 (needs >= 8.9): ok")


def test_the_real_h200_probe_selected_the_same(cfg_dir: Path) -> None:
    real = json.loads((FIXTURES / "h200_probe.json").read_text())
    candidates = profiles.explain(config.load(cfg_dir), probed("h200"))
    # multi_gpu came after that run; one GPU never matches it.
    [multi] = [c for c in candidates if c.name == "multi_gpu"]
    assert multi.verdict == "no rule matches" and "GPUs 1 (needs >= 2): FAILS" in multi.rules[0].checks
    assert [(c.name, c.verdict, c.matched_rule) for c in candidates if c.name in RECORDED] == \
        [(p["name"], p["verdict"], p["matched_rule"]) for p in real["profiles"]]
    assert real["selected"]["name"] == "generic_gpu"
    assert all(c.verdict == "no rule matches" for c in candidates if c.name not in RECORDED)


def _gpu(name: str, gib: float, cc: str) -> HardwareInfo:
    return HardwareInfo(kind="gpu", name=name, cores=8, memory_total_bytes=int(gib * 2**30), unified_memory=False,
                        compute_capability=cc, device_index=0)


@pytest.mark.parametrize(("hw", "expected", "dtype"), [
    (_gpu("NVIDIA A100-SXM4-80GB", 79.3, "8.0"), "generic_gpu_fp16", "fp16"),  # big, no FP8
    (_gpu("NVIDIA GeForce RTX 4090", 23.5, "8.9"), "generic_gpu_small", "fp8"),
    (_gpu("Tesla T4", 15.0, "7.5"), "generic_gpu_small_fp16", "fp16"),
    (_gpu("Quadro RTX 4000", 7.8, "7.5"), "generic_gpu_small_fp16", "fp16"),  # the Turing one is not an rtx_4000_pro
    (_gpu("NVIDIA RTX PRO 4000 Blackwell", 23.9, "12.0"), "rtx_4000_pro", "fp8"),
])
def test_generic_gpu_tiers_and_fp8_only_from_8_9(cfg_dir: Path, hw: HardwareInfo, expected: str, dtype: str) -> None:
    selection = profiles.select(config.load(cfg_dir), hw)
    assert (selection.name, selection.profile.tensorrt_llm.kv_cache_dtype) == (expected, dtype)


def test_an_unmatched_machine_falls_back_to_cpu(cfg_dir: Path) -> None:
    xavier = HardwareInfo(kind="jetson", name="NVIDIA Jetson AGX Xavier Developer Kit", cores=8,
                          memory_total_bytes=32 * 2**30, unified_memory=True, compute_capability="7.2")
    selection = profiles.select(config.load(cfg_dir), xavier)
    assert (selection.name, selection.fallback) == ("cpu", True)
    assert "no profile matches this jetson machine (NVIDIA Jetson AGX Xavier Developer Kit)" in selection.reason


def test_explain_shows_every_rule_and_why(cfg_dir: Path) -> None:
    candidates = {c.name: c for c in profiles.explain(config.load(cfg_dir), probed("rtx4000ada"))}
    assert candidates["rtx_4000_pro"].verdict == "selected"
    assert candidates["generic_gpu_small"].verdict == "matches, but rtx_4000_pro comes first"
    assert candidates["generic_gpu"].rules[0].checks == (
        "kind gpu (needs gpu): ok", "memory 19.995 GiB (needs >= 39.5): FAILS",
        "compute capability 8.9 (needs >= 8.9): ok")
    assert candidates["jetson_thor"].verdict == "no rule matches"


# ---------------------------------------------------------------- the pin

def test_the_pin_overrides_the_match(cfg_dir: Path) -> None:
    text = (cfg_dir / "forged.yaml").read_text().replace("profile: auto", "profile: cpu")
    (cfg_dir / "forged.yaml").write_text(text)
    selection = profiles.select(config.load(cfg_dir), probed("h200"))
    assert (selection.name, selection.pinned) == ("cpu", True)
    settings = cfg_dir / "forged.yaml"
    assert selection.reason == f"pinned by profile: cpu in {settings}:{line_of(settings, 'profile: cpu')}"
    assert [c.verdict for c in selection.candidates if c.name == "generic_gpu"] == ["selected"]  # still explained


# ---------------------------------------------------------------- layering

def test_packaged_defaults_alone(layered: tuple[Path, Path]) -> None:
    share, etc = layered
    loaded = config.load(etc, profiles_dir=share)
    assert loaded.profile_files == (str(share / "sku_profiles.yaml"),)
    assert loaded.profiles["rtx_4000_pro"].inference.max_concurrent_sessions == 8


def test_etc_overrides_a_packaged_profile_by_name(layered: tuple[Path, Path]) -> None:
    share, etc = layered
    (etc / "sku_profiles.yaml").write_text("profiles:\n  rtx_4000_pro:\n    inference:\n"
                                           "      max_concurrent_sessions: 4\n")
    loaded = config.load(etc, profiles_dir=share)
    rtx = loaded.profiles["rtx_4000_pro"]
    assert rtx.inference.max_concurrent_sessions == 4
    # Everything else still comes from the packaged profile: the seed levers and the match rules.
    assert (rtx.inference.max_seq_len, rtx.tensorrt_llm.tokens_per_block, rtx.thresholds.max_queue_depth) == \
        (32768, 32, 5)
    assert profiles.select(loaded, probed("rtx4000ada")).name == "rtx_4000_pro"
    [candidate] = [c for c in profiles.explain(loaded, probed("rtx4000ada")) if c.name == "rtx_4000_pro"]
    packaged = share / "sku_profiles.yaml"
    assert candidate.defined_at == (f"{packaged}:{line_of(packaged, 'rtx_4000_pro:')}",
                                    f"{etc / 'sku_profiles.yaml'}:2")
    assert list(loaded.profiles)[:3] == ["jetson_thor", "rtx_4000_pro", "cpu"]  # an override does not move it


def test_an_operator_profile_is_tried_before_the_packaged_ones(layered: tuple[Path, Path]) -> None:
    share, etc = layered
    (etc / "sku_profiles.yaml").write_text(
        "profiles:\n  lab_h200:\n    match:\n      - name: H200\n    inference:\n      max_concurrent_sessions: 32\n")
    loaded = config.load(etc, profiles_dir=share)
    assert next(iter(loaded.profiles)) == "lab_h200"
    selection = profiles.select(loaded, probed("h200"))
    assert (selection.name, selection.profile.inference.max_concurrent_sessions) == ("lab_h200", 32)


def test_an_override_replaces_the_match_list(layered: tuple[Path, Path]) -> None:
    share, etc = layered
    (etc / "sku_profiles.yaml").write_text("profiles:\n  generic_gpu:\n    match: []\n")
    selection = profiles.select(config.load(etc, profiles_dir=share), probed("h200"))
    # Its rules are gone, not merged with the packaged ones, and no other profile takes a 140 GiB 9.0 GPU.
    assert (selection.name, selection.fallback) == ("cpu", True)


def test_conf_d_drop_ins_apply_in_sorted_order(cfg_dir: Path) -> None:
    dropins = cfg_dir / "conf.d"
    dropins.mkdir()
    (dropins / "20-site.yaml").write_text("profiles:\n  cpu:\n    thresholds:\n      max_queue_depth: 20\n")
    (dropins / "10-vendor.yaml").write_text("profiles:\n  cpu:\n    thresholds:\n      max_queue_depth: 10\n"
                                            "    targets:\n      tps: 7\n")
    (dropins / "notes.txt").write_text("not a drop-in")
    loaded = config.load(cfg_dir)
    cpu = loaded.profiles["cpu"]
    assert (cpu.thresholds.max_queue_depth, cpu.targets.tps, cpu.targets.ttft_ms) == (20, 7, 1000)
    assert loaded.profile_files == (str(cfg_dir / "sku_profiles.yaml"), str(dropins / "10-vendor.yaml"),
                                    str(dropins / "20-site.yaml"))
    (dropins / "20-site.yaml").rename(dropins / "05-site.yaml")
    assert config.load(cfg_dir).profiles["cpu"].thresholds.max_queue_depth == 10


def test_a_drop_in_over_packaged_and_etc(layered: tuple[Path, Path]) -> None:
    share, etc = layered
    (etc / "sku_profiles.yaml").write_text("profiles:\n  cpu:\n    inference:\n      max_concurrent_sessions: 2\n")
    (etc / "conf.d").mkdir()
    (etc / "conf.d/50-more.yaml").write_text("profiles:\n  cpu:\n    inference:\n      max_concurrent_sessions: 3\n")
    loaded = config.load(etc, profiles_dir=share)
    assert loaded.profiles["cpu"].inference.max_concurrent_sessions == 3
    assert loaded.profiles["cpu"].inference.max_seq_len == 8192


def test_an_invalid_drop_in_names_its_file_and_line(cfg_dir: Path) -> None:
    (cfg_dir / "conf.d").mkdir()
    bad = cfg_dir / "conf.d/50-bad.yaml"
    bad.write_text("# site tweaks\nprofiles:\n  rtx_4000_pro:\n    inference:\n      max_concurrent_sessions: many\n")
    with pytest.raises(ConfigError) as info:
        config.load(cfg_dir)
    assert str(info.value).startswith(f"{bad}:5: profiles.rtx_4000_pro.inference.max_concurrent_sessions: "
                                      f"expected an integer in 1..256, got str 'many'")


def test_an_invalid_etc_override_names_its_file_and_line(layered: tuple[Path, Path]) -> None:
    share, etc = layered
    (etc / "sku_profiles.yaml").write_text("profiles:\n  jetson_thor:\n    tensorrt_llm:\n      kv_cache_dtype: fp4\n")
    with pytest.raises(ConfigError) as info:
        config.load(etc, profiles_dir=share)
    assert str(info.value) == (f"{etc / 'sku_profiles.yaml'}:4: profiles.jetson_thor.tensorrt_llm.kv_cache_dtype: "
                               f"expected one of fp32, fp16, bf16, fp8, got str 'fp4'")


def test_a_cross_key_error_after_merging_names_the_value_it_checks(layered: tuple[Path, Path]) -> None:
    share, etc = layered
    (etc / "sku_profiles.yaml").write_text("profiles:\n  cpu:\n    tensorrt_llm:\n      tokens_per_block: 96\n")
    with pytest.raises(ConfigError) as info:
        config.load(etc, profiles_dir=share)
    packaged = share / "sku_profiles.yaml"
    assert str(info.value).startswith(f"{packaged}:{line_of(packaged, 'max_num_tokens: 128')}: "
                                      f"profiles.cpu.tensorrt_llm.max_num_tokens: expected a multiple of "
                                      f"tokens_per_block (96)")


@pytest.mark.parametrize(("rule", "line", "message"), [
    ("- name: 'RTX ('", 4, "profiles.cpu.match[0].name: expected a regular expression, got 'RTX ('"),
    # An empty item has no key to point at: the error names the `match:` line.
    ("- {}", 3, "profiles.cpu.match[0]: expected at least one condition"),
    ("- {memory_gib_at_least: 40, memory_gib_below: 20}", 4,
     "profiles.cpu.match[0].memory_gib_below: expected more than memory_gib_at_least (40), got 20"),
    ("- {kind: tpu}", 4, "profiles.cpu.match[0].kind: expected one of jetson, gpu, cpu, got str 'tpu'"),
    ("- {colour: red}", 4, "profiles.cpu.match[0].colour: unknown key"),
])
def test_bad_match_rules_name_file_and_line(cfg_dir: Path, rule: str, line: int, message: str) -> None:
    (cfg_dir / "conf.d").mkdir()
    dropin = cfg_dir / "conf.d/10-rule.yaml"
    dropin.write_text(f"profiles:\n  cpu:\n    match:\n      {rule}\n")
    with pytest.raises(ConfigError) as info:
        config.load(cfg_dir)
    assert str(info.value).startswith(f"{dropin}:{line}: {message}"), str(info.value)


def test_drop_in_shape_errors(cfg_dir: Path) -> None:
    (cfg_dir / "conf.d").mkdir()
    dropin = cfg_dir / "conf.d/10-x.yaml"
    dropin.write_text("profile:\n  cpu: {}\n")
    with pytest.raises(ConfigError, match=r"10-x.yaml:1: profile: unknown key; expected one of: profiles"):
        config.load(cfg_dir)
    dropin.write_text("profiles:\n  cpu: 3\n")
    with pytest.raises(ConfigError, match=r"10-x.yaml:2: profiles.cpu: expected a mapping, got int 3"):
        config.load(cfg_dir)


def test_profiles_dir_from_the_environment(layered: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    share, etc = layered
    monkeypatch.setenv("FORGED_PROFILES_DIR", str(share))
    assert config.resolve_profiles_dir() == share
    assert "generic_gpu" in config.load(etc).profiles
    monkeypatch.setenv("FORGED_PROFILES_DIR", "")
    with pytest.raises(ConfigError, match=r"sku_profiles\.yaml: file not found"):
        config.load(etc)


# ---------------------------------------------------------------- forged probe

def test_forged_probe_json(cfg_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    hw = probed("h200")
    monkeypatch.setattr(hardware, "probe", lambda: hw)
    assert cli.forged_main(["--config-dir", str(cfg_dir), "probe", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    real = json.loads((FIXTURES / "h200_probe.json").read_text())
    # The recorded run is kept as it came back; the clauses' wording changed after it, not the verdicts,
    # and the CUDA target and the Orin profile came later.
    assert doc.keys() == real.keys() | {"cuda"} == {"hardware", "profile_files", "profiles", "selected", "cuda"}
    assert {k: v for k, v in doc["selected"].items() if k != "reason"} == \
        {k: v for k, v in real["selected"].items() if k != "reason"}
    assert [(p["name"], p["verdict"], [(r["rule"], r["matched"]) for r in p["rules"]]) for p in doc["profiles"]
            if p["name"] in RECORDED] == \
        [(p["name"], p["verdict"], [(r["rule"], r["matched"]) for r in p["rules"]]) for p in real["profiles"]]
    assert doc["cuda"] == {"compute_capability": "9.0", "probe_architecture": 90, "profile_architecture": None,
                           "agree": None}


def test_forged_probe_text(cfg_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    hw = probed("thor")
    monkeypatch.setattr(hardware, "probe", lambda: hw)
    assert cli.forged_main(["--config-dir", str(cfg_dir), "probe"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0] == "hardware: jetson: NVIDIA Jetson AGX Thor Developer Kit"
    assert "jetson: SoC tegra264, L4T 38.2.0 (from /etc/nv_tegra_release), JetPack 7.0" in out
    assert "  jetson_thor: selected" in out
    assert "    rule 1 holds: kind jetson (needs jetson): ok; name 'NVIDIA Jetson AGX Thor Developer Kit' " \
           "(needs /Jetson AGX Thor/): ok" in out
    assert "    rule 1 fails: kind jetson (needs gpu): FAILS; memory 121.621 GiB (needs >= 39.5): ok; " \
           "compute capability 11.0 (needs >= 8.9): ok" in out
    assert out.rstrip().endswith("selected: jetson_thor (match rule 1: kind jetson (needs jetson): ok; name 'NVIDIA "
                                 "Jetson AGX Thor Developer Kit' (needs /Jetson AGX Thor/): ok)\n"
                                 "CUDA engine: compute capability 11.0 -> sm_110 (forgectl engine build); profile "
                                 "jetson_thor agrees")


def test_forged_probe_shows_the_hardware_when_the_config_is_broken(
        cfg_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    hw = probed("cpu")
    monkeypatch.setattr(hardware, "probe", lambda: hw)
    (cfg_dir / "sku_profiles.yaml").write_text("profiles: [\n")
    assert cli.forged_main(["--config-dir", str(cfg_dir), "probe"]) == 78
    out = capsys.readouterr().out
    assert out.startswith("hardware: cpu: Intel(R) Xeon(R) Processor")
    assert "config error: " in out and "invalid YAML" in out


# ---------------------------------------------------------------- memory-aware sanity (the hook)

# Llama-3.1-8B's shape (32 layers, 8 KV heads, head_dim 128; 16 GB of bf16 weights): 128 KiB a token
# at fp16, so 2.5 GiB for 20k tokens, as DESIGN.md says.
LLAMA_8B = KvShape("llama-3.1-8b", 32, 8, 128, 128, trained_context=131072, weights_bytes=16 * 10**9)


def test_sanity_the_rtx_4000_ada_cannot_hold_8_sessions_of_an_8b_model(cfg_dir: Path) -> None:
    loaded = config.load(cfg_dir)
    root, nvml = machine("rtx4000ada")
    session = NvmlSession(nvml)
    hw = hardware.probe(root, nvml=session, env={})
    check = sanity.check(loaded.profiles["rtx_4000_pro"], hardware.device_memory(hw, nvml=session), LLAMA_8B)
    assert (check.sessions_wanted, check.sessions_fit, check.sessions_enforced) == (8, 2, 2)
    assert check.available_bytes == 21_035_483_136  # NVML v2 free: total - reserved - used
    assert check.warning == ("memory: 8 sessions x 32768 tokens of fp8 KV (2.00 GiB each) + 14.90 GiB weights need "
                             "30.9 GiB, but 0.9 of the 19.6 GiB available holds 2; enforcing 2 sessions")


def test_sanity_the_h200_holds_generic_gpu(cfg_dir: Path) -> None:
    loaded = config.load(cfg_dir)
    root, nvml = machine("h200")
    session = NvmlSession(nvml)
    hw = hardware.probe(root, nvml=session, env={})
    check = sanity.check(loaded.profiles["generic_gpu"], hardware.device_memory(hw, nvml=session), LLAMA_8B)
    assert check.fits and check.sessions_enforced == 16
    assert check.warning is None


def test_sanity_on_unified_memory_uses_mem_available(cfg_dir: Path) -> None:
    loaded = config.load(cfg_dir)
    root, _ = machine("thor")
    reading = hardware.device_memory(probed("thor"), root=root)
    check = sanity.check(loaded.profiles["jetson_thor"], reading, LLAMA_8B)
    assert check.available_bytes == 121845120 * 1024
    assert check.fits  # 20 sessions x 32k tokens of q8_0 KV (2.1 GiB each) + 16 GB weights in ~116 GiB
