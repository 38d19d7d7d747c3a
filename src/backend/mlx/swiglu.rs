//! SwiGLU's gate on the host: `silu(gate) * up` over a gate/up product's rows.
//!
//! MLX's CPU build (the mlx-cpu wheel, built for baseline x86-64) computes `sigmoid` one element
//! at a time, with an `exp` whose fused multiply-adds are calls into libm: profiled at 8 decode
//! rows of SmolLM2-135M, sigmoid, exp and `fmaf` were 6% of all samples, about a tenth of the
//! decode thread's time, growing with the rows. Here the gate is a vectorised polynomial `exp`
//! (AVX-512 where the CPU has it), applied to each row's values in place of three MLX ops.

use anyhow::ensure;

use super::Res;

/// `out[r, j] = g / (1 + e^-g) * up[r, j]` with `g = gu[r, j]`, `up[r, j] = gu[r, ffn + j]`:
/// `gu` is `[rows, 2 ffn]` (each row the gate's `ffn` values, then the up projection's), `out`
/// `[rows, ffn]`. Errors (writing nothing) when the lengths do not say that.
pub(super) fn silu_mul(gu: &[f32], ffn: usize, out: &mut [f32]) -> Res<()> {
    ensure!(ffn > 0 && gu.len().is_multiple_of(2 * ffn), "{} values are not rows of 2 x {ffn}", gu.len());
    ensure!(out.len() * 2 == gu.len(), "output: {} values for {} rows", out.len(), gu.len() / (2 * ffn));
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        unsafe { rows_avx512(gu, ffn, out) };
        return Ok(());
    }
    rows_portable(gu, ffn, out);
    Ok(())
}

/// [`silu_mul`]'s rows one value at a time, with the standard library's `exp`.
fn rows_portable(gu: &[f32], ffn: usize, out: &mut [f32]) {
    for (row, o) in gu.chunks_exact(2 * ffn).zip(out.chunks_exact_mut(ffn)) {
        let (g, u) = row.split_at(ffn);
        for ((o, &g), &u) in o.iter_mut().zip(g).zip(u) {
            *o = g / (1.0 + (-g).exp()) * u;
        }
    }
}

/// [`silu_mul`]'s rows with 16 lanes: the polynomial [`exp_512`], the tail of a row masked.
///
/// # Safety
/// The CPU supports AVX-512F; `gu` and `out` are as [`silu_mul`] checked.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn rows_avx512(gu: &[f32], ffn: usize, out: &mut [f32]) {
    use std::arch::x86_64::*;
    let one = _mm512_set1_ps(1.0);
    for (row, o) in gu.chunks_exact(2 * ffn).zip(out.chunks_exact_mut(ffn)) {
        let mut j = 0;
        while j < ffn {
            let left = ffn - j;
            let mask: __mmask16 = if left >= 16 { 0xffff } else { (1u16 << left) - 1 };
            // SAFETY: lanes j..j + 16 of the row's halves and of `o`, masked past their ends.
            unsafe {
                let g = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(j));
                let u = _mm512_maskz_loadu_ps(mask, row.as_ptr().add(ffn + j));
                let e = exp_512(_mm512_sub_ps(_mm512_setzero_ps(), g));
                let s = _mm512_div_ps(g, _mm512_add_ps(one, e));
                _mm512_mask_storeu_ps(o.as_mut_ptr().add(j), mask, _mm512_mul_ps(s, u));
            }
            j += 16;
        }
    }
}

/// `e^x` per lane, within 2 ulp of the correctly rounded value on [-87, 88] (Cephes' `expf`:
/// `x = n ln 2 + r`, `|r| <= ln 2 / 2`, a degree-6 polynomial in `r`, times `2^n`); below -87
/// it is 0, above 88 infinity.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn exp_512(x: std::arch::x86_64::__m512) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.336_55)), _mm512_set1_ps(88.376_26));
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
        x,
        _mm512_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), x);
    let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
    let mut p = _mm512_set1_ps(1.987_569_1e-4);
    for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 0.166_666_65, 0.5] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
    }
    let p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0)));
    // p * 2^n, n in [-126, 127] after the clamp.
    _mm512_scalef_ps(p, n)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against the f64 definition, over the range a gate takes and beyond it: within 6e-7
    /// relative (5 ulp; plus 1e-30 absolute, for the values that underflow to 0), both the
    /// build this CPU takes and the portable one.
    #[test]
    fn silu_mul_matches_the_definition() {
        let ffn = 37;
        let rows = 5;
        let gu: Vec<f32> = (0..rows * 2 * ffn)
            .map(|i| {
                let t = i as f32 / (rows * 2 * ffn) as f32;
                if i % 2 == 0 { (t - 0.5) * 60.0 } else { (t - 0.3) * 3.0 }
            })
            .chain([-100.0, 95.0, 0.0, -0.0, 1e-8, -1e-8])
            .chain(std::iter::repeat_n(1.5, 2 * ffn - 6))
            .collect();
        let mut out = vec![f32::NAN; gu.len() / 2];
        silu_mul(&gu, ffn, &mut out).unwrap();
        let mut portable = vec![f32::NAN; gu.len() / 2];
        rows_portable(&gu, ffn, &mut portable);
        for out in [out, portable] {
            for (r, (row, o)) in gu.chunks_exact(2 * ffn).zip(out.chunks_exact(ffn)).enumerate() {
                for j in 0..ffn {
                    let (g, u) = (row[j] as f64, row[ffn + j] as f64);
                    let want = g / (1.0 + (-g).exp()) * u;
                    let err = (o[j] as f64 - want).abs();
                    assert!(
                        err <= 6e-7 * want.abs() + 1e-30,
                        "row {r}, {j}: silu({g}) * {u} = {} not {want}",
                        o[j]
                    );
                }
            }
        }
    }

    #[test]
    fn bad_lengths_are_errors() {
        assert!(silu_mul(&[0.0; 6], 2, &mut [0.0; 3]).is_err(), "not rows of 4");
        assert!(silu_mul(&[0.0; 8], 2, &mut [0.0; 3]).is_err(), "short output");
        assert!(silu_mul(&[0.0; 8], 0, &mut [0.0; 4]).is_err());
        assert!(silu_mul(&[0.0; 8], 2, &mut [0.0; 4]).is_ok());
    }
}
