#!/usr/bin/env bash
# End-to-end test over a real socket with the official `openai` Python client.
# Builds `modelpool`, starts `modelpool serve` (fake backend) on a free port, runs
# tests/e2e/test_openai.py against it, stops the server with SIGTERM, then does the same with
# `--backend mlx` serving the tiny vision fixture for tests/e2e/test_vision.py (images in chat),
# and exits non-zero if any check failed or a server did not shut down cleanly. Needs scripts/setup-server.sh first.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
venv="${MODELPOOL_E2E_VENV:-$repo/target/e2e-venv}"
cd "$repo"
. "$repo/scripts/lib.sh"
[ -x "$venv/bin/python" ] || "$repo/scripts/setup-server.sh"

cargo build -q --bin modelpool
bin="${CARGO_TARGET_DIR:-$repo/target}/debug/modelpool"
log="$(mktemp -t modelpool-e2e.XXXXXX)"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"

# --queue-timeout 0s: the client-side tests check the immediate 503s (insufficient_memory with
# Retry-After) that the admission queue otherwise turns into waits; the queue is tested in
# tests/it (pool and HTTP routes). Keys: fresh random ones, given through the environment
# (not the command line, which other users can read); the client passes api_key=.
api_key="sk-e2e-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
admin_key="adm-e2e-$(python3 -c 'import secrets; print(secrets.token_hex(16))')"
MODELPOOL_API_KEY="$api_key" MODELPOOL_ADMIN_KEY="$admin_key" \
"$bin" serve --listen "127.0.0.1:$port" --memory-limit 6GB --fake-load-time 50ms \
    --fake-token-delay 100ms --queue-timeout 0s --log-level info >"$log.out" 2>"$log" &
pid=$!
cleanup() { kill "$pid" 2>/dev/null || true; }
trap cleanup EXIT

wait_listening "$pid" "$log.out" "$log"

status=0
MODELPOOL_URL="http://127.0.0.1:$port" MODELPOOL_E2E_API_KEY="$api_key" MODELPOOL_E2E_ADMIN_KEY="$admin_key" \
    "$venv/bin/python" tests/e2e/test_openai.py || status=$?
# The keys must never reach the log.
if grep -q -e "$api_key" -e "$admin_key" "$log"; then
    echo "an API key appears in the server log"; status=1
fi

kill -TERM "$pid"
if ! wait "$pid"; then
    echo "server did not exit cleanly after SIGTERM"; status=1
fi
trap - EXIT

# Images in chat through the MLX backend: the tiny Idefics3 and Qwen2-VL checkpoints of
# tests/fixtures/vlm (random weights, mlx-vlm's own classes) served as `smolvlm-tiny` and
# `qwen2-vl-tiny` (tests/e2e/test_vision.py).
vdir="$(mktemp -d -t modelpool-vlm.XXXXXX)"
ln -s "$repo/tests/fixtures/vlm/idefics3/model" "$vdir/smolvlm-tiny"
ln -s "$repo/tests/fixtures/vlm/qwen2_vl/model" "$vdir/qwen2-vl-tiny"
vport="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$bin" serve --backend mlx --models-dir "$vdir" --listen "127.0.0.1:$vport" --log-level info \
    >"$log.vout" 2>"$log.v" &
vpid=$!
trap 'kill "$vpid" 2>/dev/null || true' EXIT
wait_listening "$vpid" "$log.vout" "$log.v"
MODELPOOL_URL="http://127.0.0.1:$vport" "$venv/bin/python" tests/e2e/test_vision.py || status=$?
kill -TERM "$vpid"
if ! wait "$vpid"; then
    echo "vision server did not exit cleanly after SIGTERM"; status=1
fi
trap - EXIT
if [ "$status" -ne 0 ]; then
    echo "--- vision server log ($log.v) ---"; tail -n 30 "$log.v"
fi
rm -rf "$vdir" "$log.vout"
[ "$status" -eq 0 ] && rm -f "$log.v"
if [ "$status" -ne 0 ]; then
    echo "--- server log ($log) ---"; tail -n 50 "$log"
fi
rm -f "$log.out"
[ "$status" -eq 0 ] && rm -f "$log"
exit "$status"
