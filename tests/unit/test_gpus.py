"""Several GPUs in one box (forged/gpus.py): which GPUs a profile uses, the split libllama and
TensorRT-LLM get, the KV budget and the memory check over the GPUs in use, match rules on the GPU
count, and what /v1/status shows.

No GPU exists here: the machines are the fixture machines read through the STRICT NVML STAND-IN
(tests/fixtures/fake_nvml.py: it refuses what the real nvidia-ml-py refuses), the four-GPU one
being `h200_x4` (the real H200's answers four times). TensorRT-LLM is its strict stand-in as well
(tests/fixtures/fake_tensorrt_llm).
"""

from __future__ import annotations

import dataclasses
import importlib
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forged import config, gpus, hardware, profiles, sanity
from forged.engine.kv import KvShape
from forged.engine.trtllm import translate
from forged.hardware import HardwareInfo
from forged.hardware.nvml import NvmlSession
from forged.schema import ConfigError

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
PACKAGED = REPO / "etc" / "forged"
sys.path.insert(0, str(FIXTURES))
from machine import machine  # noqa: E402

GIB = 2**30
H200_TOTAL = 150_754_820_096
H200_FREE = 150_109_880_320  # NVML v2: total - reserved (615 MiB) - used (0)
# Llama-3.1-70B's shape (80 layers, 8 KV heads, head_dim 128: 320 KiB a token at fp16) with 131 GiB
# of weights: one H200 holds the weights and barely any KV, two hold both.
LLAMA_70B = KvShape("llama-3.1-70b", 80, 8, 128, 128, trained_context=131072, weights_bytes=131 * GIB)


@pytest.fixture(autouse=True)
def _no_system_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGED_PROFILES_DIR", "")


@pytest.fixture
def loaded() -> config.LoadedConfig:
    return config.load(PACKAGED)


def four_gpus(env: dict[str, str] | None = None) -> tuple[HardwareInfo, NvmlSession]:
    root, nvml = machine("h200_x4")
    session = NvmlSession(nvml)
    return hardware.probe(root, nvml=session, env=env or {}), session


def with_llama_cpp(profile: config.Profile, **changes: Any) -> config.Profile:
    return dataclasses.replace(profile, llama_cpp=dataclasses.replace(profile.llama_cpp, **changes))


def write_profiles(tmp_path: Path, extra: str) -> Path:
    shutil.copy(PACKAGED / "forged.yaml", tmp_path / "forged.yaml")
    text = (PACKAGED / "sku_profiles.yaml").read_text()
    (tmp_path / "sku_profiles.yaml").write_text(text.replace("profiles:\n", "profiles:\n" + extra, 1))
    return tmp_path


# ---------------------------------------------------------------- probe and match rules

def test_the_probe_counts_the_gpus_cuda_shows() -> None:
    hw, _ = four_gpus()
    assert (hw.gpu_count, hw.cuda_gpus, hw.device_index) == (4, (0, 1, 2, 3), 0)
    # CUDA_VISIBLE_DEVICES narrows and reorders them; a UUID prefix names one; an unknown entry ends the list.
    hw, _ = four_gpus({"CUDA_VISIBLE_DEVICES": "2,GPU-64a24bf1-0efc-56ee-1134-9854575b7e80,7,1"})
    assert (hw.gpu_count, hw.cuda_gpus, hw.device_index) == (2, (2, 0), 2)
    assert "NVML index 2, 0, in that order" in " ".join(hw.notes)
    hw, _ = four_gpus({"CUDA_VISIBLE_DEVICES": ""})
    assert (hw.kind, hw.gpu_count) == ("cpu", 0)


