//! The end of a load's life in the core: its victims' memory coming back, the load finishing
//! (measured size in, waiters granted their leases) or failing, and waiters leaving it.

use super::{LoadDone, Phase, PoolState, Victims};
use crate::estimate::SizeEstimator;
use crate::log::{Event, EvictReason};
use crate::policy::{EvictionPolicy, PolicyInfo, Slot};
use crate::types::{NANOS_PER_SEC, Nanos};

impl<P: EvictionPolicy, E: SizeEstimator> PoolState<P, E> {
    /// A draining model's memory came back (the backend unloaded it). Returns the load it made
    /// room for if that load has no victims left to wait for: the driver starts that load now.
    ///
    /// Precondition (driver): the model has no lease left (it was returned by an admission plan,
    /// `release`, or an eviction list). A slot that is not draining is ignored, so reporting an
    /// unload twice is harmless.
    pub fn reclaimed(&mut self, slot: Slot, now: Nanos) -> Option<Slot> {
        let owner = self.reclaim_bytes(slot, now);
        self.pump(now);
        owner
    }

    #[inline]
    pub(super) fn reclaim_bytes(&mut self, slot: Slot, now: Nanos) -> Option<Slot> {
        let e = &mut self.entries[slot as usize];
        if e.phase != Phase::Draining {
            return None;
        }
        debug_assert_eq!(e.leases, 0, "reclaimed while leased");
        let bytes = e.bytes;
        let owner = e.owner.take();
        e.phase = Phase::Absent;
        e.bytes = 0;
        e.cancelled = false;
        self.ledger.draining -= bytes;
        let model = &e.spec.id;
        self.log.push_with(|| Event::Unload { at: now, model: model.clone(), bytes });
        let (o, generation) = owner?;
        let oe = &mut self.entries[o as usize];
        if oe.phase != Phase::Loading || oe.load_gen != generation {
            return None;
        }
        let t = bytes.min(oe.awaiting);
        oe.awaiting -= t;
        self.ledger.awaiting -= t;
        self.ledger.reserved += t;
        oe.pending_victims = oe.pending_victims.saturating_sub(1);
        (oe.pending_victims == 0).then_some(o)
    }

    /// A load ended. On success the ledger counts `measured` bytes instead of the reservation,
    /// the waiting requests get their leases, and, if the measurement pushed the pool over its
    /// limit, unpinned idle models are evicted (returned for the driver to unload). On failure
    /// the reservation is released and the waiters are dropped (the driver fails them with the
    /// error). A measurement of 0 counts as 1 byte; one that would not fit in the ledger's
    /// `u64` is clamped to what does.
    ///
    /// # Panics
    /// If `slot` is not loading: every admitted load is finished exactly once.
    pub fn load_finished(&mut self, slot: Slot, now: Nanos, result: Result<u64, &str>) -> LoadDone {
        let done = self.finish_load(slot, now, result);
        self.pump(now);
        done
    }

    fn finish_load(&mut self, slot: Slot, now: Nanos, result: Result<u64, &str>) -> LoadDone {
        match result {
            Ok(measured) => {
                let granted = self.land_load(slot, now, measured);
                LoadDone { leases_granted: granted, evicted: self.evict_overcommit(now) }
            }
            Err(error) => {
                self.end_loading(slot, now);
                let e = &mut self.entries[slot as usize];
                e.phase = Phase::Absent;
                e.bytes = 0;
                e.waiters = 0;
                // The waiters are dropped (the driver fails them): their KV leaves the ledger.
                self.ledger.kv -= e.kv;
                e.kv = 0;
                e.load_kv = 0;
                e.pin_on_load = false;
                self.ledger.models -= 1;
                self.stats.load_failures += 1;
                let model = &e.spec.id;
                self.log.push_with(|| Event::LoadFailed {
                    at: now,
                    model: model.clone(),
                    error: error.to_string(),
                });
                LoadDone::default()
            }
        }
    }

