#!/usr/bin/env bash
# Builds modelpool's two binaries the ways a user would and starts each one (`--help`) without
# LD_LIBRARY_PATH, so that a binary which cannot find its shared libraries fails here (issue 13:
# Cargo unifies features across a workspace build, so `cargo build --workspace` links libmlx.so
# into modelpool-sim too, and sim/build.rs must give it the run path).
#
#   cargo build --workspace             modelpool and modelpool-sim, both linking MLX
#   cargo build -p modelpool-sim        modelpool-sim alone, without MLX
#   cargo run -p modelpool / -p modelpool-sim
#   cargo install --path . / --path sim into a temporary root, then run from there
#
# Usage: scripts/check-binaries.sh [--release]
# Debug by default: what breaks is feature unification and run paths, which do not depend on the
# profile, and the debug builds reuse what `cargo test` compiled (a cold release build of the
# workspace, mlx-sys included, takes many minutes on 2 cores). `--release` checks the release
# profile the same way (`cargo build --release`, `cargo install` without `--debug`).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Single words, expanded as ${x:+"$x"}: empty arrays trip `set -u` in macOS's bash 3.2.
profile=debug release="" install_debug="--debug"
case "${1:-}" in
"") ;;
--release) profile=release release="--release" install_debug="" ;;
*) echo "usage: $0 [--release]" >&2; exit 2 ;;
esac

# `cargo install` builds in a temporary directory unless told otherwise: point it at the
# workspace's target directory (wherever config or CARGO_TARGET_DIR puts it) to reuse artifacts.
target="$(cargo metadata --format-version 1 --no-deps |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')"
export CARGO_TARGET_DIR="$target"
root="$(mktemp -d -t modelpool-install.XXXXXX)"
trap 'rm -rf "$root"' EXIT

failed=0
# check WHAT BINARY: start BINARY with --help, without any library path from the environment.
check() {
    local what="$1" bin="$2" out
    if out="$(env -u LD_LIBRARY_PATH -u DYLD_LIBRARY_PATH "$bin" --help 2>&1)" &&
        grep -q '^Usage: ' <<<"$out"; then
        local mlx=""
        if [[ "$(uname -s)" == Linux ]] && ldd "$bin" 2>/dev/null | grep -q 'libmlx\.so'; then
            mlx=" (links libmlx.so)"
        fi
        echo "check-binaries: ok   $what: $(basename "$bin") --help$mlx"
    else
        echo "check-binaries: FAIL $what: $bin --help" >&2
        sed 's/^/    /' <<<"$out" >&2
        [[ "$(uname -s)" == Linux ]] && ldd "$bin" 2>&1 | grep 'not found' | sed 's/^/    /' >&2
        failed=1
    fi
}

# cargo run puts the target directory's link-search paths on LD_LIBRARY_PATH itself; start
# from a clean environment anyway so that only what cargo adds counts.
run() {
    local pkg="$1" out
    if out="$(env -u LD_LIBRARY_PATH -u DYLD_LIBRARY_PATH \
        cargo run -q ${release:+"$release"} -p "$pkg" -- --help 2>&1)" && grep -q '^Usage: ' <<<"$out"; then
        echo "check-binaries: ok   cargo run ${release:+$release }-p $pkg -- --help"
    else
        echo "check-binaries: FAIL cargo run ${release:+$release }-p $pkg -- --help" >&2
        sed 's/^/    /' <<<"$out" >&2
        failed=1
    fi
}

bins="$target/$profile"
echo "check-binaries: cargo build ${release:+$release }--workspace"
cargo build -q ${release:+"$release"} --workspace
check "cargo build ${release:+$release }--workspace" "$bins/modelpool"
check "cargo build ${release:+$release }--workspace" "$bins/modelpool-sim"

echo "check-binaries: cargo build ${release:+$release }-p modelpool-sim"
cargo build -q ${release:+"$release"} -p modelpool-sim
check "cargo build ${release:+$release }-p modelpool-sim" "$bins/modelpool-sim"

run modelpool
run modelpool-sim

for path in . sim; do
    echo "check-binaries: cargo install ${install_debug:+$install_debug }--locked --path $path --root <tmp>"
    cargo install -q ${install_debug:+"$install_debug"} --locked --path "$path" --root "$root" 2>&1 |
        { grep -v 'be sure to add' || true; }
done
check "cargo install ${install_debug:+$install_debug }--path ." "$root/bin/modelpool"
check "cargo install ${install_debug:+$install_debug }--path sim" "$root/bin/modelpool-sim"

if ((failed)); then
    echo "check-binaries: some binaries do not start (see above)" >&2
    exit 1
fi
echo "check-binaries: every binary starts ($profile)"
