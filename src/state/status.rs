//! Read-only views of the core: status rows for the admin API, and the ledger recomputed from
//! the entries (tests and debug assertions).

use super::{Admission, Intent, Ledger, ModelStatus, Phase, PoolState};
use crate::estimate::SizeEstimator;
use crate::policy::{EvictionPolicy, Slot};
use crate::types::Nanos;

/// What a request for a model would meet now, by the engine's dry run
/// ([`PoolState::preview`]): the per-model entry of a node's residency view for routers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Decision {
    /// Resident: served at once.
    Hit,
    /// A load is in progress: the request would wait for it.
    Join,
    /// Absent: it would be loaded (evicting `evict_bytes`).
    Load,
    /// Its own unload is under way: it would be loaded again after that.
    AwaitUnload,
    /// It would wait in the admission queue for in-flight work.
    Queue,
    /// It would be refused.
    Reject,
}

impl Decision {
    /// The name in the admin API (`hit`, `join`, `load`, `await_unload`, `queue`, `reject`).
    pub fn as_str(self) -> &'static str {
        match self {
            Decision::Hit => "hit",
            Decision::Join => "join",
            Decision::Load => "load",
            Decision::AwaitUnload => "await_unload",
            Decision::Queue => "queue",
            Decision::Reject => "reject",
        }
    }
}

/// A dry run's cost of admitting a request for one model now ([`PoolState::admission_view`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdmissionView {
    /// What the request would meet.
    pub decision: Decision,
    /// Bytes a load now would evict (0 unless [`Decision::Load`]).
    pub evict_bytes: u64,
    /// Seconds it would wait for its model: 0 for a hit; the model's expected load time
    /// ([`PoolState::expected_load_secs`]) for a load, a join or an awaited unload (at most that
    /// long); the refusal's retry hint for a queued or refused one (`None`: waiting cannot help).
    pub expected_wait_secs: Option<f64>,
}

impl<P: EvictionPolicy, E: SizeEstimator> PoolState<P, E> {
    /// The dry-run cost of a request for `slot` at `now`, changing nothing: the one definition
    /// behind the server's `GET /admin/residency` and the fleet simulator's router views.
    pub fn admission_view(&self, slot: Slot, now: Nanos) -> AdmissionView {
        let load = self.expected_load_secs(slot);
        // The dry run, keeping a refusal's retry hint when the queue would take it.
        let (decision, evict_bytes, wait) = match self.preview_or_refusal(slot, now) {
            Ok(Admission::Hit) => (Decision::Hit, 0, Some(0.0)),
            Ok(Admission::Join) => (Decision::Join, 0, Some(load)),
            Ok(Admission::Load(plan)) => (
                Decision::Load,
                plan.victims.iter().map(|&v| self.entries[v as usize].bytes).sum(),
                Some(load),
            ),
            Ok(Admission::AwaitUnload) => (Decision::AwaitUnload, 0, Some(load)),
            Ok(other) => unreachable!("a dry run before the queue neither queues nor refuses: {other:?}"),
            Err(r) => {
                let hint = r.retry_after_secs.map(f64::from);
                match self.queue_outcome(Intent::Request, r) {
                    Admission::Queued(_) => (Decision::Queue, 0, hint),
                    Admission::Reject(r) => (Decision::Reject, 0, r.retry_after_secs.map(f64::from)),
                    other => unreachable!("a refusal queues or is refused, not {other:?}"),
                }
            }
        };
        AdmissionView { decision, evict_bytes, expected_wait_secs: wait }
    }

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
            serving: None,
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
