#!/usr/bin/env bash
# Issue 18: forged across several GPUs of one host, for real. Not run by CI; written for the 2-GPU
# machines (nvidia-h100-x2 / nvidia-h200-x2), with the GPU kit's CUDA libllama and llama-server
# (../shared/gpu/README.md). Every check the strict NVML stand-in can make already runs in
# tests/unit/test_gpus.py; this script is what only real GPUs can show.
#
#   bench/multi_gpu.sh KIT_LIB LLAMA_SERVER GGUF_PY OUT
#
#   KIT_LIB       the unpacked kit (libllama, libggml-cuda, ...): tar xzf llama-cpp-0.3.36-cuda13-sm90.tgz -C KIT_LIB
#   LLAMA_SERVER  the kit's llama-server binary
#   GGUF_PY       gguf-py from the llama-cpp-python 0.3.36 sdist (vendor/llama.cpp/gguf-py), for random_gguf.py
#   OUT           results folder (created)
#
# PYTHONPATH must already hold llama-cpp-python's pure-Python package and diskcache (kit README), and
# .gpu/random_gguf.py must be the kit's random_gguf.py (as bench/gpu_bench.py expects).
#
# Steps, each leaving its evidence in OUT:
#   1. forged probe lists every GPU through NVML and picks multi_gpu by its match rule (probe.json);
#   2. forged serves with the model split over GPUs 0 and 1, split_mode layer then row: a streamed chat
#      over the UNIX socket (chat-<mode>.sse), /v1/status showing the split and each GPU's memory
#      (status-<mode>.json), /v1/tensorrt-llm/config with the model params libllama got;
#   3. the seed's burst (20 users x ~20k tokens, 64 new) on the random 8B shape: one GPU, then split
#      over two (layer, row), forged and llama-server with the same split in the same run
#      (one-gpu/, two-gpu-layer/, two-gpu-row/: gpu_bench.json with TTFT P50/P99, decode tok/s and
#      peak memory per GPU). docs/benchmarks.md gets the table.
set -euo pipefail
[ $# -eq 4 ] || { sed -n 2,28p "$0"; exit 2; }
KIT_LIB=$(realpath "$1"); LLAMA_SERVER=$(realpath "$2"); GGUF_PY=$(realpath "$3"); OUT=$(realpath -m "$4")
cd "$(dirname "$0")/.."
REPO=$PWD
mkdir -p "$OUT"
export LLAMA_CPP_LIB_PATH=$KIT_LIB LD_LIBRARY_PATH=$KIT_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-0,1}
nvidia-smi -L | tee "$OUT/gpus.txt"
[ "$(nvidia-smi -L | wc -l)" -ge 2 ] || { echo "multi_gpu.sh: needs two GPUs" >&2; exit 1; }

# ------------------------------------------------------------------ 1. probe
python3 -m forged --config-dir etc/forged probe --json > "$OUT/probe.json"
python3 - "$OUT/probe.json" <<'PY'
import json, sys
doc = json.load(open(sys.argv[1]))
gpus = doc["hardware"]["gpus"]
print(f"probe: {len(gpus)} GPUs ({', '.join(g['name'] for g in gpus)}), CUDA shows {doc['hardware']['cuda_gpus']}; "
      f"selected {doc['selected']['name']}: {doc['selected']['reason']}")
assert len(doc["hardware"]["cuda_gpus"]) >= 2 and doc["selected"]["name"] == "multi_gpu", doc["selected"]
PY

# ------------------------------------------------------------------ 2. split over two GPUs, served
WORK=$(mktemp -d /tmp/multi-gpu.XXXXXX)
python3 .gpu/random_gguf.py "$GGUF_PY" "$WORK/random-1b.gguf" 1b
for MODE in layer row; do
  D=$WORK/$MODE; mkdir -p "$D/etc"
  python3 - "$D" "$MODE" "$WORK/random-1b.gguf" <<'PY'
