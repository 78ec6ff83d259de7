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
    assert "profile: unknown profile 'jetson_xavier'; expected auto or one of: cpu, generic_gpu, " \
        "generic_gpu_fp16, generic_gpu_small, generic_gpu_small_fp16, jetson_orin, jetson_thor, multi_gpu, " \
        "rtx_4000_pro" in _error(cfg_dir)


def test_socket_mode_must_be_octal(cfg_dir: Path) -> None:
    _edit(cfg_dir / "forged.yaml", 'mode: "0660"', 'mode: "rw-rw----"')
    assert "listen.unix.mode: expected an octal permission string" in _error(cfg_dir)


def _numeric_fields(cls: type, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], type]]:
    """Every int and float setting under dataclass `cls`, as (key path, type); a tuple of dataclasses
    (profile match rules) is walked as its first item."""
    import dataclasses
    import typing

    out = []
    for f in dataclasses.fields(cls):
        tp = typing.get_type_hints(cls)[f.name]
        args = [a for a in typing.get_args(tp) if a is not type(None) and a is not Ellipsis]
        if typing.get_origin(tp) is tuple and dataclasses.is_dataclass(args[0]):
            out += _numeric_fields(args[0], (*path, f.name, "0"))
            continue
        inner = args[0] if args and typing.get_origin(tp) is not None else tp
        if dataclasses.is_dataclass(inner):
            out += _numeric_fields(inner, (*path, f.name))
        elif inner in (int, float):
            out.append(((*path, f.name), inner))
    return out


def _document(path: tuple[str, ...], value: float) -> str:
    """A YAML document setting the key at `path` (a "0" step is the first item of a list) to `value`."""
    import yaml

    node: object = value
    for step in reversed(path):
        node = [node] if step == "0" else {step: node}
    return yaml.safe_dump(node)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=[".nan", ".inf", "-.inf"])
def test_no_number_setting_accepts_nan_or_infinity(value: float) -> None:
    """YAML's .nan compares false with any bound, so it passed every range check ("ttft_p99_ms: .nan"
    made /v1/status print bare NaN); .inf passed every open range. Every numeric key refuses both, in
    forged.yaml and in the profiles, with the one-line error."""
    from forged.config import ProfileFile, Settings
    from forged.schema import build, parse_yaml

    fields = [(root, path, tp) for root, cls, prefix in ((Settings, Settings, ()),
                                                         (ProfileFile, config.Profile, ("profiles", "p")))
              for path, tp in ((prefix + p, t) for p, t in _numeric_fields(cls))]
    assert len(fields) > 20
    for root, path, tp in fields:
        key = ".".join(step if step != "0" else "[0]" for step in path).replace(".[0]", "[0]")
        with pytest.raises(ConfigError) as info:
            build(root, parse_yaml(_document(path, value), "f.yaml"))
        message = str(info.value)
        assert f": {key}: expected {'an integer' if tp is int else 'a finite number'}" in message, (key, message)
        assert "\n" not in message
