#!/usr/bin/env bash
# Replay speed side by side with libCacheSim (issue 10; the table in docs/sim.md, Performance):
# generates the 10-million-request, 100-model trace, converts it to libCacheSim's oracleGeneral
# format (`modelpool-sim export-libcachesim`), and replays it with LRU and Belady at a cache of
# 25% of the working set (bytes of the distinct models) in libCacheSim (pip libcachesim==0.3.5)
# and in `modelpool-sim replay --instant` (same bytes, no model-count limit), in one run; prints
# miss ratios, M requests/s and the ratio. Not part of CI.
#
# Environment: REQUESTS (10000000), MODELS (100), SEED (7), REPEAT (5: fastest of N, each side),
# POLICIES (lru,belady), WORK (a scratch directory for the trace files, default
# ${TMPDIR:-/tmp}/modelpool-libcachesim), LCS_VENV (a venv with libcachesim; created there with
# pip on first use, default $WORK/venv).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REQUESTS=${REQUESTS:-10000000}
MODELS=${MODELS:-100}
SEED=${SEED:-7}
REPEAT=${REPEAT:-5}
POLICIES=${POLICIES:-lru,belady}
WORK=${WORK:-${TMPDIR:-/tmp}/modelpool-libcachesim}
LCS_VENV=${LCS_VENV:-$WORK/venv}
mkdir -p "$WORK"

if ! "$LCS_VENV/bin/python" -c 'import libcachesim' 2>/dev/null; then
    echo "libcachesim-compare: installing libcachesim==0.3.5 into $LCS_VENV" >&2
    python3 -m venv "$LCS_VENV"
    "$LCS_VENV/bin/pip" install -q libcachesim==0.3.5
fi

cargo build --release --quiet -p modelpool-sim
SIM="${CARGO_TARGET_DIR:-target}/release/modelpool-sim"
TRACE="$WORK/seed$SEED-$REQUESTS-$MODELS.csv"
"$SIM" gen --seed "$SEED" --requests "$REQUESTS" --models "$MODELS" --rate 50 -o "$TRACE"
"$SIM" export-libcachesim "$TRACE" -o "${TRACE%.csv}.oracleGeneral" >"${TRACE%.csv}.export.json"
echo "\$ modelpool-sim gen --seed $SEED --requests $REQUESTS --models $MODELS --rate 50 -o $TRACE"
echo "\$ modelpool-sim export-libcachesim $TRACE -o ${TRACE%.csv}.oracleGeneral"
cat "${TRACE%.csv}.export.json"
"$LCS_VENV/bin/python" scripts/libcachesim-compare.py --sim "$SIM" --trace "$TRACE" \
    --oracle "${TRACE%.csv}.oracleGeneral" --export "${TRACE%.csv}.export.json" \
    --policies "$POLICIES" --repeat "$REPEAT"
