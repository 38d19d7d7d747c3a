#!/usr/bin/env bash
# Installs what the server's end-to-end test and benchmark need. Idempotent; quick when done.
#   - wrk (Debian package): load generator for scripts/bench-server.sh
#   - a Python venv with the official `openai` client: tests/e2e/test_openai.py
# Usage: scripts/setup-server.sh            (venv at target/e2e-venv, or $MODELPOOL_E2E_VENV)
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MODELPOOL_E2E_VENV:-$repo/target/e2e-venv}"

if ! command -v wrk >/dev/null 2>&1; then
    SUDO=""
    [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk >/dev/null
fi

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c 'import openai' >/dev/null 2>&1; then
    "$venv/bin/pip" install -q --disable-pip-version-check 'openai>=1.40,<3'
fi
echo "setup-server: wrk $(command -v wrk), openai $("$venv/bin/python" -c 'import openai; print(openai.__version__)') in $venv"
