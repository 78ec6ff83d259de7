"""The profile -> TensorRT-LLM LLM(...) translation, version by version, and every refusal path.

TensorRT-LLM cannot be installed on these machines. These tests run against a STAND-IN for the
`tensorrt_llm` package (tests/fixtures/fake_tensorrt_llm, see its docstring): its KvCacheConfig,
SchedulerConfig, TorchLlmArgs (LLM's keyword arguments) and SamplingParams accept exactly the fields
that ../shared/reference/trtllm-llm-api.md gives for 1.0.0, 1.1.0 and 1.2.0, and refuse any other as
pydantic's extra="forbid" does. What passes here is what the reference says the real package takes;
it is not a run of TensorRT-LLM itself.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from forged import config, hardware
from forged.engine import create_engine, trtllm
from forged.engine.trtllm import EngineConfigError, check_hardware, resolve_checkpoint, translate
from forged.hardware import HardwareInfo
from forged.hardware.nvml import NvmlSession
from forged.schema import ConfigError

REPO = Path(__file__).resolve().parents[4]
FIXTURES = REPO / "tests" / "fixtures"
FAKE = FIXTURES / "fake_tensorrt_llm"
CHECKPOINT = FAKE / "tiny-checkpoint"
PACKAGED = REPO / "etc" / "forged"
VERSIONS = ("1.0", "1.1", "1.2")

sys.path.insert(0, str(FIXTURES))  # fake_nvml, machine
from machine import machine  # noqa: E402


@pytest.fixture(autouse=True)
def _no_system_profiles(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FORGED_PROFILES_DIR", "")


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """The stand-in `tensorrt_llm`, importable for this test; version 1.2 unless the test selects one."""
    monkeypatch.syspath_prepend(str(FAKE))
    trt = importlib.import_module("tensorrt_llm")
    assert "fake_tensorrt_llm" in trt.__file__, "a real tensorrt_llm shadows the stand-in"
    trt._fake.select_version("1.2")
    trt._fake.EVENTS.clear()
    yield trt
    trt._fake.select_version("1.2")


@pytest.fixture(scope="module")
def loaded() -> config.LoadedConfig:
    import os
    os.environ["FORGED_PROFILES_DIR"] = ""
    try:
        return config.load(PACKAGED)
    finally:
        del os.environ["FORGED_PROFILES_DIR"]


def probed(name: str) -> HardwareInfo:
    root, nvml = machine(name)
    return hardware.probe(root, nvml=NvmlSession(nvml), env={})


def gpu(cc: str, name: str = "NVIDIA RTX A4000") -> HardwareInfo:
    return HardwareInfo(kind="gpu", name=name, cores=8, memory_total_bytes=16 << 30, unified_memory=False,
                        compute_capability=cc, device_index=0)


def expected(profile: str, version: str, model: str) -> dict[str, Any]:
    """The LLM(...) kwargs each seed profile must become, written out by hand from the reference."""
    seed = {"rtx_4000_pro": dict(tpb=32, mnt=4096, sessions=8, policy="GUARANTEED_NO_EVICT"),
            "jetson_thor": dict(tpb=64, mnt=8192, sessions=20, policy="MAX_UTILIZATION")}[profile]
    kv: dict[str, Any] = {"dtype": "fp8", "free_gpu_memory_fraction": 0.9}
    if version != "1.0":
        kv["tokens_per_block"] = seed["tpb"]
    kv["enable_block_reuse"] = True
    return {"model": model, "enable_chunked_prefill": True, "max_num_tokens": seed["mnt"],
            "max_batch_size": seed["sessions"], "max_seq_len": 32768, "enable_iter_perf_stats": True,
            "guided_decoding_backend": "xgrammar",  # response_format and forced tool calls
            "kv_cache_config": kv,
            "scheduler_config": {"capacity_scheduler_policy": seed["policy"],
                                 "context_chunking_policy": "FIRST_COME_FIRST_SERVED"}}


# ---------------------------------------------------------------- translation

@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("profile_name", ["rtx_4000_pro", "jetson_thor"])
def test_seed_profiles_translate_on_every_version(fake: Any, loaded: config.LoadedConfig, version: str,
                                                  profile_name: str) -> None:
    fake._fake.select_version(version)
    profile = loaded.profiles[profile_name]
    model = str(CHECKPOINT)
    if profile_name == "jetson_thor" and version == "1.0":
        # 1.0.0's KvCacheConfig has no tokens_per_block, and Thor's 64 is not 1.0's own 32: refused,
        # naming the file:line, the key and the version; never silently dropped.
        with pytest.raises(EngineConfigError) as err:
            translate(profile_name, profile, model, fake, max_seq_len=32768, where=loaded.profiles_source.where)
        line = str(err.value)
        assert "\n" not in line
        assert "sku_profiles.yaml:" in line and "profiles.jetson_thor.tensorrt_llm.tokens_per_block" in line
        assert "1.0.0" in line and "tokens_per_block" in line
        return
    tr = translate(profile_name, profile, model, fake, max_seq_len=32768, where=loaded.profiles_source.where)
    assert tr.version == {"1.0": "1.0.0", "1.1": "1.1.0", "1.2": "1.2.0"}[version]
    assert tr.plain == expected(profile_name, version, model)
    if version == "1.0":
        assert any("tokens_per_block" in note and "1.0.0" in note for note in tr.notes)
    # The strict stand-in takes exactly these arguments and records what it was given.
    llm = fake.LLM(**tr.kwargs)
    try:
        recorded = fake._fake.EVENTS[-1]
        assert recorded["event"] == "llm" and recorded["version"] == tr.version
        assert recorded["kwargs"] == tr.plain
    finally:
        llm.shutdown()


def test_fp16_asks_for_the_model_dtype_and_caps_max_seq_len(fake: Any, loaded: config.LoadedConfig) -> None:
    profile = dataclasses.replace(loaded.profiles["cpu"], engine="tensorrt_llm")
    tr = translate("cpu", profile, str(CHECKPOINT), fake, max_seq_len=4096)
    assert tr.plain["dtype"] == "float16" and tr.plain["kv_cache_config"]["dtype"] == "auto"
    assert tr.plain["max_seq_len"] == 4096 and any("max_position_embeddings" in n for n in tr.notes)
    assert tr.mapping["tensorrt_llm.kv_cache_dtype"] == "kv_cache_config.dtype, dtype"
    levers = dataclasses.replace(profile.tensorrt_llm, kv_cache_max_tokens=8192, enable_chunked_context=False,
                                 scheduler_policy="max_utilization")
    tr = translate("cpu", dataclasses.replace(profile, tensorrt_llm=levers), str(CHECKPOINT), fake,
                   max_seq_len=4096)
    assert tr.plain["kv_cache_config"]["max_tokens"] == 8192
    assert tr.plain["enable_chunked_prefill"] is False
    assert tr.plain["scheduler_config"] == {"capacity_scheduler_policy": "MAX_UTILIZATION"}
    fake.LLM(**tr.kwargs).shutdown()


def test_the_stand_in_refuses_what_the_version_lacks(fake: Any) -> None:
    from pydantic import ValidationError

    fake._fake.select_version("1.0")
    from tensorrt_llm.llmapi import KvCacheConfig, SchedulerConfig

    with pytest.raises(ValidationError, match="extra_forbidden"):
        KvCacheConfig(tokens_per_block=32)
    with pytest.raises(ValidationError, match="GUARANTEED_NO_EVICT"):
        SchedulerConfig(capacity_scheduler_policy="guaranteed_no_evict")
    with pytest.raises(ValidationError, match="extra_forbidden"):
        fake.LLM(str(CHECKPOINT), enable_chunked_context=True)  # the profile's name, not the LLM API's
    with pytest.raises(TypeError):
        fake.SamplingParams(max_new_tokens=4)
    fake._fake.select_version("1.2")
    assert KvCacheConfig.model_fields["free_gpu_memory_fraction"].default is None  # 1.0's class, kept
    from tensorrt_llm.llmapi import KvCacheConfig as KvCacheConfig12

    assert KvCacheConfig12(tokens_per_block=64).tokens_per_block == 64
    assert KvCacheConfig12.model_fields["free_gpu_memory_fraction"].default == 0.9


def test_any_key_the_version_lacks_is_refused(fake: Any, loaded: config.LoadedConfig,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import create_model

    real = fake._fake.current().TorchLlmArgs
    fields = {name: (Any, None) for name in real.model_fields if name != "enable_chunked_prefill"}
    older = create_model("TorchLlmArgs", __base__=fake._fields.StrictBaseModel, **fields)
    monkeypatch.setattr(fake._fake, "version_attr",
                        lambda name: older if name == "TorchLlmArgs" else getattr(fake._fake.current(), name))
    with pytest.raises(EngineConfigError) as err:
        translate("rtx_4000_pro", loaded.profiles["rtx_4000_pro"], str(CHECKPOINT), fake, max_seq_len=4096,
                  where=loaded.profiles_source.where)
    line = str(err.value)
    assert "profiles.rtx_4000_pro.tensorrt_llm.enable_chunked_context" in line
    assert "'enable_chunked_prefill'" in line and "1.2.0" in line and "sku_profiles.yaml:" in line


def test_an_unsupported_version_is_refused(fake: Any, loaded: config.LoadedConfig,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fake, "__version__", "1.3.0")
    with pytest.raises(EngineConfigError, match=r"TensorRT-LLM 1\.3\.0 is installed; forged supports 1\.0 to 1\.2"):
        translate("rtx_4000_pro", loaded.profiles["rtx_4000_pro"], str(CHECKPOINT), fake, max_seq_len=4096)


# ---------------------------------------------------------------- hardware

def test_fp8_below_compute_capability_8_9_is_refused_with_the_reason(loaded: config.LoadedConfig) -> None:
    profile = loaded.profiles["rtx_4000_pro"]
    with pytest.raises(EngineConfigError) as err:
        check_hardware("rtx_4000_pro", profile, gpu("8.6"), loaded.profiles_source.where)
    line = str(err.value)
    assert "profiles.rtx_4000_pro.tensorrt_llm.kv_cache_dtype" in line and "sku_profiles.yaml:" in line
    assert "8.9" in line and "NVIDIA RTX A4000 has 8.6" in line and "\n" not in line
    fp16 = dataclasses.replace(profile, tensorrt_llm=dataclasses.replace(profile.tensorrt_llm, kv_cache_dtype="fp16"))
    assert check_hardware("rtx_4000_pro", fp16, gpu("8.6")) == []
    assert check_hardware("rtx_4000_pro", profile, probed("rtx4000ada")) == []  # 8.9: fp8 is fine
    assert check_hardware("rtx_4000_pro", profile, gpu("12.0", "NVIDIA RTX PRO 4000 Blackwell")) == []
    with pytest.raises(EngineConfigError, match=r"this machine has none"):
        check_hardware("rtx_4000_pro", profile, probed("cpu"))


def test_jetson_thor_is_refused_for_tensorrt_llm(loaded: config.LoadedConfig) -> None:
    thor = dataclasses.replace(loaded.profiles["jetson_thor"], engine="tensorrt_llm")
    with pytest.raises(EngineConfigError, match=r"profiles\.jetson_thor\.engine: TensorRT-LLM 1\.0-1\.2 does not "
                                                r"support Jetson"):
        check_hardware("jetson_thor", thor, probed("thor"))
    assert loaded.profiles["jetson_thor"].engine == "llama_cpp"
    text = (PACKAGED / "sku_profiles.yaml").read_text()
    assert "TensorRT-LLM 1.0-1.2 does not support Thor" in text  # the seed says why


def test_paged_kv_and_max_num_tokens_multiple(loaded: config.LoadedConfig) -> None:
    profile = loaded.profiles["rtx_4000_pro"]
    unpaged = dataclasses.replace(profile, tensorrt_llm=dataclasses.replace(profile.tensorrt_llm,
                                                                            use_paged_kv_cache=False))
    with pytest.raises(EngineConfigError, match="use_paged_kv_cache: TensorRT-LLM's PyTorch backend always pages"):
        check_hardware("rtx_4000_pro", unpaged, probed("rtx4000ada"))
    odd = dataclasses.replace(profile, tensorrt_llm=dataclasses.replace(profile.tensorrt_llm, max_num_tokens=4100))
    with pytest.raises(EngineConfigError, match=r"max_num_tokens: expected a multiple of tokens_per_block \(32\)"):
        check_hardware("rtx_4000_pro", odd, probed("rtx4000ada"))


# ---------------------------------------------------------------- engine selection

def test_not_installed_fails_in_one_line_naming_the_package(loaded: config.LoadedConfig, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trtllm, "missing_package", lambda: True)
    with pytest.raises(ConfigError) as err:
        create_engine(loaded, "rtx_4000_pro", loaded.profiles["rtx_4000_pro"], probed("rtx4000ada"), tmp_path)
    line = str(err.value)
    assert "\n" not in line and "sku_profiles.yaml:" in line and "profiles.rtx_4000_pro.engine" in line
    assert "package tensorrt_llm, which is not installed" in line
    assert "pip install --extra-index-url https://pypi.nvidia.com" in line and "engine_fallback: true" in line


def test_fallback_runs_llama_cpp(loaded: config.LoadedConfig, model_path: Path,
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(trtllm, "missing_package", lambda: True)
    profile = dataclasses.replace(loaded.profiles["rtx_4000_pro"], engine_fallback=True)
    state = model_path.parent.parent  # where the test model was assembled: nothing is assembled again
    with_gguf = dataclasses.replace(loaded, settings=dataclasses.replace(
        loaded.settings, model=config.ModelSettings(path=str(model_path))))
    choice = create_engine(with_gguf, "rtx_4000_pro", profile, probed("rtx4000ada"), state)
    assert choice.engine.name == "llama_cpp" and choice.engine.model.path == str(model_path)
    assert choice.note is not None and "engine_fallback: true" in choice.note
    # model.path names a checkpoint directory (for TensorRT-LLM): llama_cpp serves the default model.
    with_dir = dataclasses.replace(loaded, settings=dataclasses.replace(
        loaded.settings, model=config.ModelSettings(path=str(CHECKPOINT), name="tiny")))
    choice = create_engine(with_dir, "rtx_4000_pro", profile, probed("rtx4000ada"), state)
    assert choice.engine.name == "llama_cpp" and choice.engine.model_name != "tiny"
    assert choice.engine.model.path.endswith(".gguf")


def test_tensorrt_llm_gets_the_checkpoint_and_the_hardware_checks(fake: Any, loaded: config.LoadedConfig,
                                                                  tmp_path: Path) -> None:
    settings = dataclasses.replace(loaded.settings, model=config.ModelSettings(path=str(CHECKPOINT)))
    choice = create_engine(dataclasses.replace(loaded, settings=settings), "rtx_4000_pro",
                           loaded.profiles["rtx_4000_pro"], probed("rtx4000ada"), tmp_path)
    assert choice.engine.name == "tensorrt_llm" and choice.note is None
    assert choice.engine.model_name == "tiny-checkpoint"
    with pytest.raises(EngineConfigError, match=r"has 8\.6"):
        create_engine(dataclasses.replace(loaded, settings=settings), "rtx_4000_pro",
                      loaded.profiles["rtx_4000_pro"], gpu("8.6"), tmp_path)


def test_the_checkpoint_must_be_a_hugging_face_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"model\.path: engine tensorrt_llm needs a Hugging Face checkpoint"):
        resolve_checkpoint(config.ModelSettings())
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    with pytest.raises(ConfigError, match=f"{re.escape(str(gguf))} is not one"):
        resolve_checkpoint(config.ModelSettings(path=str(gguf)), lambda key: "forged.yaml:3")
    assert resolve_checkpoint(config.ModelSettings(path=str(CHECKPOINT), name="tiny")) == (CHECKPOINT, "tiny")
