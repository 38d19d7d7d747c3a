//! Decode attention on the host, straight over the shared KV cache's cells.
//!
//! A batched decode step has one query per row, and each row attends to its own sequence's
//! cells (`llama::SharedKv`). Through MLX this costs a gather of every row's cells into a padded
//! `[B, kv heads, L, head dim]` batch per layer (a strided copy of the whole cache, into fresh
//! pages, on every step) and a dozen small ops, products and BLAS calls per row: profiled at 8
//! rows, about 4 ms of a step per added row, far more than the multiply-adds it does. Here the
//! scores, the softmax and the weighted sum read the cells where they are, with no copy and no
//! padding, and a row's result depends on its own cells only (not on the other rows of the
//! batch, nor on their lengths).

use anyhow::ensure;

use super::Res;

/// The attention a layer computes, as its model configures it.
#[derive(Clone, Copy, Debug)]
pub(super) struct Heads {
    /// Query heads.
    pub heads: usize,
    /// Key/value heads (a divisor of `heads`: grouped-query attention).
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Multiplies every score before the softmax.
    pub scale: f32,
    /// Gemma 2's soft cap: scores become `cap * tanh(score / cap)` after scaling.
    pub softcap: Option<f32>,
}

/// `out[b, h] = sum_j p_j V[c_j, g]` with `p = softmax_j(score(q[b, h], K[c_j, g]))`, for each
/// row `b` over its cells `c_j` (`rows[b]`, only the last `window` of them when given) and each
/// query head `h` (key/value head `g = h / (heads / kv_heads)`).
///
/// Layouts, row-major: `q` and `out` `[rows, heads, head_dim]`; `keys` and `values`
/// `[cells, kv_heads, head_dim]`. Errors (and writes nothing) when a length does not match,
/// `heads` is not a multiple of `kv_heads`, a row has no cell, or a cell is outside the buffers.
pub(super) fn decode(
    h: Heads,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    rows: &[&[i32]],
    window: Option<i32>,
    out: &mut [f32],
) -> Res<()> {
    let (nh, nkv, hd) = (h.heads, h.kv_heads, h.head_dim);
    ensure!(nkv > 0 && hd > 0 && nh.is_multiple_of(nkv), "{nh} query heads over {nkv} key/value heads");
    ensure!(q.len() == rows.len() * nh * hd, "queries: {} values for {} rows", q.len(), rows.len());
    ensure!(out.len() == q.len(), "output: {} values for {} rows", out.len(), rows.len());
    ensure!(
        keys.len() == values.len() && keys.len().is_multiple_of(nkv * hd),
        "key and value buffers differ"
    );
    let cells = keys.len() / (nkv * hd);
    let seen = |r: &[i32]| -> usize {
        let first = window.map_or(0, |w| r.len().saturating_sub(w.max(1) as usize));
        r.len() - first
    };
    for r in rows {
        ensure!(!r.is_empty(), "a row without cells");
        ensure!(
            r.iter().all(|&c| c >= 0 && (c as usize) < cells),
            "a cell outside the cache ({cells} cells)"
        );
    }
    let longest = rows.iter().map(|r| seen(r)).max().unwrap_or(0);
    let mut scores = vec![0f32; longest];
    let rows: Vec<&[i32]> = rows.iter().map(|r| &r[r.len() - seen(r)..]).collect();
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked just above).
        unsafe { decode_avx512(h, q, keys, values, &rows, &mut scores, out) };
        return Ok(());
    }
    decode_rows(h, q, keys, values, &rows, &mut scores, out);
    Ok(())
}

/// [`decode_rows`] compiled for AVX-512 (the same operations in the same order: the lanes of
/// [`dot`] are independent, so the result is the same bit for bit, only wider).
///
/// # Safety
/// The CPU supports AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn decode_avx512(
    h: Heads,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    rows: &[&[i32]],
    scores: &mut [f32],
    out: &mut [f32],
) {
    decode_rows(h, q, keys, values, rows, scores, out)
}

