#!/usr/bin/env python3
"""What the prefix cache's KV moves cost, measured on the real libllama context forged creates.

    .venv/bin/python bench/kv_copy.py [--model GGUF] [--context 8192] [--tokens 4096] [--gpu-layers 0]
                                      [--kv-dtype fp16] [--json out.json]

- unified pool: sharing a prefix is `llama_memory_seq_cp` over its positions (cells get one more
  tag; no data moves);
- streams: sharing across streams copies the whole source stream inside libllama, at the next
  decode: the cost is that decode's time minus the same decode without a copy;
- host tier: saving a sequence's KV to host RAM and restoring it (`llama_state_seq_get/set_data`),
  beside recomputing the same tokens.

Each figure is the median of `--repeat` runs. Not part of CI; docs/benchmarks.md has the results.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from forged.config import EngineLevers, LlamaCppOptions, Profile  # noqa: E402
from forged.engine.llama_cpp.batch import StepBatch  # noqa: E402
from forged.engine.llama_cpp.context import LlamaContext  # noqa: E402
from forged.engine.llama_cpp.model import LlamaModel  # noqa: E402
from forged.engine.llama_cpp.sizing import KvSizing  # noqa: E402

CHUNK = 512


def fill(context: LlamaContext, batch: StepBatch, seq: int, tokens: list[int], start: int = 0) -> float:
    """Decode `tokens` into sequence `seq` from position `start`; seconds taken."""
    began = time.perf_counter()
    for i in range(0, len(tokens), CHUNK):
        batch.clear()
        part = tokens[i:i + CHUNK]
        batch.add(part, start + i, seq, want_last_logits=True)
        if context.decode(batch.ready()) != 0:
            raise RuntimeError("llama_decode failed")
    return time.perf_counter() - began


def one_token(context: LlamaContext, batch: StepBatch, seq: int, pos: int) -> float:
    batch.clear()
    batch.add([42], pos, seq, want_last_logits=True)
    began = time.perf_counter()
    if context.decode(batch.ready()) != 0:
        raise RuntimeError("llama_decode failed")
    return time.perf_counter() - began


def make(model: LlamaModel, args: argparse.Namespace, unified: bool) -> LlamaContext:
    seqs = 2
    blocks = (args.context // 32) * (seqs if not unified else 2)
    sizing = KvSizing(num_blocks=blocks, tokens_per_block=32, cache_bytes=0, budget_bytes=0, limited_by="bench",
                      sessions=seqs, unified=unified, n_seq_max=seqs)
    profile = Profile(tensorrt_llm=EngineLevers(kv_cache_dtype=args.kv_dtype),
                      llama_cpp=LlamaCppOptions(n_gpu_layers=args.gpu_layers, n_threads=args.threads))
    return LlamaContext(model, profile, sizing, n_batch=CHUNK, n_ubatch=CHUNK, n_gpu_layers=args.gpu_layers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path)
    ap.add_argument("--context", type=int, default=8192, help="cells of one stream")
    ap.add_argument("--tokens", type=int, default=4096, help="tokens of the shared prefix")
    ap.add_argument("--gpu-layers", type=int, default=0)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--kv-dtype", default="fp16", choices=["fp32", "fp16", "bf16", "fp8"])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.model is None:
        from forged.config import ModelSettings
        from forged.engine.model_files import resolve_model
        args.model, _ = resolve_model(ModelSettings(), REPO / "build" / "test-state")
    model = LlamaModel(args.model, args.gpu_layers)
    tokens = [(i * 7919) % (model.n_vocab - 1000) + 500 for i in range(args.tokens)]
    batch = StepBatch(CHUNK)
    out: dict[str, Any] = {"model": args.model.name, "context": args.context, "tokens": args.tokens,
                           "kv_dtype": args.kv_dtype, "gpu_layers": args.gpu_layers, "host": platform.node(),
                           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}

    unified = make(model, args, unified=True)
    fill(unified, batch, 0, tokens)
    share = []
    for _ in range(args.repeat):
        unified.seq_rm(1, -1, -1)
        began = time.perf_counter()
        unified.seq_cp(0, 1, 0, len(tokens))
        share.append(time.perf_counter() - began)
    out["unified_share_ms"] = 1e3 * statistics.median(share)
    unified.seq_rm(1, -1, -1)
    out["recompute_ms"] = 1e3 * fill(unified, batch, 1, tokens)
    unified.free()

    streams = make(model, args, unified=False)
    fill(streams, batch, 0, tokens)
    plain, copied = [], []
    for _ in range(args.repeat):
        streams.seq_rm(1, -1, -1)
        streams.seq_cp(0, 1, -1, -1)
        streams.seq_rm(1, len(tokens), -1)
        copied.append(one_token(streams, batch, 1, len(tokens)))  # the copy runs inside this decode
        plain.append(one_token(streams, batch, 1, len(tokens) + 1))  # the same step, nothing to copy
    out["stream_copy_ms"] = 1e3 * (statistics.median(copied) - statistics.median(plain))
    out["decode_without_copy_ms"] = 1e3 * statistics.median(plain)

    saves, restores = [], []
    size = 0
    for _ in range(args.repeat):
        began = time.perf_counter()
        data = streams.save_seq(0)
        saves.append(time.perf_counter() - began)
        size = len(data)
        streams.seq_rm(1, -1, -1)
        began = time.perf_counter()
        if not streams.restore_seq(1, data):
            raise RuntimeError("llama_state_seq_set_data failed")
        restores.append(time.perf_counter() - began)
    out.update(host_bytes=size, host_save_ms=1e3 * statistics.median(saves),
               host_restore_ms=1e3 * statistics.median(restores))
    streams.free()
    model.free()
    print(json.dumps(out, indent=2))
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