def test_the_four_gpu_box_selects_multi_gpu_and_one_gpu_does_not(loaded: config.LoadedConfig) -> None:
    hw, _ = four_gpus()
    selection = profiles.select(loaded, hw)
    assert selection.name == "multi_gpu"
    assert "GPUs 4 (needs >= 2): ok" in selection.reason
    one, _ = four_gpus({"CUDA_VISIBLE_DEVICES": "3"})
    assert profiles.select(loaded, one).name == "generic_gpu"
    [candidate] = [c for c in profiles.explain(loaded, one) if c.name == "multi_gpu"]
    assert candidate.verdict == "no rule matches" and "GPUs 1 (needs >= 2): FAILS" in candidate.rules[0].checks


def test_gpu_count_rules_are_half_open_and_checked(tmp_path: Path) -> None:
    rule = "{kind: gpu, gpus_at_least: 2, gpus_below: 4}"
    cfg = write_profiles(tmp_path, f"  two_or_three:\n    match:\n      - {rule}\n")
    loaded = config.load(cfg)
    assert profiles.select(loaded, four_gpus({"CUDA_VISIBLE_DEVICES": "0,1,2"})[0]).name == "two_or_three"
    assert profiles.select(loaded, four_gpus()[0]).name == "multi_gpu"  # 4 is not below 4
    write_profiles(tmp_path, "  bad:\n    match:\n      - {kind: gpu, gpus_at_least: 4, gpus_below: 2}\n")
    with pytest.raises(ConfigError, match=r"sku_profiles\.yaml:\d+: profiles\.bad\.match\[0\]\.gpus_below: "
                                          r"expected more than gpus_at_least \(4\), got 2"):
        config.load(cfg)


@pytest.mark.parametrize(("section", "message"), [
    ("llama_cpp: {tensor_split: [0, 0]}", r"llama_cpp\.tensor_split: expected 1 to 16 shares with at least one "
                                          r"above 0"),
    ("llama_cpp: {tensor_split: [1, -1]}", r"llama_cpp\.tensor_split\[1\]: expected a finite number >= 0, got -1"),
    ("llama_cpp: {split_mode: rows}", r"llama_cpp\.split_mode: expected one of none, layer, row, got str 'rows'"),
    ("llama_cpp: {split_mode: row, main_gpu: 1, tensor_split: [1, 0]}",
     r"llama_cpp\.tensor_split: expected a share above 0 for main_gpu 1, which holds the KV cache"),
    ("tensorrt_llm: {tensor_parallel_size: 2}",
     r"tensorrt_llm\.tensor_parallel_size: expected 1 with engine llama_cpp, got 2; the embedded engine spreads"),
])
def test_bad_multi_gpu_keys_name_file_line_and_key(tmp_path: Path, section: str, message: str) -> None:
    cfg = write_profiles(tmp_path, f"  bad:\n    {section}\n")
    with pytest.raises(ConfigError, match=r"sku_profiles\.yaml:\d+: profiles\.bad\." + message):
        config.load(cfg)


# ---------------------------------------------------------------- placement

def test_layer_split_from_free_memory_spreads_the_model_and_the_kv_over_every_gpu(
        loaded: config.LoadedConfig) -> None:
    hw, session = four_gpus()
    placement = gpus.place("multi_gpu", loaded.profiles["multi_gpu"], "llama_cpp", hw)
    assert (placement.split_mode, placement.main_gpu, placement.shares_from) == ("layer", 0, "free memory at start")
    assert placement.shares == (0.25,) * 4
    assert placement.model_params() == {"split_mode": "layer", "main_gpu": 0, "tensor_split": (0.25,) * 4}
    assert [g.index for g in placement.kv_gpus] == [0, 1, 2, 3]
    kv = placement.kv_memory(hw, nvml=session)
    assert (kv.total_bytes, kv.available_bytes) == (4 * H200_TOTAL, 4 * H200_FREE)
    assert placement.kv_shape(LLAMA_70B).weights_bytes == LLAMA_70B.weights_bytes  # every layer's weights with its KV


