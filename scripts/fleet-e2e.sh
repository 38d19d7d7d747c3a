#!/usr/bin/env bash
# Several modelpool nodes behind LiteLLM, end to end on loopback (issue 18; docs/server.md,
# "Behind a router"). For each of two routings, at the same time and on separate processes:
#   - `modelpool` (tools/litellm/modelpool_routing.py: residency-aware), and
#   - LiteLLM's default `simple-shuffle`, for contrast,
# it starts 5 fake-backend `modelpool serve` nodes and a LiteLLM proxy (pinned by
# scripts/setup-fleet.sh) in front of them, then
#   1. drives traces/fleet-e2e.csv (8 models, 21.7 GB of weights) through the proxy with
#      `modelpool-sim drive` against nodes 1-3 (7 GB each: they must evict), and meanwhile
#   2. the failover experiment of ../shared/FLEET.md: 124 requests (one every 0.25 s) for a
#      model on node 4 (healthy) and node 5 (its only slot pinned by another model: a 503 for
#      every request; listed first, so that only residency keeps requests away from it),
#      counting the 503s that reach the client and the requests node 5 refused. LiteLLM's cooldown is 1 s here
#      (FLEET.md's case: the node said `Retry-After: 1`, so LiteLLM re-probed it every second).
# Afterwards it reads every node's /admin/pool and writes target/fleet-e2e/<routing>/observed.json
# (per node and total: hits, loads, evictions, 503s the nodes sent; the client-visible statuses;
# the failover counts) and target/fleet-e2e/observed.json (both). About a minute.
#
# Fails when a node or a proxy fails, when drive fails, when a key appears in a log, or, with
# the modelpool routing: when a client saw a 503 although some node could have served the
# request (every trace request fits a node; the failover model fits node 4), when node 5 got a
# failover request at all (its residency says `reject`), or when it did not load less often than
# LiteLLM's default.
#
#   scripts/fleet-e2e.sh                 # builds the debug binaries first (as fidelity.sh does)
#   MODELPOOL_BIN_DIR=target/release scripts/fleet-e2e.sh     # prebuilt binaries, no build
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo"
# shellcheck source=scripts/lib.sh
source "$repo/scripts/lib.sh"

# The debug binaries, built as scripts/fidelity.sh builds them (they reuse what `cargo test`
# compiled; a cold release build takes many minutes on 2 cores), unless MODELPOOL_BIN_DIR names
# a directory holding prebuilt `modelpool` and `modelpool-sim`.
if [[ -n "${MODELPOOL_BIN_DIR:-}" ]]; then
    bin="$MODELPOOL_BIN_DIR"
else
    cargo build -q -p modelpool-sim --bin modelpool-sim
    cargo build -q --bin modelpool
    bin="${CARGO_TARGET_DIR:-$repo/target}/debug"
fi
for b in modelpool modelpool-sim; do
    [[ -x "$bin/$b" ]] || { echo "fleet-e2e: $bin/$b is missing" >&2; exit 1; }
done
scripts/setup-fleet.sh >/dev/null
venv="${MODELPOOL_FLEET_VENV:-$repo/target/fleet-venv}"
py="$venv/bin/python"
helper="$repo/tools/litellm/fleet_e2e.py"
trace="$repo/traces/fleet-e2e.csv"
out="$repo/target/fleet-e2e"
rm -rf "$out"
mkdir -p "$out"
# The routing rule and the strategy's bookkeeping first (no nodes needed).
"$py" tests/fleet/test_routing.py >"$out/routing-tests.txt" 2>&1 ||
    { cat "$out/routing-tests.txt" >&2; echo "fleet-e2e: tests/fleet/test_routing.py failed" >&2; exit 1; }
tail -1 "$out/routing-tests.txt"
# The simulator's placement as a LiteLLM config (docs/fleet.md): LiteLLM must accept it, with the
# strategy installed, one deployment per (model, node) the placement chose.
"$bin/modelpool-sim" fleet "$trace" --nodes 3 --node-memory 7000000000B --max-models 4 --router placement \
    --emit-litellm-config "$out/placement.yaml" --node-urls http://127.0.0.1:1,http://127.0.0.1:2,http://127.0.0.1:3 \
    --json >"$out/placement.json"
