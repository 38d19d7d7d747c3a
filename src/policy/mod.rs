//! Eviction policies. A policy owns only ordering data keyed by [`Slot`]; the engine owns
//! entries, sizes, leases, pins and the ledger.
//!
//! Contract between the engine ([`crate::PoolState`]) and a policy:
//! - `on_insert(slot)` is called when a model becomes resident, and only if the slot is not
//!   already tracked; `on_remove(slot)` when it stops being resident (evicted or unloaded),
//!   only for a tracked slot; `on_access(slot)` on every hit of a tracked slot.
//! - `on_request(slot)` on every request the engine admits through
//!   [`crate::PoolState::admit_request`] or [`crate::PoolState::serve_instant`], before it
//!   decides, for any registered slot (tracked or not: a miss is an arrival too). A request
//!   woken from the admission queue is not announced again. Default: nothing.
//! - `visit_victims` walks tracked slots from the best victim to the worst. The engine skips the
//!   ones it may not evict (pinned, leased) and stops the walk once it has enough, so a policy
//!   never causes a pinned, busy or loading model to be evicted.
//! - Time is whatever the caller passes; policies never read a clock.

mod gdsf;
mod lfu;
mod lru;
mod predictive;

pub use gdsf::Gdsf;
pub use lfu::Lfu;
pub use lru::Lru;
pub use predictive::{Predictive, Predictor};

use crate::types::Nanos;

/// Dense index of a registered model inside a [`crate::PoolState`]. Stable for the state's life.
pub type Slot = u32;

/// What a policy may know about a model when it becomes resident.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyInfo {
    /// Bytes the model holds now (its measured size); fixed while it stays resident.
    pub bytes: u64,
    /// Seconds a reload would cost: the duration of the load that just ended (> 0).
    pub load_cost: f64,
}

/// Ordering of resident models for eviction. The engine owns everything else (sizes, leases,
/// pins, the ledger); a policy only answers "in which order would you evict?".
///
/// Who guarantees what: the engine calls the hooks exactly as documented on each method, so a
/// policy never sees a slot it does not track (no defensive checks needed); the policy keeps the
/// walk of [`EvictionPolicy::visit_victims`] consistent with the hooks it has been given. Hooks
/// run under the pool lock on the hot path: they must not block, allocate per call where
/// avoidable, or read a clock (time is `now`, the caller's).
pub trait EvictionPolicy: Send + 'static {
    /// The policy's name in config, CLI, logs and reports (`lru`, `gdsf`, ...). Constant.
    fn name(&self) -> &'static str;

    /// `slot` became resident (a load finished), with what the policy may know about it.
    ///
    /// Precondition (engine): `slot` is not tracked, i.e. it was never inserted or was removed
    /// since. After the call the policy tracks it.
    fn on_insert(&mut self, slot: Slot, info: PolicyInfo, now: Nanos);

    /// `slot` was used again: a request or preload found it resident.
    ///
    /// Precondition (engine): `slot` is tracked. Called on every hit, so it should be O(1).
    fn on_access(&mut self, slot: Slot, now: Nanos);

    /// A request for `slot` arrived at `now`, resident or not: the engine calls it before it
    /// decides, on every request admitted through [`crate::PoolState::admit_request`] or
    /// [`crate::PoolState::serve_instant`] (hits, joins, loads and refusals alike; a hit also
    /// gets [`EvictionPolicy::on_access`]). Not called again for a request woken from the
    /// admission queue. For policies that learn from every arrival ([`Predictive`]).
    ///
    /// Precondition (engine): `slot` is registered; it may be untracked. Must be O(1) and must
    /// not allocate once the policy has seen the slot. Default: nothing.
    #[inline]
    fn on_request(&mut self, _slot: Slot, _now: Nanos) {}

    /// `slot` stopped being resident; the policy must forget it. `evicted` is true when the
    /// engine chose it as a victim (capacity, max_models, overcommit, limits, expiry), false for
    /// an operator's explicit unload.
    ///
    /// Precondition (engine): `slot` is tracked. After the call it is not.
    fn on_remove(&mut self, slot: Slot, evicted: bool);

    /// Call `visit` on every tracked slot, from the best victim to the worst, until `visit`
    /// returns `false`. The engine skips slots it may not evict (pinned, leased) itself and stops
    /// once it has enough, so the policy never has to know about pins or leases.
    ///
    /// Guarantee (policy): each tracked slot is visited at most once per walk, and no untracked
    /// slot is visited. The order may change only through the hooks above.
    fn visit_victims(&self, visit: &mut dyn FnMut(Slot) -> bool);

    /// [`EvictionPolicy::visit_victims`] as of `now` (never before the latest hook's time): the
    /// engine's plans call this, so a dry run at `now` walks the same order as the admission at
    /// `now` that follows it, even when no hook has told the policy the time yet. For policies
    /// whose order depends on the time (`predictive`: distances to predicted arrivals); the
    /// default ignores `now`.
    fn visit_victims_at(&self, now: Nanos, visit: &mut dyn FnMut(Slot) -> bool) {
        let _ = now;
        self.visit_victims(visit);
    }

    /// [`EvictionPolicy::visit_victims_at`], with a visitor the compiler can inline: for an
    /// engine that knows the policy's type (the decision core's plans). Must walk exactly the
    /// slots, in exactly the order, that `visit_victims_at(now, ..)` walks. Default: calls it
    /// (one indirect call per slot visited); a policy on a hot path overrides it with the same
    /// walk, generic over the visitor.
    #[inline]
    fn walk_victims_at<F: FnMut(Slot) -> bool>(&self, now: Nanos, mut visit: F)
    where
        Self: Sized,
    {
        self.visit_victims_at(now, &mut visit);
    }

    /// The policy's score for a tracked `slot` (lower is evicted first), for the decision log
    /// and the admin API; `None` when the policy has no numeric score (LRU) or the slot is not
    /// tracked. Never used to decide.
    fn score(&self, _slot: Slot) -> Option<f64> {
        None
    }

    /// When the policy expects the next request for `slot` (tracked or not), from what it has
    /// seen up to `now`; `None` when it makes no predictions (the default) or has seen nothing
    /// of `slot`. Predictive preload ([`crate::PoolState::preload_candidate`]) asks it.
    fn predicted_next(&self, _slot: Slot, _now: Nanos) -> Option<Nanos> {
        None
    }
}

