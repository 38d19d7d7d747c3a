//! Offline baselines that see the future: Belady (evict the model used farthest in the future)
//! and a size-and-cost-aware Belady (evict the model whose future use saves the least reload
//! cost per byte held until then). They are [`EvictionPolicy`] implementations like the online
//! ones, so the very same [`modelpool::PoolState`] drives them; the replay feeds each one the
//! next use of a model through [`SimPolicy::set_next_use`] (via `PoolState::policy_mut`) just
//! before admitting a request for it.
//!
//! "Next use" is an operation index in the trace (`NEVER` if the model is not requested again).
//! With variable sizes and costs, and with loads that take time, neither is optimal; they are
//! strong practical bounds to measure online policies against.

use std::cell::RefCell;
use std::cmp::Reverse;

use modelpool::policy::PolicyInfo;
use modelpool::{EvictionPolicy, Gdsf, Lfu, Lru, Nanos, Predictive, Slot};

/// Next-use value of a model that is never requested again.
pub const NEVER: u64 = u64::MAX;

/// A policy the simulator can drive. Online policies ignore the future.
pub trait SimPolicy: EvictionPolicy {
    /// Whether the replay must compute and feed next-use information.
    const OFFLINE: bool = false;
    /// Before admitting the request at trace index `now_idx` for `slot`: that model's next
    /// request after this one is at index `next` (or [`NEVER`]).
    #[inline]
    fn set_next_use(&mut self, _slot: Slot, _next: u64, _now_idx: u64) {}
}

impl SimPolicy for Lru {}
impl SimPolicy for Gdsf {}
impl SimPolicy for Lfu {}
impl SimPolicy for Predictive {}

fn grow<T: Clone>(v: &mut Vec<T>, slot: Slot, fill: T) {
    if v.len() <= slot as usize {
        v.resize(slot as usize + 1, fill);
    }
}

/// Belady's MIN: the resident model whose next request is farthest away goes first.
///
/// The order is a sorted `Vec` of the resident models, not a tree: every request moves its
/// model's key, and for the tens of models a pool holds a short `memmove` beats a `BTreeSet`'s
/// remove and insert (which also allocate and free nodes). O(resident models) per request.
#[derive(Debug, Clone, Default)]
pub struct Belady {
    next: Vec<u64>,
    tracked: Vec<bool>,
    /// Tracked models by (farther next use first, lower slot first): the eviction order.
    order: Vec<(Reverse<u64>, Slot)>,
}

impl Belady {
    /// An empty policy.
    pub fn new() -> Self {
        Belady::default()
    }

    /// Position of `key` in the order, or where it would go.
    #[inline]
    fn find(&self, key: (Reverse<u64>, Slot)) -> Result<usize, usize> {
        self.order.binary_search(&key)
    }
}

impl EvictionPolicy for Belady {
    fn name(&self) -> &'static str {
        "belady"
    }

    fn on_insert(&mut self, slot: Slot, _info: PolicyInfo, _now: Nanos) {
        grow(&mut self.next, slot, NEVER);
        grow(&mut self.tracked, slot, false);
        if !self.tracked[slot as usize] {
            self.tracked[slot as usize] = true;
            let key = (Reverse(self.next[slot as usize]), slot);
            let at = self.find(key).unwrap_err();
            self.order.insert(at, key);
        }
    }

    fn on_access(&mut self, _slot: Slot, _now: Nanos) {}

    fn on_remove(&mut self, slot: Slot, _evicted: bool) {
        if self.tracked.get(slot as usize).copied().unwrap_or(false) {
            self.tracked[slot as usize] = false;
            let at =
                self.find((Reverse(self.next[slot as usize]), slot)).expect("tracked slots are in the order");
            self.order.remove(at);
        }
    }

    fn visit_victims(&self, visit: &mut dyn FnMut(Slot) -> bool) {
        self.walk_victims_at(0, visit);
    }

    #[inline]
    fn walk_victims_at<F: FnMut(Slot) -> bool>(&self, _now: Nanos, mut visit: F) {
        for &(_, s) in &self.order {
            if !visit(s) {
                return;
            }
        }
    }

    fn score(&self, slot: Slot) -> Option<f64> {
        // Distance is not known here; report the next-use index itself.
        self.next
            .get(slot as usize)
            .filter(|_| self.tracked[slot as usize])
            .map(|&n| if n == NEVER { f64::INFINITY } else { n as f64 })
    }
}

