#!/usr/bin/env bash
# Loopback benchmark of a non-streaming chat completion on a hot model (fake backend), with wrk.
# Prints wrk's latency distribution for 1 connection (per-request latency: the server's overhead
# plus loopback TCP) and for 32 connections (throughput), then the server's own request-time
# histogram from /metrics (handler start to response built, no network).
# Usage: scripts/bench-server.sh [seconds per run, default 10]
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
secs="${1:-10}"
cd "$repo"
command -v wrk >/dev/null || "$repo/scripts/setup-server.sh"
cargo build -q --release --bin modelpool
bin="${CARGO_TARGET_DIR:-$repo/target}/release/modelpool"
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
out="$(mktemp -t modelpool-bench.XXXXXX)"
"$bin" serve --listen "127.0.0.1:$port" --fake-load-time 0s --preload qwen2.5-0.5b-instruct \
    >"$out" 2>"$out.log" &
pid=$!
trap 'kill $pid 2>/dev/null || true; rm -f "$out" "$out.log" "$out.lua"' EXIT
for _ in $(seq 1 100); do grep -q "listening on" "$out" && break; sleep 0.1; done

cat >"$out.lua" <<'LUA'
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"qwen2.5-0.5b-instruct","messages":[{"role":"user","content":"Say hello"}],"max_tokens":16}'
LUA
url="http://127.0.0.1:$port/v1/chat/completions"
curl -sf -X POST "$url" -H 'content-type: application/json' \
    -d '{"model":"qwen2.5-0.5b-instruct","messages":[{"role":"user","content":"hi"}]}' >/dev/null

# getconf works on Linux and macOS; the load average is in /proc on Linux, in sysctl on macOS.
load="$(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || sysctl -n vm.loadavg 2>/dev/null || echo unknown)"
echo "== $(getconf _NPROCESSORS_ONLN) cores, load average: $load"
echo "== wrk -t1 -c1 -d${secs}s --latency (one client: per-request latency)"
wrk -t1 -c1 -d"${secs}s" --latency -s "$out.lua" "$url" | sed -n '/Latency/,/Transfer/p'
echo "== wrk -t2 -c32 -d${secs}s --latency (32 clients: throughput)"
wrk -t2 -c32 -d"${secs}s" --latency -s "$out.lua" "$url" | sed -n '/Latency/,/Transfer/p'
echo "== server-side request time (modelpool_request_duration_seconds, chat_completions)"
curl -s "http://127.0.0.1:$port/metrics" | awk '
  /^modelpool_request_duration_seconds_bucket\{route="chat_completions"/ {
    match($0, /le="[^"]+"/); le = substr($0, RSTART + 4, RLENGTH - 5); n[le] = $2; order[++k] = le }
  /^modelpool_request_duration_seconds_count\{route="chat_completions"/ { total = $2 }
  END { for (i = 1; i <= 6; i++) printf "  <= %-8s %6.2f%%\n", order[i] "s", 100 * n[order[i]] / total; printf "  requests: %d\n", total }'
curl -s "http://127.0.0.1:$port/metrics" | grep '^modelpool_http_responses_total{route="chat_completions"' | sed 's/^/  /'
