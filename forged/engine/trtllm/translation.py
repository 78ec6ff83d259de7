"""The profile as TensorRT-LLM's `LLM(...)` keyword arguments, for the version installed.

The profile's `tensorrt_llm` and `inference` sections become (PyTorch backend, the default):
`KvCacheConfig(dtype, free_gpu_memory_fraction, tokens_per_block, enable_block_reuse, max_tokens)`,
`SchedulerConfig(capacity_scheduler_policy, context_chunking_policy)`, `enable_chunked_prefill`,
`max_num_tokens`, `max_batch_size`, `max_seq_len` and `enable_iter_perf_stats=True`, with
`guided_decoding_backend="xgrammar"` where the version's LlmArgs has that field (1.0-1.2 do). Every
key is checked against the installed version's pydantic `model_fields` first; one the version lacks
is refused at startup naming the key and the version, never dropped. The one field that changes
between 1.0 and 1.2 is `KvCacheConfig.tokens_per_block` (absent in 1.0.0): there the profile's value
must equal 1.0's own block size, and the value the runtime really uses is read back from
`kvCacheStats.tokensPerBlock` (engine.py).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from forged.config import Profile
from forged.engine.trtllm.checks import PACKAGE, Locate, check_version, one_line, refusal
from forged.schema import to_plain

GUIDED_BACKEND_FIELD, GUIDED_BACKEND = "guided_decoding_backend", "xgrammar"
# 1.0.0's KvCacheConfig has no tokens_per_block; its PyTorch runtime uses its own (32 in the 1.0
# source; its long-sequence doc says 64, which is why the real value is read back from the stats).
BUILTIN_TOKENS_PER_BLOCK = 32
CAPACITY_POLICY = {"guaranteed_no_evict": "GUARANTEED_NO_EVICT", "max_utilization": "MAX_UTILIZATION"}
# KvCacheConfig.dtype takes "auto" (the model's dtype) or "fp8". The other profile dtypes are the
# model's dtype itself, so they are asked for through LLM(dtype=...).
MODEL_DTYPE = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


@dataclass
class Translation:
    """The LLM(...) call forged makes: live objects, and the same serialised."""

    version: str
    kwargs: dict[str, Any]  # exactly what LLM(**kwargs) gets (nested configs as instances)
    plain: dict[str, Any]  # the same, JSON-serialisable (nested configs as their constructor kwargs)
    call: str  # as Python source
    mapping: dict[str, str]  # profile key -> LLM argument
    notes: list[str] = field(default_factory=list)


def _fields(cls: Any) -> set[str]:
    fields = getattr(cls, "model_fields", None)
    if fields is None:  # a pydantic v1 class or a plain one: its constructor's names
        fields = getattr(cls, "__fields__", None) or {}
    return set(fields)


def _src(value: Any) -> str:
    if isinstance(value, Enum):
        return f"{type(value).__name__}.{value.name}"
    return repr(value)


def translate(profile_name: str, profile: Profile, model: str, trt: Any, *, max_seq_len: int,
              where: Locate | None = None) -> Translation:
    """The profile as TensorRT-LLM LLM(...) keyword arguments for the installed version `trt`."""
    version = check_version(profile_name, trt, where)
    llmapi = importlib.import_module(f"{PACKAGE}.llmapi")
    kv_cls, sched_cls = llmapi.KvCacheConfig, llmapi.SchedulerConfig
    args_cls = getattr(llmapi, "TorchLlmArgs", None)
    if args_cls is None:
        args_cls = importlib.import_module(f"{PACKAGE}.llmapi.llm_args").TorchLlmArgs
    levers, inference = profile.tensorrt_llm, profile.inference
    notes: list[str] = []
    mapping: dict[str, str] = {}

    def need(cls: Any, name: str, profile_key: str) -> None:
        if name not in _fields(cls):
            raise refusal(profile_name, profile_key, f"TensorRT-LLM {version}'s {cls.__name__} has no field "
                          f"{name!r}, so this setting cannot be applied on this version; remove it from the "
                          f"profile or install a version that has it", where)

    # KvCacheConfig
    kv: dict[str, Any] = {}

    def kv_put(name: str, value: Any, profile_key: str) -> None:
        need(kv_cls, name, profile_key)
        kv[name] = value
        mapping[profile_key] = f"kv_cache_config.{name}"

    fp8 = levers.kv_cache_dtype == "fp8"
    kv_put("dtype", "fp8" if fp8 else "auto", "tensorrt_llm.kv_cache_dtype")
    kv_put("free_gpu_memory_fraction", levers.free_gpu_memory_fraction, "tensorrt_llm.free_gpu_memory_fraction")
    if "tokens_per_block" in _fields(kv_cls):
        kv_put("tokens_per_block", levers.tokens_per_block, "tensorrt_llm.tokens_per_block")
    elif levers.tokens_per_block == BUILTIN_TOKENS_PER_BLOCK:
        mapping["tensorrt_llm.tokens_per_block"] = f"not a KvCacheConfig field in {version}: its runtime's own " \
                                                   f"block size, checked against kvCacheStats.tokensPerBlock"
        notes.append(f"tokens_per_block: TensorRT-LLM {version} takes none; the profile's "
                     f"{levers.tokens_per_block} is its own block size, checked at runtime")
    else:
        raise refusal(profile_name, "tensorrt_llm.tokens_per_block", f"TensorRT-LLM {version}'s KvCacheConfig "
                      f"has no field 'tokens_per_block' (it arrived in 1.1); this version uses its own block "
                      f"size of {BUILTIN_TOKENS_PER_BLOCK} tokens, not {levers.tokens_per_block}; set "
                      f"tokens_per_block: {BUILTIN_TOKENS_PER_BLOCK} or install 1.1 or later", where)
    kv_put("enable_block_reuse", True, "(forged) prefix reuse across requests")
    if levers.host_cache_size:
        kv_put("host_cache_size", levers.host_cache_size, "tensorrt_llm.host_cache_size")
    if levers.kv_cache_max_tokens:
        kv_put("max_tokens", levers.kv_cache_max_tokens, "tensorrt_llm.kv_cache_max_tokens")

    # SchedulerConfig
    sched: dict[str, Any] = {}
    need(sched_cls, "capacity_scheduler_policy", "tensorrt_llm.scheduler_policy")
    sched["capacity_scheduler_policy"] = llmapi.CapacitySchedulerPolicy[CAPACITY_POLICY[levers.scheduler_policy]]
    mapping["tensorrt_llm.scheduler_policy"] = "scheduler_config.capacity_scheduler_policy"
    if levers.enable_chunked_context:
        # forged's chunked context schedules prefill chunks first come, first served.
        need(sched_cls, "context_chunking_policy", "tensorrt_llm.enable_chunked_context")
        sched["context_chunking_policy"] = llmapi.ContextChunkingPolicy.FIRST_COME_FIRST_SERVED

    # LLM(...) / TorchLlmArgs
    top: dict[str, Any] = {}

    def put(name: str, value: Any, profile_key: str) -> None:
        need(args_cls, name, profile_key)
        top[name] = value
        mapping[profile_key] = name if profile_key not in mapping else f"{mapping[profile_key]}, {name}"

    if not fp8:
        put("dtype", MODEL_DTYPE[levers.kv_cache_dtype], "tensorrt_llm.kv_cache_dtype")
    put("enable_chunked_prefill", levers.enable_chunked_context, "tensorrt_llm.enable_chunked_context")
    put("max_num_tokens", levers.max_num_tokens, "tensorrt_llm.max_num_tokens")
    put("max_batch_size", inference.max_concurrent_sessions, "inference.max_concurrent_sessions")
    put("max_seq_len", max_seq_len, "inference.max_seq_len")
    if max_seq_len < inference.max_seq_len:
        notes.append(f"max_seq_len: the profile's {inference.max_seq_len} is capped at the model's "
                     f"{max_seq_len} (config.json max_position_embeddings)")
    tp = levers.tensor_parallel_size
    if tp > 1:
        put("tensor_parallel_size", tp, "tensorrt_llm.tensor_parallel_size")
    else:  # LLM's own default: not passed, so that a single-GPU call stays what it was
        mapping["tensorrt_llm.tensor_parallel_size"] = "tensor_parallel_size (1, LLM's default: not passed)"
    put("enable_iter_perf_stats", True, "(forged) iteration stats for /metrics and /v1/status")
    if GUIDED_BACKEND_FIELD in _fields(args_cls):
        put(GUIDED_BACKEND_FIELD, GUIDED_BACKEND, "(forged) response_format and forced tool calls")
    else:
        notes.append(f"{GUIDED_BACKEND_FIELD}: TensorRT-LLM {version} has no such argument, so requests that "
                     f"need structured output (response_format, a forced tool call) are refused with 400")
    need(args_cls, "kv_cache_config", "tensorrt_llm")
    need(args_cls, "scheduler_config", "tensorrt_llm.scheduler_policy")

    try:
        kv_obj = kv_cls(**kv)
        sched_obj = sched_cls(**sched)
    except Exception as exc:  # pydantic ValidationError: a value the version refuses
        raise refusal(profile_name, "tensorrt_llm", f"TensorRT-LLM {version} refused the KV/scheduler config: "
                      f"{one_line(exc)}", where) from None
    kwargs = {"model": model, **top, "kv_cache_config": kv_obj, "scheduler_config": sched_obj}
    plain = to_plain({"model": model, **top, "kv_cache_config": kv, "scheduler_config": sched})
    args = ", ".join([f"model={model!r}", *(f"{k}={_src(v)}" for k, v in top.items()),
                      "kv_cache_config=KvCacheConfig(" + ", ".join(f"{k}={_src(v)}" for k, v in kv.items()) + ")",
                      "scheduler_config=SchedulerConfig(" + ", ".join(f"{k}={_src(v)}" for k, v in sched.items())
                      + ")"])
    return Translation(version, kwargs, plain, f"LLM({args})", mapping, notes)


