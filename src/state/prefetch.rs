//! Predictive preload: while memory and model slots are free and nothing waits, load the absent
//! model the policy expects to be requested soonest ([`EvictionPolicy::predicted_next`]) into
//! the free room. A preload is an ordinary load in the ledger and the decision log (its `Load`
//! event carries `predicted_in_secs`), never pins, takes no lease and evicts nothing, so it never
//! displaces a model predicted sooner (or at all); once loaded it is evictable like any idle
//! model, so a real request that needs the room takes it back through the policy.
//!
//! Evicting models predicted later than the preloaded one was tried too: on the committed
//! traces it wasted two preloads in three and missed more than preloading into free room only
//! (docs/sim.md).

use super::{Intent, Phase, PoolState};
use crate::estimate::SizeEstimator;
use crate::log::Event;
use crate::policy::{EvictionPolicy, Slot};
use crate::types::Nanos;

impl<P: EvictionPolicy, E: SizeEstimator> PoolState<P, E> {
    /// The absent model to preload at `now`, and when its next request is expected: of the
    /// models that fit in the free memory beside a free model slot, the one whose predicted
    /// next request is soonest, if within `horizon` nanoseconds. `None` while a request waits
    /// in the queue or an engine-evicted unload is pending, when no model slot or too little
    /// memory is free, when the policy predicts nothing (every built-in policy but
    /// `predictive`), or when nothing qualifies. Changes nothing. O(models).
    pub fn preload_candidate(&self, now: Nanos, horizon: Nanos) -> Option<(Slot, Nanos)> {
        let l = self.ledger;
        if !self.queue.is_empty() || !self.unloads.is_empty() || l.models >= l.max_models {
            return None;
        }
        let free = l.limit.saturating_sub(l.used());
        let mut best: Option<(Nanos, Slot)> = None;
        for (i, e) in self.entries.iter().enumerate() {
            if e.phase != Phase::Absent || e.need() > free {
                continue;
            }
            let Some(at) = self.policy.predicted_next(i as Slot, now) else { continue };
            if at.saturating_sub(now) <= horizon && best.is_none_or(|(b, _)| at < b) {
                best = Some((at, i as Slot));
            }
        }
        best.map(|(at, slot)| (slot, at))
    }

    /// Start the preload [`PoolState::preload_candidate`] chooses, if any, and return its slot:
    /// the reservation is held and a `Load` event logged with `predicted_in_secs`. The driver
    /// loads it and reports [`PoolState::load_finished`] exactly once, as for a `Load`
    /// admission with no victims; the load grants no lease and pins nothing.
    pub fn predictive_preload(&mut self, now: Nanos, horizon: Nanos) -> Option<Slot> {
        let (slot, at) = self.preload_candidate(now, horizon)?;
        let reserve = self.entries[slot as usize].need();
        self.commit_load_parts(slot, now, Intent::Preload, reserve, 0, &[]);
        // A predictive preload does not pin (an operator's preload does), and a real request
        // may cancel it while nobody waits on it.
        let e = &mut self.entries[slot as usize];
        e.pin_on_load = false;
        e.predictive = true;
        self.preloading += 1;
        if let Some(Event::Load { predicted_in_secs, .. }) = self.log.newest_mut() {
            *predicted_in_secs = Some(at.saturating_sub(now) as f64 / 1e9);
        }
        Some(slot)
    }
}
