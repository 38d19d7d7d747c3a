//! Predictive eviction: per model, an online estimate of when it will next be requested,
//! learned from its own arrivals; the victim is the model whose predicted reuse saves the least
//! reload cost per (square root of a) byte held until then
//! (`cost / (sqrt(GB) x predicted distance)`), the online analogue of the simulator's offline
//! `belady-cost`. The square root hedges the size weighting: with a perfect prediction cost per
//! byte is right (`belady-cost`), but a prediction's error is of the order of the prediction, and
//! full per-byte weighting then throws out a big model that is needed soon (docs/sim.md has the
//! measured exponents 1, 0.5, 0.25 and 0).
//!
//! The predictor ([`Predictor`]) sees every request ([`EvictionPolicy::on_request`]), hits and
//! misses alike, and models a model's inter-arrival gaps as a mixture of two exponentials: short
//! gaps (a session or a burst going on) and long gaps (between sessions), fitted online by a
//! two-means split in log space with exponentially decayed means (O(1), no allocation, 48
//! bytes per model). Given the time `e` since the last request, the posterior weight of "the
//! session goes on" falls as `e` grows, and the expected time to the next request is the
//! posterior mean of the two components' residuals. Long gaps with a low coefficient of
//! variation are periodic (a job): their residual is the time left to the next period, not a
//! memoryless mean. Once `e` exceeds what the history explains (past the long mean plus two
//! deviations), the estimate is `e` itself: with nothing learned, or nothing learnable, the
//! ordering is LRU's (with the cost-per-byte weighting).

use std::cell::RefCell;

use super::{EvictionPolicy, PolicyInfo, Slot};
use crate::types::Nanos;

/// Weight of a new gap in the decayed means once warmed up (1/8: about the last eight gaps).
const ALPHA: f64 = 0.125;
/// Below this coefficient of variation the long gaps are taken as periodic.
const PERIODIC_CV: f64 = 0.25;
/// The smallest distance a prediction may give, seconds (no division by zero, no infinities).
const MIN_SECS: f64 = 1e-3;

/// Online estimate of one model's next request, from its own arrivals. O(1) per arrival, fixed
/// size, no allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Predictor {
    /// Last arrival, nanoseconds (valid when `n > 0`).
    last: Nanos,
    /// Arrivals seen, saturating.
    n: u32,
    /// Decayed mean of the short gaps, seconds.
    short: f64,
    /// Decayed mean of the long gaps, seconds.
    long: f64,
    /// Decayed variance of the long gaps, seconds squared.
    long_var: f64,
    /// Decayed fraction of gaps that were short.
    w: f64,
}

impl Predictor {
    /// A predictor that has seen nothing.
    pub const fn new() -> Self {
        Predictor { last: 0, n: 0, short: 0.0, long: 0.0, long_var: 0.0, w: 0.5 }
    }

    /// Arrivals seen so far (saturating at `u32::MAX`).
    pub fn arrivals(&self) -> u32 {
        self.n
    }

    /// Record an arrival at `now` (not before the previous one).
    #[inline]
    pub fn observe(&mut self, now: Nanos) {
        if self.n > 0 {
            let gap = (now.saturating_sub(self.last) as f64 * 1e-9).max(MIN_SECS);
            // Warm start: plain averages over the first gaps, then a fixed decay.
            let a = (1.0 / self.n as f64).max(ALPHA);
            if self.n == 1 {
                self.short = gap;
                self.long = gap;
            } else if gap * gap < self.short * self.long {
                // Below the geometric mean of the two means: a short gap (2-means in log space).
                self.short += a * (gap - self.short);
                self.w += a * (1.0 - self.w);
            } else {
                let d = gap - self.long;
                self.long += a * d;
                self.long_var = (1.0 - a) * (self.long_var + a * d * d);
                self.w -= a * self.w;
            }
            // Keep the components ordered (a drift can cross them).
            if self.short > self.long {
                std::mem::swap(&mut self.short, &mut self.long);
            }
        }
        self.last = now;
        self.n = self.n.saturating_add(1);
    }

