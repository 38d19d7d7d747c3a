//! Picking the next token from logits on the host: greedy, or temperature + top-p (nucleus)
//! sampling driven by a seeded ChaCha8 generator, so a given seed always yields the same tokens.

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

/// Sampling state for one generation.
pub(super) struct Sampler {
    temperature: f32,
    top_p: f32,
    rng: ChaCha8Rng,
    /// Scratch buffer of (probability, id), reused across steps.
    scratch: Vec<(f32, u32)>,
}

impl Sampler {
    /// `temperature <= 0` is greedy. `seed` `None` draws a fresh seed per generation.
    pub fn new(temperature: f32, top_p: f32, seed: Option<u64>) -> Self {
        let seed = seed.unwrap_or_else(|| {
            use std::hash::{BuildHasher, Hasher};
            // RandomState is seeded randomly per process and per instance.
            std::collections::hash_map::RandomState::new().build_hasher().finish()
        });
        Sampler {
            temperature,
            top_p: if top_p.is_finite() && top_p > 0.0 { top_p.min(1.0) } else { 1.0 },
            rng: ChaCha8Rng::seed_from_u64(seed),
            scratch: Vec::new(),
        }
    }

    /// The next token id. NaN logits never win.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        if self.temperature <= 0.0 || !self.temperature.is_finite() {
            return argmax(logits);
        }
        let max = logits.iter().copied().filter(|x| !x.is_nan()).fold(f32::NEG_INFINITY, f32::max);
        let inv_t = 1.0 / self.temperature;
        self.scratch.clear();
        let mut total = 0.0f64;
        for (i, &l) in logits.iter().enumerate() {
            if l.is_nan() {
                continue;
            }
            let p = ((l - max) * inv_t).exp();
            if p > 0.0 {
                total += p as f64;
                self.scratch.push((p, i as u32));
            }
        }
        if self.scratch.is_empty() {
            return argmax(logits);
        }
        let mut mass = total;
        if self.top_p < 1.0 {
            self.scratch.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
            let target = self.top_p as f64 * total;
            let mut acc = 0.0f64;
            let mut keep = self.scratch.len();
            for (n, (p, _)) in self.scratch.iter().enumerate() {
                acc += *p as f64;
                if acc >= target {
                    keep = n + 1;
                    break;
                }
            }
            self.scratch.truncate(keep);
            mass = acc.min(total);
        }
        // Uniform in [0, mass) from 53 random bits.
        let u = (self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64 * mass;
        let mut acc = 0.0f64;
        for &(p, id) in &self.scratch {
            acc += p as f64;
            if u < acc {
                return id;
            }
        }
        self.scratch.last().map(|&(_, id)| id).unwrap_or(0)
    }
}

/// Index of the largest logit (first on ties; NaN ignored).
pub(super) fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0usize;
    let mut best_v = f32::NEG_INFINITY;
    for (i, &v) in logits.iter().enumerate() {
        if v > best_v {
            best_v = v;
            best = i;
        }
    }
    best as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_argmax_and_ignores_nan() {
        let mut s = Sampler::new(0.0, 1.0, Some(1));
        assert_eq!(s.sample(&[0.1, 3.0, f32::NAN, 2.9]), 1);
    }

    #[test]
    fn same_seed_same_tokens_and_top_p_restricts_support() {
        let logits = [2.0f32, 1.9, 1.8, -5.0, 0.5];
        let run = |seed| {
            let mut s = Sampler::new(1.0, 1.0, Some(seed));
            (0..64).map(|_| s.sample(&logits)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let all = run(7);
        assert!(all.contains(&4), "full support reaches id 4");
        // top_p 0.5 keeps the two most likely ids (0: 0.35, 1: 0.32 of the mass).
        let mut s = Sampler::new(1.0, 0.5, Some(3));
        let picks: Vec<u32> = (0..200).map(|_| s.sample(&logits)).collect();
        assert!(picks.iter().all(|&t| t == 0 || t == 1), "{picks:?}");
        assert!(picks.contains(&0) && picks.contains(&1));
    }
}
