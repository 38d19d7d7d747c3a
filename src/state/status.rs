//! Read-only views of the core: status rows for the admin API, and the ledger recomputed from
//! the entries (tests and debug assertions).

use super::{Ledger, ModelStatus, Phase, PoolState};
use crate::estimate::SizeEstimator;
use crate::policy::{EvictionPolicy, Slot};

impl<P: EvictionPolicy, E: SizeEstimator> PoolState<P, E> {
    /// Status of one model.
    pub fn model_status(&self, slot: Slot) -> ModelStatus {
        let e = &self.entries[slot as usize];
        ModelStatus {
            id: e.spec.id.clone(),
            model_type: e.spec.model_type,
            phase: e.phase,
            estimate: e.estimate.clone(),
            measured: e.measured,
            ledger_bytes: e.bytes,
            kv_bytes_per_token: e.kv_per_token,
            kv_bytes: e.kv,
            pinned: e.pinned,
            leases: e.leases,
            waiters: e.waiters,
            queued: e.queued,
            last_used: e.last_used,
            load_secs: e.load_secs,
            hits: e.hits,
            loads: e.loads,
            score: if e.phase == Phase::Resident { self.policy.score(slot) } else { None },
        }
    }

    /// Status of every registered model, in slot order.
    pub fn models_status(&self) -> Vec<ModelStatus> {
        (0..self.entries.len() as Slot).map(|s| self.model_status(s)).collect()
    }

    /// Check the ledger against the entries (tests and debug builds). Returns a description of
    /// the first inconsistency.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut l =
            Ledger { limit: self.ledger.limit, max_models: self.ledger.max_models, ..Ledger::default() };
        for (i, e) in self.entries.iter().enumerate() {
            l.kv += e.kv;
            if e.kv > 0 && e.leases == 0 && e.waiters == 0 {
                return Err(format!("slot {i}: {} KV bytes with no request on it", e.kv));
            }
            if e.load_kv > 0 && e.phase != Phase::Loading {
                return Err(format!("slot {i}: load KV outside a load"));
            }
            match e.phase {
                Phase::Absent => {
                    if e.leases != 0 || e.bytes != 0 || e.pinned {
                        return Err(format!("slot {i}: absent with leases/bytes/pin"));
                    }
                }
                Phase::Loading => {
                    l.reserved += e.bytes - e.awaiting;
                    l.awaiting += e.awaiting;
                    l.models += 1;
                    if e.leases != 0 {
                        return Err(format!("slot {i}: loading with leases"));
                    }
                }
                Phase::Resident => {
                    l.resident += e.bytes;
                    l.models += 1;
                    if e.pinned {
                        l.pinned += e.bytes;
                    }
                }
                Phase::Draining => {
                    l.draining += e.bytes;
                    if e.pinned {
                        return Err(format!("slot {i}: draining while pinned"));
                    }
                }
            }
        }
        if l != self.ledger {
            return Err(format!("ledger {:?} != recomputed {:?}", self.ledger, l));
        }
        let pinned = self.entries.iter().filter(|e| e.pinned).count();
        if pinned != self.pinned_models {
            return Err(format!("{} pinned models counted, {pinned} pinned entries", self.pinned_models));
        }
        Ok(())
    }
}
