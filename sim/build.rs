//! Run path to `libmlx.so` for the simulator's binaries, tests and benches, when they link it.
//!
//! The simulator depends on `modelpool` without the `mlx` feature, but Cargo unifies features
//! across the packages of one build: `cargo build --workspace` builds `modelpool` with `mlx`
//! (the root package's default) and then every binary that links it, this one included, needs
//! `libmlx.so`. Link arguments do not propagate between packages, so `modelpool`'s build script
//! publishes the library's directory as `links` metadata instead, which Cargo passes here as
//! `DEP_MODELPOOL_MLX_LIB_DIR`. It is set exactly when this build of `modelpool` links MLX
//! dynamically (feature `mlx` on Linux); otherwise (`cargo build -p modelpool-sim`, macOS's
//! static MLX) this script emits nothing.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=DEP_MODELPOOL_MLX_LIB_DIR");
    if let Some(dir) = std::env::var_os("DEP_MODELPOOL_MLX_LIB_DIR") {
        let dir = dir.to_str().expect("modelpool's build script prints a UTF-8 path");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{dir}");
    }
}