    /// Expected seconds from `now` to the next arrival. With fewer than three arrivals, or once
    /// the silence exceeds what the history explains, it is the time since the last arrival
    /// (LRU's estimate); `None` before any arrival.
    #[inline]
    pub fn expected_in(&self, now: Nanos) -> Option<f64> {
        if self.n == 0 {
            return None;
        }
        let e = now.saturating_sub(self.last) as f64 * 1e-9;
        let sd = self.long_var.sqrt();
        if self.n < 3 || e > self.long + 2.0 * sd {
            return Some(e.max(MIN_SECS));
        }
        let periodic = sd < PERIODIC_CV * self.long;
        let long_left = if periodic { (self.long - e).max(sd) } else { self.long };
        // Posterior weights of the two components after `e` seconds of silence.
        let ws = self.w * (-e / self.short).exp() / self.short;
        let wl = (1.0 - self.w) * (-e / self.long).exp() / self.long;
        let total = ws + wl;
        let r = if total > 0.0 && total.is_finite() {
            (ws * self.short + wl * long_left) / total
        } else {
            long_left
        };
        Some(r.max(MIN_SECS))
    }

    /// The predicted time of the next arrival, nanoseconds (see [`Predictor::expected_in`]).
    pub fn next_at(&self, now: Nanos) -> Option<Nanos> {
        self.expected_in(now).map(|s| now.saturating_add((s * 1e9) as u64))
    }

    /// Whether the prediction at `now` comes from the learned gaps: three arrivals or more and a
    /// silence the history explains. Otherwise [`Predictor::expected_in`] is LRU's fallback (the
    /// silence itself), which orders victims but predicts nothing worth a preload.
    pub fn learned(&self, now: Nanos) -> bool {
        let e = now.saturating_sub(self.last) as f64 * 1e-9;
        self.n >= 3 && e <= self.long + 2.0 * self.long_var.sqrt()
    }
}

/// (value, predicted distance, bytes, slot): a victim candidate.
type Cand = (f64, f64, u64, Slot);

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    pred: Predictor,
    bytes: u64,
    cost: f64,
    tracked: bool,
}

/// Evicts the model with the least `reload cost / (sqrt(GB) x predicted distance to its next
/// request)` first; ties by farther prediction, then larger, then lower slot.
///
/// Memory: one fixed-size record per slot ever seen (the vector grows only when a new slot
/// appears) and a scratch vector as long as the resident set; no allocation per request.
#[derive(Debug, Default)]
pub struct Predictive {
    meta: Vec<Meta>,
    tracked: Vec<Slot>,
    /// The latest time a hook was given: the walk's "now".
    now: Nanos,
    /// Scratch for ordering candidates (reused).
    scratch: RefCell<Vec<Cand>>,
}

impl Predictive {
    /// An empty policy.
    pub fn new() -> Self {
        Predictive::default()
    }

    #[inline]
    fn grow(&mut self, slot: Slot) {
        if self.meta.len() <= slot as usize {
            self.meta.resize(slot as usize + 1, Meta::default());
        }
    }

    /// The predictor of `slot` (a default one for a slot never seen).
    pub fn predictor(&self, slot: Slot) -> Predictor {
        self.meta.get(slot as usize).map(|m| m.pred).unwrap_or_default()
    }

    /// Heap bytes held (for the no-allocation tests: constant once every slot was seen and the
    /// resident set stopped growing).
    pub fn heap_capacity(&self) -> usize {
        self.meta.capacity() * std::mem::size_of::<Meta>()
            + self.tracked.capacity() * std::mem::size_of::<Slot>()
            + self.scratch.borrow().capacity() * std::mem::size_of::<Cand>()
    }

    /// (value, distance) of a tracked model at the latest hook's time.
    #[inline]
    fn value(&self, m: &Meta) -> (f64, f64) {
        self.value_at(m, self.now)
    }

    /// (value, distance) of a tracked model at `now`.
    #[inline]
    fn value_at(&self, m: &Meta, now: Nanos) -> (f64, f64) {
        let d = m.pred.expected_in(now).unwrap_or(MIN_SECS);
        (m.cost / (m.bytes.max(1) as f64 * 1e-9).sqrt() / d, d)
    }
}

