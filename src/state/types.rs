//! The decision core's data: configuration, phases, admission outcomes, the ledger, counters
//! and the status rows. Plain values with no behaviour beyond small accessors.

use serde::Serialize;
use smallvec::SmallVec;

use crate::error::PoolError;
use crate::estimate::Estimate;
use crate::log::{EvictReason, LogMode, RejectCode};
use crate::policy::Slot;
use crate::types::{ModelId, Nanos};

/// Limits and knobs of a [`PoolState`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PoolConfig {
    /// Memory limit in bytes (resolve a [`crate::MemoryLimit`] first).
    pub limit: u64,
    /// Maximum models loaded or loading at once (default 4).
    pub max_models: usize,
    /// How much of the decision log to keep.
    pub log: LogMode,
    /// Unpinned models idle this long after their last request ends are evicted by
    /// [`PoolState::expire_idle`]; `None` keeps them until memory is needed.
    pub idle_ttl: Option<Nanos>,
    /// Fixed part of a modelled load time, seconds (used for policies' reload cost and retry
    /// hints until a model's load has been measured).
    pub load_latency_secs: f64,
    /// Bytes per second of a modelled load.
    pub load_bandwidth: f64,
    /// How long a request may wait in the admission queue for memory or a model slot held by
    /// in-flight work; `0` disables the queue (every such request is refused at once, the
    /// behaviour before the queue existed).
    pub queue_timeout: Nanos,
    /// Requests waiting at once; one more is refused with `queue_full`.
    pub max_queue: usize,
    /// Prior service nanoseconds per token of a request's context (prompt plus maximum new
    /// tokens), for retry hints until a model's own rate has been measured: a backend's modelled
    /// decode time per token, or `None` (then hints fall back to the typical request time).
    pub service_ns_per_token: Option<f64>,
}

impl PoolConfig {
    /// Defaults with the given limit: 4 models, a 1024-event ring log, no TTL, 1 GB/s loads.
    pub fn with_limit(limit: u64) -> Self {
        PoolConfig {
            limit,
            max_models: 4,
            log: LogMode::Ring(1024),
            idle_ttl: None,
            load_latency_secs: 0.5,
            load_bandwidth: 1e9,
            queue_timeout: 0,
            max_queue: 1024,
            service_ns_per_token: None,
        }
    }

    /// Builder: queue requests for up to `timeout` (0 disables the queue), at most `max_queue`.
    pub fn with_queue(mut self, timeout: Nanos, max_queue: usize) -> Self {
        self.queue_timeout = timeout;
        self.max_queue = max_queue;
        self
    }
}

/// Where a model is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Not in memory.
    Absent,
    /// A load is in progress.
    Loading,
    /// In memory and serving.
    Resident,
    /// Evicted: takes no new leases; memory returns after the last lease ends and it unloads.
    Draining,
}

/// Who is asking for a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Intent {
    /// A request: on success it holds a lease until [`PoolState::release`].
    Request,
    /// A preload: loads if needed and pins; takes no lease.
    Preload,
}

/// Victims of a load plan (inline for up to 16: a plan evicting many small models for a big one
/// allocates nothing).
pub type Victims = SmallVec<[Slot; 16]>;

/// A load that fits once `victims` are evicted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadPlan {
    /// Bytes reserved for the weights (the estimate, or the last measured size).
    pub reserve: u64,
    /// Bytes reserved beside the weights for the KV cache of the request that started the load
    /// (0 for a preload); they move to the ledger's `kv` column when the load lands.
    pub kv: u64,
    /// Models to evict first, in policy order. The driver unloads them before loading.
    pub victims: Victims,
}

/// A refused admission. Nothing was evicted for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// The machine-readable reason (the HTTP error `code`).
    pub code: RejectCode,
    /// Bytes the model needs (weights, plus the request's KV cache when it asked for one).
    pub need: u64,
    /// Bytes of `need` that are the request's KV cache.
    pub kv: u64,
    /// Bytes obtainable by evicting everything evictable (for `model_too_large`: limit - pinned).
    pub available: u64,
    /// Seconds after which a retry may succeed; `None` when waiting cannot help.
    pub retry_after_secs: Option<u32>,
    /// How long the request waited in the admission queue first (0 unless it was queued).
    pub waited: Nanos,
}

