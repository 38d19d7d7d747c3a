//! Link settings for the `mlx` feature on Linux (docs/mlx.md). Without the feature, or on other
//! systems (macOS links MLX statically through mlx-sys), this does nothing.
//!
//! - `libmlx.so` comes from the `mlx-cpu` wheel in `vendor/mlx-cpu` (`scripts/setup-mlx.sh`):
//!   add it to the link search path and as an rpath, so binaries and tests run without
//!   `LD_LIBRARY_PATH` (the rpath is absolute: binaries point into this checkout). The directory
//!   is also published as `links` metadata (`DEP_MODELPOOL_MLX_LIB_DIR`) for packages that
//!   depend on this one, whose binaries need the same rpath (sim/build.rs).
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
    // Own binaries, tests and benches: an rpath into the checkout, and OpenBLAS as a direct
    // dependency whether or not anything references it.
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", dir.display());
    println!("cargo:rustc-link-arg=-Wl,--push-state,--no-as-needed,-l:libopenblas.so.0,--pop-state");
    // Link args do not propagate to other packages, but `links` metadata does: every package
    // that depends on this one directly and has a build script sees the directory as
    // `DEP_MODELPOOL_MLX_LIB_DIR` (Cargo.toml: `links = "modelpool"`). sim/build.rs turns it
    // into the same rpath, so a workspace build's `modelpool-sim` (which links libmlx.so
    // through feature unification) starts without `LD_LIBRARY_PATH`.
    println!("cargo::metadata=mlx_lib_dir={}", dir.display());
    // Other packages that link this crate with the feature (link args do not propagate):
    // OpenBLAS through a propagating link-lib (kept because src/backend/mlx/sys.rs references
    // cblas_sgemv), and libmlx.so through a link-search path inside the target directory,
    // which cargo puts on LD_LIBRARY_PATH for `cargo run`/`cargo test`. The wheel is linked
    // as a whole so that libmlx.so's own rpath ($ORIGIN/../../mlx_cpu.libs) still resolves.
    println!("cargo:rustc-link-lib=dylib:+verbatim=libopenblas.so.0");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let link = out.join("mlx-cpu");
    let wheel = dir.join("../..");
    let _ = std::fs::remove_file(&link);
    #[cfg(unix)]
    if std::os::unix::fs::symlink(&wheel, &link).is_ok() {
        println!("cargo:rustc-link-search=native={}", link.join("mlx/lib").display());
    }
}
