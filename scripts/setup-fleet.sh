#!/usr/bin/env bash
# Installs what the fleet end-to-end test (scripts/fleet-e2e.sh) needs: a Python venv with the
# LiteLLM proxy at a pinned version, `tenacity` (LiteLLM's num_retries needs it and the proxy
# extras do not bring it) and the official `openai` client. Idempotent; quick when done (about
# 90 s on a fresh machine, PyPI only).
# Usage: scripts/setup-fleet.sh            (venv at target/fleet-venv, or $MODELPOOL_FLEET_VENV)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MODELPOOL_FLEET_VENV:-$repo/target/fleet-venv}"
pins=("litellm[proxy]==1.108.7" "tenacity==9.2.1" "openai==3.57.0")

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
# The installed versions must be the pinned ones (a venv left by an older pin is upgraded).
if ! "$venv/bin/python" - "${pins[@]}" >/dev/null 2>&1 <<'PY'; then
import sys
from importlib.metadata import version
for pin in sys.argv[1:]:
    name, want = pin.split("==")
    if version(name.split("[")[0]) != want:
        sys.exit(1)
for extra in ("fastapi", "uvicorn", "backoff", "PyYAML"):  # some of the proxy extras
    version(extra)
PY
    "$venv/bin/pip" install -q --disable-pip-version-check "${pins[@]}"
fi
echo "setup-fleet: $("$venv/bin/python" -c 'from importlib.metadata import version as v; print("litellm", v("litellm"), "tenacity", v("tenacity"), "openai", v("openai"))') in $venv"
