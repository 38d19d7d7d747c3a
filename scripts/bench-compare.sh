#!/usr/bin/env bash
# Runs the SmolLM2 decode/prefill comparison in one go (numbers in docs/mlx.md): the Rust MLX
# backend bench, the same graph from Python MLX (with the wheel's reference BLAS and with
# OpenBLAS preloaded), and llama.cpp on the same GGUF. Needs scripts/setup-mlx.sh,
# scripts/fetch-models.sh, and a .venv with mlx==0.32.2 mlx-cpu==0.32.2 numpy and
# llama-cpp-python==0.3.36 (see the two Python scripts for the one-off setup). Not part of CI.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ "$(uname -s)/$(uname -m)" != Linux/x86_64 ]]; then
    echo "bench-compare: Linux x86_64 only (it compares MLX's CPU backend from the mlx-cpu wheel," \
        "with and without OpenBLAS); elsewhere run: cargo bench --bench mlx_decode" >&2
    exit 1
fi
GGUF=$(ls models/smollm2-135m-instruct/*.gguf)
echo "## Rust (modelpool MLX backend)"
cargo bench --quiet --features mlx --bench mlx_decode
echo
echo "## Python MLX 0.32.2, wheel as shipped (bundled reference BLAS)"
.venv/bin/python scripts/bench-python-mlx.py "$GGUF"
echo
echo "## Python MLX 0.32.2, LD_PRELOAD=libopenblas.so.0"
LD_PRELOAD=/lib/x86_64-linux-gnu/libopenblas.so.0 .venv/bin/python scripts/bench-python-mlx.py "$GGUF"
echo
echo "## llama.cpp (llama-cpp-python 0.3.36, Q4_1 kernels, 2 threads)"
.venv/bin/python scripts/bench-llama-cpp.py "$GGUF"
