#!/usr/bin/env bash
# The llama.cpp source that `forgectl engine build` compiles, as one small tarball:
#   scripts/llama-source.sh [PIP]      -> prints the tarball's path
# It is the llama.cpp vendored in the PyPI sdist of llama-cpp-python (the version forged binds, so
# the library and the Python binding always match), pruned to what libllama + ggml's CPU and CUDA
# backends need to build. The sdist is downloaded once (PIP, default python3 -m pip) and both are
# kept in ${FORGED_SRC_CACHE:-~/.cache/forged/src}. The tarball is reproducible (sorted, fixed
# mtime and owner), and FORGED-SOURCE.json inside it names the sdist and its sha256.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=$(sed -n 's/.*llama-cpp-python==\([0-9.]*\).*/\1/p' setup.cfg | head -1)
CACHE=${FORGED_SRC_CACHE:-$HOME/.cache/forged/src}
SDIST=$CACHE/llama_cpp_python-$VERSION.tar.gz
OUT=$CACHE/llama.cpp-$VERSION.tar.xz
# What the build reads, relative to the sdist's vendor/llama.cpp. Other ggml backends, the tools,
# common/, the models, docs and tests stay out (they are most of the sdist's 76 MB).
KEEP=(CMakeLists.txt LICENSE licenses cmake include src vendor
      ggml/CMakeLists.txt ggml/cmake ggml/include ggml/src/ggml-cpu ggml/src/ggml-cuda)

[ -n "$VERSION" ] || { echo "llama-source: no llama-cpp-python==X pin in setup.cfg" >&2; exit 1; }
if [ -f "$OUT" ]; then echo "$OUT"; exit 0; fi
mkdir -p "$CACHE"
if [ ! -f "$SDIST" ]; then
  ${1:-python3 -m pip} download -q --no-deps --no-binary :all: -d "$CACHE" "llama-cpp-python==$VERSION" >&2
fi
work=$(mktemp -d "$CACHE/.prune-XXXXXX")
trap 'rm -rf "$work"' EXIT
top=llama_cpp_python-$VERSION/vendor/llama.cpp
tar -xzf "$SDIST" -C "$work" "$top"
src=$work/$top
dest=$work/llama.cpp-$VERSION
mkdir -p "$dest/ggml/src"
for path in "${KEEP[@]}"; do
  mkdir -p "$(dirname "$dest/$path")"
  cp -a "$src/$path" "$dest/$path"
done
# ggml's own sources: the files directly in ggml/src (the base library and the backend registry).
find "$src/ggml/src" -maxdepth 1 -type f -exec cp -a {} "$dest/ggml/src/" \;
sha=$(sha256sum "$SDIST" | cut -d' ' -f1)
printf '{"llama_cpp_python": "%s", "sdist": "%s", "sdist_sha256": "%s", "llama_cpp_dir": "vendor/llama.cpp"}\n' \
  "$VERSION" "$(basename "$SDIST")" "$sha" > "$dest/FORGED-SOURCE.json"
tar -C "$work" --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - "llama.cpp-$VERSION" \
  | xz -T1 -6 > "$OUT.partial"
mv "$OUT.partial" "$OUT"
echo "$OUT"