/// The outcome of an admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    /// Resident: a lease was taken (for a request).
    Hit,
    /// A load is in progress: the caller waits for it (a request gets its lease when it ends).
    Join,
    /// A load was admitted: victims are evicted, the reservation is held; the caller loads.
    Load(LoadPlan),
    /// The model is leaving memory with no request left on it: its own unload is in progress.
    /// Nothing changed. The caller waits until the driver reports [`PoolState::reclaimed`] for
    /// this slot and then admits again (the model loads anew, or the new admission decides
    /// otherwise). Waiting is always worth it: the unload is already under way and ends without
    /// any request having to finish first. A model drained with requests still in flight (a
    /// forced unload, a lowered limit, shutdown) is refused with `model_draining` instead.
    ///
    /// Also, with the queue off, for a request whose KV cache fits beside its resident or
    /// loading model only once draining memory is back (the core may just have evicted idle
    /// models for it: see [`crate::PoolState::take_unloads`]): admit again after the next
    /// [`PoolState::reclaimed`] of any model.
    AwaitUnload,
    /// Waiting can help and the queue is on: the request waits in the core's admission queue
    /// under this ticket. The driver waits for a [`Wake`] with the ticket (from
    /// [`crate::PoolState::take_wakes`] after any call that frees capacity, or after
    /// [`crate::PoolState::queue_tick`] at the queue's deadline), or reports the request gone
    /// ([`crate::PoolState::cancel_queued`]). Nothing else changed.
    Queued(Ticket),
    /// Refused, with why and whether waiting can help. Nothing was evicted.
    Reject(Rejection),
}

/// A queued request's identity, unique for the life of a [`crate::PoolState`].
pub type Ticket = u64;

/// A queued request's turn came: what its admission now is (`Hit`, `Join` or `Load(plan)`,
/// carried out in the ledger exactly as [`crate::PoolState::admit`] would have; or `Reject` when
/// waiting stopped being able to help). The driver carries it out as for a direct admission.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wake {
    /// The ticket its admission returned.
    pub ticket: Ticket,
    /// The model it asked for.
    pub slot: Slot,
    /// When it entered the queue (the driver's clock).
    pub queued_at: Nanos,
    /// The KV bytes it asked for (held in the ledger from now on if it was admitted).
    pub kv: u64,
    /// Its admission now.
    pub outcome: Admission,
}

/// Models a limit change evicted, in eviction order.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Evicted {
    /// Idle models: the driver unloads them now and reports each with `reclaimed`.
    pub unload_now: Victims,
    /// Busy models now draining: `release` says when the last lease ends and they must go.
    pub drained: Victims,
}

/// What a finished load leaves for the driver to do.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadDone {
    /// Leases granted to the requests that waited for this load.
    pub leases_granted: u32,
    /// Models evicted because the measured size pushed the pool over its limit; unload them.
    pub evicted: Victims,
}

/// Memory ledger in bytes, plus the model count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Ledger {
    /// Memory limit.
    pub limit: u64,
    /// Bytes of resident models (measured).
    pub resident: u64,
    /// Bytes reserved by loads in progress.
    pub reserved: u64,
    /// Bytes of evicted models not yet returned.
    pub draining: u64,
    /// Bytes of pinned models (included in `resident`).
    pub pinned: u64,
    /// Bytes of draining victims already promised to loads in progress (included in
    /// `draining`; they move to `reserved` as the victims' memory comes back).
    pub awaiting: u64,
    /// Bytes held beside the weights by admitted requests (their KV cache: prompt plus maximum
    /// new tokens at the model's KV bytes per token), from admission to the end of the lease.
    pub kv: u64,
    /// Models resident or loading.
    pub models: usize,
    /// Maximum models resident or loading.
    pub max_models: usize,
}

impl Ledger {
    /// `resident + reserved + draining + kv`: memory committed now.
    #[inline]
    pub fn used(&self) -> u64 {
        self.resident + self.reserved + self.draining + self.kv
    }

    /// `resident + reserved + awaiting + kv`: memory committed once every draining model is gone.
    #[inline]
    pub fn committed(&self) -> u64 {
        self.resident + self.reserved + self.awaiting + self.kv
    }
}