def test_an_explicit_split_in_cuda_order(loaded: config.LoadedConfig) -> None:
    """tensor_split counts the GPUs CUDA shows: with CUDA_VISIBLE_DEVICES=3,1 the first share is NVML GPU 3's."""
    hw, session = four_gpus({"CUDA_VISIBLE_DEVICES": "3,1"})
    profile = with_llama_cpp(loaded.profiles["multi_gpu"], tensor_split=(3.0, 1.0))
    placement = gpus.place("multi_gpu", profile, "llama_cpp", hw)
    assert [(g.index, s) for g, s in zip(placement.gpus, placement.shares, strict=True)] == [(3, 0.75), (1, 0.25)]
    assert placement.shares_from == "profile"
    # A shorter list leaves the other GPUs out; a zero share too.
    hw4, _ = four_gpus()
    placement = gpus.place("p", with_llama_cpp(profile, tensor_split=(1.0, 0.0, 1.0)), "llama_cpp", hw4)
    assert placement.shares == (0.5, 0.0, 0.5, 0.0) and [g.index for g in placement.kv_gpus] == [0, 2]
    assert placement.memory(hw4, nvml=session).total_bytes == 2 * H200_TOTAL


def test_row_keeps_the_kv_cache_on_main_gpu_and_none_puts_everything_there(loaded: config.LoadedConfig) -> None:
    hw, session = four_gpus()
    row = with_llama_cpp(loaded.profiles["multi_gpu"], split_mode="row", main_gpu=1, tensor_split=(1.0, 1.0))
    placement = gpus.place("multi_gpu", row, "llama_cpp", hw)
    assert [g.index for g in placement.kv_gpus] == [1]
    assert placement.kv_memory(hw, nvml=session).total_bytes == H200_TOTAL
    # Half of the weights are on the KV cache's GPU: only they come off its memory.
    assert placement.kv_shape(LLAMA_70B).weights_bytes == LLAMA_70B.weights_bytes // 2
    none = with_llama_cpp(loaded.profiles["multi_gpu"], split_mode="none", main_gpu=2)
    placement = gpus.place("multi_gpu", none, "llama_cpp", hw)
    assert placement.shares == (0.0, 0.0, 1.0, 0.0) and [g.index for g in placement.kv_gpus] == [2]
    assert placement.model_params()["main_gpu"] == 2


def test_no_gpu_in_use_means_system_memory(loaded: config.LoadedConfig) -> None:
    hw, session = four_gpus()
    placement = gpus.place("multi_gpu", with_llama_cpp(loaded.profiles["multi_gpu"], n_gpu_layers=0),
                           "llama_cpp", hw)
    assert (placement.gpus, placement.model_params()) == ((), {})
    root, _ = machine("h200_x4")
    assert placement.kv_memory(hw, root=root, nvml=session) == hardware.system_memory(root)
    root, nvml = machine("cpu")
    cpu_hw = hardware.probe(root, nvml=NvmlSession(nvml), env={})
    assert gpus.place("cpu", loaded.profiles["cpu"], "llama_cpp", cpu_hw).model_params() == {}


def test_asking_for_gpus_the_machine_lacks_is_a_config_error(loaded: config.LoadedConfig) -> None:
    hw, _ = four_gpus({"CUDA_VISIBLE_DEVICES": "0,1"})
    base = loaded.profiles["multi_gpu"]
    where = loaded.profiles_source
    with pytest.raises(ConfigError, match=r"sku_profiles\.yaml:\d+: profiles\.multi_gpu\.llama_cpp\.main_gpu: "
                                          r"expected a GPU index below 2 .*got 2"):
        gpus.place("multi_gpu", with_llama_cpp(base, main_gpu=2), "llama_cpp", hw, where)
    with pytest.raises(ConfigError, match=r"llama_cpp\.tensor_split: expected at most 2 shares"):
        gpus.place("multi_gpu", with_llama_cpp(base, tensor_split=(1.0, 1.0, 1.0)), "llama_cpp", hw, where)
    tp = dataclasses.replace(base, tensorrt_llm=dataclasses.replace(base.tensorrt_llm, tensor_parallel_size=4))
    with pytest.raises(ConfigError, match=r"tensorrt_llm\.tensor_parallel_size: expected at most the 2 GPUs"):
        gpus.place("multi_gpu", tp, "tensorrt_llm", hw, where)


