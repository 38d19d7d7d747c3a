#!/usr/bin/env bash
# Regenerates the committed vision-language fixtures (tests/fixtures/vlm/) with
# scripts/make-vlm-fixtures.py in a venv with pinned mlx-vlm, mlx, transformers
# (target/vlm-venv, or $MODELPOOL_VLM_VENV). Not part of setup or CI: the output is committed and
# a rerun rewrites the same bytes (check with `git status`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${MODELPOOL_VLM_VENV:-$ROOT/target/vlm-venv}"
pins=(mlx==0.32.4 mlx-cpu==0.32.4 mlx-vlm==0.7.10 transformers==5.24.0 numpy==2.4.6 pillow==13.0.0 tokenizers==0.23.3 safetensors==0.8.0)
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import mlx_vlm, transformers, PIL' >/dev/null 2>&1; then
    "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
fi
"$venv/bin/python" "$ROOT/scripts/make-vlm-fixtures.py"
