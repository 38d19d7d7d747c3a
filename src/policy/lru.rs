//! Least recently used, as an intrusive doubly linked list over slots: every operation is O(1)
//! and allocation-free once the slot table has grown to the largest slot seen.

use super::{EvictionPolicy, PolicyInfo, Slot};
use crate::types::Nanos;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
    linked: bool,
}

const UNLINKED: Link = Link { prev: NIL, next: NIL, linked: false };

/// Least recently used first. The default policy.
#[derive(Debug, Clone)]
pub struct Lru {
    links: Vec<Link>,
    /// Most recently used.
    head: u32,
    /// Least recently used: the first victim.
    tail: u32,
}

impl Default for Lru {
    fn default() -> Self {
        Lru::new()
    }
}

impl Lru {
    /// An empty LRU list.
    pub fn new() -> Self {
        Lru { links: Vec::new(), head: NIL, tail: NIL }
    }

    #[inline(always)]
    fn unlink(&mut self, s: u32) {
        let Link { prev, next, .. } = self.links[s as usize];
        if prev == NIL {
            self.head = next
        } else {
            self.links[prev as usize].next = next
        }
        if next == NIL {
            self.tail = prev
        } else {
            self.links[next as usize].prev = prev
        }
        self.links[s as usize] = UNLINKED;
    }

    /// The walk of [`EvictionPolicy::visit_victims`]: from the tail (least recently used) on.
    #[inline(always)]
    fn walk(&self, mut visit: impl FnMut(Slot) -> bool) {
        let mut s = self.tail;
        while s != NIL {
            let prev = self.links[s as usize].prev;
            if !visit(s) {
                return;
            }
            s = prev;
        }
    }

    #[inline(always)]
    fn push_front(&mut self, s: u32) {
        self.links[s as usize] = Link { prev: NIL, next: self.head, linked: true };
        if self.head == NIL {
            self.tail = s
        } else {
            self.links[self.head as usize].prev = s
        }
        self.head = s;
    }
}

impl EvictionPolicy for Lru {
    fn name(&self) -> &'static str {
        "lru"
    }

    #[inline(always)]
    fn on_insert(&mut self, slot: Slot, _info: PolicyInfo, _now: Nanos) {
        if self.links.len() <= slot as usize {
            self.links.resize(slot as usize + 1, UNLINKED);
        }
        if self.links[slot as usize].linked {
            self.unlink(slot);
        }
        self.push_front(slot);
    }

    #[inline(always)]
    fn on_access(&mut self, slot: Slot, _now: Nanos) {
        if self.head == slot {
            return;
        }
        if self.links.get(slot as usize).is_some_and(|l| l.linked) {
            self.unlink(slot);
            self.push_front(slot);
        }
    }

    #[inline(always)]
    fn on_remove(&mut self, slot: Slot, _evicted: bool) {
        if self.links.get(slot as usize).is_some_and(|l| l.linked) {
            self.unlink(slot);
        }
    }

    #[inline(always)]
    fn visit_victims(&self, visit: &mut dyn FnMut(Slot) -> bool) {
        self.walk(visit);
    }

    #[inline(always)]
    fn walk_victims_at<F: FnMut(Slot) -> bool>(&self, _now: Nanos, visit: F) {
        self.walk(visit);
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_util::{info, order};
    use super::*;

    #[test]
    fn oldest_first_and_access_moves_to_back() {
        let mut p = Lru::new();
        for s in 0..4 {
            p.on_insert(s, info(1, 1.0), u64::from(s));
        }
        assert_eq!(order(&p), vec![0, 1, 2, 3]);
        p.on_access(1, 10);
        assert_eq!(order(&p), vec![0, 2, 3, 1]);
        p.on_access(0, 11);
        assert_eq!(order(&p), vec![2, 3, 1, 0]);
        p.on_remove(3, true);
        assert_eq!(order(&p), vec![2, 1, 0]);
        p.on_remove(2, true);
        p.on_remove(0, false);
        assert_eq!(order(&p), vec![1]);
        p.on_remove(1, true);
        assert!(order(&p).is_empty());
        // Removing or touching an untracked slot changes nothing.
        p.on_remove(7, false);
        p.on_access(7, 12);
        assert!(order(&p).is_empty());
    }
}
