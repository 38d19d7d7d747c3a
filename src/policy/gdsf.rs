//! Greedy-Dual-Size-Frequency (Cherkasova 1998): priority = clock + frequency x cost / size.
//! Evicting a model raises the clock to its priority, so models not used for a while age out.
//! With model sizes in bytes and reload cost in seconds, a big model that takes long to reload
//! and is used often stays; a small cheap one goes first.

use std::collections::BTreeSet;

use super::{EvictionPolicy, PolicyInfo, Slot, prio_key};
use crate::types::Nanos;

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    key: u64,
    seq: u64,
    freq: u64,
    cost_per_byte: f64,
    tracked: bool,
}

/// Greedy-Dual-Size-Frequency. Ties broken by least recent use.
#[derive(Debug, Clone, Default)]
pub struct Gdsf {
    clock: f64,
    seq: u64,
    meta: Vec<Meta>,
    queue: BTreeSet<(u64, u64, Slot)>,
}

impl Gdsf {
    /// An empty policy with clock 0.
    pub fn new() -> Self {
        Gdsf::default()
    }

    fn requeue(&mut self, slot: Slot) {
        self.seq += 1;
        let m = &mut self.meta[slot as usize];
        let prio = self.clock + m.freq as f64 * m.cost_per_byte;
        m.key = prio_key(prio);
        m.seq = self.seq;
        self.queue.insert((m.key, m.seq, slot));
    }
}

impl EvictionPolicy for Gdsf {
    fn name(&self) -> &'static str {
        "gdsf"
    }

    fn on_insert(&mut self, slot: Slot, info: PolicyInfo, _now: Nanos) {
        if self.meta.len() <= slot as usize {
            self.meta.resize(slot as usize + 1, Meta::default());
        }
        let m = self.meta[slot as usize];
        if m.tracked {
            self.queue.remove(&(m.key, m.seq, slot));
        }
        // Cost per gigabyte keeps priorities in a comfortable floating-point range.
        let cost = if info.load_cost.is_finite() && info.load_cost > 0.0 { info.load_cost } else { 1e-9 };
        let per_gb = cost / (info.bytes.max(1) as f64 / 1e9);
        self.meta[slot as usize] = Meta { freq: 1, cost_per_byte: per_gb, tracked: true, ..m };
        self.requeue(slot);
    }

    fn on_access(&mut self, slot: Slot, _now: Nanos) {
        let Some(m) = self.meta.get(slot as usize).copied() else {
            return;
        };
        if !m.tracked {
            return;
        }
        self.queue.remove(&(m.key, m.seq, slot));
        self.meta[slot as usize].freq += 1;
        self.requeue(slot);
    }

    fn on_remove(&mut self, slot: Slot, evicted: bool) {
        let Some(m) = self.meta.get(slot as usize).copied() else {
            return;
        };
        if !m.tracked {
            return;
        }
        self.queue.remove(&(m.key, m.seq, slot));
        if evicted {
            self.clock = self.clock.max(f64::from_bits(m.key));
        }
        self.meta[slot as usize].tracked = false;
    }

    fn visit_victims(&self, visit: &mut dyn FnMut(Slot) -> bool) {
        for &(_, _, slot) in &self.queue {
            if !visit(slot) {
                return;
            }
        }
    }

    fn score(&self, slot: Slot) -> Option<f64> {
        self.meta.get(slot as usize).filter(|m| m.tracked).map(|m| f64::from_bits(m.key))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{info, order};
    use super::*;

    #[test]
    fn cheap_per_byte_goes_first_and_frequency_protects() {
        let mut p = Gdsf::new();
        // slot 0: 40 GB, 20 s to load (0.5 s/GB); slot 1: 2 GB, 2 s (1 s/GB); slot 2: 4 GB, 1 s.
        p.on_insert(0, info(40_000_000_000, 20.0), 0);
        p.on_insert(1, info(2_000_000_000, 2.0), 0);
        p.on_insert(2, info(4_000_000_000, 1.0), 0);
        assert_eq!(order(&p), vec![2, 0, 1]);
        // Two more uses of slot 2 lift it to 0.75 per GB: above slot 0.
        p.on_access(2, 1);
        p.on_access(2, 2);
        assert_eq!(order(&p), vec![0, 2, 1]);
        // Evicting slot 0 raises the clock to 0.5, so a new insert starts above the old ones.
        p.on_remove(0, true);
        p.on_insert(3, info(4_000_000_000, 1.0), 3);
        assert_eq!(p.score(3), Some(0.5 + 0.25));
        // Slot 2 ties with it at 0.75: the tie goes to the least recently used, slot 2.
        assert_eq!(order(&p), vec![2, 3, 1]);
    }
}
