#!/usr/bin/env bash
# The GPU proof (issue 15), on an NVIDIA GPU machine with a CUDA toolkit, run as root from a checkout
# with .gpu-proof/ beside it (scripts/gpu-proof-prepare.sh):
#   scripts/gpu-proof.sh [all|build|serve]        (default all: build, then serve)
# build: forged on the CPU-only libllama refuses to start in one line; `forgectl engine build`
#        compiles the CUDA engine into /var/lib/forged/engines (the project's own command).
# serve: forged starts with the automatic profile and no environment of its own (no LLAMA_CPP_LIB_PATH,
#        LD_LIBRARY_PATH or LD_PRELOAD), serves a streamed chat over its UNIX socket, and /v1/status
#        shows where the layers and the KV are, beside NVML's memory figures.
# PYTHONPATH stands in for the .deb: .gpu-proof/vendor is its /usr/lib/forged/vendor, the checkout its
# forged package. Output: stdout, and files in $OUT (or build/gpu-proof).
set -euo pipefail
cd "$(dirname "$0")/.."
phase=${1:-all}
PY=${PYTHON:-python3}
KIT=$PWD/.gpu-proof
OUT=${OUT:-$PWD/build/gpu-proof}
MODEL=${GPU_PROOF_MODEL:-/tmp/gpu-proof/random-1b.gguf}
SHAPE=${GPU_PROOF_SHAPE:-1b}
CFG=/tmp/gpu-proof/etc
SOCK=${FORGED_RUN_DIR:-/run/forged}/forged.sock  # root's run dir, as under the package
mkdir -p "$OUT" /tmp/gpu-proof "$CFG"
export PYTHONPATH=$KIT/vendor:$PWD PYTHONUNBUFFERED=1
unset LLAMA_CPP_LIB_PATH LD_PRELOAD
T0=$(date +%s)
step() { echo; echo "== [$(($(date +%s) - T0)) s] $*"; }
forgectl() { "$PY" -c 'import sys; sys.argv[0] = "forgectl"; from forged.cli import forgectl_entry; forgectl_entry()' "$@"; }
[ -d "$KIT/vendor/llama_cpp" ] || { echo "gpu-proof: $KIT is missing; run scripts/gpu-proof-prepare.sh and carry it" >&2; exit 2; }

# The packaged configuration with a model path; profile: auto.
config() {  # DIR MODEL
  mkdir -p "$1"
  sed "s|^  path: null.*|  path: $2|" etc/forged/forged.yaml > "$1/forged.yaml"
  cp etc/forged/sku_profiles.yaml "$1/"
  grep -q "path: $2" "$1/forged.yaml" && grep -q '^profile: auto' "$1/forged.yaml"
}
config "$CFG" "$MODEL"

model() {  # the 1B-shaped model; written in a temporary file, so a reader never sees half of it
  [ -f "$MODEL" ] || { "$PY" "$KIT/random_gguf.py" "$KIT/gguf-py" "$MODEL.part" "$SHAPE" >/dev/null \
                       && mv "$MODEL.part" "$MODEL"; }
}