# ---------------------------------------------------------------- KV budget and the memory check

def test_the_memory_check_sums_the_gpus_in_use(loaded: config.LoadedConfig) -> None:
    """A 70B model's weights nearly fill one H200; split by layers over two, the sessions' KV fits."""
    profile = dataclasses.replace(loaded.profiles["multi_gpu"],
                                  inference=dataclasses.replace(loaded.profiles["multi_gpu"].inference,
                                                                max_concurrent_sessions=8, max_seq_len=20000))
    one, session1 = four_gpus({"CUDA_VISIBLE_DEVICES": "0"})
    two, session2 = four_gpus({"CUDA_VISIBLE_DEVICES": "0,1"})
    results = {}
    for name, (hw, session) in {"one": (one, session1), "two": (two, session2)}.items():
        placement = gpus.place("multi_gpu", profile, "llama_cpp", hw)
        results[name] = sanity.check(profile, placement.kv_memory(hw, nvml=session), placement.kv_shape(LLAMA_70B))
    assert results["two"].available_bytes == 2 * results["one"].available_bytes == 2 * H200_FREE
    assert not results["one"].fits and results["one"].sessions_enforced < 8
    assert results["two"].fits and results["two"].sessions_fit > 8


def test_the_embedded_engines_kv_budget_sums_them_too(loaded: config.LoadedConfig) -> None:
    from forged.engine.llama_cpp.sizing import size_kv_cache

    profile = loaded.profiles["multi_gpu"]
    hw, session = four_gpus({"CUDA_VISIBLE_DEVICES": "0,1"})
    placement = gpus.place("multi_gpu", profile, "llama_cpp", hw)
    available = placement.kv_memory(hw, nvml=session).available_bytes
    two = size_kv_cache(placement.kv_shape(LLAMA_70B), profile.tensorrt_llm, sessions=32, context=20000,
                        n_ubatch=512, available_bytes=available, unified=True)
    one = size_kv_cache(LLAMA_70B, profile.tensorrt_llm, sessions=32, context=20000, n_ubatch=512,
                        available_bytes=available // 2, unified=True)
    # One GPU: what the weights leave holds under three contexts. Two: every session gets a full one.
    assert one.limited_by == "free_gpu_memory_fraction of free memory" and one.n_ctx < 3 * 20000
    assert two.limited_by == "every session at a full context" and two.n_ctx >= 32 * 20000


# ---------------------------------------------------------------- what libllama gets

def test_libllama_gets_the_split_in_its_model_params(monkeypatch: pytest.MonkeyPatch, model_path: Path) -> None:
    """The split reaches llama_model_params as libllama reads it (a CPU build has no GPU to act on it,
    so the real load just goes on)."""
    import llama_cpp as ll

    from forged.engine.llama_cpp import model as model_mod

    seen: dict[str, Any] = {}
    real = ll.llama_model_load_from_file

    def spy(path: bytes, params: Any) -> Any:
        split = params.tensor_split
        seen.update(split_mode=params.split_mode, main_gpu=params.main_gpu,
                    tensor_split=[round(split[i], 4) for i in range(ll.llama_max_devices())] if split else None)
        return real(path, params)

    monkeypatch.setattr(model_mod.ll, "llama_model_load_from_file", spy)
    llama = model_mod.LlamaModel(model_path, 0, split_mode="row", main_gpu=1, tensor_split=(0.75, 0.25))
    llama.free()
    assert seen == {"split_mode": ll.LLAMA_SPLIT_MODE_ROW, "main_gpu": 1,
                    "tensor_split": [0.75, 0.25] + [0.0] * (ll.llama_max_devices() - 2)}
    seen.clear()
    model_mod.LlamaModel(model_path, 0).free()  # no split asked: libllama's defaults, untouched
    assert seen == {"split_mode": ll.LLAMA_SPLIT_MODE_LAYER, "main_gpu": 0, "tensor_split": None}


# ---------------------------------------------------------------- TensorRT-LLM

@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.syspath_prepend(str(FIXTURES / "fake_tensorrt_llm"))
    trt = importlib.import_module("tensorrt_llm")
    assert "fake_tensorrt_llm" in trt.__file__
    yield trt
    trt._fake.select_version("1.2")


@pytest.mark.parametrize("version", ("1.0", "1.1", "1.2"))
def test_tensor_parallel_size_on_every_version(fake: Any, loaded: config.LoadedConfig, version: str) -> None:
    fake._fake.select_version(version)
    base = dataclasses.replace(loaded.profiles["cpu"], engine="tensorrt_llm")
    profile = dataclasses.replace(base, tensorrt_llm=dataclasses.replace(base.tensorrt_llm, tensor_parallel_size=2))
    checkpoint = str(FIXTURES / "fake_tensorrt_llm" / "tiny-checkpoint")
    tr = translate("p", profile, checkpoint, fake, max_seq_len=4096)
    assert tr.plain["tensor_parallel_size"] == 2
    assert tr.mapping["tensorrt_llm.tensor_parallel_size"] == "tensor_parallel_size"
    llm = fake.LLM(**tr.kwargs)  # the strict stand-in takes it on this version, and records it
    try:
        assert fake._fake.EVENTS[-1]["kwargs"]["tensor_parallel_size"] == 2
    finally:
        llm.shutdown()
    # One GPU: LLM's own default, not passed, so the single-GPU call is unchanged.
    assert "tensor_parallel_size" not in translate("p", base, checkpoint, fake, max_seq_len=4096).plain


def test_tensor_parallel_size_must_divide_the_attention_heads(fake: Any, loaded: config.LoadedConfig,
                                                              tmp_path: Path) -> None:
    from forged.engine.trtllm import EngineConfigError, TrtLlmEngine

    hw, _ = four_gpus()
    base = loaded.profiles["rtx_4000_pro"]
    profile = dataclasses.replace(base, tensorrt_llm=dataclasses.replace(base.tensorrt_llm, tensor_parallel_size=3))
    engine = TrtLlmEngine("rtx_4000_pro", profile, FIXTURES / "fake_tensorrt_llm" / "tiny-checkpoint", "tiny", hw)
    with pytest.raises(EngineConfigError, match=r"tensor_parallel_size: expected a divisor of the model's 4 "
                                                r"attention heads .* got 3"):
        engine.load()
    placement = gpus.place("rtx_4000_pro", profile, "tensorrt_llm", hw)
    assert [g.index for g in placement.gpus] == [0, 1, 2] and placement.kv_gpus == placement.gpus


# ---------------------------------------------------------------- /v1/status

def test_status_shows_the_split_and_each_gpus_memory(loaded: config.LoadedConfig) -> None:
    hw, session = four_gpus({"CUDA_VISIBLE_DEVICES": "1,0"})
    profile = with_llama_cpp(loaded.profiles["multi_gpu"], tensor_split=(2.0, 1.0))
    doc = gpus.place("multi_gpu", profile, "llama_cpp", hw).status(hw, nvml=session)
    assert (doc["split_mode"], doc["main_gpu"], doc["shares_from"]) == ("layer", 0, "profile")
    assert [(g["cuda_index"], g["nvml_index"], g["share"], g["kv_cache"]) for g in doc["gpus"]] == \
        [(0, 1, 0.6667, True), (1, 0, 0.3333, True)]
    assert all(g["memory_total_bytes"] == H200_TOTAL and g["memory_available_bytes"] == H200_FREE
               and g["name"] == "NVIDIA H200" for g in doc["gpus"])