    /// After [`Self::land_load`]: if the measured size pushed the pool over its limits, evict
    /// unpinned idle models (returned, for the driver to unload).
    #[inline]
    pub(super) fn evict_overcommit(&mut self, now: Nanos) -> Victims {
        if self.over_limits() {
            self.evict_down(now, EvictReason::Overcommit, false).unload_now
        } else {
            Victims::new()
        }
    }

    /// The load's reservation leaves the ledger; returns how long the load took, seconds.
    ///
    /// # Panics
    /// If `slot` is not loading.
    #[inline]
    fn end_loading(&mut self, slot: Slot, now: Nanos) -> f64 {
        let e = &mut self.entries[slot as usize];
        assert_eq!(e.phase, Phase::Loading, "load_finished on a model that is not loading");
        if std::mem::take(&mut e.predictive) {
            self.preloading -= 1;
        }
        self.ledger.reserved -= e.bytes - e.awaiting;
        self.ledger.awaiting -= e.awaiting;
        e.awaiting = 0;
        e.pending_victims = 0;
        now.saturating_sub(e.load_started) as f64 / NANOS_PER_SEC as f64
    }

    /// A load of `slot` succeeded with `measured` bytes: it is resident, its waiters hold their
    /// leases (returned: how many). The caller then evicts if the pool is over its limits
    /// ([`PoolState::load_finished`]'s overcommit).
    #[inline]
    pub(super) fn land_load(&mut self, slot: Slot, now: Nanos, measured: u64) -> u32 {
        let secs = self.end_loading(slot, now);
        let e = &mut self.entries[slot as usize];
        // The ledger's columns sum to at most u64::MAX bytes: admission keeps them under
        // the limit, and a measurement (the one input that can exceed it) is clamped to
        // what still fits. Over 16 EiB cannot be a real measurement anyway.
        let headroom = u64::MAX - self.ledger.used() - e.load_kv;
        let measured = measured.max(1).min(headroom);
        e.phase = Phase::Resident;
        e.bytes = measured;
        e.measured = Some(measured);
        e.load_secs = Some(secs);
        e.leases = e.waiters;
        e.waiters = 0;
        // The starting request's KV leaves the reservation for the `kv` column.
        let load_kv = std::mem::take(&mut e.load_kv);
        e.kv += load_kv;
        self.ledger.kv += load_kv;
        e.busy_since = now;
        // The waiters' leases start now; their KV (all of it: a bound for the longest) sets the
        // expected end of work.
        e.work_end = 0;
        if e.kv > 0 && e.leases > 0 {
            let kv = e.kv;
            super::expect_work(e, now, kv, self.cfg.service_ns_per_token);
        }
        e.last_used = Some(now);
        let granted = e.leases;
        let pin = std::mem::take(&mut e.pin_on_load);
        let info = PolicyInfo { bytes: measured, load_cost: secs.max(1e-9) };
        self.ledger.resident += measured;
        self.stats.loaded += 1;
        self.stats.bytes_loaded = self.stats.bytes_loaded.saturating_add(measured);
        self.stats.load_secs += secs;
        self.policy.on_insert(slot, info, now);
        let model = &self.entries[slot as usize].spec.id;
        self.log.push_with(|| Event::Loaded { at: now, model: model.clone(), measured, secs });
        if pin {
            self.pin_resident(slot, now);
        }
        self.track_peak();
        granted
    }

    /// A request waiting on a load, admitted with `kv` bytes, went away before the load ended:
    /// it gives its place and its KV back (KV inside the load's reservation stays reserved until
    /// the load ends, then is not counted). Ignored when the model is no longer loading (the
    /// driver then ends the granted lease with [`PoolState::release_unused`] instead).
    pub fn cancel_wait(&mut self, slot: Slot, kv: u64) {
        let e = &mut self.entries[slot as usize];
        if e.phase == Phase::Loading {
            e.waiters = e.waiters.saturating_sub(1);
            // The core cannot tell the starting request from joiners: take from the `kv` column
            // first, the rest from the reservation's share (their sum is what the waiters hold).
            let from_kv = kv.min(e.kv);
            e.kv -= from_kv;
            self.ledger.kv -= from_kv;
            e.load_kv = e.load_kv.saturating_sub(kv - from_kv);
        }
    }
}