impl SimPolicy for Belady {
    const OFFLINE: bool = true;

    #[inline]
    fn set_next_use(&mut self, slot: Slot, next: u64, _now_idx: u64) {
        grow(&mut self.next, slot, NEVER);
        grow(&mut self.tracked, slot, false);
        let old = std::mem::replace(&mut self.next[slot as usize], next);
        if self.tracked[slot as usize] && old != next {
            // Move the key within the order: rotate the run between its old and new places.
            let from = self.find((Reverse(old), slot)).expect("tracked slots are in the order");
            let key = (Reverse(next), slot);
            let to = self.find(key).unwrap_err();
            if to <= from {
                self.order[to..=from].rotate_right(1);
                self.order[to] = key;
            } else {
                // `to` counts the old key, which moves out from before it.
                self.order[from..to].rotate_left(1);
                self.order[to - 1] = key;
            }
        }
    }
}

/// (value, farther next use first, larger first, slot): the eviction order of [`BeladyCost`].
type Candidate = (f64, Reverse<u64>, Reverse<u64>, Slot);

#[derive(Debug, Clone, Copy, Default)]
struct CostMeta {
    next: u64,
    bytes: u64,
    cost: f64,
    tracked: bool,
}

/// Size-and-cost-aware Belady: evict first the resident model with the lowest
/// `reload cost / (bytes x distance to next use)`: a model not needed again, or big, cheap to
/// reload and needed late, goes before a small costly one needed soon. Ties: farther next use,
/// then larger, then lower slot.
#[derive(Debug, Default)]
pub struct BeladyCost {
    meta: Vec<CostMeta>,
    tracked: Vec<Slot>,
    now_idx: u64,
    /// Scratch for ordering candidates (reused, so steady state allocates nothing).
    scratch: RefCell<Vec<Candidate>>,
}

impl BeladyCost {
    /// An empty policy.
    pub fn new() -> Self {
        BeladyCost::default()
    }

    fn value(&self, m: &CostMeta) -> f64 {
        if m.next == NEVER {
            return 0.0;
        }
        let distance = m.next.saturating_sub(self.now_idx).max(1) as f64;
        m.cost / (m.bytes.max(1) as f64 / 1e9) / distance
    }
}

impl EvictionPolicy for BeladyCost {
    fn name(&self) -> &'static str {
        "belady-cost"
    }

    fn on_insert(&mut self, slot: Slot, info: PolicyInfo, _now: Nanos) {
        grow(&mut self.meta, slot, CostMeta { next: NEVER, ..CostMeta::default() });
        let m = &mut self.meta[slot as usize];
        m.bytes = info.bytes;
        m.cost = if info.load_cost.is_finite() && info.load_cost > 0.0 { info.load_cost } else { 1e-9 };
        if !m.tracked {
            m.tracked = true;
            self.tracked.push(slot);
        }
    }

    fn on_access(&mut self, _slot: Slot, _now: Nanos) {}

    fn on_remove(&mut self, slot: Slot, _evicted: bool) {
        if let Some(m) = self.meta.get_mut(slot as usize)
            && m.tracked
        {
            m.tracked = false;
            self.tracked.retain(|&s| s != slot);
        }
    }

    fn visit_victims(&self, visit: &mut dyn FnMut(Slot) -> bool) {
        let mut cands = self.scratch.borrow_mut();
        cands.clear();
        for &s in &self.tracked {
            let m = &self.meta[s as usize];
            cands.push((self.value(m), Reverse(m.next), Reverse(m.bytes), s));
        }
        cands.sort_unstable_by(|a, b| {
            a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)).then(a.3.cmp(&b.3))
        });
        for &(_, _, _, s) in cands.iter() {
            if !visit(s) {
                return;
            }
        }
    }

    fn score(&self, slot: Slot) -> Option<f64> {
        self.meta.get(slot as usize).filter(|m| m.tracked).map(|m| self.value(m))
    }
}

