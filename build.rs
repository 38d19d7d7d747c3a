//! Link settings and environment checks for the `mlx` feature (docs/mlx.md). Without the
//! feature this does nothing.
//!
//! Platforms, stated once here and in docs/mlx.md's table: with `mlx`, the target
//! `x86_64-unknown-linux-gnu` builds with the glue in `.cargo/config.toml` and `tools/mlx/`,
//! and macOS on Apple silicon (`aarch64`) through mlx-rs's own Metal build (mlx-sys links MLX
//! statically; nothing to do here). Any other target stops with a message: build it with
//! `--no-default-features`.
//!
//! On Linux x86_64:
//! - The glue reaches mlx-sys's build script only through cargo (the rustc wrapper and the
//!   `[env]` table), and the shell's environment replaces either without a word: a
//!   `RUSTC_WRAPPER` (sccache), a `C_INCLUDE_PATH` of its own, or one of the target-scoped names.
//!   mlx-sys then fails minutes later with an error that does not say why. [`check_glue`] stops
//!   the build at once and names the variable and the fix.
//! - `libmlx.so` comes from the `mlx-cpu` wheel in `vendor/mlx-cpu` (`scripts/setup-mlx.sh`):
//!   add it to the link search path and as an rpath, so binaries and tests run without
//!   `LD_LIBRARY_PATH` (the rpath is absolute: binaries point into this checkout). The directory
//!   is also published as `links` metadata (`DEP_MODELPOOL_MLX_LIB_DIR`) for packages that
//!   depend on this one, whose binaries need the same rpath (sim/build.rs).
//! - The wheel bundles the netlib reference BLAS (about 5 GFLOP/s on a 1024^3 sgemm here, against
//!   about 170 with OpenBLAS). Linking the system OpenBLAS as a direct dependency of the binary,
//!   ahead of libmlx.so's own dependencies, makes MLX's `cblas_sgemm` calls resolve to OpenBLAS.

use std::env;
use std::path::{Path, PathBuf};

/// The one target the Linux glue is written for (and the suffix of its `[env]` names).
const GLUE_TARGET: &str = "x86_64-unknown-linux-gnu";

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    for var in ["MODELPOOL_MLX_LIB_DIR", "RUSTC_WRAPPER", "MODELPOOL_RUSTC_WRAPPER", "C_INCLUDE_PATH"] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    for (var, _) in scoped_env(Path::new("")) {
        println!("cargo:rerun-if-env-changed={var}");
    }
    println!("cargo:rerun-if-env-changed=BINDGEN_EXTRA_CLANG_ARGS_{GLUE_TARGET}");
    if env::var_os("CARGO_FEATURE_MLX").is_none() {
        return;
    }
    let target = env::var("TARGET").expect("cargo sets TARGET");
    let os = env::var("CARGO_CFG_TARGET_OS").unwrap_or_default();
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    if os == "macos" && arch == "aarch64" {
        return; // mlx-sys builds MLX with Metal and links it statically
    }
    if target != GLUE_TARGET {
        fail(&format!(
            "feature `mlx` builds for {GLUE_TARGET} and for macOS on Apple silicon only \
             (docs/mlx.md, Platforms), not for {target}: build with `--no-default-features` \
             (fake backend)"
        ));
    }
    let root = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets this"));
    check_glue(&root);

    let dir = env::var_os("MODELPOOL_MLX_LIB_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("vendor/mlx-cpu/mlx/lib"));
    if !dir.join("libmlx.so").is_file() {
        fail(&format!("feature `mlx`: {} has no libmlx.so; run scripts/setup-mlx.sh first", dir.display()));
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

/// The target-scoped `[env]` entries of `.cargo/config.toml` whose values are paths, as they
/// resolve for the checkout at `root` (`relative = true`). Keep in step with that file.
fn scoped_env(root: &Path) -> [(String, PathBuf); 2] {
    [
        (format!("CMAKE_TOOLCHAIN_FILE_{GLUE_TARGET}"), root.join("tools/mlx/toolchain.cmake")),
        (format!("CMAKE_PREFIX_PATH_{GLUE_TARGET}"), root.join("vendor/mlx-cpu/mlx")),
    ]
}

/// Whether two paths are the same, or name the same existing file or directory.
fn same_path(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// Stops the build, listing every problem with its fix, when the environment keeps a piece of
/// the Linux glue in `.cargo/config.toml` from reaching mlx-sys's build (`root` is the
/// checkout).
///
/// Cargo passes build scripts the rustc wrapper it uses as `RUSTC_WRAPPER`, and `[env]` values
/// only where the shell has not set the variable: so what this script sees is what mlx-sys's
/// build script and rustc see.
fn check_glue(root: &Path) {
    let mut problems = Vec::new();
    let wrapper = root.join("tools/mlx/rustc-wrapper.sh");
    match env::var_os("RUSTC_WRAPPER").filter(|w| !w.is_empty()) {
        Some(w) if same_path(Path::new(&w), &wrapper) => {}
        Some(w) => problems.push(format!(
            "RUSTC_WRAPPER={w} replaces the rustc wrapper of .cargo/config.toml, which rewrites \
             mlx-sys's macOS link directives for Linux: unset it, or chain it through ours: \
             RUSTC_WRAPPER={} MODELPOOL_RUSTC_WRAPPER={w}",
            wrapper.display(),
            w = Path::new(&w).display(),
        )),
        None => problems.push(format!(
            "no rustc wrapper runs (RUSTC_WRAPPER is empty, or .cargo/config.toml is not read), so \
             mlx-sys's macOS link directives stay: unset RUSTC_WRAPPER, or set it to {}",
            wrapper.display()
        )),
    }
    for (var, want) in scoped_env(root) {
        match env::var_os(&var) {
            Some(v) if same_path(Path::new(&v), &want) => {}
            Some(v) => problems.push(format!(
                "{var} is {v:?} in the shell, which hides .cargo/config.toml's {}: unset it",
                want.display(),
            )),
            None => problems.push(format!("{var} is not set (.cargo/config.toml sets it)")),
        }
    }
    let bindgen = format!("BINDGEN_EXTRA_CLANG_ARGS_{GLUE_TARGET}");
    let args = env::var(&bindgen).unwrap_or_default();
    if !args.split_whitespace().any(|a| a == "modelpool_mlx_compat.h") {
        problems.push(format!(
            "{bindgen} is {args:?}: it needs `-include modelpool_mlx_compat.h` (.cargo/config.toml); \
             unset it or add that"
        ));
    }
    let include = root.join("tools/mlx");
    let paths = env::var_os("C_INCLUDE_PATH").unwrap_or_default();
    if !env::split_paths(&paths).any(|p| same_path(&p, &include)) {
        problems.push(format!(
            "C_INCLUDE_PATH is {paths:?} in the shell, so .cargo/config.toml's does not apply and \
             bindgen cannot find tools/mlx/modelpool_mlx_compat.h: \
             export C_INCLUDE_PATH={}${{C_INCLUDE_PATH:+:$C_INCLUDE_PATH}}",
            include.display()
        ));
    }
    if !problems.is_empty() {
        fail(&format!(
            "feature `mlx` on {GLUE_TARGET}: the build glue does not reach mlx-sys (docs/mlx.md):\n  - {}\n\
             (cargo reads .cargo/config.toml only when run inside this checkout)",
            problems.join("\n  - ")
        ));
    }
}

/// Stops the build with `message` (on stderr, which cargo shows for a failed build script),
/// without a panic's location and backtrace.
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}
