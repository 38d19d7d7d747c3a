//! Link settings for the `mlx` feature on Linux (docs/mlx.md). Without the feature, or on other
//! systems (macOS links MLX statically through mlx-sys), this does nothing.
//!
//! - `libmlx.so` comes from the `mlx-cpu` wheel in `vendor/mlx-cpu` (`scripts/setup-mlx.sh`):
//!   add it to the link search path and as an rpath, so binaries and tests run without
//!   `LD_LIBRARY_PATH` (the rpath is absolute: binaries point into this checkout).
//! - The wheel bundles the netlib reference BLAS (about 5 GFLOP/s on a 1024^3 sgemm here, against
//!   about 170 with OpenBLAS). Linking the system OpenBLAS as a direct dependency of the binary,
//!   ahead of libmlx.so's own dependencies, makes MLX's `cblas_sgemm` calls resolve to OpenBLAS.

use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=MODELPOOL_MLX_LIB_DIR");
    println!("cargo:rerun-if-changed=build.rs");
    let mlx = env::var_os("CARGO_FEATURE_MLX").is_some();
    let linux = env::var("CARGO_CFG_TARGET_OS").as_deref() == Ok("linux");
    if !(mlx && linux) {
        return;
    }
    let dir = env::var_os("MODELPOOL_MLX_LIB_DIR").map(PathBuf::from).unwrap_or_else(|| {
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets this"))
            .join("vendor/mlx-cpu/mlx/lib")
    });
    if !dir.join("libmlx.so").is_file() {
        panic!("feature `mlx`: {} has no libmlx.so; run scripts/setup-mlx.sh first", dir.display());
    }
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-l:libopenblas.so.0,--pop-state");
}
