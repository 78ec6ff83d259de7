"""What one engine step costs inside libllama on this CPU, apart from forged's scheduling and serving.

Two measurements on a context shaped as the cpu profile's (one KV stream per sequence, 8 sequences of
8,192 tokens, f16 KV, forged's thread count), with the default model:

- `decode`: one stream's one-token `llama_decode` a few tokens into its context, without and with
  the persistent ggml thread pool forged attaches (`forged/engine/llama_cpp/threadpool.py`), and
  with the pool and flash attention off, in alternating rounds so that all see the same machine
  (median ms per token of each round).
- `chunks`: the cost per token of one prefill chunk of each size, `--depth` tokens into a prompt,
  with flash attention on (what forged's `auto` resolves to on the CPU) and off. It shows the tile
  of ggml's CPU flash attention: chunks shorter than 64 query tokens run row by row (`Policy.min_chunk`).

    .venv/bin/python bench/cpu_step_cost.py [--depth 3584] [--rounds 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import llama_cpp as ll  # noqa: E402
from bench_serving import model  # noqa: E402

from forged.engine.llama_cpp.threadpool import CpuThreadPool  # noqa: E402

CHUNKS = (16, 32, 63, 64, 96, 128, 256)


class Bench:
    def __init__(self, model_ptr: object, threads: int, flash_attn: bool, pool: bool) -> None:
        p = ll.llama_context_default_params()
        p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = 65536, 512, 512, 8
        p.n_threads = p.n_threads_batch = threads
        p.kv_unified, p.no_perf = False, True
        p.flash_attn_type = ll.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attn else ll.LLAMA_FLASH_ATTN_TYPE_DISABLED
        self.ctx = ll.llama_init_from_model(model_ptr, p)
        self.pool = CpuThreadPool(self.ctx, threads) if pool else None
        self.batch = ll.llama_batch_init(512, 0, 1)
        self.rng = np.random.default_rng(0)

    def tokens(self, n: int) -> list[int]:
        return [int(t) for t in self.rng.integers(100, 20000, n)]

    def decode(self, tokens: list[int], pos: int, seq: int = 0) -> float:
        """ms of one llama_decode of `tokens` at `pos` in sequence `seq`."""
        b = self.batch
        b.n_tokens = len(tokens)
        for i, t in enumerate(tokens):
            b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = t, pos + i, 1, i == len(tokens) - 1
            b.seq_id[i][0] = seq
        start = time.perf_counter()
        if ll.llama_decode(self.ctx, b) != 0:
            raise RuntimeError("llama_decode failed")
        return (time.perf_counter() - start) * 1000

    def clear(self) -> None:
        ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)

    def free(self) -> None:
        if self.pool is not None:
            self.pool.free(self.ctx)
        ll.llama_batch_free(self.batch)
        ll.llama_free(self.ctx)


def one_token_decode(bench: Bench, n: int = 64) -> float:
    bench.clear()
    bench.decode(bench.tokens(8), 0)
    return statistics.median(bench.decode(bench.tokens(1), 8 + k) for k in range(n))


def chunk_costs(bench: Bench, depth: int) -> dict[int, float]:
    """ms per token of a chunk of each size, `depth` tokens into one prompt (median of 3)."""
    bench.clear()
    for pos in range(0, depth, 512):
        bench.decode(bench.tokens(min(512, depth - pos)), pos)
    out = {}
    for n in CHUNKS:
        times = []
        for k in range(3):
            times.append(bench.decode(bench.tokens(n), depth + k * n))
        ll.llama_memory_seq_rm(ll.llama_get_memory(bench.ctx), 0, depth, -1)
        out[n] = round(statistics.median(times) / n, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--depth", type=int, default=3584, help="prompt tokens before the measured chunk")
    parser.add_argument("--rounds", type=int, default=8, help="alternating rounds of the one-token decode")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)))
    args = parser.parse_args()
    ll.llama_backend_init()
    model_ptr = ll.llama_model_load_from_file(str(model()).encode(), ll.llama_model_default_params())
    result: dict[str, object] = {"model": model().name, "threads": args.threads, "depth": args.depth}
    benches = {"no pool": Bench(model_ptr, args.threads, True, False),
               "pool": Bench(model_ptr, args.threads, True, True),
               "pool, flash attention off": Bench(model_ptr, args.threads, False, True)}
    rounds: dict[str, list[float]] = {name: [] for name in benches}
    for _ in range(args.rounds):
        for name, bench in benches.items():
            rounds[name].append(round(one_token_decode(bench), 2))
    result["decode_ms_per_token"] = {name: {"median": statistics.median(v), "rounds": v} for name, v in rounds.items()}
    result["chunk_ms_per_token"] = {"flash attention on": chunk_costs(benches["pool"], args.depth),
                                    "flash attention off": chunk_costs(benches["pool, flash attention off"],
                                                                       args.depth)}
    for bench in benches.values():
        bench.free()
    ll.llama_model_free(model_ptr)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