PYTHONPATH="$repo/tools/litellm" HF_HUB_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True MODELPOOL_API_KEY=unused \
    "$py" - "$out/placement.yaml" "$out/placement.json" <<'PLACEMENT'
import json, sys
import yaml
from litellm import Router
import modelpool_routing
cfg = yaml.safe_load(open(sys.argv[1]))
placement = json.load(open(sys.argv[2]))["placement"]
settings = {k: v for k, v in cfg["router_settings"].items() if k != "retry_after"}
router = Router(model_list=cfg["model_list"], **settings)
modelpool_routing.install(router)
want = sum(len(nodes) for _, nodes in placement)
assert len(router.model_list) == want, (len(router.model_list), want)
assert cfg["litellm_settings"]["callbacks"] == ["modelpool_routing.proxy_handler"]
assert cfg["general_settings"]["background_health_checks"] is False
print(f"placement config: {want} deployments of {len(placement)} models accepted by LiteLLM")
PLACEMENT

# Node settings: the simulator's server-config gives the models and sizes; the fake timings are
# the same numbers as flags (loads 0.1 s + 20 GB/s, 2 ms a token).
limit_bytes=7000000000
timing=(--load-latency 0.1 --load-bandwidth 20GB --decode-ms 2)
fake=(--fake-load-time 100ms --fake-load-bandwidth 20GB --fake-token-delay 2ms)
"$bin/modelpool-sim" server-config "$trace" --memory-limit "${limit_bytes}B" --max-models 4 \
    "${timing[@]}" --queue-timeout 30 -o "$out/node.toml"
# Failover nodes: a 0.5 GB model everybody asks for, and a blocker pinned on node 5.
cat >"$out/failover.toml" <<'EOF'
backend = "fake"
memory_limit = "2000000000B"
max_models = 1

[[models]]
id = "failover-model"
type = "text-gen"
size = "500000000B"

[[models]]
id = "blocker-model"
type = "text-gen"
size = "500000000B"
EOF

# Keys: fresh each run, only in the environment (never on a command line or in a log).
key() { "$py" -c 'import secrets; print(secrets.token_hex(16))'; }
MODELPOOL_ADMIN_KEY="$(key)"
MODELPOOL_API_KEY="$(key)"
LITELLM_MASTER_KEY="sk-$(key)"
export MODELPOOL_ADMIN_KEY MODELPOOL_API_KEY LITELLM_MASTER_KEY
export HF_HUB_OFFLINE=1 LITELLM_LOCAL_MODEL_COST_MAP=True NO_PROXY=127.0.0.1,localhost
unset http_proxy https_proxy HTTP_PROXY HTTPS_PROXY

