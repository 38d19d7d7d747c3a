#!/usr/bin/env bash
# The project's test command (README "Test"): sets up what the tests need on a fresh Debian/Ubuntu
# x86_64 machine (idempotent), then runs formatting and lint checks, every Rust test in the
# workspace, both binaries as each usual way of building them leaves them (check-binaries.sh),
# the end-to-end test with the official OpenAI Python client, and the fidelity check (a trace
# driven against a fake server decides exactly what the simulator predicts), and the fleet on
# loopback (three nodes and a LiteLLM proxy with modelpool's routing strategy).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings
echo "== cargo test"
cargo test --workspace
echo "== both binaries start, however they are built (scripts/check-binaries.sh)"
scripts/check-binaries.sh
echo "== end-to-end: official openai client against modelpool serve"
scripts/e2e-openai.sh
echo "== does the simulator predict the server? traces/fidelity.csv driven against modelpool serve (scripts/fidelity.sh)"
scripts/fidelity.sh
echo "== several nodes behind LiteLLM: traces/fleet-e2e.csv and the failover experiment (scripts/fleet-e2e.sh)"
scripts/fleet-e2e.sh