http() {  # METHOD ROUTE [JSON]: one request over forged's UNIX socket (forgectl's client), body to stdout
  "$PY" - "$SOCK" "$@" <<'PYEOF'
import json, sys
from forged.ctl.client import Client, sse_payloads
sock, method, route = sys.argv[1:4]
client = Client(socket_path=sock, timeout=60)
if method == "STREAM":
    conn = client.connection(120)
    conn.request("POST", route, body=sys.argv[4], headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    print(f"HTTP {response.status} {response.getheader('Content-Type')}")
    for event in sse_payloads(response):
        print("data: " + (event if event == "[DONE]" else json.dumps(event)), flush=True)
else:
    status, _, body = client.request(method, route)
    sys.stdout.write(body.decode())
    sys.exit(0 if status == 200 else 1)
PYEOF
}

build() {
  step "the machine"
  nvidia-smi --query-gpu=name,compute_cap,driver_version,memory.used,memory.total --format=csv
  command -v nvcc && nvcc --version | tail -2 || echo "nvcc not on PATH (forgectl engine build also looks in \$CUDA_HOME/bin, /usr/local/cuda/bin)"
  cmake --version | head -1; ninja --version || true; nproc
  "$PY" -m forged --config-dir "$CFG" probe | grep -E "^hardware|GPU 0|^selected|^CUDA engine"
  model &  # written while the engine builds
  local writer=$!

  step "forged on the CPU-only libllama (the package's vendored one): must refuse in one line"
  # A tiny model of the same family for this start: the refusal comes before any model load.
  "$PY" "$KIT/random_gguf.py" "$KIT/gguf-py" /tmp/gpu-proof/tiny.gguf tiny >/dev/null
  config /tmp/gpu-proof/etc-tiny /tmp/gpu-proof/tiny.gguf
  local env=()
  if [ -e /var/lib/forged/engines/current ]; then  # a warm machine from an earlier run: name the CPU library
    env=(LLAMA_CPP_LIB_PATH="$KIT/vendor/llama_cpp/lib")
  fi
  set +e
  env "${env[@]}" "$PY" -m forged --config-dir /tmp/gpu-proof/etc-tiny run >"$OUT/refusal.log" 2>&1
  local rc=$?
  set -e
  grep -v '^20..-' "$OUT/refusal.log" || true
  echo "exit status $rc; lines starting 'forged:': $(grep -c '^forged: ' "$OUT/refusal.log")"
  [ "$rc" = 1 ] && grep -q "has no GPU backend" "$OUT/refusal.log" && grep -q "forgectl engine build" "$OUT/refusal.log"

  step "forgectl engine build (libllama + ggml-cuda for the probe's compute capability)"
  local started=$(date +%s)
  local built=0
  forgectl engine build --config-dir "$CFG" --source "$KIT"/llama.cpp-*.tar.xz || built=$?
  echo "engine build: $(($(date +%s) - started)) s wall, exit status $built"
  cp /var/lib/forged/engines/last-build.log "$OUT/build.log" 2>/dev/null || true
  [ "$built" = 0 ]
  local lib=/var/lib/forged/engines/current/lib
  readelf -d "$lib/libggml-cuda.so" | grep -E "RUNPATH|NEEDED"
  ls -la "$lib"; cat /var/lib/forged/engines/current/build.json
  wait "$writer"
}

serve() {
  model
  step "forged, automatic profile, the built engine: start"
  local started=$(date +%s)
  "$PY" -m forged --config-dir "$CFG" run >"$OUT/forged.log" 2>&1 &
  pid=$!
  trap 'kill "$pid" 2>/dev/null || true' EXIT
  until http GET /readyz >/dev/null 2>&1; do
    kill -0 "$pid" 2>/dev/null || { cat "$OUT/forged.log"; echo "gpu-proof: forged exited" >&2; exit 1; }
    [ $(($(date +%s) - started)) -lt 240 ] || { tail -30 "$OUT/forged.log"; echo "gpu-proof: not ready" >&2; exit 1; }
    sleep 0.5
  done
  echo "ready in $(($(date +%s) - started)) s"
  grep -E "libllama|engine device|GPU unused|model .* loaded|ready:" "$OUT/forged.log"

  step "a streamed chat over the UNIX socket"
  http STREAM /v1/chat/completions '{"messages": [{"role": "user", "content": "Say hello to the GPU."}],
    "max_tokens": 32, "stream": true, "temperature": 0}' > "$OUT/chat.sse"
  head -3 "$OUT/chat.sse"
  echo "... $(grep -c '^data: {' "$OUT/chat.sse") chunks, then: $(tail -1 "$OUT/chat.sse")"
  grep -q '^data: \[DONE\]' "$OUT/chat.sse"

  step "/v1/status: the engine's device and the layers on it; NVML's memory"
  http GET /v1/status > "$OUT/status.json"
  "$PY" - "$OUT/status.json" <<'EOF'
import json, sys
s = json.load(open(sys.argv[1]))
d, hw = s["engine"]["device"], s["hardware"]
print(json.dumps({k: d[k] for k in ("runs_on", "layers_offloaded", "layers_total", "kv_on", "model_buffers_bytes",
                                    "kv_buffers_bytes", "gpu_unused", "library", "library_source", "backends")},
                 indent=1))
gpu = hw["gpus"][hw["device_index"]] if hw["device_index"] is not None else None
print(f"NVML: {gpu['name']}, {hw['memory_used_bytes'] / 2**30:.2f} GiB used now of "
      f"{gpu['memory_total_bytes'] / 2**30:.2f} GiB ({gpu['memory_used_bytes'] / 2**30:.2f} GiB at the probe)"
      if gpu else f"NVML: no GPU ({hw['kind']} {hw['name']})")
print(f"profile {s['profile']['name']}; KV {s['kv_cache']['blocks_total']} blocks x "
      f"{s['kv_cache']['tokens_per_block']} tokens, {s['kv_cache']['bytes'] / 2**30:.2f} GiB {s['kv_cache']['dtype']}")
assert d["runs_on"] != "CPU" and d["layers_offloaded"] == d["layers_total"] and d["gpu_unused"] is None, d
assert all(name.startswith("CUDA") for name in d["kv_on"]), d["kv_on"]
EOF
  nvidia-smi --query-gpu=memory.used,memory.total --format=csv
  forgectl --socket "$SOCK" status
  forgectl --socket "$SOCK" doctor || true

  step "stop"
  kill -TERM "$pid"; wait "$pid" || true
  trap - EXIT
  tail -2 "$OUT/forged.log"
}

case $phase in
  all) build; serve ;;
  build) build ;;
  serve) serve ;;
  *) echo "usage: $0 [all|build|serve]" >&2; exit 2 ;;
esac
step "done"
