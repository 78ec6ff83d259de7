#!/usr/bin/env bash
# Build the Debian package from a clean copy of this tree (so the build never touches the
# checkout, .venv or build/): scripts/build-deb.sh [OUT_DIR [ARCH]]
# OUT_DIR defaults to build/deb; ARCH (amd64 or arm64) to this machine's. A foreign ARCH is
# cross-built (dpkg-buildpackage -a): only the vendored engine is native code, and it comes
# prebuilt for that architecture from the wheel cache.
# Needs: debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel
# dpkg-dev (and crossbuild-essential-arm64 for arm64; scripts/bootstrap.sh --test installs them),
# the vendored wheels in ${FORGED_WHEEL_CACHE:-~/.cache/forged/wheels} and the engine source in
# ${FORGED_SRC_CACHE:-~/.cache/forged/src} (scripts/llama-source.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-build/deb}")
arch=${2:-$(dpkg --print-architecture)}
src=$out/src
rm -rf "$src" "$out"/forged_*.deb "$out"/forged_*.buildinfo "$out"/forged_*.changes "$out"/forged-dbgsym_*
mkdir -p "$src"
# The files a release would contain: what git tracks plus new files not ignored.
git ls-files -z --cached --others --exclude-standard \
  | grep -zv -e '^build/' -e '^\.venv/' -e '^tests/' -e '^bench/' \
  | xargs -0 -I{} cp --parents -P {} "$src"/
export FORGED_WHEEL_CACHE=${FORGED_WHEEL_CACHE:-$HOME/.cache/forged/wheels}
export FORGED_SRC_CACHE=${FORGED_SRC_CACHE:-$HOME/.cache/forged/src}
cross=()
if [ "$arch" != "$(dpkg --print-architecture)" ]; then
  # -d: the Build-Depends are tools that run on this machine (debhelper, pybuild); dpkg-checkbuilddeps
  # would ask for their $arch versions.
  cross=(-a "$arch" -d)
fi
# pyenv or a venv first on PATH would make pybuild use the wrong python3.
(cd "$src" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage "${cross[@]}" -us -uc -b) >"$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log" >&2; echo "build-deb: failed, full log in $out/build.log" >&2; exit 1; }
ls "$out"/forged_*_"$arch".deb
