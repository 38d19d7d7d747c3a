//! Least frequently used; among equally used models the least recently used goes first.
//! Frequencies restart when a model is reloaded.

use std::collections::BTreeSet;

use super::{EvictionPolicy, PolicyInfo, Slot};
use crate::types::Nanos;

#[derive(Debug, Clone, Copy, Default)]
struct Meta {
    freq: u64,
    seq: u64,
    tracked: bool,
}

/// Least frequently used first.
#[derive(Debug, Clone, Default)]
pub struct Lfu {
    seq: u64,
    meta: Vec<Meta>,
    queue: BTreeSet<(u64, u64, Slot)>,
}

impl Lfu {
    /// An empty policy.
    pub fn new() -> Self {
        Lfu::default()
    }
}

impl EvictionPolicy for Lfu {
    fn name(&self) -> &'static str {
        "lfu"
    }

    fn on_insert(&mut self, slot: Slot, _info: PolicyInfo, _now: Nanos) {
        if self.meta.len() <= slot as usize {
            self.meta.resize(slot as usize + 1, Meta::default());
        }
        let m = self.meta[slot as usize];
        if m.tracked {
            self.queue.remove(&(m.freq, m.seq, slot));
        }
        self.seq += 1;
        self.meta[slot as usize] = Meta { freq: 1, seq: self.seq, tracked: true };
        self.queue.insert((1, self.seq, slot));
    }

    fn on_access(&mut self, slot: Slot, _now: Nanos) {
        let Some(m) = self.meta.get(slot as usize).copied() else {
            return;
        };
        if !m.tracked {
            return;
        }
        self.queue.remove(&(m.freq, m.seq, slot));
        self.seq += 1;
        let m = Meta { freq: m.freq + 1, seq: self.seq, tracked: true };
        self.meta[slot as usize] = m;
        self.queue.insert((m.freq, m.seq, slot));
    }

    fn on_remove(&mut self, slot: Slot, _evicted: bool) {
        let Some(m) = self.meta.get(slot as usize).copied() else {
            return;
        };
        if m.tracked {
            self.queue.remove(&(m.freq, m.seq, slot));
            self.meta[slot as usize].tracked = false;
        }
    }

    fn visit_victims(&self, visit: &mut dyn FnMut(Slot) -> bool) {
        for &(_, _, slot) in &self.queue {
            if !visit(slot) {
                return;
            }
        }
    }

    fn score(&self, slot: Slot) -> Option<f64> {
        self.meta.get(slot as usize).filter(|m| m.tracked).map(|m| m.freq as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{info, order};
    use super::*;

    #[test]
    fn least_used_first_ties_by_recency() {
        let mut p = Lfu::new();
        for s in 0..3 {
            p.on_insert(s, info(1, 1.0), 0);
        }
        p.on_access(0, 1);
        p.on_access(0, 2);
        p.on_access(2, 3);
        assert_eq!(order(&p), vec![1, 2, 0]);
        p.on_remove(1, true);
        p.on_insert(1, info(1, 1.0), 4);
        assert_eq!(order(&p), vec![1, 2, 0]);
    }
}
