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

    /// Products of 2 to 16 rows against a transposed weight (the few-rows kernel on Linux
    /// x86_64, split between two threads when large) equal a host computation, for sizes that
    /// are not multiples of the kernel's blocks (odd n, k not a multiple of 8, m not of 4).
    #[test]
    fn few_row_products_match_host() {
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        let calls = super::few_rows::CALLS.load(std::sync::atomic::Ordering::Relaxed);
        for (m, n, k) in [(2usize, 3usize, 9usize), (3, 577, 37), (5, 64, 8), (8, 1001, 576), (16, 130, 100)]
        {
            let a: Vec<f32> = (0..m * k).map(|i| (i as f32 * 0.37).sin()).collect();
            let w: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // [n, k]
            let x = Array::from_slice(&a, &[m as i32, k as i32]);
            let wm = Array::from_slice(&w, &[n as i32, k as i32]);
            let got = x.matmul(wm.t()).unwrap().to_vec_exact::<f32>().unwrap();
            for i in 0..m {
                for j in 0..n {
                    let want: f32 = (0..k).map(|t| a[i * k + t] * w[j * k + t]).sum();
                    let g = got[i * n + j];
                    assert!(
                        (g - want).abs() <= 1e-4 * (1.0 + want.abs()),
                        "{m}x{n}x{k} [{i},{j}]: {g} vs {want}"
                    );
                }
            }
        }
        #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
        if super::few_rows::available() {
            let now = super::few_rows::CALLS.load(std::sync::atomic::Ordering::Relaxed);
            assert!(now >= calls + 5, "MLX's products reached the kernel ({calls} -> {now})");
        }
    }

    /// `alpha` and `beta` as CBLAS defines them, and leading dimensions wider than the rows,
    /// in both kernels (AVX-512 when the CPU has it, and AVX2).
    #[cfg(all(target_os = "linux", target_arch = "x86_64"))]
    #[test]
    fn few_rows_kernel_honours_alpha_beta_and_strides() {
        if !super::few_rows::available() {
            return;
        }
        let (m, n, k, lda, ldw, ldc) = (3usize, 5usize, 19usize, 21usize, 20usize, 7usize);
        let a: Vec<f32> = (0..m * lda).map(|i| i as f32 * 0.5 - 3.0).collect();
        let w: Vec<f32> = (0..n * ldw).map(|i| 1.0 - i as f32 * 0.25).collect();
        let before: Vec<f32> = (0..m * ldc).map(|i| i as f32).collect();
        type Kernel = unsafe fn(super::few_rows::Gemm);
        let kernels: [(&str, Kernel); 2] =
            [("gemm", super::few_rows::gemm), ("avx2", super::few_rows::gemm_avx2)];
        for (what, kernel) in kernels {
            let mut c = before.clone();
            let g = super::few_rows::Gemm {
                a: a.as_ptr(),
                lda,
                w: w.as_ptr(),
                ldw,
                c: c.as_mut_ptr(),
                ldc,
                m,
                n,
                k,
                alpha: 2.0,
                beta: 0.5,
            };
            // SAFETY: the three buffers hold m x lda, n x ldw and m x ldc values.
            unsafe { kernel(g) };
            for i in 0..m {
                for j in 0..ldc {
                    let want = if j < n {
                        2.0 * (0..k).map(|t| a[i * lda + t] * w[j * ldw + t]).sum::<f32>()
                            + 0.5 * before[i * ldc + j]
                    } else {
                        before[i * ldc + j] // outside the product: untouched
                    };
                    let got = c[i * ldc + j];
                    assert!(
                        (got - want).abs() <= 1e-3 * (1.0 + want.abs()),
                        "{what} [{i},{j}] {got} vs {want}"
                    );
                }
            }
        }
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
        #[cfg(target_arch = "x86_64")]
        if order == ROW_MAJOR
            && trans_a == NO_TRANS
            && trans_b == TRANS
            && (1..=super::few_rows::MAX_ROWS).contains(&m)
            && n > 1
            && k > 1
            && super::few_rows::available()
        {
            // SAFETY: the caller's matrices, as CBLAS describes them: A [m, k] (lda), B [n, k]
            // (ldb, used transposed), C [m, n] (ldc).
            unsafe {
                super::few_rows::gemm(super::few_rows::Gemm {
                    a,
                    lda: lda as usize,
                    w: b,
                    ldw: ldb as usize,
                    c,
                    ldc: ldc as usize,
                    m: m as usize,
                    n: n as usize,
                    k: k as usize,
                    alpha,
                    beta,
                })
            };
            return;
        }
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

/// Products with a few rows (2 to [`few_rows::MAX_ROWS`]) against a weight matrix, the linear
/// layers of a batched decode step: `C = alpha A W^T + beta C` with A `[m, k]` and W `[n, k]`,
/// both row-major (MLX's `x.matmul(w.transpose())`).
///
/// OpenBLAS 0.3.21 runs these through its GEMM, which packs (copies) the whole weight matrix
/// on every call: profiled at 8 rows, the packing alone was the largest cost of a decode step
/// (24% of the time, more than the multiply), and on CPUs it does not know (this machine's
/// Xeon, family 6 model 207) it falls back to its SSE3 kernels. Here each pair of weight rows
/// is read once, straight from memory, and multiplied with every row of A (which stays in
/// cache) with AVX2 FMA, in blocks of 4 x 2 accumulators; the columns are split between the
/// calling thread and one helper thread (2 cores here), so the weights stream at the memory
/// bandwidth, as a GEMV does for one row. x86_64 with AVX2 and FMA only
/// ([`few_rows::available`]); elsewhere the call goes to the BLAS unchanged.
#[cfg(all(target_os = "linux", target_arch = "x86_64"))]
mod few_rows {
    use std::arch::x86_64::*;
    use std::cell::UnsafeCell;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::thread::Thread;
    use std::time::{Duration, Instant};

    /// The most rows this path takes; larger products (prefill chunks) are compute-bound and
    /// OpenBLAS's packed GEMM is the right tool there.
    pub const MAX_ROWS: i32 = 16;

    /// One product, as [`super::gemv_forward::cblas_sgemm`] received it.
    #[derive(Clone, Copy)]
    pub struct Gemm {
        pub a: *const f32,
        pub lda: usize,
        pub w: *const f32,
        pub ldw: usize,
        pub c: *mut f32,
        pub ldc: usize,
        pub m: usize,
        pub n: usize,
        pub k: usize,
        pub alpha: f32,
        pub beta: f32,
    }

    /// Products computed here so far (tests check that MLX's calls arrive).
    pub static CALLS: AtomicU64 = AtomicU64::new(0);

    /// Whether this CPU has what the kernel uses, and `MODELPOOL_GEMM` is not `blas` (which
    /// sends every product to the BLAS, for comparisons; read once per process).
    pub fn available() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| {
            std::env::var("MODELPOOL_GEMM").map_or(true, |v| v != "blas")
                && is_x86_feature_detected!("avx2")
                && is_x86_feature_detected!("fma")
        })
    }

    /// The helper thread's mailbox. A caller that wins `busy` writes `job`, then publishes
    /// `claim = ticket << 32 | chunks << 16 | 0` (a new ticket, its chunk count, the next chunk
    /// to take); the caller and the helper take chunks of [`CHUNK`] columns by compare-and-swap
    /// on `claim` (only below the count, and only while the ticket is the one they read) and
    /// count each finished one in `finished`. The caller returns once
    /// every chunk is finished, so a helper that is late (descheduled by other work on the
    /// machine) costs nothing: the caller takes the chunks it has not.
    struct Helper {
        busy: AtomicBool,
        job: UnsafeCell<Gemm>,
        claim: AtomicU64,
        finished: AtomicU64,
        sleeping: AtomicBool,
        thread: OnceLock<Thread>,
    }

    // SAFETY: `job` is written only by the caller holding `busy` and before the Release store
    // of a new ticket to `claim`; the helper reads it only after claiming a chunk of that
    // ticket (Acquire), and the caller neither returns nor writes the next job until that
    // chunk is finished, so the data and the matrices it points to are valid while read.
    unsafe impl Sync for Helper {}

    static HELPER: Helper = Helper {
        busy: AtomicBool::new(false),
        job: UnsafeCell::new(Gemm {
            a: std::ptr::null(),
            lda: 0,
            w: std::ptr::null(),
            ldw: 0,
            c: std::ptr::null_mut(),
            ldc: 0,
            m: 0,
            n: 0,
            k: 0,
            alpha: 0.0,
            beta: 0.0,
        }),
        claim: AtomicU64::new(0),
        finished: AtomicU64::new(0),
        sleeping: AtomicBool::new(false),
        thread: OnceLock::new(),
    };

    /// Columns per chunk (a multiple of 2: whole pairs).
    const CHUNK: usize = 128;

    /// The helper spins this long for the next job (a decode step issues them back to back)
    /// before it parks.
    const SPIN: Duration = Duration::from_micros(300);

    /// Products smaller than this many weights run on the calling thread alone.
    const SHARE_ABOVE: usize = 1 << 18;

    /// Claims the next chunk of ticket `ticket`, if any is left.
    fn take(ticket: u64) -> Option<u64> {
        let mut cur = HELPER.claim.load(Ordering::Acquire);
        loop {
            if cur >> 32 != ticket || cur & 0xffff >= (cur >> 16) & 0xffff {
                return None;
            }
            match HELPER.claim.compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => return Some(cur & 0xffff),
                Err(now) => cur = now,
            }
        }
    }

    /// Runs chunk `i` of `g` and counts it finished.
    ///
    /// # Safety
    /// As [`gemm`]; `i` was claimed by [`take`] for the current ticket.
    unsafe fn run_chunk(g: &Gemm, i: u64) {
        let from = i as usize * CHUNK;
        // SAFETY: columns from..to of the caller's product; chunks are disjoint.
        unsafe { columns(g, from, (from + CHUNK).min(g.n)) };
        HELPER.finished.fetch_add(1, Ordering::AcqRel);
    }

    fn helper() -> &'static Thread {
        HELPER.thread.get_or_init(|| {
            std::thread::Builder::new()
                .name("modelpool-gemm".into())
                .spawn(|| {
                    let mut idle = Instant::now();
                    let mut spins = 0u32;
                    loop {
                        let cur = HELPER.claim.load(Ordering::Acquire);
                        let mut worked = false;
                        while let Some(i) = take(cur >> 32) {
                            // SAFETY: see `Helper`: a chunk is claimed and not finished, so
                            // the job is current and its caller waits.
                            let g = unsafe { *HELPER.job.get() };
                            // SAFETY: a claimed chunk of the current job.
                            unsafe { run_chunk(&g, i) };
                            worked = true;
                        }
                        if worked {
                            idle = Instant::now();
                            spins = 0;
                            continue;
                        }
                        spins += 1;
                        if spins.is_multiple_of(64) && idle.elapsed() > SPIN {
                            HELPER.sleeping.store(true, Ordering::SeqCst);
                            if HELPER.claim.load(Ordering::SeqCst) == cur {
                                std::thread::park();
                            }
                            HELPER.sleeping.store(false, Ordering::SeqCst);
                            idle = Instant::now();
                        } else {
                            std::hint::spin_loop();
                        }
                    }
                })
                .expect("spawning the GEMM helper thread")
                .thread()
                .clone()
        })
    }

    /// Computes `g`, in chunks of columns shared with the helper thread when it is large and
    /// the helper is free.
    ///
    /// # Safety
    /// `g` describes valid matrices (the CBLAS contract) and [`available`] is true.
    pub unsafe fn gemm(g: Gemm) {
        CALLS.fetch_add(1, Ordering::Relaxed);
        let chunks = g.n.div_ceil(CHUNK) as u64;
        let shared = g.n > CHUNK
            && chunks <= 0xffff
            && g.n * g.k >= SHARE_ABOVE
            && HELPER.busy.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).is_ok();
        if !shared {
            // SAFETY: the caller's contract.
            return unsafe { columns(&g, 0, g.n) };
        }
        let thread = helper();
        let ticket = (HELPER.claim.load(Ordering::Relaxed) >> 32) + 1;
        // SAFETY: we hold `busy`, and every chunk of the previous ticket is finished, so no
        // one reads the job now.
        unsafe { *HELPER.job.get() = g };
        HELPER.finished.store(0, Ordering::SeqCst);
        HELPER.claim.store(ticket << 32 | chunks << 16, Ordering::SeqCst);
        if HELPER.sleeping.load(Ordering::SeqCst) {
            thread.unpark();
        }
        while let Some(i) = take(ticket) {
            // SAFETY: claimed chunk of our own job.
            unsafe { run_chunk(&g, i) };
        }
        while HELPER.finished.load(Ordering::Acquire) < chunks {
            std::hint::spin_loop();
        }
        HELPER.busy.store(false, Ordering::Release);
    }

    /// Whether the AVX-512 kernel runs (else the AVX2 one).
    fn wide() -> bool {
        static OK: OnceLock<bool> = OnceLock::new();
        *OK.get_or_init(|| is_x86_feature_detected!("avx512f"))
    }

    /// Columns `from..to` of `g`'s product.
    ///
    /// # Safety
    /// `g` describes valid matrices, `from <= to <= g.n`, and [`available`] is true.
    unsafe fn columns(g: &Gemm, from: usize, to: usize) {
        // SAFETY: the caller's contract; `wide` checked the AVX-512 kernel's feature.
        unsafe { if wide() { columns_512(g, from, to) } else { columns_256(g, from, to) } }
    }

    /// The column and row loops around a `block::<MR, NR>` kernel: weight rows `NR` at a time
    /// (the remainder one by one), rows of A four at a time (the remainder in one block).
    macro_rules! loops {
        ($columns:ident, $rows:ident, $block:ident, $feature:literal, $nr:literal) => {
            #[target_feature(enable = $feature)]
            unsafe fn $columns(g: &Gemm, from: usize, to: usize) {
                let mut n = from;
                while n + $nr <= to {
                    // SAFETY (all blocks): rows m..m + MR <= g.m, columns n..n + NR <= to.
                    unsafe { $rows::<$nr>(g, n) };
                    n += $nr;
                }
                while n < to {
                    unsafe { $rows::<1>(g, n) };
                    n += 1;
                }
            }

            #[target_feature(enable = $feature)]
            unsafe fn $rows<const NR: usize>(g: &Gemm, n: usize) {
                let mut m = 0;
                while m + 4 <= g.m {
                    unsafe { $block::<4, NR>(g, m, n) };
                    m += 4;
                }
                match g.m - m {
                    3 => unsafe { $block::<3, NR>(g, m, n) },
                    2 => unsafe { $block::<2, NR>(g, m, n) },
                    1 => unsafe { $block::<1, NR>(g, m, n) },
                    _ => {}
                }
            }
        };
    }

    loops!(columns_256, rows_256, block_256, "avx2,fma", 2);

    /// The AVX2 kernel over all of `g` on this thread, whatever the CPU has more (for tests on
    /// AVX-512 machines).
    ///
    /// # Safety
    /// As [`gemm`].
    #[cfg(test)]
    pub unsafe fn gemm_avx2(g: Gemm) {
        unsafe { columns_256(&g, 0, g.n) }
    }
    loops!(columns_512, rows_512, block_512, "avx512f", 4);

    /// Stores `alpha s + beta C` (`alpha s` when `beta` is 0: C is not read, as CBLAS says).
    ///
    /// # Safety
    /// `c` points into C.
    unsafe fn store(g: &Gemm, c: *mut f32, s: f32) {
        let v = if g.beta == 0.0 { g.alpha * s } else { g.alpha * s + g.beta * unsafe { *c } };
        unsafe { *c = v };
    }

    /// `C[m0.., n0..] = alpha A[m0..m0 + MR] W[n0..n0 + NR]^T + beta C`, 8 lanes of k at a time
    /// in `MR x NR` accumulators, the tail of k in scalars.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn block_256<const MR: usize, const NR: usize>(g: &Gemm, m0: usize, n0: usize) {
        let k8 = g.k / 8 * 8;
        let mut acc = [[_mm256_setzero_ps(); NR]; MR];
        let mut kk = 0;
        while kk < k8 {
            let mut w = [_mm256_setzero_ps(); NR];
            for (r, w) in w.iter_mut().enumerate() {
                *w = unsafe { _mm256_loadu_ps(g.w.add((n0 + r) * g.ldw + kk)) };
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = unsafe { _mm256_loadu_ps(g.a.add((m0 + i) * g.lda + kk)) };
                for (a, w) in acc.iter_mut().zip(&w) {
                    *a = _mm256_fmadd_ps(x, *w, *a);
                }
            }
            kk += 8;
        }
        for (i, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate() {
                let mut s = hsum(*a);
                for t in k8..g.k {
                    s += unsafe { *g.a.add((m0 + i) * g.lda + t) * *g.w.add((n0 + r) * g.ldw + t) };
                }
                unsafe { store(g, g.c.add((m0 + i) * g.ldc + n0 + r), s) };
            }
        }
    }

    /// [`block_256`] with 16 lanes (AVX-512), the tail of k as one masked load (after the
    /// unmasked loop: masked loads in the loop itself made a one-row product 1.5x slower).
    #[target_feature(enable = "avx512f")]
    unsafe fn block_512<const MR: usize, const NR: usize>(g: &Gemm, m0: usize, n0: usize) {
        let mut acc = [[_mm512_setzero_ps(); NR]; MR];
        let mut kk = 0;
        // With two rows or more the block computes long enough for the memory to fall behind:
        // its first pass fetches the next block's weight rows (same columns, NR rows on).
        // Measured on AMD Zen 5, 30 layers of SmolLM2-135M's shapes: 8 rows 1.45x faster
        // (38 -> 26 ms), 4 rows 1.3x; one row 1.2x slower (the hardware prefetcher already
        // keeps up with a single stream), hence not for one row.
        let fetch = g.m >= 2 && m0 == 0 && n0 + 2 * NR <= g.n;
        while kk + 16 <= g.k {
            let mut w = [_mm512_setzero_ps(); NR];
            for (r, w) in w.iter_mut().enumerate() {
                let p = unsafe { g.w.add((n0 + r) * g.ldw + kk) };
                if fetch && kk % 32 == 0 {
                    // A prefetch is a hint: it reads nothing and never faults (the rows are
                    // within W, checked above; the second line may be past W's last row).
                    let next = p.wrapping_add(NR * g.ldw);
                    _mm_prefetch::<_MM_HINT_T0>(next.cast());
                    _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(16).cast());
                }
                *w = unsafe { _mm512_loadu_ps(p) };
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = unsafe { _mm512_loadu_ps(g.a.add((m0 + i) * g.lda + kk)) };
                for (a, w) in acc.iter_mut().zip(&w) {
                    *a = _mm512_fmadd_ps(x, *w, *a);
                }
            }
            kk += 16;
        }
        if kk < g.k {
            let mask: __mmask16 = (1u16 << (g.k - kk)) - 1;
            let mut w = [_mm512_setzero_ps(); NR];
            for (r, w) in w.iter_mut().enumerate() {
                *w = unsafe { _mm512_maskz_loadu_ps(mask, g.w.add((n0 + r) * g.ldw + kk)) };
            }
            for (i, acc) in acc.iter_mut().enumerate() {
                let x = unsafe { _mm512_maskz_loadu_ps(mask, g.a.add((m0 + i) * g.lda + kk)) };
                for (a, w) in acc.iter_mut().zip(&w) {
                    *a = _mm512_fmadd_ps(x, *w, *a);
                }
            }
        }
        for (i, acc) in acc.iter().enumerate() {
            for (r, a) in acc.iter().enumerate() {
                unsafe { store(g, g.c.add((m0 + i) * g.ldc + n0 + r), _mm512_reduce_add_ps(*a)) };
            }
        }
    }

    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let lo = _mm256_castps256_ps128(v);
        let hi = _mm256_extractf128_ps(v, 1);
        let s = _mm_add_ps(lo, hi);
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }
}
