"""KV arithmetic against hand-computed values for real model shapes."""

from __future__ import annotations

import pytest

from forged.engine.kv import (
    DTYPE_BYTES,
    KV_DTYPE_TO_GGML,
    KvShape,
    kv_budget_bytes,
    plan_capacity,
    shape_from_hf_config,
    shape_from_metadata,
    swa_layer_count,
)
from forged.engine.shapes import shape_from_path

# Published config.json values (meta-llama/Llama-3.1-8B and meta-llama/Llama-2-7b-hf).
LLAMA_31_8B = {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
               "hidden_size": 4096, "max_position_embeddings": 131072}
LLAMA_2_7B = {"model_type": "llama", "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "hidden_size": 4096, "max_position_embeddings": 4096}
# google/gemma-3-270m config.json (text part).
GEMMA3_270M_HF = {"model_type": "gemma3_text", "num_hidden_layers": 18, "num_attention_heads": 4,
                  "num_key_value_heads": 1, "head_dim": 256, "hidden_size": 640, "sliding_window": 512,
                  "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
                  "max_position_embeddings": 32768}


def test_llama_31_8b_fp16_is_128_kib_per_token() -> None:
    shape = shape_from_hf_config(LLAMA_31_8B)
    # 2 x 32 layers x 8 kv heads x 128 head dim x 2 bytes
    assert shape.bytes_per_token(2) == 2 * 32 * 8 * 128 * 2 == 131072
    assert shape.context_bytes(20_000, 2) == 131072 * 20_000  # ~2.44 GiB: DESIGN.md's 2.5 GiB
    assert shape.bytes_per_token(1) == 65536 and shape.bytes_per_token(4) == 262144


def test_model_without_gqa_llama2_7b() -> None:
    shape = shape_from_hf_config(LLAMA_2_7B)
    assert shape.n_kv_heads == 32
    assert shape.bytes_per_token(2) == 2 * 32 * 32 * 128 * 2 == 524288  # 512 KiB a token


def test_gemma3_270m_sliding_window_from_hf_config() -> None:
    shape = shape_from_hf_config(GEMMA3_270M_HF)
    assert (shape.n_layers, shape.swa_layers, shape.full_layers) == (18, 15, 3)
    # 2 x 18 x 1 x 256 x 2 = 18432 bytes a token if every layer attended fully
    assert shape.bytes_per_token(2) == 18432
    # 20k tokens: 3 full layers x 20000 + 15 sliding layers x 512, at 2 x 256 x 2 bytes per layer-token
    assert shape.context_bytes(20_000, 2) == 1024 * (3 * 20_000 + 15 * 512) == 69_304_320


def test_gemma3_270m_from_the_real_gguf(gemma_path) -> None:
    shape = shape_from_path(gemma_path)
    assert (shape.n_layers, shape.n_kv_heads, shape.head_dim_k, shape.head_dim_v) == (18, 1, 256, 256)
    assert (shape.sliding_window, shape.swa_layers, shape.trained_context) == (512, 15, 32768)
    assert shape.context_bytes(20_000, 2) == 69_304_320
    assert shape.weights_bytes == gemma_path.stat().st_size


def test_gguf_metadata_pattern_table_and_explicit() -> None:
    meta = {"general.architecture": "gemma2", "gemma2.block_count": "26", "gemma2.attention.head_count": "8",
            "gemma2.attention.head_count_kv": "4", "gemma2.embedding_length": "2304",
            "gemma2.attention.key_length": "256", "gemma2.attention.value_length": "256",
            "gemma2.attention.sliding_window": "4096", "gemma2.context_length": "8192"}
    assert shape_from_metadata(meta).swa_layers == 13
    assert swa_layer_count(4, 128, [True, False, True, True]) == 3
    assert swa_layer_count(32, 4096, None) == 32  # Mistral v0.1: every layer slides
    assert swa_layer_count(32, 0, 6) == 0


def test_capacity_plan_counts_whole_blocks_and_weights() -> None:
    shape = KvShape("toy", n_layers=2, n_kv_heads=1, head_dim_k=4, head_dim_v=4, weights_bytes=1000)
    # 16 bytes a token per layer at fp16 -> 32 bytes a token; 100 tokens -> 4 blocks of 32 = 128 tokens
    plan = plan_capacity(shape, budget_bytes=1000 + 4096 * 3 + 100, dtype="fp16", tokens_per_block=32,
                         context=100, sessions=2)
    assert plan.blocks_per_session == 4 and plan.bytes_per_session == 4096
    assert plan.sessions_fit == 3 and plan.fits(2) and not plan.fits(4)
    assert plan.headroom_bytes == 4096 * 3 + 100 - 2 * 4096


def test_llama_cpp_fp8_is_q8_0_size() -> None:
    shape = shape_from_hf_config(LLAMA_31_8B)
    plan = plan_capacity(shape, 10**12, "fp8", 32, 20_000, 8, engine="llama_cpp")
    assert plan.bytes_per_token == pytest.approx(65536 * 34 / 32)


def test_every_profile_dtype_has_a_libllama_kv_type_and_its_numbers_are_libllamas() -> None:
    import llama_cpp as ll  # the binding names most ggml types; bf16 it lacks (hence the numbers in kv.py)

    assert set(KV_DTYPE_TO_GGML) == set(DTYPE_BYTES)
    for name, ggml_type in KV_DTYPE_TO_GGML.values():
        binding = getattr(ll, f"GGML_TYPE_{name.upper()}", None)
        assert binding is None or binding == ggml_type, name


def test_the_kv_budget_is_the_fraction_of_what_the_weights_leave() -> None:
    assert kv_budget_bytes(10 * 2**30, 2 * 2**30, 0.5) == 4 * 2**30
    # Weights larger than the memory leave nothing, never a negative budget.
    assert kv_budget_bytes(2**30, 2 * 2**30, 0.9) == 0
