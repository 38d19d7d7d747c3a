#!/usr/bin/env bash
# Installs what the server's end-to-end test and benchmark need. Idempotent; quick when done.
#   - wrk (Debian package; elsewhere it says how to install it): load generator for
#     scripts/bench-server.sh
#   - a Python venv with the official `openai` client: tests/e2e/test_openai.py
# Usage: scripts/setup-server.sh            (venv at target/e2e-venv, or $MODELPOOL_E2E_VENV)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MODELPOOL_E2E_VENV:-$repo/target/e2e-venv}"

# shellcheck source=scripts/lib.sh
source "$repo/scripts/lib.sh"

if ! command -v wrk >/dev/null 2>&1; then
    if is_debian; then
        apt_install setup-server wrk
    else
        # Only scripts/bench-server.sh needs it: say so and go on.
        how="your package manager's wrk package"
        [[ "$(uname -s)" == Darwin ]] && how="brew install wrk"
        echo "setup-server: wrk is not installed (scripts/bench-server.sh needs it): $how" >&2
    fi
fi

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import openai' >/dev/null 2>&1; then
    "$venv/bin/pip" install -q --disable-pip-version-check 'openai>=1.40,<3'
fi
wrk="$(command -v wrk || true)"
echo "setup-server: wrk ${wrk:-missing}, openai $("$venv/bin/python" -c 'import openai; print(openai.__version__)') in $venv"