impl SimPolicy for BeladyCost {
    const OFFLINE: bool = true;

    #[inline]
    fn set_next_use(&mut self, slot: Slot, next: u64, now_idx: u64) {
        grow(&mut self.meta, slot, CostMeta { next: NEVER, ..CostMeta::default() });
        self.meta[slot as usize].next = next;
        self.now_idx = now_idx;
    }
}

/// For each operation index, the index of the next request for the same model ([`NEVER`] if
/// none). Entries for admin operations are [`NEVER`].
pub fn next_uses(trace: &crate::trace::Trace) -> Vec<u64> {
    let mut last = vec![NEVER; trace.models.len()];
    let mut next = vec![NEVER; trace.ops.len()];
    for (i, op) in trace.ops.iter().enumerate().rev() {
        if op.kind == crate::trace::OpKind::Request {
            let m = op.model as usize;
            next[i] = last[m];
            last[m] = i as u64;
        }
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(p: &dyn EvictionPolicy) -> Vec<Slot> {
        let mut v = Vec::new();
        p.visit_victims(&mut |s| {
            v.push(s);
            true
        });
        v
    }

    fn info(bytes: u64, load_cost: f64) -> PolicyInfo {
        PolicyInfo { bytes, load_cost }
    }

    #[test]
    fn belady_evicts_farthest_next_use_first() {
        let mut p = Belady::new();
        p.set_next_use(0, 10, 0);
        p.set_next_use(1, NEVER, 1);
        p.set_next_use(2, 5, 2);
        for s in 0..3 {
            p.on_insert(s, info(1, 1.0), 0);
        }
        assert_eq!(order(&p), vec![1, 0, 2]);
        p.set_next_use(2, 50, 5);
        assert_eq!(order(&p), vec![1, 2, 0]);
        p.on_remove(1, true);
        assert_eq!(order(&p), vec![2, 0]);
    }

    #[test]
    fn cost_aware_belady_prefers_big_cheap_far() {
        let mut p = BeladyCost::new();
        // slot 0: 40 GB, 10 s reload, next at 100; slot 1: 1 GB, 1 s, next at 100;
        // slot 2: 4 GB, 2 s, next at 20; slot 3: never again.
        p.set_next_use(0, 100, 0);
        p.set_next_use(1, 100, 0);
        p.set_next_use(2, 20, 0);
        p.set_next_use(3, NEVER, 0);
        p.on_insert(0, info(40_000_000_000, 10.0), 0);
        p.on_insert(1, info(1_000_000_000, 1.0), 0);
        p.on_insert(2, info(4_000_000_000, 2.0), 0);
        p.on_insert(3, info(1_000_000_000, 1.0), 0);
        // values: 0 -> 0.25/100, 1 -> 1/100, 2 -> 0.5/20, 3 -> 0.
        assert_eq!(order(&p), vec![3, 0, 1, 2]);
        p.on_remove(3, true);
        assert_eq!(order(&p), vec![0, 1, 2]);
    }

    #[test]
    fn next_uses_point_forward() {
        use crate::trace::{Op, Service, Trace};
        let r = |m| Op::request(0, m, Service::Duration(0));
        let t = Trace { models: Vec::new(), ops: vec![r(0), r(1), r(0), r(0), r(1)] };
        let t = Trace {
            models: vec![
                crate::trace::ModelDef {
                    id: "a".into(),
                    model_type: Default::default(),
                    size: None,
                    kv_bytes_per_token: None,
                };
                2
            ],
            ..t
        };
        assert_eq!(next_uses(&t), vec![2, 4, 3, NEVER, NEVER]);
    }
}
