//! What the pool reports to the admin API: its status, dry-run answers and unload reports.

use serde::Serialize;

use crate::state::{Ledger, ModelStatus, Stats};
use crate::types::ModelId;

/// The pool's state for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct PoolStatus {
    /// Backend name.
    pub backend: &'static str,
    /// Policy name.
    pub policy: &'static str,
    /// Memory ledger and limits.
    pub ledger: Ledger,
    /// Whether the ledger exceeds the limit (pinned or busy models after a lowered limit).
    pub over_limit: bool,
    /// The decision core's counters since the pool started.
    pub stats: Stats,
    /// Whether shutdown has begun.
    pub shutting_down: bool,
    /// Every registered model.
    pub models: Vec<ModelStatus>,
    /// The settings that shape decisions besides the ledger's limits (what a simulation of this
    /// pool must be given to predict it).
    pub config: ConfigSummary,
    /// The backend's timing model, if it follows one by construction (the fake backend);
    /// `None` for a real backend, whose timings are measured (`models[].load_secs`).
    pub timing: Option<crate::timing::TimingModel>,
}

/// The pool's decision settings, as [`PoolStatus::config`] reports them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigSummary {
    /// The policy's name.
    pub policy: &'static str,
    /// Unpinned models idle this long are evicted; `None`: never.
    pub idle_ttl_secs: Option<f64>,
    /// How long a request may wait in the admission queue (0: no queue).
    pub queue_timeout_secs: f64,
    /// Requests waiting at once.
    pub max_queue: usize,
    /// The load-time prior's fixed part, seconds (policies' reload cost, retry hints).
    pub load_latency_secs: f64,
    /// The load-time prior's bandwidth, bytes per second (`None`: infinite).
    pub load_bandwidth: Option<f64>,
}

/// The answer of a dry-run admission.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DryRun {
    /// Model asked about.
    pub model: ModelId,
    /// `hit`, `join`, `load`, `await_unload` (the model's own unload is running; a request
    /// waits for it, then loads) or `reject`.
    pub decision: &'static str,
    /// Whether a request now would be served (possibly after a load).
    pub fits: bool,
    /// Bytes a load would reserve.
    pub need: u64,
    /// Models a load would evict, in order.
    pub would_evict: Vec<ModelId>,
    /// Rejection code, if it would be refused.
    pub reject_code: Option<&'static str>,
    /// The refusal message, if it would be refused.
    pub message: Option<String>,
    /// Retry hint of a refusal, seconds.
    pub retry_after_secs: Option<u32>,
}

/// What an unload did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnloadReport {
    /// The model unloaded (or draining).
    pub model: ModelId,
    /// True if memory has been returned; false if it drains after in-flight requests.
    pub unloaded_now: bool,
    /// Bytes the backend reported freed (when unloaded now).
    pub freed_bytes: Option<u64>,
}

/// One model in a [`Residency`] view: where it is and what a request for it would cost now.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ResidencyEntry {
    /// Model id.
    pub id: ModelId,
    /// Life phase now.
    pub phase: crate::state::Phase,
    /// Requests holding it.
    pub leases: u32,
    /// Requests waiting for it (its load, or the admission queue).
    pub waiting: u32,
    /// What a request now would meet: `hit`, `join`, `load`, `await_unload`, `queue` or
    /// `reject` (the dry run's decision).
    pub decision: &'static str,
    /// Bytes a load now would evict (0 unless `load`).
    pub evict_bytes: u64,
    /// Seconds a request now would wait for its model: 0 for a hit; its load time (measured
    /// last time, else the pool's prior) for a load or a join (at most that long); the refusal's
    /// retry hint for a queued or refused one (`None` when waiting cannot help).
    pub expected_wait_secs: Option<f64>,
}

/// What a node holds and what admitting each model would cost there: a compact view for
/// routers (one lock, no backend call).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Residency {
    /// Memory limit, bytes.
    pub limit: u64,
    /// Bytes committed now (weights, reservations, draining, KV).
    pub used: u64,
    /// Every registered model.
    pub models: Vec<ResidencyEntry>,
}
