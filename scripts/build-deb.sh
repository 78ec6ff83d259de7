#!/usr/bin/env bash
# Build the Debian package from a clean copy of this tree (so the build never touches the
# checkout, .venv or build/), into build/deb/: scripts/build-deb.sh [OUT_DIR]
# Needs: debhelper dh-python pybuild-plugin-pyproject python3-all python3-setuptools python3-wheel
# dpkg-dev (scripts/bootstrap.sh --test installs them) and the vendored wheels in
# ${FORGED_WHEEL_CACHE:-~/.cache/forged/wheels}.
set -euo pipefail
cd "$(dirname "$0")/.."
out=$(realpath -m "${1:-build/deb}")
src=$out/src
rm -rf "$src" "$out"/forged_*.deb "$out"/forged_*.buildinfo "$out"/forged_*.changes "$out"/forged-dbgsym_*
mkdir -p "$src"
# The files a release would contain: what git tracks plus new files not ignored.
git ls-files -z --cached --others --exclude-standard \
  | grep -zv -e '^build/' -e '^\.venv/' -e '^tests/' -e '^bench/' \
  | xargs -0 -I{} cp --parents -P {} "$src"/
export FORGED_WHEEL_CACHE=${FORGED_WHEEL_CACHE:-$HOME/.cache/forged/wheels}
# pyenv or a venv first on PATH would make pybuild use the wrong python3.
(cd "$src" && env PATH=/usr/sbin:/usr/bin:/sbin:/bin dpkg-buildpackage -us -uc -b) >"$out/build.log" 2>&1 \
  || { tail -40 "$out/build.log" >&2; echo "build-deb: failed, full log in $out/build.log" >&2; exit 1; }
ls "$out"/forged_*.deb