import sys, yaml
d, mode, model = sys.argv[1:]
profiles = yaml.safe_load(open("etc/forged/sku_profiles.yaml"))
profiles["profiles"]["multi_gpu"]["llama_cpp"]["split_mode"] = mode
yaml.safe_dump(profiles, open(f"{d}/etc/sku_profiles.yaml", "w"))
yaml.safe_dump({"listen": {"http": {"enabled": False}, "unix": {"path": f"{d}/forged.sock"}},
                "model": {"path": model}, "profile": "auto"}, open(f"{d}/etc/forged.yaml", "w"))
PY
  FORGED_RUN_DIR=$D FORGED_STATE_DIR=$D/state python3 -m forged --config-dir "$D/etc" run > "$OUT/forged-$MODE.log" 2>&1 &
  PID=$!
  for _ in $(seq 600); do
    curl -sf --unix-socket "$D/forged.sock" http://forged/readyz >/dev/null 2>&1 && break
    kill -0 $PID 2>/dev/null || { tail -20 "$OUT/forged-$MODE.log"; exit 1; }
    sleep 0.5
  done
  curl -sfN --unix-socket "$D/forged.sock" http://forged/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 32, "stream": true}' \
    > "$OUT/chat-$MODE.sse"
  curl -sf --unix-socket "$D/forged.sock" http://forged/v1/status > "$OUT/status-$MODE.json"
  curl -sf --unix-socket "$D/forged.sock" http://forged/v1/tensorrt-llm/config > "$OUT/config-$MODE.json"
  kill -TERM $PID; wait $PID || true
  python3 - "$OUT" "$MODE" <<'PY'
import json, sys
out, mode = sys.argv[1:]
assert open(f"{out}/chat-{mode}.sse").read().rstrip().endswith("data: [DONE]")
status = json.load(open(f"{out}/status-{mode}.json"))
placement = status["placement"]
params = json.load(open(f"{out}/config-{mode}.json"))["llama_model_params"]
print(f"{mode}: profile {status['profile']['name']}, libllama got {params}")
for gpu in placement["gpus"]:
    print(f"  GPU {gpu['cuda_index']} (NVML {gpu['nvml_index']}, {gpu['name']}): share {gpu['share']}, "
          f"KV {gpu['kv_cache']}, {gpu['memory_used_bytes'] / 2**30:.1f} of {gpu['memory_total_bytes'] / 2**30:.1f} GiB used")
assert placement["split_mode"] == mode and len(placement["gpus"]) >= 2
assert all(g["share"] > 0 and g["memory_used_bytes"] > 0 for g in placement["gpus"][:2])
assert [g["kv_cache"] for g in placement["gpus"][:2]] == ([True, True] if mode == "layer" else [True, False])
PY
done

# ------------------------------------------------------------------ 3. the seed's burst, 8B shape
BENCH=(python3 bench/gpu_bench.py --kit-lib "$KIT_LIB" --llama-server "$LLAMA_SERVER" --gguf-py "$GGUF_PY"
       --shapes 8b --users 20 --prompt-tokens 20000 --new-tokens 64 --spreads 0
       --configs tuned llama-server --decode-configs tuned llama-server)
CUDA_VISIBLE_DEVICES=0 "${BENCH[@]}" --out "$OUT/one-gpu"
CUDA_VISIBLE_DEVICES=0,1 "${BENCH[@]}" --split-mode layer --out "$OUT/two-gpu-layer"
CUDA_VISIBLE_DEVICES=0,1 "${BENCH[@]}" --split-mode row --out "$OUT/two-gpu-row"
python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
print(f"{'run':<16}{'config':<14}{'TTFT P50 s':>11}{'P99 s':>8}{'decode tok/s':>14}  peak GiB per GPU")
for run in ("one-gpu", "two-gpu-layer", "two-gpu-row"):
    report = json.load(open(f"{out}/{run}/gpu_bench.json"))["shapes"]["8b"]["runs"]
    for key, r in report.items():
        if "error" in r:
            print(f"{run:<16}{key:<14} error: {r['error'][:80]}")
            continue
        print(f"{run:<16}{key.split('/')[0]:<14}{r.get('ttft_p50_s', '?'):>11}{r.get('ttft_p99_s', '?'):>8}"
              f"{r.get('decode_tok_s_all_streams', '?'):>14}  {r.get('peak_gpu_memory_gib_per_gpu')}")
PY
