"""KV cache arithmetic, read from the model itself, and capacity plans.

Bytes per token = 2 (K and V) x layers x kv_heads x head_dim x bytes(dtype), with K and V head
sizes taken separately when they differ. Sliding-window layers (Gemma 2/3, Cohere 2, Mistral v0.1)
never hold more than `window` tokens of one sequence, so a long context costs them nothing more:
`context_bytes` counts full-attention layers at the whole context and sliding layers at the window.

Shapes come from GGUF metadata (as libllama renders it) or from a Hugging Face config.json; reading
either from a file is `engine/shapes.py`'s job, so that this module stays arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Bytes per element of the KV cache, by the profile's dtype name (TensorRT-LLM's: fp8 is one byte).
DTYPE_BYTES: dict[str, float] = {"fp32": 4.0, "fp16": 2.0, "bf16": 2.0, "fp8": 1.0}
# The same dtypes as libllama's KV cache types: ggml's name and its ggml_type number (fixed: GGUF
# files store it; llama-cpp-python 0.3.36 has no GGML_TYPE_BF16 to read it from). libllama has no
# fp8; q8_0 is its 1-byte type: blocks of 32 int8 values plus one fp16 scale.
KV_DTYPE_TO_GGML: dict[str, tuple[str, int]] = {"fp32": ("f32", 0), "fp16": ("f16", 1), "bf16": ("bf16", 30),
                                                "fp8": ("q8_0", 8)}
GGML_TYPE_BYTES: dict[str, float] = {"f32": 4.0, "f16": 2.0, "bf16": 2.0, "q8_0": 34 / 32}
LLAMA_CPP_DTYPE_BYTES: dict[str, float] = {dtype: GGML_TYPE_BYTES[name]
                                          for dtype, (name, _) in KV_DTYPE_TO_GGML.items()}

# Architectures whose GGUF does not carry the sliding-window layer pattern: llama.cpp hard-codes it
# (one full-attention layer every N layers; the others slide).
_SWA_PATTERN_BY_ARCH = {"gemma2": 2, "gemma3": 6, "cohere2": 4}


@dataclass(frozen=True)
class KvShape:
    name: str
    n_layers: int
    n_kv_heads: int
    head_dim_k: int
    head_dim_v: int
    sliding_window: int = 0  # 0: no sliding-window layers
    swa_layers: int = 0
    trained_context: int = 0
    weights_bytes: int = 0

    @property
    def full_layers(self) -> int:
        return self.n_layers - self.swa_layers

    def elements_per_token_per_layer(self) -> int:
        return self.n_kv_heads * (self.head_dim_k + self.head_dim_v)

    def bytes_per_token(self, dtype_bytes: float) -> float:
        """Every layer at full attention: the textbook 2 x layers x kv_heads x head_dim x bytes."""
        return self.n_layers * self.elements_per_token_per_layer() * dtype_bytes

    def context_bytes(self, tokens: int, dtype_bytes: float) -> float:
        """KV bytes one sequence of `tokens` really needs, sliding-window layers capped at the window."""
        per_layer = self.elements_per_token_per_layer() * dtype_bytes
        swa_tokens = min(tokens, self.sliding_window) if self.sliding_window else tokens
        return per_layer * (self.full_layers * tokens + self.swa_layers * swa_tokens)


def swa_layer_count(n_layers: int, window: int, pattern: int | list[bool] | None) -> int:
    if not window:
        return 0
    if isinstance(pattern, list):
        return sum(1 for sliding in pattern[:n_layers] if sliding)
    if pattern:
        # llama.cpp's convention: layer il slides unless (il % pattern) == pattern - 1.
        return sum(1 for il in range(n_layers) if il % pattern < pattern - 1)
    return n_layers  # a window with no pattern: every layer slides (Mistral v0.1)


def shape_from_metadata(meta: dict[str, str], weights_bytes: int = 0) -> KvShape:
    """From GGUF key/values (as libllama renders them to strings)."""
    arch = meta.get("general.architecture", "")

    def num(key: str, default: int | None = None) -> int:
        value = meta.get(f"{arch}.{key}")
        if value is None:
            if default is None:
                raise ValueError(f"the model's metadata has no {arch}.{key}")
            return default
        return int(float(value))

    n_layers = num("block_count")
    n_heads = num("attention.head_count")
    n_kv = num("attention.head_count_kv", n_heads)
    embd = num("embedding_length")
    head_k = num("attention.key_length", embd // n_heads)
    head_v = num("attention.value_length", head_k)
    window = num("attention.sliding_window", 0)
    raw_pattern = meta.get(f"{arch}.attention.sliding_window_pattern")
    pattern: int | list[bool] | None = _SWA_PATTERN_BY_ARCH.get(arch)
    if raw_pattern:
        pattern = _parse_pattern(raw_pattern)
    return KvShape(name=meta.get("general.name", arch), n_layers=n_layers, n_kv_heads=n_kv, head_dim_k=head_k,
                   head_dim_v=head_v, sliding_window=window,
                   swa_layers=swa_layer_count(n_layers, window, pattern),
                   trained_context=num("context_length", 0), weights_bytes=weights_bytes)


def _parse_pattern(raw: str) -> int | list[bool]:
    raw = raw.strip()
    if raw.startswith("["):
        return [item.strip().lower() in ("true", "1") for item in raw.strip("[]").split(",") if item.strip()]
    return int(raw)


def shape_from_hf_config(config: dict[str, Any], weights_bytes: int = 0) -> KvShape:
    """From a Hugging Face config.json (text models; multimodal ones keep it under text_config)."""
    cfg = config.get("text_config", config)
    n_layers = int(cfg["num_hidden_layers"])
    n_heads = int(cfg["num_attention_heads"])
    n_kv = int(cfg.get("num_key_value_heads") or n_heads)
    head = int(cfg.get("head_dim") or cfg["hidden_size"] // n_heads)
    window = int(cfg.get("sliding_window") or 0)
    layer_types = cfg.get("layer_types")
    if window and layer_types:
        pattern: int | list[bool] | None = [t == "sliding_attention" for t in layer_types]
    else:
        pattern = cfg.get("sliding_window_pattern") or _SWA_PATTERN_BY_ARCH.get(cfg.get("model_type", ""))
    if window and cfg.get("use_sliding_window") is False:
        window = 0
    return KvShape(name=cfg.get("_name_or_path") or config.get("model_type", "model"), n_layers=n_layers,
                   n_kv_heads=n_kv, head_dim_k=head, head_dim_v=head, sliding_window=window,
                   swa_layers=swa_layer_count(n_layers, window, pattern),
                   trained_context=int(cfg.get("max_position_embeddings") or 0), weights_bytes=weights_bytes)


def blocks_for(tokens: int, tokens_per_block: int) -> int:
    """Whole blocks that hold `tokens` tokens: KV is allocated and counted in blocks."""
    return -(-tokens // tokens_per_block)


def kv_budget_bytes(available_bytes: int, weights_bytes: int, free_gpu_memory_fraction: float) -> float:
    """What the KV cache may take: `free_gpu_memory_fraction` of the memory left once the weights
    are in (TensorRT-LLM's rule, which the llama_cpp engine follows too). The whole budget the
    startup check and `forgectl plan` speak of is the weights plus this."""
    return free_gpu_memory_fraction * max(available_bytes - weights_bytes, 0)


@dataclass(frozen=True)
class CapacityPlan:
    dtype: str
    dtype_bytes: float
    context: int
    tokens_per_block: int
    budget_bytes: int
    kv_budget_bytes: float
    bytes_per_token: float
    bytes_per_session: float
    blocks_per_session: int
    sessions_fit: int
    headroom_bytes: float

    def fits(self, sessions: int) -> bool:
        return self.sessions_fit >= sessions


def plan_capacity(shape: KvShape, budget_bytes: int, dtype: str, tokens_per_block: int, context: int,
                  sessions: int, *, engine: str = "tensorrt_llm") -> CapacityPlan:
    """How many sessions of `context` tokens fit in `budget_bytes` once the weights are loaded,
    KV allocated in whole blocks of `tokens_per_block` tokens, and what is left for `sessions`."""
    dtype_bytes = (LLAMA_CPP_DTYPE_BYTES if engine == "llama_cpp" else DTYPE_BYTES)[dtype]
    kv_budget = max(budget_bytes - shape.weights_bytes, 0)
    blocks = blocks_for(context, tokens_per_block)
    per_session = shape.context_bytes(blocks * tokens_per_block, dtype_bytes)
    fit = int(kv_budget // per_session) if per_session else 0
    return CapacityPlan(dtype=dtype, dtype_bytes=dtype_bytes, context=context, tokens_per_block=tokens_per_block,
                        budget_bytes=budget_bytes, kv_budget_bytes=kv_budget,
                        bytes_per_token=shape.bytes_per_token(dtype_bytes), bytes_per_session=per_session,
                        blocks_per_session=blocks, sessions_fit=fit,
                        headroom_bytes=kv_budget - sessions * per_session)
