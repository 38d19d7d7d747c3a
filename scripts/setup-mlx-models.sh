#!/usr/bin/env bash
# Builds the MLX-format test models (Hugging Face / mlx-community directories made from the
# SmolLM2 GGUF by mlx-lm's own converter, plus tiny random-weight checkpoints of other families)
# into <models>/mlx with scripts/make-mlx-models.py, in a venv with pinned mlx-lm, mlx-cpu,
# transformers and gguf (target/mlx-venv, or $MODELPOOL_MLX_VENV). Needs the GGUF from
# scripts/fetch-models.sh. Idempotent: skipped when the stamp matches the script's hash.
# Usage: scripts/setup-mlx-models.sh [MODELS_DIR]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
MODELS="${1:-${MODELPOOL_MODELS_DIR:-$ROOT/models}}"
venv="${MODELPOOL_MLX_VENV:-$ROOT/target/mlx-venv}"
pins=(mlx==0.32.4 mlx-cpu==0.32.4 mlx-lm==0.32.2 transformers==5.24.0 gguf==0.19.0)

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import mlx_lm, gguf, transformers' >/dev/null 2>&1; then
    "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
fi
stamp="$MODELS/mlx/.stamp"
want="$(cat "$ROOT/scripts/make-mlx-models.py" | cksum)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
    echo "setup-mlx-models: ok ($MODELS/mlx)"
    exit 0
fi
echo "setup-mlx-models: building into $MODELS/mlx (about a minute)"
"$venv/bin/python" "$ROOT/scripts/make-mlx-models.py" "$MODELS"
echo "$want" >"$stamp"
echo "setup-mlx-models: ready ($MODELS/mlx)"
