#!/usr/bin/env bash
# The predictive policy's comparison table (docs/sim.md, issue 15): object and load-cost miss
# ratio and p99 added latency per policy on each trace, and each online policy's gap to
# belady-cost. Usage: scripts/predictive-table.sh SIM_BINARY [replay flags...] -- TRACE...
set -euo pipefail
sim=$1; shift
flags=()
while [[ $# -gt 0 && $1 != -- ]]; do flags+=("$1"); shift; done
shift
read -ra policies <<<"${POLICIES:-lru gdsf lfu predictive predictive+preload belady belady-cost}"
printf '| trace | policy | object miss | cost miss | p99 added (s) | cost gap to belady-cost | object vs lru |\n|---|---|---|---|---|---|---|\n'
for t in "$@"; do
  rows=""
  for p in "${policies[@]}"; do
    extra=()
    if [[ $p == predictive+preload ]]; then extra=(--predictive-preload); pol=predictive; else pol=$p; fi
    j=$("$sim" replay "$t" "${flags[@]}" --policy "$pol" "${extra[@]}" --json)
    rows+="$p $(jq -r '"\(.miss_ratio.object) \(.miss_ratio.cost) \(.added_latency.p99)"' <<<"$j")"$'\n'
  done
  awk -v t="$(basename "$t")" '
    NF { p[NR]=$1; o[NR]=$2; c[NR]=$3; l[NR]=$4; n=NR; if ($1=="belady-cost") bc=$3; if ($1=="lru") lo=$2 }
    END { for (i=1;i<=n;i++) {
      gap = (bc>0) ? sprintf("%+.1f%%", 100*(c[i]-bc)/bc) : "-";
      vs = (lo>0) ? sprintf("%+.1f%%", 100*(o[i]-lo)/lo) : "-";
      printf "| %s | %s | %.4f | %.4f | %.2f | %s | %s |\n", t, p[i], o[i], c[i], l[i], gap, vs } }' <<<"$rows"
done