/// The body of [`decode`], once its arguments are checked and each row cut to its window.
#[inline(always)]
fn decode_rows(
    h: Heads,
    q: &[f32],
    keys: &[f32],
    values: &[f32],
    rows: &[&[i32]],
    scores: &mut [f32],
    out: &mut [f32],
) {
    let (nh, nkv, hd) = (h.heads, h.kv_heads, h.head_dim);
    let group = nh / nkv;
    for (b, &r) in rows.iter().enumerate() {
        for head in 0..nh {
            let g = head / group;
            let qh = &q[(b * nh + head) * hd..][..hd];
            let at = |c: i32| (c as usize * nkv + g) * hd;
            let scores = &mut scores[..r.len()];
            for (s, &c) in scores.iter_mut().zip(r) {
                let d = dot(qh, &keys[at(c)..][..hd]) * h.scale;
                *s = match h.softcap {
                    Some(cap) => cap * (d / cap).tanh(),
                    None => d,
                };
            }
            let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for s in scores.iter_mut() {
                *s = (*s - max).exp();
                sum += *s;
            }
            let o = &mut out[(b * nh + head) * hd..][..hd];
            o.fill(0.0);
            for (&p, &c) in scores.iter().zip(r) {
                axpy(p, &values[at(c)..][..hd], o);
            }
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|v| *v *= inv);
        }
    }
}