impl EvictionPolicy for Predictive {
    fn name(&self) -> &'static str {
        "predictive"
    }

    fn on_insert(&mut self, slot: Slot, info: PolicyInfo, now: Nanos) {
        self.grow(slot);
        self.now = self.now.max(now);
        let m = &mut self.meta[slot as usize];
        m.bytes = info.bytes;
        m.cost = if info.load_cost.is_finite() && info.load_cost > 0.0 { info.load_cost } else { 1e-9 };
        if m.pred.n == 0 {
            // Loaded with no request seen (a preload): recency starts now.
            m.pred.observe(now);
        }
        if !m.tracked {
            m.tracked = true;
            self.tracked.push(slot);
        }
    }

    #[inline]
    fn on_request(&mut self, slot: Slot, now: Nanos) {
        self.grow(slot);
        self.now = self.now.max(now);
        self.meta[slot as usize].pred.observe(now);
    }

    #[inline]
    fn on_access(&mut self, _slot: Slot, now: Nanos) {
        // Arrivals come through `on_request`; a preload hit is no demand.
        self.now = self.now.max(now);
    }

    fn on_remove(&mut self, slot: Slot, _evicted: bool) {
        if let Some(m) = self.meta.get_mut(slot as usize)
            && m.tracked
        {
            m.tracked = false;
            if let Some(i) = self.tracked.iter().position(|&s| s == slot) {
                self.tracked.swap_remove(i);
            }
        }
    }

    fn visit_victims(&self, visit: &mut dyn FnMut(Slot) -> bool) {
        self.visit_victims_at(self.now, visit);
    }

    /// The walk at `now` (or the latest hook's time, if later): a dry run between hooks orders
    /// models as the admission at the same `now` will.
    fn visit_victims_at(&self, now: Nanos, visit: &mut dyn FnMut(Slot) -> bool) {
        let now = now.max(self.now);
        let mut cands = self.scratch.borrow_mut();
        cands.clear();
        for &s in &self.tracked {
            let m = &self.meta[s as usize];
            let (v, d) = self.value_at(m, now);
            cands.push((v, d, m.bytes, s));
        }
        // The engine usually stops after one or two victims: select the next best lazily
        // (O(resident) per victim) instead of sorting them all.
        let better = |a: &Cand, b: &Cand| {
            a.0.total_cmp(&b.0).then(b.1.total_cmp(&a.1)).then(b.2.cmp(&a.2)).then(a.3.cmp(&b.3)).is_lt()
        };
        for i in 0..cands.len() {
            let mut best = i;
            for j in i + 1..cands.len() {
                if better(&cands[j], &cands[best]) {
                    best = j;
                }
            }
            cands.swap(i, best);
            if !visit(cands[i].3) {
                return;
            }
        }
    }

    fn score(&self, slot: Slot) -> Option<f64> {
        self.meta.get(slot as usize).filter(|m| m.tracked).map(|m| self.value(m).0)
    }

    /// Only learned predictions ([`Predictor::learned`]): a model whose estimate is LRU's
    /// fallback is not predicted (a preload of it would be a guess).
    fn predicted_next(&self, slot: Slot, now: Nanos) -> Option<Nanos> {
        self.meta.get(slot as usize).filter(|m| m.pred.learned(now)).and_then(|m| m.pred.next_at(now))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{info, order};
    use super::*;

    const S: Nanos = 1_000_000_000;

    /// A tiny seeded generator (xorshift) for synthetic arrival processes.
    struct Xs(u64);
    impl Xs {
        fn uniform(&mut self) -> f64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            ((self.0 >> 11) as f64 + 0.5) / (1u64 << 53) as f64
        }
        fn exp(&mut self) -> f64 {
            -self.uniform().ln()
        }
    }

    fn secs(s: f64) -> Nanos {
        (s * 1e9) as Nanos
    }

    #[test]
    fn periodic_arrivals_predict_the_next_period() {
        let mut p = Predictor::new();
        let mut t = 0;
        for _ in 0..50 {
            p.observe(t);
            t += 600 * S;
        }
        let last = t - 600 * S;
        // 100 s after the last job: 500 s left, within a second.
        let left = p.expected_in(last + 100 * S).unwrap();
        assert!((left - 500.0).abs() < 1.0, "{left}");
        assert!((p.next_at(last + 100 * S).unwrap() as f64 - (last + 600 * S) as f64).abs() < 1e9);
        // Long past the period: overdue, the estimate becomes the silence itself (LRU).
        assert!((p.expected_in(last + 2000 * S).unwrap() - 2000.0).abs() < 1e-6);
    }

    #[test]
    fn poisson_arrivals_predict_about_the_mean_gap() {
        let mut r = Xs(7);
        let mut p = Predictor::new();
        let mut t = 0.0;
        for _ in 0..5000 {
            t += 10.0 * r.exp();
            p.observe(secs(t));
        }
        // Memoryless: right after an arrival and a few seconds later, about the mean (10 s).
        for e in [0.0, 5.0, 10.0] {
            let left = p.expected_in(secs(t + e)).unwrap();
            assert!((3.0..30.0).contains(&left), "e={e}: {left}");
        }
    }

    #[test]
    fn bursty_arrivals_separate_sessions_from_silences() {
        let mut r = Xs(11);
        let mut p = Predictor::new();
        let mut t = 0.0;
        for _ in 0..200 {
            // A session of 20 requests 2 s apart (mean), then 1000 s (mean) of silence.
            for _ in 0..20 {
                t += 2.0 * r.exp();
                p.observe(secs(t));
            }
            t += 1000.0 * r.exp();
        }
        p.observe(secs(t));
        // Inside a session: the next request is seconds away.
        let soon = p.expected_in(secs(t + 0.5)).unwrap();
        assert!(soon < 30.0, "{soon}");
        // 60 s of silence: the session is over, the next one is hundreds of seconds away.
        let later = p.expected_in(secs(t + 60.0)).unwrap();
        assert!(later > 300.0, "{later}");
    }

    #[test]
    fn few_arrivals_order_like_lru() {
        let mut p = Predictive::new();
        for s in 0..3 {
            p.on_request(s, u64::from(s) * S);
            p.on_insert(s, info(1_000_000_000, 1.0), u64::from(s) * S);
        }
        p.on_request(0, 10 * S);
        assert_eq!(order(&p), vec![1, 2, 0]);
        // LRU's fallback orders victims but is no prediction (nothing to preload on).
        assert_eq!(p.predicted_next(1, 10 * S), None);
    }

    #[test]
    fn far_and_big_goes_before_near_and_small() {
        let mut p = Predictive::new();
        // Slot 0: a job every 100 s; slot 1: every 10 s; both 1 GB and 1 s to reload.
        for k in 0..20u64 {
            p.on_request(0, k * 100 * S);
        }
        for k in 0..195u64 {
            p.on_request(1, k * 10 * S);
        }
        p.on_insert(0, info(1_000_000_000, 1.0), 1900 * S);
        p.on_insert(1, info(1_000_000_000, 1.0), 1940 * S);
        // Slot 2: 40 GB, requested once, at 1000 s.
        p.on_request(2, 1000 * S);
        p.on_insert(2, info(40_000_000_000, 1.0), 1000 * S);
        p.on_access(1, 1945 * S);
        // At 1945 s: slot 0 is due in 55 s, slot 1 in 5 s; slot 2 has been silent 945 s (its
        // LRU estimate) and holds 40 times the bytes: it goes first, then slot 0.
        assert_eq!(order(&p), vec![2, 0, 1]);
        let due = |s| p.predicted_next(s, 1945 * S).unwrap() as f64 / 1e9;
        assert!((due(0) - 2000.0).abs() < 1.0 && (due(1) - 1950.0).abs() < 1.0);
        p.on_remove(2, true);
        assert_eq!(order(&p), vec![0, 1]);
    }

    #[test]
    fn no_allocation_per_request_after_warm_up() {
        let mut r = Xs(3);
        let mut p = Predictive::new();
        let mut t = 0.0;
        for s in 0..8 {
            p.on_request(s, 0);
            p.on_insert(s, info(1_000_000_000 * u64::from(s + 1), 1.0), 0);
        }
        let _ = order(&p);
        let cap = p.heap_capacity();
        for _ in 0..100_000 {
            t += r.exp();
            let s = (r.uniform() * 8.0) as Slot;
            p.on_request(s, secs(t));
            p.on_access(s, secs(t));
            if r.uniform() < 0.01 {
                let _ = order(&p);
            }
        }
        assert_eq!(p.heap_capacity(), cap);
        assert_eq!(std::mem::size_of::<Predictor>(), 48);
    }
}
