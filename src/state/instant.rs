//! One request on a backend where loads, unloads and requests take no time, in a single call:
//! what the simulator's instant mode (a plain cache simulation) drives on every request.

use super::{Admission, Intent, Phase, PoolState, Victims};
use crate::estimate::SizeEstimator;
use crate::log::{Event, EvictReason};
use crate::policy::{EvictionPolicy, PolicyInfo, Slot};
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
        if self.hit_instant(slot, now) {
            return Served::Hit;
        }
        let served = if self.entries[slot as usize].phase == Phase::Absent {
            if self.load_instant(slot, now, measured, &mut unloaded) {
                return Served::Loaded;
            }
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

    /// [`PoolState::serve_instant`] for a resident, idle `slot` in the common case: the hit of
    /// `admit_request(slot, now, 0)` and the `release(slot, now, now)` after it, fused, leaving
    /// exactly the state, counters and policy calls (in order) that the pair leaves. Taken only
    /// when the pair has no branch this one leaves out: the model holds no lease, hits are not
    /// logged, and the pool is within its limits (so the lease's end evicts nothing). Returns
    /// `false`, having changed nothing, when not taken.
    ///
    /// Precondition (caller): `serve_instant`'s quiet case (empty queue, no pending unloads);
    /// `policy.on_request` already called.
    #[inline(always)]
    fn hit_instant(&mut self, slot: Slot, now: Nanos) -> bool {
        let e = &self.entries[slot as usize];
        if e.phase != Phase::Resident || e.leases != 0 || self.log.wants_hits() || self.over_limits() {
            return false;
        }
        // `admit_kv`'s hit (no KV): the lease starts now.
        let e = &mut self.entries[slot as usize];
        e.last_used = Some(now);
        e.hits += 1;
        e.busy_since = now;
        self.stats.hits += 1;
        self.policy.on_access(slot, now);
        // `release_request(slot, now, now, 0)`: the lease held no time and was the only one.
        self.note_lease(0.0);
        self.entries[slot as usize].work_end = 0;
        true
    }

    /// [`PoolState::serve_instant`] for an absent `slot` in the common case, with the ledger in
    /// locals: the load's plan, its commit, its victims' reclaims, its landing and the request's
    /// lease, leaving exactly the state, counters, policy calls and log events (in order) that
    /// the generic sequence leaves. Taken only when that sequence has no branch this one leaves
    /// out: no predictive preload is loading (no cancellable victims), the model holds no KV
    /// bytes, the plan succeeds, the landed load leaves the pool within its limits (no
    /// overcommit eviction, no eviction at the lease's end). Returns `false`, having changed
    /// nothing, when not taken; the caller then takes the generic path, which plans the same.
    ///
    /// Precondition (caller): `serve_instant`'s quiet case (empty queue, no pending unloads)
    /// and `slot` absent; `policy.on_request` already called.
    #[inline]
    fn load_instant(
        &mut self,
        slot: Slot,
        now: Nanos,
        measured: u64,
        unloaded: &mut impl FnMut(Slot),
    ) -> bool {
        debug_assert!(self.queue.is_empty() && self.unloads.is_empty());
        let e = &self.entries[slot as usize];
        debug_assert_eq!(e.phase, Phase::Absent);
        if self.preloading != 0 || e.kv != 0 {
            return false;
        }
        // `plan_load_into` with no KV: refusals are left to the generic path.
        let need = e.need();
        let l = self.ledger;
        if need > l.limit.saturating_sub(l.pinned) || self.pinned_models >= l.max_models {
            return false;
        }
        let used0 = l.used();
        let bytes_short = (u128::from(used0) + u128::from(need)).saturating_sub(u128::from(l.limit));
        let count_short = (l.models + 1).saturating_sub(l.max_models);
        let mut victims = Victims::new();
        if bytes_short != 0 || count_short != 0 {
            let freed = self.push_evictable(now, bytes_short, count_short, &mut victims);
            if freed < bytes_short || victims.len() < count_short {
                return false;
            }
        }
        // What the landed load leaves: victims gone, the model resident at its measurement
        // (clamped as `land_load` clamps it, against the ledger as it stands then).
        let mut victim_bytes = 0u64;
        for &v in &victims {
            victim_bytes += self.entries[v as usize].bytes;
        }
        let headroom = u64::MAX - (used0 - victim_bytes);
        let measured = measured.max(1).min(headroom);
        let resident = l.resident - victim_bytes + measured;
        let models = l.models - victims.len() + 1;
        if resident + l.reserved + l.awaiting + l.kv > l.limit || models > l.max_models {
            return false;
        }

        // `commit_load_parts` (request intent, no KV): evict the victims.
        let reserve = need;
        let reason = if used0.saturating_add(reserve) > l.limit {
            EvictReason::Capacity
        } else {
            EvictReason::MaxModels
        };
        let keeps = self.log.keeps_decisions();
        for &v in &victims {
            let score = if keeps { self.policy.score(v) } else { None };
            self.policy.on_remove(v, true);
            let e = &self.entries[v as usize];
            debug_assert!(e.phase == Phase::Resident && !e.pinned);
            let bytes = e.bytes;
            self.log_evict(v, now, reason, bytes, score, Some(slot));
        }
        self.stats.evictions[reason as usize] += victims.len() as u64;
        let awaiting = reserve.min(victim_bytes);
        let e = &mut self.entries[slot as usize];
        e.load_gen = e.load_gen.wrapping_add(1);
        e.load_started = now;
        e.loads += 1;
        self.stats.loads += 1;
        // `track_peak` with the victims draining and the reservation held.
        let used1 = used0 + (reserve - awaiting);
        self.stats.peak_used = self.stats.peak_used.max(used1);
        self.stats.peak_kv = self.stats.peak_kv.max(l.kv);
        self.log_load(slot, now, reserve);

        // `reclaim_bytes` for each victim, in plan order.
        for &v in &victims {
            let e = &mut self.entries[v as usize];
            let bytes = e.bytes;
            e.phase = Phase::Absent;
            e.bytes = 0;
            e.cancelled = false;
            e.owner = None;
            let model = &e.spec.id;
            self.log.push_with(|| Event::Unload { at: now, model: model.clone(), bytes });
            unloaded(v);
        }

        // `land_load`: the load took no time.
        let secs = 0.0f64;
        let e = &mut self.entries[slot as usize];
        if std::mem::take(&mut e.predictive) {
            self.preloading -= 1;
        }
        e.awaiting = 0;
        e.pending_victims = 0;
        e.phase = Phase::Resident;
        e.bytes = measured;
        e.measured = Some(measured);
        e.load_secs = Some(secs);
        e.waiters = 0;
        e.load_kv = 0;
        e.pin_on_load = false;
        e.busy_since = now;
        e.last_used = Some(now);
        self.ledger.resident = resident;
        self.ledger.models = models;
        self.stats.loaded += 1;
        self.stats.bytes_loaded = self.stats.bytes_loaded.saturating_add(measured);
        self.stats.load_secs += secs;
        self.policy.on_insert(slot, PolicyInfo { bytes: measured, load_cost: secs.max(1e-9) }, now);
        let model = &self.entries[slot as usize].spec.id;
        self.log.push_with(|| Event::Loaded { at: now, model: model.clone(), measured, secs });
        self.stats.peak_used = self.stats.peak_used.max(used0 - victim_bytes + measured);

        // `release_request(slot, now, now, 0)`: the lease held no time; within the limits, the
        // model stays.
        self.note_lease(0.0);
        let e = &mut self.entries[slot as usize];
        e.leases = 0;
        e.work_end = 0;
        true
    }
}
