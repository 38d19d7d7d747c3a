#!/usr/bin/env bash
# Installs what the `mlx` cargo feature needs on Linux x86_64 (see docs/mlx.md):
#   - system packages: cmake (mlx-c build), libclang-dev (bindgen), libopenblas0 (fast BLAS);
#   - MLX 0.32.2 itself, from the PyPI wheel `mlx-cpu==0.32.2` (libmlx.so + headers + CMake
#     config), unpacked into vendor/mlx-cpu/ inside the checkout. mlx-c 0.7.0 (vendored in
#     mlx-sys 0.7.0) pins MLX 0.32.2 exactly; other versions fail to compile.
# Idempotent: a second run only checks the stamp file and exits.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/vendor/mlx-cpu"
WHEEL="mlx_cpu-0.32.2-py3-none-manylinux_2_35_x86_64.whl"
SHA256="fc5d31b90fc4f457b2f9614ed45651a567d22a6a11a03d114a90a4e10bdd8878"
STAMP="$DEST/.installed-$SHA256"

if [[ "$(uname -s)" != "Linux" || "$(uname -m)" != "x86_64" ]]; then
    echo "setup-mlx: nothing to do on $(uname -s)/$(uname -m) (macOS uses mlx-rs's own Metal build)"
    exit 0
fi

# System packages (skipped when already present).
missing=()
for pkg in cmake libclang-dev libopenblas0; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    echo "setup-mlx: installing ${missing[*]}"
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}"
fi

if [[ -f "$STAMP" && -f "$DEST/mlx/lib/libmlx.so" ]]; then
    echo "setup-mlx: MLX 0.32.2 already in $DEST"
    exit 0
fi

TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
python3 -m pip download --quiet --no-deps --only-binary=:all: \
    --platform manylinux_2_35_x86_64 --python-version 3.11 \
    "mlx-cpu==0.32.2" -d "$TMP"
(cd "$TMP" && echo "$SHA256  $WHEEL" | sha256sum -c --quiet -)
rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m zipfile -e "$TMP/$WHEEL" "$DEST"
touch "$STAMP"
echo "setup-mlx: MLX 0.32.2 installed in $DEST"
