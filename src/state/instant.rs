//! One request on a backend where loads, unloads and requests take no time, in a single call:
//! what the simulator's instant mode (a plain cache simulation) drives on every request.

use super::{Admission, Intent, Phase, PoolState, Victims};
use crate::estimate::SizeEstimator;
use crate::policy::{EvictionPolicy, Slot};
use crate::types::Nanos;

/// What [`PoolState::serve_instant`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Served {
    /// The model was resident: the request took its lease and ended it.
    Hit,
    /// The model was absent: its victims were unloaded, it loaded, and the request took its
    /// lease and ended it.
    Loaded,
    /// Any other admission, or any admission while requests wait in the queue: only the
    /// admission was made (as [`PoolState::admit_request`] with no KV bytes); the driver carries
    /// it out.
    Admitted(Admission),
}

impl<P: EvictionPolicy, E: SizeEstimator> PoolState<P, E> {
    /// Serve a request for `slot` (no KV cache) at `now` on an instant backend, in one call.
    ///
    /// Exactly what this sequence of calls does, decision for decision (same ledger, counters,
    /// policy calls and log events, in the same order):
    /// 1. [`PoolState::admit_request`]`(slot, now, 0)` (which tells the policy of the request);
    /// 2. on `Load(plan)`: [`PoolState::reclaimed`]`(v, now)` for each victim in plan order, then
    ///    [`PoolState::load_finished`]`(slot, now, Ok(measured))`, then `reclaimed(v, now)` for
    ///    each model that load evicted;
    /// 3. on `Hit`, or after the load: [`PoolState::release`]`(slot, now, now)`, and
    ///    `reclaimed(slot, now)` if it says the model must go.
    ///
    /// `unloaded(v)` is told each model reclaimed, in that order (the driver's count of
    /// unloads). Taken only while nothing waits in the admission queue and no self-evicted
    /// unload is pending (so no call above could wake or evict anything else); otherwise, and
    /// for any other admission, the call is step 1 alone and returns [`Served::Admitted`].
    pub fn serve_instant(
        &mut self,
        slot: Slot,
        now: Nanos,
        measured: u64,
        mut unloaded: impl FnMut(Slot),
    ) -> Served {
        self.policy.on_request(slot, now);
        let quiet = self.queue.is_empty() && self.unloads.is_empty();
        if !quiet {
            return Served::Admitted(self.admit_kv(slot, now, Intent::Request, 0));
        }
        let served = if self.entries[slot as usize].phase == Phase::Absent {
            // `admit_cold`'s arm for an absent model (a request without KV always fits).
            // The plan is kept in place (`plan_absent` would return it by value, ~90 bytes).
            let mut victims = Victims::new();
            if let Err(r) = self.plan_absent_into(slot, now, Intent::Request, 0, &mut victims) {
                return Served::Admitted(self.queue_or_reject(slot, now, Intent::Request, r, 0));
            }
            let reserve = self.entries[slot as usize].need();
            self.commit_load_parts(slot, now, Intent::Request, reserve, 0, &victims);
            for &v in &victims {
                let _owner = self.reclaim_bytes(v, now);
                debug_assert!(_owner.is_none() || _owner == Some(slot));
                unloaded(v);
            }
            let _granted = self.land_load(slot, now, measured);
            debug_assert_eq!(_granted, 1);
            if self.over_limits() {
                for v in self.evict_overcommit(now) {
                    self.reclaim_bytes(v, now);
                    unloaded(v);
                }
            }
            Served::Loaded
        } else {
            match self.admit_kv(slot, now, Intent::Request, 0) {
                Admission::Hit => Served::Hit,
                other => return Served::Admitted(other),
            }
        };
        if self.release_request(slot, now, now, 0) {
            self.reclaim_bytes(slot, now);
            unloaded(slot);
        }
        served
    }
}
