#!/usr/bin/env bash
# Make .gpu-proof/, what scripts/gpu-proof.sh needs on a GPU machine that reaches no package
# registry (the device tool's machines: docs/install.md, "Proof on a GPU machine"):
#   scripts/gpu-proof-prepare.sh [RANDOM_GGUF_PY]
#   .gpu-proof/vendor/          what the .deb installs in /usr/lib/forged/vendor (debian/vendor-wheels:
#                               llama-cpp-python with its CPU libllama, pynvml), plus the pure-Python
#                               sdnotify and diskcache that the package takes from Debian
#   .gpu-proof/llama.cpp-*.tar.xz   the engine source the .deb carries (scripts/llama-source.sh)
#   .gpu-proof/gguf-py/, random_gguf.py   to write a random-weight Llama-3.2-1B-shaped GGUF there
# Everything comes from the caches scripts/bootstrap.sh --test fills (no download when they are warm).
# .gpu-proof/ is git-ignored; carry it: run(..., carry=[".gpu-proof"]). About 15 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
random_gguf=${1:-../../shared/gpu/random_gguf.py}
[ -f "$random_gguf" ] || random_gguf=/work/shared/gpu/random_gguf.py
WHEELS=${FORGED_WHEEL_CACHE:-$HOME/.cache/forged/wheels}
SRC=${FORGED_SRC_CACHE:-$HOME/.cache/forged/src}
PIP=${PIP:-.venv/bin/pip}
out=.gpu-proof
rm -rf "$out" && mkdir -p "$out/vendor"
python3 debian/vendor-wheels "$out/vendor" "$WHEELS"/llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl \
  "$WHEELS"/nvidia_ml_py-13.615.71-py3-none-any.whl
mkdir -p "$SRC/pure"
for spec in diskcache==5.6.3 sdnotify==0.3.2; do
  ls "$SRC/pure/${spec%%==*}"-* >/dev/null 2>&1 || "$PIP" download -q --no-deps -d "$SRC/pure" "$spec"
done
python3 - "$SRC/pure" "$out/vendor" <<'EOF'
import sys, tarfile, zipfile
from pathlib import Path
cache, dest = Path(sys.argv[1]), Path(sys.argv[2])
with zipfile.ZipFile(next(cache.glob("diskcache-*.whl"))) as zf:
    zf.extractall(dest, [n for n in zf.namelist() if n.startswith("diskcache/")])
with tarfile.open(next(cache.glob("sdnotify-*.tar.gz"))) as tar:
    member = next(m for m in tar.getmembers() if m.name.endswith("sdnotify/__init__.py"))
    (dest / "sdnotify").mkdir()
    (dest / "sdnotify" / "__init__.py").write_bytes(tar.extractfile(member).read())
EOF
cp "$(scripts/llama-source.sh "$PIP")" "$out/"
tar -xzf "$SRC/llama_cpp_python-0.3.36.tar.gz" -C "$out" --strip-components=3 \
  llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py
cp "$random_gguf" "$out/random_gguf.py"
du -sh "$out"
