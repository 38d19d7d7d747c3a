#!/usr/bin/env bash
# Installs what the `mlx` cargo feature needs (see docs/mlx.md's platform table):
# - Linux x86_64: system packages cmake (mlx-c build), libclang-dev (bindgen), libopenblas0
#   (fast BLAS), through apt-get on Debian/Ubuntu (elsewhere it names them and stops); and
#   MLX 0.32.2 itself, from the PyPI wheel `mlx-cpu==0.32.2` (libmlx.so + headers + CMake
#   config), unpacked into vendor/mlx-cpu/ inside the checkout. mlx-c 0.7.0 (vendored in
#   mlx-sys 0.7.0) pins MLX 0.32.2 exactly; other versions fail to compile.
# - macOS on Apple silicon: nothing to install here (mlx-rs fetches and builds MLX with Metal
#   during `cargo build`, which needs network); checks for cmake and the Metal compiler and says
#   how to install what is missing.
# - anything else: says that the feature is not available (build with --no-default-features).
# Idempotent: a second run only checks the stamp file and exits.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh"
DEST="$ROOT/vendor/mlx-cpu"
WHEEL="mlx_cpu-0.32.2-py3-none-manylinux_2_35_x86_64.whl"
SHA256="fc5d31b90fc4f457b2f9614ed45651a567d22a6a11a03d114a90a4e10bdd8878"
STAMP="$DEST/.installed-$SHA256"

case "$(uname -s)/$(uname -m)" in
Linux/x86_64) ;;
Darwin/arm64)
    missing=0
    if ! command -v cmake >/dev/null 2>&1; then
        echo "setup-mlx: cmake is missing (mlx-sys builds mlx-c and MLX with it): brew install cmake" >&2
        missing=1
    fi
    if ! xcrun -sdk macosx --find metal >/dev/null 2>&1; then
        echo "setup-mlx: the Metal compiler is missing (MLX builds its Metal kernels): install full" \
            "Xcode, not only the Command Line Tools, select it with" \
            "'sudo xcode-select -s /Applications/Xcode.app', and on Xcode 26 or later run" \
            "'xcodebuild -downloadComponent MetalToolchain'" >&2
        missing=1
    fi
    if ((missing)); then
        echo "setup-mlx: install the above, or build without MLX: cargo build --no-default-features" >&2
        exit 1
    fi
    echo "setup-mlx: macOS: cmake and Metal found; mlx-rs builds MLX during cargo build (needs network)"
    exit 0
    ;;
*)
    echo "setup-mlx: the mlx feature builds on Linux x86_64 and macOS on Apple silicon only, not on" \
        "$(uname -s)/$(uname -m): build with --no-default-features (fake backend)" >&2
    exit 0
    ;;
esac

# System packages (skipped when already present).
if is_debian; then
    apt_install setup-mlx cmake libclang-dev libopenblas0
else
    libs="$({ ldconfig -p || /sbin/ldconfig -p; } 2>/dev/null || true)"
    missing=""
    command -v cmake >/dev/null 2>&1 || missing="$missing cmake;"
    grep -q 'libclang' <<<"$libs" || missing="$missing libclang (e.g. clang-devel or libclang-dev);"
    grep -q 'libopenblas\.so\.0' <<<"$libs" || missing="$missing OpenBLAS (libopenblas.so.0);"
    if [[ -n "$missing" ]]; then
        echo "setup-mlx: not Debian/Ubuntu, so nothing is installed here: install with your package" \
            "manager:${missing%;}; then run this again" >&2
        exit 1
    fi
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
(cd "$TMP" && sha256_check <<<"$SHA256  $WHEEL")
rm -rf "$DEST"
mkdir -p "$DEST"
python3 -m zipfile -e "$TMP/$WHEEL" "$DEST"
touch "$STAMP"
echo "setup-mlx: MLX 0.32.2 installed in $DEST"