pids="$out/pids"
: >"$pids"
runs=()
cleanup() {
    local pid
    # The two runs first (so that they start nothing more), then what they started.
    for pid in "${runs[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${runs[@]}"; do wait "$pid" 2>/dev/null || true; done
    while read -r pid; do kill "$pid" 2>/dev/null || true; done <"$pids"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() { "$py" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

# start_node DIR NAME CONFIG FLAG...: starts a node, prints its URL.
start_node() {
    local dir="$1" name="$2" config="$3"
    shift 3
    "$bin/modelpool" serve --config "$config" --listen 127.0.0.1:0 --node-id "$name" --log-level warn \
        "$@" >"$dir/$name.out" 2>"$dir/$name.log" &
    echo $! >>"$pids"
    wait_listening $! "$dir/$name.out" "$dir/$name.log" >&2
    grep -o 'http://[0-9.:]*' "$dir/$name.out" | head -1
}

# run ROUTING: one whole run; everything it writes goes under $out/ROUTING.
run() {
    local routing="$1" dir="$out/$1" n1 n2 n3 n4 n5 port proxy
    mkdir -p "$dir"
    n1="$(start_node "$dir" node-1 "$out/node.toml" "${fake[@]}")"
    n2="$(start_node "$dir" node-2 "$out/node.toml" "${fake[@]}")"
    n3="$(start_node "$dir" node-3 "$out/node.toml" "${fake[@]}")"
    n4="$(start_node "$dir" node-4 "$out/failover.toml" "${fake[@]}")"
    n5="$(start_node "$dir" node-5 "$out/failover.toml" "${fake[@]}")"
    # Node 5's only slot holds a pinned model: every failover-model request there is a 503
    # `max_models_reached` (x-should-retry: false), and its residency says `reject`.
    "$py" "$helper" admin "$n5" /admin/models/blocker-model/preload /admin/models/blocker-model/pin ||
        { echo "fleet-e2e[$routing]: could not pin node 5's blocker model" >&2; return 1; }

    port="$(free_port)"
    proxy="http://127.0.0.1:$port"
    "$py" "$helper" config "$dir/litellm.yaml" --trace "$trace" --nodes "$n1,$n2,$n3" \
        --failover-model failover-model --failover-nodes "$n5,$n4" --strategy "$routing" \
        --cooldown-time 1
    local t0=$SECONDS
    MODELPOOL_ROUTING_STATS="$dir/router.json" PYTHONPATH="$repo/tools/litellm" \
        "$venv/bin/litellm" --config "$dir/litellm.yaml" --host 127.0.0.1 --port "$port" \
        >"$dir/proxy.log" 2>&1 &
    local proxy_pid=$!
    echo "$proxy_pid" >>"$pids"
    local ok=""
    for _ in $(seq 1 600); do
        curl -sf "$proxy/health/liveliness" >/dev/null 2>&1 && { ok=1; break; }
        kill -0 "$proxy_pid" 2>/dev/null || break
        sleep 0.1
    done
    [[ -n "$ok" ]] || { echo "fleet-e2e[$routing]: the LiteLLM proxy did not start:" >&2; tail -20 "$dir/proxy.log" >&2; return 1; }
    echo "fleet-e2e[$routing]: proxy up in $((SECONDS - t0)) s"

    "$py" "$helper" failover --url "$proxy" --model failover-model --requests 124 \
        --out "$dir/failover.json" >"$dir/failover.log" 2>&1 &
    local fo=$!
    # drive's key through its environment, not its command line; --no-admin: the proxy has no
    # admin API (the nodes' counters are read from the nodes by the summary).
    MODELPOOL_API_KEY="$LITELLM_MASTER_KEY" \
        "$bin/modelpool-sim" drive "$trace" --url "$proxy" --no-admin --records "$dir/records.jsonl" \
        >"$dir/drive.txt" 2>&1 ||
        { echo "fleet-e2e[$routing]: drive failed:" >&2; cat "$dir/drive.txt" >&2; return 1; }
    wait "$fo" || { echo "fleet-e2e[$routing]: the failover probe failed:" >&2; cat "$dir/failover.log" >&2; return 1; }
    kill -0 "$proxy_pid" 2>/dev/null || { echo "fleet-e2e[$routing]: the proxy died" >&2; return 1; }
    "$py" "$helper" summary --records "$dir/records.jsonl" --nodes "$n1,$n2,$n3" --trace "$trace" \
        --limit "$limit_bytes" --strategy "$routing" --failover "$dir/failover.json" \
        --routing-stats "$dir/router.json" --failover-bad-node "$n5" --out "$dir/observed.json"
    # The fleet simulator's prediction for the same trace, nodes and router (reported, not yet
    # required to agree; needs a modelpool-sim with `fleet`).
    local sim_router=residency
    [[ "$routing" == modelpool ]] || sim_router=random
    # An ensemble over 5 seeds of arrival jitter: a fleet behind a residency router is sensitive
    # to when requests reach the nodes (docs/fleet.md). The jitter is calibrated on this run: the
    # proxy's median added time per request (response time less the node's wait and the
    # modelled service), as a uniform delay of twice that (the same mean).
    local jitter seed
    jitter="$("$py" - "$dir/records.jsonl" "$trace" <<'JITTER'
import json, sys
recs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
shape = []
for line in open(sys.argv[2]):
    if line.startswith("#") or line.startswith("time"):
        continue
    cells = line.rstrip("\n").split(",")
    shape.append((int(cells[5] or 0), int(cells[6] or 0)))
over = sorted(r["total_secs"] - (r["wait_ms"] or 0) / 1000 - (shape[r["op"]][0] * 0.0002 + shape[r["op"]][1] * 0.002)
              for r in recs if r.get("status") == 200)
print(f"{2000 * over[len(over) // 2]:.0f}" if over else "0")
JITTER
)"
    echo "$jitter" >"$dir/jitter-ms"
    for seed in 1 2 3 4 5; do
        "$bin/modelpool-sim" fleet "$trace" --nodes 3 --node-memory "${limit_bytes}B" --max-models 4 \
            "${timing[@]}" --queue-timeout 30 --router "$sim_router" --client-retries 2 \
            --allowed-fails 3 --cooldown 1 --view-ttl 1 --arrival-jitter-ms "$jitter" --seed "$seed" \
            --search-passes 0 --json >"$dir/predicted-$seed.json"
    done
}

start=$SECONDS
run modelpool >"$out/modelpool.txt" 2>&1 &
ours=$!
run simple-shuffle >"$out/simple-shuffle.txt" 2>&1 &
theirs=$!
runs=("$ours" "$theirs")
status=0
wait "$ours" || status=1
wait "$theirs" || status=1
cat "$out/modelpool.txt" "$out/simple-shuffle.txt"
[[ "$status" == 0 ]] || { echo "fleet-e2e: a run failed (logs in $out)" >&2; exit 1; }

# No key in any log.
for k in "$MODELPOOL_ADMIN_KEY" "$MODELPOOL_API_KEY" "$LITELLM_MASTER_KEY"; do
    if grep -rlF -e "$k" "$out" >/dev/null; then
        echo "fleet-e2e: a key appears in a log under $out" >&2
        exit 1
    fi
done

"$py" - "$out" "$((SECONDS - start))" <<'EOF'
import json, sys
out, wall = sys.argv[1], int(sys.argv[2])
runs = {r: json.load(open(f"{out}/{r}/observed.json")) for r in ("modelpool", "simple-shuffle")}
json.dump({"wall_secs": wall, **runs}, open(f"{out}/observed.json", "w"), indent=1)
print(f"{'routing':28} {'hits':>5} {'loads':>5} {'evict':>5} {'node 503':>8} {'client':>22} {'failover 503':>12}")
for name, r in runs.items():
    t = r["total"]
    print(f"{name:28} {t['hits']:>5} {t['loads']:>5} {t['evictions']:>5} {t['rejections_503']:>8} "
          f"{json.dumps(r['client_statuses'], sort_keys=True):>22} "
          f"{r['failover']['statuses'].get('503', 0):>5} of {r['failover']['requests']}")
for name in runs:
    preds = []
    for seed in range(1, 6):
        try:
            preds.append(json.load(open(f"{out}/{name}/predicted-{seed}.json"))["routers"][0])
        except (OSError, KeyError, IndexError, ValueError):
            pass
    if not preds:
        continue
    # The nodes' hits are their engines' counters (stats.hits): the simulator's engine_hits.
    keys = ("engine_hits", "loads", "node_refusals", "client_failed")
    stats = {k: (sum(p[k] for p in preds) / len(preds), min(p[k] for p in preds), max(p[k] for p in preds)) for k in keys}
    runs[name]["predicted"] = {"router": preds[0]["router"], "seeds": len(preds),
                               **{k: {"mean": m, "min": lo, "max": hi} for k, (m, lo, hi) in stats.items()}}
    rng = lambda k: f"{stats[k][0]:.0f} [{stats[k][1]}-{stats[k][2]}]"
    print(f"{name + ' (sim ' + preds[0]['router'] + ')':28} hits {rng('engine_hits')}, loads {rng('loads')}, "
          f"node 503 {rng('node_refusals')}, failed {rng('client_failed')} (mean [min-max], {len(preds)} seeds, "
          f"jitter {open(f'{out}/{name}/jitter-ms').read().strip()} ms)")
json.dump({"wall_secs": wall, **runs}, open(f"{out}/observed.json", "w"), indent=1)
print(f"fleet-e2e: {wall} s; {out}/observed.json")
failures = list(runs["modelpool"]["failures"])
ours, theirs = runs["modelpool"]["total"], runs["simple-shuffle"]["total"]
if ours["loads"] >= theirs["loads"]:
    failures.append(f"residency-aware routing loaded {ours['loads']} times, LiteLLM's default {theirs['loads']}")
for f in failures:
    print(f"fleet-e2e: FAIL (modelpool routing): {f}", file=sys.stderr)
sys.exit(1 if failures else 0)
EOF
