#!/usr/bin/env bash
# Continuous batching through the HTTP server (issue 9, docs/mlx.md): serves SmolLM2-135M with
# the MLX backend (release build, `--max-parallel 16`) on a free loopback port, then
# tools/bench/batch_streams.py (the official `openai` client) runs 1, 2, 4, 8 and 16 concurrent
# streams of 128 tokens and prints aggregate tokens/s against the 1-stream row of the same run
# and per-stream inter-token gaps. Then the backend's own single-stream rate without HTTP
# (`cargo bench --bench mlx_decode -- concurrent`, its first row), for the server-overhead ratio.
# Usage: scripts/bench-batch.sh [streams, default 1,2,4,8,16]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
streams="${1:-1,2,4,8,16}"
venv="$repo/target/e2e-venv"
[ -x "$venv/bin/python" ] || scripts/setup-server.sh
cargo build -q --release --bin modelpool
bin="${CARGO_TARGET_DIR:-$repo/target}/release/modelpool"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
log="$(mktemp -t modelpool-batch.XXXXXX)"
"$bin" serve --backend mlx --models-dir models --listen "127.0.0.1:$port" --max-parallel 16 \
    --preload smollm2-135m-instruct >"$log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$log"' EXIT
for _ in $(seq 1 600); do
    curl -sf "http://127.0.0.1:$port/v1/models" 2>/dev/null | grep -q smollm2 && break
    sleep 0.2
done
load="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || sysctl -n vm.loadavg 2>/dev/null || echo unknown)"
echo "== $(getconf _NPROCESSORS_ONLN) cores, load average: $load; server: --max-parallel 16"
"$venv/bin/python" tools/bench/batch_streams.py --base-url "http://127.0.0.1:$port/v1" \
    --model smollm2-135m-instruct --streams "$streams"
kill $pid 2>/dev/null || true
echo "== the backend alone, one stream (generate, no HTTP)"
MODELPOOL_BENCH_STREAMS=1 cargo bench -q --features mlx --bench mlx_decode -- concurrent 2>/dev/null | grep -E '^\| (concurrent|1) '