impl EvictionPolicy for Box<dyn EvictionPolicy> {
    fn name(&self) -> &'static str {
        (**self).name()
    }
    fn on_insert(&mut self, slot: Slot, info: PolicyInfo, now: Nanos) {
        (**self).on_insert(slot, info, now)
    }
    #[inline]
    fn on_access(&mut self, slot: Slot, now: Nanos) {
        (**self).on_access(slot, now)
    }
    fn on_remove(&mut self, slot: Slot, evicted: bool) {
        (**self).on_remove(slot, evicted)
    }
    fn visit_victims(&self, visit: &mut dyn FnMut(Slot) -> bool) {
        (**self).visit_victims(visit)
    }
    fn visit_victims_at(&self, now: Nanos, visit: &mut dyn FnMut(Slot) -> bool) {
        (**self).visit_victims_at(now, visit)
    }
    fn score(&self, slot: Slot) -> Option<f64> {
        (**self).score(slot)
    }
    #[inline]
    fn on_request(&mut self, slot: Slot, now: Nanos) {
        (**self).on_request(slot, now)
    }
    fn predicted_next(&self, slot: Slot, now: Nanos) -> Option<Nanos> {
        (**self).predicted_next(slot, now)
    }
}

/// The built-in online policies, selectable by name (`lru`, `gdsf`, `lfu`, `predictive`;
/// case-insensitive).
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    strum::IntoStaticStr,
    strum::VariantArray,
    strum::EnumCount,
)]
#[strum(serialize_all = "lowercase")]
pub enum PolicyKind {
    /// Least recently used (default).
    #[default]
    Lru,
    /// Greedy-Dual-Size-Frequency: keeps models that are used often and costly to reload per byte.
    Gdsf,
    /// Least frequently used, ties broken by recency.
    Lfu,
    /// Farthest predicted next request per byte of reload cost first ([`Predictive`]).
    Predictive,
}

impl PolicyKind {
    /// A fresh boxed policy of this kind.
    pub fn build(self) -> Box<dyn EvictionPolicy> {
        match self {
            PolicyKind::Lru => Box::new(Lru::new()),
            PolicyKind::Gdsf => Box::new(Gdsf::new()),
            PolicyKind::Lfu => Box::new(Lfu::new()),
            PolicyKind::Predictive => Box::new(Predictive::new()),
        }
    }
}

crate::name_table!(PolicyKind, ParsePolicyError, "eviction policy");

/// A totally ordered key for non-negative finite f64 priorities (IEEE bits order like values).
#[inline]
pub(crate) fn prio_key(v: f64) -> u64 {
    debug_assert!(v >= 0.0 && v.is_finite());
    v.max(0.0).to_bits()
}

#[cfg(test)]
pub(crate) mod test_util {
    use super::*;

    /// The full victim order, for assertions.
    pub fn order(p: &dyn EvictionPolicy) -> Vec<Slot> {
        let mut v = Vec::new();
        p.visit_victims(&mut |s| {
            v.push(s);
            true
        });
        v
    }

    pub fn info(bytes: u64, load_cost: f64) -> PolicyInfo {
        PolicyInfo { bytes, load_cost }
    }
}
