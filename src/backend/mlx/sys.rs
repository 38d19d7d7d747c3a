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
    /// f16 round-trips (the f16 entry points exist only thanks to tools/mlx/modelpool_mlx_compat.h on x86_64).
    #[test]
    fn mlx_links_and_computes() {
        let a = Array::from_slice(&[1.0f32, 2.0, 3.0, 4.0], &[2, 2]);
        let b = Array::from_slice(&[5.0f32, 6.0, 7.0, 8.0], &[2, 2]);
        let c = a.matmul(&b).unwrap();
        assert_eq!(c.as_slice::<f32>(), &[19.0, 22.0, 43.0, 50.0]);
        let h = Array::from_slice(&[1.5f32, -2.25], &[2]).as_dtype(mlx_rs::Dtype::Float16).unwrap();
        assert_eq!(h.to_vec_cast::<f32>().unwrap(), vec![1.5, -2.25]);
    }

    /// One-row products (forwarded to GEMV on Linux) agree with a host computation for every
    /// operand layout MLX passes: B plain or transposed, A a row or a transposed column.
    #[test]
    fn one_row_products_match_host() {
        let (k, n) = (37usize, 23usize);
        let a: Vec<f32> = (0..k).map(|i| (i as f32 * 0.37).sin()).collect();
        let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // [n, k]
        let want: Vec<f32> = (0..n).map(|j| (0..k).map(|i| a[i] * w[j * k + i]).sum()).collect();
        let x = Array::from_slice(&a, &[1, k as i32]);
        let wm = Array::from_slice(&w, &[n as i32, k as i32]);
        let w_t = wm.t().contiguous().unwrap(); // [k, n] row-major
        let x_col = Array::from_slice(&a, &[k as i32, 1]);
        let cases = [
            ("x @ W^T (transposed view)", x.matmul(wm.t()).unwrap()),
            ("x @ B (plain)", x.matmul(&w_t).unwrap()),
            ("col^T @ W^T", x_col.t().matmul(wm.t()).unwrap()),
        ];
        for (what, got) in cases {
            let got = got.to_vec_exact::<f32>().unwrap();
            assert_eq!(got.len(), n, "{what}");
            for (g, e) in got.iter().zip(&want) {
                assert!((g - e).abs() < 1e-4, "{what}: {g} vs {e}");
            }
        }
    }
}

/// Matrix-vector products through OpenBLAS's GEMV instead of its GEMM (Linux).
///
/// MLX's CPU matmul always calls `cblas_sgemm`. At batch 1 (decode) every linear layer is a
/// `[1, K] x [K, N]` product, and OpenBLAS 0.3.21 (Debian 12) runs GEMM with M = 1 through its
/// packing kernels at about 3.5 GB/s here, against about 11 GB/s of memory bandwidth: decode ran
/// at a third of the bandwidth floor. OpenBLAS 0.3.27 added the same forwarding internally
/// (`GEMM_GEMV_FORWARD`). This definition, exported from the executable, comes first in the
/// dynamic symbol lookup, so MLX's calls land here: products with one output row go to
/// `cblas_sgemv` (multi-threaded, streams the weights once), everything else to the next
/// `cblas_sgemm` in lookup order (the system OpenBLAS linked by build.rs).
#[cfg(target_os = "linux")]
mod gemv_forward {
    use std::ffi::{c_float, c_int, c_void};
    use std::sync::OnceLock;

    const ROW_MAJOR: c_int = 101;
    const NO_TRANS: c_int = 111;
    const TRANS: c_int = 112;

    type Sgemm = unsafe extern "C" fn(
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
        c_float,
        *const c_float,
        c_int,
        *const c_float,
        c_int,
        c_float,
        *mut c_float,
        c_int,
    );

    unsafe extern "C" {
        fn cblas_sgemv(
            order: c_int,
            trans: c_int,
            m: c_int,
            n: c_int,
            alpha: c_float,
            a: *const c_float,
            lda: c_int,
            x: *const c_float,
            incx: c_int,
            beta: c_float,
            y: *mut c_float,
            incy: c_int,
        );
    }

    fn next_sgemm() -> Sgemm {
        static NEXT: OnceLock<usize> = OnceLock::new();
        let p = *NEXT.get_or_init(|| {
            // SAFETY: dlsym with a valid NUL-terminated name; RTLD_NEXT skips this definition.
            let p = unsafe { libc::dlsym(libc::RTLD_NEXT, c"cblas_sgemm".as_ptr()) };
            assert!(!p.is_null(), "no cblas_sgemm after the executable's (OpenBLAS missing)");
            p as usize
        });
        // SAFETY: the symbol is OpenBLAS's cblas_sgemm, which has exactly this signature.
        unsafe { std::mem::transmute::<*mut c_void, Sgemm>(p as *mut c_void) }
    }

    /// CBLAS `sgemm` (C = alpha op(A) op(B) + beta C), forwarding one-row products to GEMV.
    ///
    /// # Safety
    /// The CBLAS contract: pointers and leading dimensions describe valid matrices.
    #[unsafe(no_mangle)]
    pub unsafe extern "C" fn cblas_sgemm(
        order: c_int,
        trans_a: c_int,
        trans_b: c_int,
        m: c_int,
        n: c_int,
        k: c_int,
        alpha: c_float,
        a: *const c_float,
        lda: c_int,
        b: *const c_float,
        ldb: c_int,
        beta: c_float,
        c: *mut c_float,
        ldc: c_int,
    ) {
        if order == ROW_MAJOR && m == 1 && n > 1 && k > 1 {
            // A is one row of K values: contiguous unless A is stored transposed ([K, 1]).
            let incx = if trans_a == NO_TRANS { 1 } else { lda };
            // c[0, j] = sum_k a_k op(B)[k, j]
            // op(B) = B   ([K, N] row-major): c = B^T a  -> gemv Trans   on B (K x N)
            // op(B) = B^T (B is [N, K]):      c = B a    -> gemv NoTrans on B (N x K)
            // SAFETY: same matrices as the caller's sgemm, read as GEMV operands.
            unsafe {
                if trans_b == NO_TRANS {
                    cblas_sgemv(ROW_MAJOR, TRANS, k, n, alpha, b, ldb, a, incx, beta, c, 1);
                } else if trans_b == TRANS {
                    cblas_sgemv(ROW_MAJOR, NO_TRANS, n, k, alpha, b, ldb, a, incx, beta, c, 1);
                } else {
                    next_sgemm()(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
                }
            }
            return;
        }
        // SAFETY: forwarding the caller's arguments unchanged.
        unsafe { next_sgemm()(order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) }
    }
}
