//! Platform glue for mlx-rs on Linux.

/// mlx-rs seeds its default PRNG from the macOS function `mach_approximate_time` (through the
/// `mach-sys` crate), which does not exist on Linux. This provides it: nanoseconds from the
/// system clock. It is only a seed; every sampling path in this crate seeds explicitly.
#[cfg(not(target_os = "macos"))]
#[unsafe(no_mangle)]
pub extern "C" fn mach_approximate_time() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use mlx_rs::Array;

    /// The build glue links a working MLX: a small matmul gives the hand-computed product, and
    /// f16 round-trips (the f16 entry points exist only thanks to tools/mlx/compat.h on x86_64).
    #[test]
    fn mlx_links_and_computes() {
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
        let b = Array::from_slice(&[5.0f32, 6.0, 7.0, 8.0], &[2, 2]);
        let c = a.matmul(&b).unwrap();
        assert_eq!(c.as_slice::<f32>(), &[19.0, 22.0, 43.0, 50.0]);
        let h = Array::from_slice(&[1.5f32, -2.25], &[2])
            .as_dtype(mlx_rs::Dtype::Float16)
            .unwrap();
        assert_eq!(h.to_vec_cast::<f32>().unwrap(), vec![1.5, -2.25]);
    }
}
