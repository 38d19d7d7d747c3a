//! What operators and limits do to the pool: pin, unpin, explicit unloads, limit changes,
//! idle expiry and shutdown, and the eviction down to the limits they share.

use super::{Evicted, Phase, PoolState, Victims};
use crate::error::PoolError;
use crate::estimate::SizeEstimator;
use crate::log::{Event, EvictReason};
use crate::policy::{EvictionPolicy, Slot};
use crate::types::Nanos;

impl<P: EvictionPolicy, E: SizeEstimator> PoolState<P, E> {
    pub(super) fn pin_resident(&mut self, slot: Slot, now: Nanos) {
        let e = &mut self.entries[slot as usize];
        if !e.pinned {
            e.pinned = true;
            self.ledger.pinned += e.bytes;
            self.pinned_models += 1;
            let model = e.spec.id.clone();
            self.log.push(Event::Pin { at: now, model });
        }
    }

    /// Pin a resident model (or mark a loading one to be pinned when it lands).
    /// Returns `false` if the model is absent or draining.
    pub fn pin(&mut self, slot: Slot, now: Nanos) -> bool {
        match self.entries[slot as usize].phase {
            Phase::Resident => {
                self.pin_resident(slot, now);
                true
            }
            Phase::Loading => {
                self.entries[slot as usize].pin_on_load = true;
                true
            }
            _ => false,
        }
    }

    /// Unpin a model; it becomes evictable when idle. Returns whether it was pinned, and the
    /// models evicted because the pool was over its limits (possibly this one) for the driver
    /// to unload.
    pub fn unpin(&mut self, slot: Slot, now: Nanos) -> (bool, Victims) {
        let e = &mut self.entries[slot as usize];
        let was = e.pinned || e.pin_on_load;
        e.pin_on_load = false;
        if !e.pinned {
            return (was, Victims::new());
        }
        e.pinned = false;
        self.ledger.pinned -= e.bytes;
        self.pinned_models -= 1;
        let model = e.spec.id.clone();
        self.log.push(Event::Unpin { at: now, model });
        let evicted = if self.over_limits() {
            self.evict_down(now, self.over_reason, false).unload_now
        } else {
            Victims::new()
        };
        // An unpinned slot may be what a queued request waits for.
        self.pump(now);
        (was, evicted)
    }

    /// Evict a resident model on request. Pinned or busy models are refused unless `force`;
    /// a forced eviction of a busy model drains it (no new leases; freed after the last one).
    /// Returns `Ok(true)` if the driver must unload it now, `Ok(false)` if it waits for leases.
    ///
    /// # Errors
    /// `UnloadRefused` (with the reason and how to force it) when the model is absent, loading,
    /// already draining, or pinned or busy without `force`; nothing changes then.
    pub fn unload(&mut self, slot: Slot, now: Nanos, force: bool) -> Result<bool, PoolError> {
        let e = &self.entries[slot as usize];
        let refuse = |reason: String| PoolError::UnloadRefused { model: e.spec.id.clone(), reason };
        match e.phase {
            Phase::Absent => return Err(refuse("it is not loaded".into())),
            Phase::Loading => {
                return Err(refuse("it is loading; retry when the load has finished".into()));
            }
            Phase::Draining => return Err(refuse("it is already being unloaded".into())),
            Phase::Resident => {}
        }
        if !force && e.pinned {
            return Err(refuse("it is pinned (preloaded); unpin it first or force the unload".into()));
        }
        if !force && e.leases > 0 {
            return Err(refuse(format!(
                "{} request(s) in flight; force to stop new requests and unload when they end",
                e.leases
            )));
        }
        let leases = e.leases;
        self.evict(slot, now, EvictReason::Explicit, None);
        Ok(leases == 0)
    }

    /// Change the limits and evict down to them: idle unpinned models first (returned for the
    /// driver to unload), then busy unpinned ones are drained. Pinned models stay even if the
    /// pool remains over the new limit (the status shows it).
    ///
    /// # Errors
    /// `InvalidConfig` for a zero limit or `max_models` of 0; nothing changes then.
    pub fn set_limits(&mut self, limit: u64, max_models: usize, now: Nanos) -> Result<Evicted, PoolError> {
        if limit == 0 {
            return Err(PoolError::InvalidConfig("memory limit must be greater than zero".into()));
        }
        if max_models == 0 {
            return Err(PoolError::InvalidConfig("max_models must be at least 1".into()));
        }
        self.cfg.limit = limit;
        self.cfg.max_models = max_models;
        self.ledger.limit = limit;
        self.ledger.max_models = max_models;
        self.log.push(Event::LimitChanged { at: now, limit, max_models });
        let evicted = self.evict_down(now, EvictReason::LimitChanged, true);
        // A raised limit lets waiters in; a lowered one may make waiting hopeless for some.
        self.pump(now);
        Ok(evicted)
    }

    /// Evict idle unpinned models in policy order until within limits; if `drain_busy`, then
    /// drain busy unpinned ones too. Returns both lists (the idle ones to unload now). Memory already
    /// draining counts as on its way back, so it is not evicted for twice.
    pub(super) fn evict_down(&mut self, now: Nanos, reason: EvictReason, drain_busy: bool) -> Evicted {
        self.over_reason = reason;
        let l = self.ledger;
        let mut excess_bytes = l.committed().saturating_sub(l.limit);
        let mut excess_count = l.models.saturating_sub(l.max_models);
        let mut out = Evicted::default();
        for busy_pass in [false, true] {
            if busy_pass && !drain_busy {
                break;
            }
            while excess_bytes > 0 || excess_count > 0 {
                let mut pick = None;
                self.policy.visit_victims_at(now, &mut |s| {
                    let e = &self.entries[s as usize];
                    let ok = e.phase == Phase::Resident && !e.pinned && (busy_pass || e.leases == 0);
                    if ok {
                        pick = Some(s);
                    }
                    !ok
                });
                let Some(s) = pick else { break };
                let e = &self.entries[s as usize];
                let idle = e.leases == 0;
                excess_bytes = excess_bytes.saturating_sub(e.bytes);
                excess_count = excess_count.saturating_sub(1);
                self.evict(s, now, reason, None);
                if idle { out.unload_now.push(s) } else { out.drained.push(s) }
            }
        }
        out
    }

    /// Evict unpinned idle models whose last request ended more than the TTL ago. Returns them
    /// for the driver to unload.
    pub fn expire_idle(&mut self, now: Nanos) -> Victims {
        let Some(ttl) = self.cfg.idle_ttl else {
            return Victims::new();
        };
        let mut expired = Victims::new();
        self.policy.visit_victims(&mut |s| {
            let e = &self.entries[s as usize];
            if e.phase == Phase::Resident
                && !e.pinned
                && e.leases == 0
                && e.last_used.is_some_and(|t| now.saturating_sub(t) >= ttl)
            {
                expired.push(s);
            }
            true
        });
        for &s in &expired {
            self.evict(s, now, EvictReason::Expired, None);
        }
        expired
    }

    /// Evict every unpinned idle model and drain busy ones (shutdown). Returns the idle ones.
    pub fn evict_all(&mut self, now: Nanos, include_pinned: bool) -> Victims {
        let mut out = Victims::new();
        for slot in 0..self.entries.len() as Slot {
            let e = &mut self.entries[slot as usize];
            if e.phase != Phase::Resident || (e.pinned && !include_pinned) {
                continue;
            }
            let idle = e.leases == 0;
            self.evict(slot, now, EvictReason::Shutdown, None);
            if idle {
                out.push(slot);
            }
        }
        out
    }
}