/// Counters kept whatever the log mode.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Stats {
    /// Requests that found their model resident.
    pub hits: u64,
    /// Requests that joined a load in progress.
    pub joins: u64,
    /// Loads admitted.
    pub loads: u64,
    /// Loads that finished successfully.
    pub loaded: u64,
    /// Loads that failed.
    pub load_failures: u64,
    /// Bytes measured over successful loads (saturates at `u64::MAX`).
    pub bytes_loaded: u64,
    /// Seconds spent in successful loads.
    pub load_secs: f64,
    /// Evictions by [`EvictReason`], indexed by `reason as usize`.
    pub evictions: [u64; <EvictReason as strum::EnumCount>::COUNT],
    /// Rejections by [`RejectCode`], indexed by `code as usize`.
    pub rejections: [u64; <RejectCode as strum::EnumCount>::COUNT],
    /// Highest `used()` seen.
    pub peak_used: u64,
    /// Highest `kv` column seen.
    pub peak_kv: u64,
    /// Requests that entered the admission queue.
    pub queued: u64,
    /// Requests admitted from the queue (the rest timed out, were refused or went away).
    pub dequeued: u64,
    /// Longest the queue has been.
    pub peak_queue: u64,
    /// Predictive preloads cancelled mid-load because a real request needed their room.
    pub preloads_cancelled: u64,
}

impl Stats {
    /// Evictions for one reason.
    pub fn evictions_for(&self, r: EvictReason) -> u64 {
        self.evictions[r as usize]
    }
    /// Rejections for one code.
    pub fn rejections_for(&self, c: RejectCode) -> u64 {
        self.rejections[c as usize]
    }
    /// All evictions.
    pub fn total_evictions(&self) -> u64 {
        self.evictions.iter().sum()
    }
    /// All rejections.
    pub fn total_rejections(&self) -> u64 {
        self.rejections.iter().sum()
    }
}

/// A model's state as the admin API shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelStatus {
    /// Model id.
    pub id: ModelId,
    /// Model type.
    pub model_type: crate::types::ModelType,
    /// Life phase.
    pub phase: Phase,
    /// Estimate used before the first load.
    pub estimate: Estimate,
    /// Last measured size, if it has loaded.
    pub measured: Option<u64>,
    /// Bytes counted in the ledger now for the weights (0 when absent; while loading, the
    /// reservation, including the KV of the request that started the load).
    pub ledger_bytes: u64,
    /// KV cache bytes per token: the backend's figure once loaded, before that the spec's or
    /// the documented rule's ([`crate::estimate::kv_bytes_per_token`]).
    pub kv_bytes_per_token: u64,
    /// KV bytes held now by its requests (leases, and requests waiting for its load).
    pub kv_bytes: u64,
    /// Never evicted while set.
    pub pinned: bool,
    /// Live leases (requests in flight).
    pub leases: u32,
    /// Requests waiting for a load in progress.
    pub waiters: u32,
    /// Requests waiting in the admission queue for this model.
    pub queued: u32,
    /// Last time a request started or ended on it.
    pub last_used: Option<Nanos>,
    /// Duration of its last load, seconds.
    pub load_secs: Option<f64>,
    /// Hits served.
    pub hits: u64,
    /// Loads started.
    pub loads: u64,
    /// The policy's score, when resident and the policy has one.
    pub score: Option<f64>,
    /// What the backend serves on it now (the pool fills it from the loaded model's handle;
    /// the engine alone, e.g. in the simulator, leaves it `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub serving: Option<crate::types::ServingStatus>,
}

impl Rejection {
    /// Whether retrying the same request on this node can never succeed: `model_too_large`, and
    /// `max_models_reached` without a retry hint (every slot held by a pinned model). The
    /// server marks such replies `x-should-retry: false` with no `Retry-After`; the fleet
    /// simulator's clients and routers read the same rule.
    pub fn never_succeeds(&self) -> bool {
        match self.code {
            RejectCode::ModelTooLarge => true,
            RejectCode::MaxModels => self.retry_after_secs.is_none(),
            _ => false,
        }
    }

    /// The engine error for this rejection of `model`.
    pub fn into_error(self, model: ModelId, max_models: usize) -> PoolError {
        let retry = self.retry_after_secs.unwrap_or(1);
        match self.code {
            RejectCode::InsufficientMemory => PoolError::InsufficientMemory {
                model,
                need: self.need,
                kv: self.kv,
                available: self.available,
                retry_after_secs: retry,
            },
            RejectCode::ModelTooLarge => {
                PoolError::ModelTooLarge { model, need: self.need, kv: self.kv, available: self.available }
            }
            RejectCode::MaxModels => {
                PoolError::MaxModelsReached { model, max_models, retry_after_secs: self.retry_after_secs }
            }
            RejectCode::Draining => PoolError::Draining { model, retry_after_secs: retry },
            RejectCode::QueueFull => PoolError::QueueFull { model, retry_after_secs: retry },
            RejectCode::QueueTimeout => PoolError::QueueTimeout {
                model,
                waited_secs: self.waited as f64 / crate::types::NANOS_PER_SEC as f64,
                retry_after_secs: retry,
            },
        }
    }
}
