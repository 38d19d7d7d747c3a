#!/usr/bin/env bash
# bash, not sh: dash drops environment variables whose names are not shell identifiers, such as
# cargo's CARGO_BIN_EXE_<name-with-dashes>, which integration tests need at compile time.
# cargo rustc-wrapper (set in .cargo/config.toml). A no-op pass-through for every crate except
# `mlx_sys` on Linux, whose build script prints macOS link directives and expects static MLX:
#   drop  -l framework=*, -l dylib=objc, -l static=gguflib, -l static=jaccl  (macOS-only, or
#         already inside libmlx.so);
#   map   -l c++ -> -l stdc++, and -l static=mlx -> -l dylib=mlx (libmlx.so from vendor/mlx-cpu,
#         moved after mlxc so the linker sees mlxc's references first).
# A RUSTC_WRAPPER environment variable (e.g. sccache) replaces this wrapper, and build.rs then
# stops the build with a message. To keep both, chain them: with
# RUSTC_WRAPPER=<checkout>/tools/mlx/rustc-wrapper.sh MODELPOOL_RUSTC_WRAPPER=sccache, every
# rustc call, rewritten or not, runs through sccache.
chain="${MODELPOOL_RUSTC_WRAPPER:-}"
case " $* " in
*" --crate-name mlx_sys "*) ;;
*) exec ${chain:+"$chain"} "$@" ;;
esac
[ "$(uname -s)" = Linux ] || exec ${chain:+"$chain"} "$@"

rustc="$1"
shift
mlx=""
n=$#
i=0
while [ "$i" -lt "$n" ]; do
    a="$1"
    shift
    i=$((i + 1))
    if [ "$a" = "-l" ] && [ "$i" -lt "$n" ]; then
        lib="$1"
        shift
        i=$((i + 1))
        case "$lib" in
        framework=* | dylib=objc | objc | static=gguflib | static=jaccl) ;;
        c++ | dylib=c++) set -- "$@" -l stdc++ ;;
        static=mlx) mlx=1 ;;
        *) set -- "$@" -l "$lib" ;;
        esac
    else
        set -- "$@" "$a"
    fi
done
[ -n "$mlx" ] && set -- "$@" -l dylib=mlx
exec ${chain:+"$chain"} "$rustc" "$@"
