"""Config validation: every failure is one line with file:line, the key path and what was expected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from forged import config
from forged.schema import ConfigError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def cfg_dir(tmp_path: Path) -> Path:
    for name in ("forged.yaml", "sku_profiles.yaml"):
        shutil.copy(REPO / "etc" / "forged" / name, tmp_path / name)
    return tmp_path


def _edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1))


def _error(cfg_dir: Path) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(cfg_dir)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_packaged_config_loads_with_the_seed_values(cfg_dir: Path) -> None:
    loaded = config.load(cfg_dir)
    thor, rtx = loaded.profiles["jetson_thor"], loaded.profiles["rtx_4000_pro"]
    assert (thor.tensorrt_llm.kv_cache_dtype, rtx.tensorrt_llm.kv_cache_dtype) == ("fp8", "fp8")
    assert (thor.tensorrt_llm.use_paged_kv_cache, thor.tensorrt_llm.tokens_per_block) == (True, 64)
    assert (rtx.tensorrt_llm.use_paged_kv_cache, rtx.tensorrt_llm.tokens_per_block) == (True, 32)
    assert (thor.tensorrt_llm.enable_chunked_context, thor.tensorrt_llm.max_num_tokens) == (True, 8192)
    assert (rtx.tensorrt_llm.enable_chunked_context, rtx.tensorrt_llm.max_num_tokens) == (True, 4096)
    assert thor.tensorrt_llm.scheduler_policy == "max_utilization"
    assert rtx.tensorrt_llm.scheduler_policy == "guaranteed_no_evict"
    assert (thor.inference.max_concurrent_sessions, rtx.inference.max_concurrent_sessions) == (20, 8)
    assert (thor.thresholds.max_queue_depth, rtx.thresholds.max_queue_depth) == (10, 5)
    assert (thor.targets.ttft_ms, thor.targets.ttft_p99_ms, thor.targets.tps) == (500, 2000, 60)
    assert (rtx.targets.ttft_ms, rtx.targets.ttft_p99_ms, rtx.targets.tps) == (750, 3000, 50)
    assert "cpu" in loaded.profiles
    assert loaded.settings.listen.http.host == "127.0.0.1"


def test_out_of_range_names_file_line_key_and_range(cfg_dir: Path) -> None:
    _edit(cfg_dir / "forged.yaml", "port: 8000", "port: 70000")
    message = _error(cfg_dir)
    lineno = next(i for i, line in enumerate((cfg_dir / "forged.yaml").read_text().splitlines(), 1)
                  if "port: 70000" in line)
    assert message.startswith(f"{cfg_dir / 'forged.yaml'}:{lineno}: listen.http.port:")
    assert "expected an integer in 0..65535, got 70000" in message


def test_wrong_type(cfg_dir: Path) -> None:
    _edit(cfg_dir / "sku_profiles.yaml", "max_concurrent_sessions: 8", "max_concurrent_sessions: eight")
    message = _error(cfg_dir)
    assert "sku_profiles.yaml:" in message
    assert "profiles.rtx_4000_pro.inference.max_concurrent_sessions: expected an integer" in message
    assert "'eight'" in message


def test_bool_is_not_an_int(cfg_dir: Path) -> None:
    _edit(cfg_dir / "forged.yaml", "port: 8000", "port: yes")
    assert "listen.http.port: expected an integer" in _error(cfg_dir)


def test_unknown_key_lists_the_valid_ones(cfg_dir: Path) -> None:
    _edit(cfg_dir / "forged.yaml", "logging:\n  level: info", "logging:\n  level: info\n  colour: true")
    message = _error(cfg_dir)
    assert "logging.colour: unknown key; expected one of: level" in message


def test_bad_enum_value(cfg_dir: Path) -> None:
    _edit(cfg_dir / "sku_profiles.yaml", "kv_cache_dtype: fp16", "kv_cache_dtype: fp4")
    message = _error(cfg_dir)
    assert "profiles.cpu.tensorrt_llm.kv_cache_dtype: expected one of fp32, fp16, bf16, fp8, got str 'fp4'" \
        in message


def test_max_num_tokens_must_be_a_multiple_of_tokens_per_block(cfg_dir: Path) -> None:
    _edit(cfg_dir / "sku_profiles.yaml", "max_num_tokens: 4096", "max_num_tokens: 4100")
    assert "profiles.rtx_4000_pro.tensorrt_llm.max_num_tokens: expected a multiple of tokens_per_block (32)" \
        in _error(cfg_dir)


def test_invalid_yaml_and_missing_file(cfg_dir: Path) -> None:
    (cfg_dir / "forged.yaml").write_text("listen: [unclosed\n")
    assert "invalid YAML" in _error(cfg_dir)
    (cfg_dir / "forged.yaml").unlink()
    assert _error(cfg_dir) == f"{cfg_dir / 'forged.yaml'}: file not found"


def test_pinned_profile_must_exist(cfg_dir: Path) -> None:
    _edit(cfg_dir / "forged.yaml", "profile: auto", "profile: jetson_xavier")
    assert "profile: unknown profile 'jetson_xavier'; expected auto or one of: cpu, generic_gpu, generic_gpu_fp16, " \
        "generic_gpu_small, generic_gpu_small_fp16, jetson_orin, jetson_thor, rtx_4000_pro" in _error(cfg_dir)


def test_socket_mode_must_be_octal(cfg_dir: Path) -> None:
    _edit(cfg_dir / "forged.yaml", 'mode: "0660"', 'mode: "rw-rw----"')
    assert "listen.unix.mode: expected an octal permission string" in _error(cfg_dir)