/// `a . b` in 16 partial sums (lanes the compiler vectorises), then their sum.
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for l in 0..16 {
            acc[l] += x[l] * y[l];
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `o += p v`.
#[inline(always)]
fn axpy(p: f32, v: &[f32], o: &mut [f32]) {
    for (o, v) in o.iter_mut().zip(v) {
        *o += p * v;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The textbook definition, in f64.
    fn naive(
        h: Heads,
        q: &[f32],
        keys: &[f32],
        values: &[f32],
        rows: &[&[i32]],
        window: Option<i32>,
    ) -> Vec<f64> {
        let (nh, nkv, hd) = (h.heads, h.kv_heads, h.head_dim);
        let mut out = vec![0f64; q.len()];
        for (b, r) in rows.iter().enumerate() {
            let first = window.map_or(0, |w| r.len().saturating_sub(w as usize));
            let r = &r[first..];
            for head in 0..nh {
                let g = head / (nh / nkv);
                let at = |c: i32| (c as usize * nkv + g) * hd;
                let s: Vec<f64> = r
                    .iter()
                    .map(|&c| {
                        let d: f64 = (0..hd)
                            .map(|i| q[(b * nh + head) * hd + i] as f64 * keys[at(c) + i] as f64)
                            .sum();
                        let d = d * h.scale as f64;
                        h.softcap.map_or(d, |cap| cap as f64 * (d / cap as f64).tanh())
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - m).exp()).collect();
                let z: f64 = e.iter().sum();
                for i in 0..hd {
                    out[(b * nh + head) * hd + i] =
                        r.iter().zip(&e).map(|(&c, p)| p / z * values[at(c) + i] as f64).sum::<f64>();
                }
            }
        }
        out
    }

    /// Deterministic values in [-1, 1).
    fn fill(n: usize, seed: u32) -> Vec<f32> {
        let mut x = seed.wrapping_mul(2_654_435_761).max(1);
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x as f32 / u32::MAX as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// Grouped-query heads, rows of different lengths over scattered cells, windows and soft
    /// caps, a head size that is not a multiple of 16: within 1e-5 of the f64 definition.
    #[test]
    fn decode_matches_the_definition() {
        let (nkv, cells) = (2, 40);
        let rows: [&[i32]; 3] = [&[3, 7, 8, 20, 39], &[0], &[1, 2, 4, 5, 6, 9, 10, 11, 12, 13, 14, 30]];
        for (nh, hd, window, softcap) in
            [(6, 64, None, None), (2, 20, Some(4), None), (4, 35, Some(1), Some(5.0))]
        {
            let h =
                Heads { heads: nh, kv_heads: nkv, head_dim: hd, scale: 1.0 / (hd as f32).sqrt(), softcap };
            let q: Vec<f32> = fill(rows.len() * nh * hd, 1).iter().map(|x| x * 4.0).collect();
            let (k, v) = (fill(cells * nkv * hd, 2), fill(cells * nkv * hd, 3));
            let mut out = vec![f32::NAN; q.len()];
            decode(h, &q, &k, &v, &rows, window, &mut out).unwrap();
            let want = naive(h, &q, &k, &v, &rows, window);
            let err = out.iter().zip(&want).map(|(a, b)| (*a as f64 - b).abs()).fold(0.0, f64::max);
            assert!(err < 1e-5, "heads {nh}, dim {hd}, window {window:?}, cap {softcap:?}: max error {err}");
        }
    }

    /// A row's result does not depend on the rows decoded with it.
    #[test]
    fn a_rows_result_is_independent_of_its_batch() {
        let h = Heads { heads: 4, kv_heads: 1, head_dim: 16, scale: 0.25, softcap: None };
        let (k, v) = (fill(30 * 16, 5), fill(30 * 16, 6));
        let mine: &[i32] = &[2, 9, 11];
        let q = fill(3 * 4 * 16, 7);
        let mut alone = vec![0f32; 4 * 16];
        decode(h, &q[..64], &k, &v, &[mine], None, &mut alone).unwrap();
        let mut batch = vec![0f32; q.len()];
        decode(h, &q, &k, &v, &[mine, &[0, 1, 3, 4, 5, 6, 7, 8, 10, 12, 13], &[29]], None, &mut batch)
            .unwrap();
        assert_eq!(alone, batch[..64], "bit for bit");
    }

    /// The AVX-512 build gives the portable build's result bit for bit (where the CPU has
    /// AVX-512; elsewhere `decode` is the portable build).
    #[test]
    fn the_wide_build_equals_the_portable_one() {
        let h = Heads { heads: 6, kv_heads: 2, head_dim: 72, scale: 0.12, softcap: None };
        let rows: [&[i32]; 2] = [&[0, 5, 9, 2], &[7, 1, 3, 4, 6, 8]];
        let (k, v) = (fill(10 * 2 * 72, 8), fill(10 * 2 * 72, 9));
        let q = fill(2 * 6 * 72, 10);
        let mut wide = vec![0f32; q.len()];
        decode(h, &q, &k, &v, &rows, None, &mut wide).unwrap();
        let mut portable = vec![0f32; q.len()];
        decode_rows(h, &q, &k, &v, &rows, &mut [0f32; 6], &mut portable);
        assert_eq!(wide, portable);
    }

    #[test]
    fn bad_shapes_are_errors() {
        let h = Heads { heads: 2, kv_heads: 1, head_dim: 4, scale: 1.0, softcap: None };
        let (k, v) = (vec![0f32; 8], vec![0f32; 8]);
        let mut out = vec![0f32; 8];
        assert!(decode(h, &[0.0; 8], &k, &v, &[&[2]], None, &mut out).is_err(), "cell 2 of 2");
        assert!(decode(h, &[0.0; 8], &k, &v, &[&[]], None, &mut out).is_err(), "no cells");
        assert!(decode(h, &[0.0; 4], &k, &v, &[&[0]], None, &mut out).is_err(), "short queries");
        let odd = Heads { heads: 3, kv_heads: 2, ..h };
        assert!(decode(odd, &[0.0; 12], &k, &v, &[&[0]], None, &mut [0.0; 12]).is_err());
        assert!(decode(h, &[0.0; 8], &k, &v, &[&[1, 0]], None, &mut out).is_ok());
    }
}
