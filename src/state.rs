//! The synchronous decision core: entries, the memory ledger, limits, the policy, the estimator
//! and the decision log. No I/O, no clock, no locks: the async pool and the simulator drive it
//! with the same calls, so what the simulator predicts is what the server does.
//!
//! Life of a model: `Absent -> Loading -> Resident -> Draining -> Absent`.
//! - [`PoolState::admit`] decides: hit, join a load in progress, load (with a victim plan that is
//!   carried out at once), or reject. A rejected admission changes nothing but counters and log.
//! - The driver loads the model outside any lock, first unloading the victims the plan named and
//!   reporting each with [`PoolState::reclaimed`]; then it reports [`PoolState::load_finished`].
//! - Requests hold leases; [`PoolState::release`] ends one. A draining model whose last lease
//!   ends must then be unloaded by the driver, which reports [`PoolState::reclaimed`].
//!
//! Ledger (bytes): `resident` (loaded models, measured sizes), `reserved` (loads in progress at
//! their estimate, minus the part still held by their own victims while those drain),
//! `draining` (evicted, memory not yet returned), `pinned` (a subset of resident). Admission keeps
//! `resident + reserved + draining <= limit`; only a load that measures above its estimate or a
//! lowered limit can push it over, and both evict at once to get back under.

use std::collections::HashMap;

use serde::Serialize;
use smallvec::SmallVec;

use crate::error::PoolError;
use crate::estimate::{Estimate, SizeEstimator};
use crate::log::{DecisionLog, Event, EvictReason, LogMode, RejectCode};
use crate::policy::{EvictionPolicy, PolicyInfo, Slot};
use crate::types::{ModelId, ModelSpec, NANOS_PER_SEC, Nanos};

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
        }
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
    /// Bytes reserved for the load (its estimate, or its last measured size).
    pub reserve: u64,
    /// Models to evict first, in policy order. The driver unloads them before loading.
    pub victims: Victims,
}

/// A refused admission. Nothing was evicted for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rejection {
    /// Why.
    pub code: RejectCode,
    /// Bytes the model needs.
    pub need: u64,
    /// Bytes obtainable by evicting everything evictable (for `model_too_large`: limit - pinned).
    pub available: u64,
    /// Seconds after which a retry may succeed; `None` when waiting cannot help.
    pub retry_after_secs: Option<u32>,
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
    AwaitUnload,
    /// Refused.
    Reject(Rejection),
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
    /// Models resident or loading.
    pub models: usize,
    /// Maximum models resident or loading.
    pub max_models: usize,
}

impl Ledger {
    /// `resident + reserved + draining`: memory committed now.
    #[inline]
    pub fn used(&self) -> u64 {
        self.resident + self.reserved + self.draining
    }

    /// `resident + reserved + awaiting`: memory committed once every draining model is gone.
    #[inline]
    pub fn committed(&self) -> u64 {
        self.resident + self.reserved + self.awaiting
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
    /// Bytes counted in the ledger now (0 when absent).
    pub ledger_bytes: u64,
    /// Never evicted while set.
    pub pinned: bool,
    /// Live leases (requests in flight).
    pub leases: u32,
    /// Requests waiting for a load in progress.
    pub waiters: u32,
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
}

#[derive(Debug, Clone)]
struct Entry {
    spec: ModelSpec,
    estimate: Estimate,
    measured: Option<u64>,
    phase: Phase,
    /// Bytes in the ledger for the current phase.
    bytes: u64,
    /// Loading: part of the reservation still held by this load's draining victims.
    awaiting: u64,
    /// Loading: victims not yet reclaimed.
    pending_victims: u32,
    /// Loading: generation, so victims reclaimed after the load ended do not touch a new one.
    load_gen: u32,
    /// Draining: the load (slot, generation) this victim makes room for.
    owner: Option<(Slot, u32)>,
    pinned: bool,
    pin_on_load: bool,
    leases: u32,
    waiters: u32,
    last_used: Option<Nanos>,
    busy_since: Nanos,
    load_started: Nanos,
    load_secs: Option<f64>,
    hits: u64,
    loads: u64,
}

impl Entry {
    #[inline]
    fn need(&self) -> u64 {
        self.measured.unwrap_or(self.estimate.bytes)
    }
}

/// The decision core. Generic over the eviction policy and the size estimator; use the boxed
/// trait objects for choices made at run time.
pub struct PoolState<P: EvictionPolicy, E: SizeEstimator> {
    cfg: PoolConfig,
    policy: P,
    estimator: E,
    entries: Vec<Entry>,
    index: HashMap<ModelId, Slot>,
    ledger: Ledger,
    stats: Stats,
    log: DecisionLog,
    /// Exponentially weighted mean of lease durations, nanoseconds.
    ewma_lease: Option<f64>,
    /// Why the pool last went over its limits (the reason logged for evictions that follow).
    over_reason: EvictReason,
    /// Resident pinned models: model slots that no eviction can free.
    pinned_models: usize,
}

impl<P: EvictionPolicy, E: SizeEstimator> PoolState<P, E> {
    /// An empty pool.
    pub fn new(cfg: PoolConfig, policy: P, estimator: E) -> Self {
        let ledger = Ledger { limit: cfg.limit, max_models: cfg.max_models, ..Ledger::default() };
        let log = DecisionLog::new(cfg.log);
        PoolState {
            cfg,
            policy,
            estimator,
            entries: Vec::new(),
            index: HashMap::new(),
            ledger,
            stats: Stats::default(),
            log,
            ewma_lease: None,
            over_reason: EvictReason::LimitChanged,
            pinned_models: 0,
        }
    }

    /// Register `spec` (or update it while the model is absent) and return its slot, estimating
    /// its size with this state's estimator now. For pure estimators only (the simulator's,
    /// tests'): an estimator that does I/O belongs outside the core, with
    /// [`PoolState::register_estimated`]. A model's own measured size later replaces the estimate.
    pub fn register(&mut self, spec: ModelSpec) -> Slot {
        let estimate = self.estimator.estimate(&spec);
        self.register_estimated(spec, estimate)
    }

    /// Register `spec` with an `estimate` the driver computed beforehand (outside any lock), or
    /// update an absent model whose spec changed; returns its slot. A model that is loading,
    /// resident or draining keeps its spec and estimate until it is absent again. Changing the
    /// size hint or the path forgets the model's measured size.
    ///
    /// # Panics
    /// If 2^32 models are registered.
    pub fn register_estimated(&mut self, spec: ModelSpec, estimate: Estimate) -> Slot {
        if let Some(&slot) = self.index.get(&spec.id) {
            let e = &mut self.entries[slot as usize];
            if e.phase == Phase::Absent && e.spec != spec {
                e.estimate = estimate;
                if e.spec.size_hint != spec.size_hint || e.spec.path != spec.path {
                    e.measured = None;
                }
                e.spec = spec;
            }
            return slot;
        }
        let slot = Slot::try_from(self.entries.len()).expect("fewer than 2^32 models");
        self.index.insert(spec.id.clone(), slot);
        self.entries.push(Entry {
            spec,
            estimate,
            measured: None,
            phase: Phase::Absent,
            bytes: 0,
            awaiting: 0,
            pending_victims: 0,
            load_gen: 0,
            owner: None,
            pinned: false,
            pin_on_load: false,
            leases: 0,
            waiters: 0,
            last_used: None,
            busy_since: 0,
            load_started: 0,
            load_secs: None,
            hits: 0,
            loads: 0,
        });
        slot
    }

    /// The slot of a registered model.
    #[inline]
    pub fn slot(&self, id: &str) -> Option<Slot> {
        self.index.get(id).copied()
    }

    /// The spec of a slot. Panics on a slot this state did not hand out.
    pub fn spec(&self, slot: Slot) -> &ModelSpec {
        &self.entries[slot as usize].spec
    }

    /// Every registered spec, in slot order.
    pub fn specs(&self) -> impl Iterator<Item = &ModelSpec> {
        self.entries.iter().map(|e| &e.spec)
    }

    /// Number of registered models.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no model is registered.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The phase of a slot.
    #[inline]
    pub fn phase(&self, slot: Slot) -> Phase {
        self.entries[slot as usize].phase
    }

    /// Live leases on a slot.
    pub fn leases(&self, slot: Slot) -> u32 {
        self.entries[slot as usize].leases
    }

    /// Whether a slot is pinned.
    pub fn is_pinned(&self, slot: Slot) -> bool {
        self.entries[slot as usize].pinned
    }

    /// Bytes an admission of `slot` would reserve now.
    pub fn need(&self, slot: Slot) -> u64 {
        self.entries[slot as usize].need()
    }

    /// The ledger.
    #[inline]
    pub fn ledger(&self) -> Ledger {
        self.ledger
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// The decision log.
    pub fn log(&self) -> &DecisionLog {
        &self.log
    }

    /// The decision log, to drain it.
    pub fn log_mut(&mut self) -> &mut DecisionLog {
        &mut self.log
    }

    /// The configuration.
    pub fn config(&self) -> &PoolConfig {
        &self.cfg
    }

    /// The policy (read-only).
    pub fn policy(&self) -> &P {
        &self.policy
    }

    /// The policy, for policies that take side information between calls (offline baselines in
    /// the simulator). Callers must not break the tracking contract of [`EvictionPolicy`].
    pub fn policy_mut(&mut self) -> &mut P {
        &mut self.policy
    }

    /// The estimator.
    pub fn estimator(&self) -> &E {
        &self.estimator
    }

    fn evictable(&self, slot: Slot) -> bool {
        let e = &self.entries[slot as usize];
        e.phase == Phase::Resident && !e.pinned && e.leases == 0
    }

    fn load_cost(&self, e: &Entry, bytes: u64) -> f64 {
        e.load_secs.unwrap_or(self.cfg.load_latency_secs + bytes as f64 / self.cfg.load_bandwidth)
    }

    fn track_peak(&mut self) {
        let used = self.ledger.used();
        if used > self.stats.peak_used {
            self.stats.peak_used = used;
        }
    }

    /// Decide for `slot` and carry the decision out in the ledger. A `Reject` changes nothing
    /// but counters and the log. See the module docs for what the driver does next.
    #[inline]
    pub fn admit(&mut self, slot: Slot, now: Nanos, intent: Intent) -> Admission {
        let e = &mut self.entries[slot as usize];
        if e.phase == Phase::Resident {
            // The hot path: no allocation unless hits are logged.
            e.last_used = Some(now);
            e.hits += 1;
            self.stats.hits += 1;
            match intent {
                Intent::Request => {
                    if e.leases == 0 {
                        e.busy_since = now;
                    }
                    e.leases += 1;
                }
                Intent::Preload => self.pin_resident(slot, now),
            }
            self.policy.on_access(slot, now);
            if self.log.wants_hits() {
                let model = self.entries[slot as usize].spec.id.clone();
                self.log.push(Event::Hit { at: now, model });
            }
            return Admission::Hit;
        }
        self.admit_cold(slot, now, intent)
    }

    fn admit_cold(&mut self, slot: Slot, now: Nanos, intent: Intent) -> Admission {
        match self.entries[slot as usize].phase {
            Phase::Loading => {
                let e = &mut self.entries[slot as usize];
                match intent {
                    Intent::Request => e.waiters += 1,
                    Intent::Preload => e.pin_on_load = true,
                }
                self.stats.joins += 1;
                if self.log.wants_hits() {
                    self.log.push(Event::Join { at: now, model: e.spec.id.clone() });
                }
                Admission::Join
            }
            Phase::Draining if self.entries[slot as usize].leases == 0 => Admission::AwaitUnload,
            Phase::Draining => {
                let e = &self.entries[slot as usize];
                let r = Rejection {
                    code: RejectCode::Draining,
                    need: e.need(),
                    available: 0,
                    retry_after_secs: Some(self.drain_hint(e, now)),
                };
                self.record_reject(slot, now, r);
                Admission::Reject(r)
            }
            Phase::Absent => match self.plan_load(slot, now) {
                Ok(plan) => {
                    self.commit_load(slot, now, intent, &plan);
                    Admission::Load(plan)
                }
                Err(r) => {
                    self.record_reject(slot, now, r);
                    Admission::Reject(r)
                }
            },
            Phase::Resident => unreachable!("handled on the hot path"),
        }
    }

    /// What [`PoolState::admit`] would decide for a request now, changing nothing (dry run).
    pub fn preview(&self, slot: Slot, now: Nanos) -> Admission {
        let e = &self.entries[slot as usize];
        match e.phase {
            Phase::Resident => Admission::Hit,
            Phase::Loading => Admission::Join,
            Phase::Draining if e.leases == 0 => Admission::AwaitUnload,
            Phase::Draining => Admission::Reject(Rejection {
                code: RejectCode::Draining,
                need: e.need(),
                available: 0,
                retry_after_secs: Some(self.drain_hint(e, now)),
            }),
            Phase::Absent => match self.plan_load(slot, now) {
                Ok(plan) => Admission::Load(plan),
                Err(r) => Admission::Reject(r),
            },
        }
    }

    fn record_reject(&mut self, slot: Slot, now: Nanos, r: Rejection) {
        self.stats.rejections[r.code as usize] += 1;
        self.log.push_with(|| Event::Reject {
            at: now,
            model: self.entries[slot as usize].spec.id.clone(),
            code: r.code,
            need: r.need,
            available: r.available,
            retry_after_secs: r.retry_after_secs,
        });
    }

    /// Plan a load of an absent model without changing anything.
    ///
    /// The arithmetic is done in `u128`: `used + need` can exceed `u64::MAX` for sizes near
    /// 2^64 bytes, and a saturated sum would understate the shortfall and overcommit.
    fn plan_load(&self, slot: Slot, now: Nanos) -> Result<LoadPlan, Rejection> {
        let need = self.entries[slot as usize].need();
        let l = self.ledger;
        let room_beside_pins = l.limit.saturating_sub(l.pinned);
        if need > room_beside_pins {
            return Err(Rejection {
                code: RejectCode::ModelTooLarge,
                need,
                available: room_beside_pins,
                retry_after_secs: None,
            });
        }
        if self.pinned_models >= l.max_models {
            // Every model slot is held by a pinned model, which no eviction frees: waiting
            // cannot help (the model-count analogue of `model_too_large`).
            return Err(Rejection {
                code: RejectCode::MaxModels,
                need,
                available: 0,
                retry_after_secs: None,
            });
        }
        let used = u128::from(l.used());
        let bytes_short = (used + u128::from(need)).saturating_sub(u128::from(l.limit));
        let count_short = (l.models + 1).saturating_sub(l.max_models);
        let mut victims = Victims::new();
        if bytes_short == 0 && count_short == 0 {
            return Ok(LoadPlan { reserve: need, victims });
        }
        let mut freed = 0u128;
        self.policy.visit_victims(&mut |s| {
            if self.evictable(s) {
                victims.push(s);
                freed += u128::from(self.entries[s as usize].bytes);
            }
            freed < bytes_short || victims.len() < count_short
        });
        if freed >= bytes_short && victims.len() >= count_short {
            return Ok(LoadPlan { reserve: need, victims });
        }
        // Not enough even with every evictable model gone: evict nothing. `freed <= used`, and
        // the result is at most `limit`, so it fits in u64.
        let available = u64::try_from(u128::from(l.limit).saturating_sub(used - freed)).unwrap_or(u64::MAX);
        let (code, short_bytes, short_count) = if freed < bytes_short {
            let short = u64::try_from(bytes_short - freed).unwrap_or(u64::MAX);
            (RejectCode::InsufficientMemory, short, 0)
        } else {
            (RejectCode::MaxModels, 0, count_short - victims.len())
        };
        Err(Rejection {
            code,
            need,
            available,
            retry_after_secs: Some(self.retry_hint(now, short_bytes, short_count)),
        })
    }

    fn commit_load(&mut self, slot: Slot, now: Nanos, intent: Intent, plan: &LoadPlan) {
        let generation = {
            let e = &mut self.entries[slot as usize];
            e.load_gen = e.load_gen.wrapping_add(1);
            e.load_gen
        };
        // Victims freed bytes if memory was short, otherwise they only made a model slot free.
        let reason = if self.ledger.used().saturating_add(plan.reserve) > self.ledger.limit {
            EvictReason::Capacity
        } else {
            EvictReason::MaxModels
        };
        let mut victim_bytes = 0;
        for &v in &plan.victims {
            victim_bytes += self.entries[v as usize].bytes;
            self.evict(v, now, reason, Some((slot, generation)));
        }
        let e = &mut self.entries[slot as usize];
        e.phase = Phase::Loading;
        e.bytes = plan.reserve;
        e.awaiting = plan.reserve.min(victim_bytes);
        e.pending_victims = plan.victims.len() as u32;
        e.waiters = u32::from(intent == Intent::Request);
        e.pin_on_load = intent == Intent::Preload;
        e.load_started = now;
        e.loads += 1;
        let (reserve, awaiting) = (e.bytes, e.awaiting);
        self.ledger.reserved += reserve - awaiting;
        self.ledger.awaiting += awaiting;
        self.ledger.models += 1;
        self.stats.loads += 1;
        self.track_peak();
        let e = &self.entries[slot as usize];
        self.log.push_with(|| Event::Load {
            at: now,
            model: e.spec.id.clone(),
            estimate: reserve,
            source: if e.measured.is_some() {
                crate::estimate::EstimateSource::Measured
            } else {
                e.estimate.source.clone()
            },
        });
    }

    /// Move a resident model to draining. `owner` is the load it makes room for.
    fn evict(&mut self, slot: Slot, now: Nanos, reason: EvictReason, owner: Option<(Slot, u32)>) {
        let score = if self.log.keeps_decisions() { self.policy.score(slot) } else { None };
        self.policy.on_remove(slot, reason != EvictReason::Explicit);
        let e = &mut self.entries[slot as usize];
        debug_assert_eq!(e.phase, Phase::Resident);
        if e.pinned {
            e.pinned = false;
            self.ledger.pinned -= e.bytes;
            self.pinned_models -= 1;
        }
        e.phase = Phase::Draining;
        e.owner = owner;
        self.ledger.resident -= e.bytes;
        self.ledger.draining += e.bytes;
        self.ledger.models -= 1;
        self.stats.evictions[reason as usize] += 1;
        let bytes = e.bytes;
        let entries = &self.entries;
        self.log.push_with(|| Event::Evict {
            at: now,
            model: entries[slot as usize].spec.id.clone(),
            reason,
            bytes,
            score,
            for_model: owner.map(|(o, _)| entries[o as usize].spec.id.clone()),
        });
    }

    /// A draining model's memory came back (the backend unloaded it). Returns the load it made
    /// room for if that load has no victims left to wait for.
    pub fn reclaimed(&mut self, slot: Slot, now: Nanos) -> Option<Slot> {
        let e = &mut self.entries[slot as usize];
        if e.phase != Phase::Draining {
            return None;
        }
        debug_assert_eq!(e.leases, 0, "reclaimed while leased");
        let bytes = e.bytes;
        let owner = e.owner.take();
        e.phase = Phase::Absent;
        e.bytes = 0;
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
    /// limit, unpinned idle models are evicted (returned for the driver to unload).
    pub fn load_finished(&mut self, slot: Slot, now: Nanos, result: Result<u64, &str>) -> LoadDone {
        let e = &mut self.entries[slot as usize];
        assert_eq!(e.phase, Phase::Loading, "load_finished on a model that is not loading");
        self.ledger.reserved -= e.bytes - e.awaiting;
        self.ledger.awaiting -= e.awaiting;
        e.awaiting = 0;
        e.pending_victims = 0;
        let secs = now.saturating_sub(e.load_started) as f64 / NANOS_PER_SEC as f64;
        match result {
            Err(error) => {
                e.phase = Phase::Absent;
                e.bytes = 0;
                e.waiters = 0;
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
            Ok(measured) => {
                // The ledger's columns sum to at most u64::MAX bytes: admission keeps them under
                // the limit, and a measurement (the one input that can exceed it) is clamped to
                // what still fits. Over 16 EiB cannot be a real measurement anyway.
                let headroom = u64::MAX - self.ledger.used();
                let measured = measured.max(1).min(headroom);
                e.phase = Phase::Resident;
                e.bytes = measured;
                e.measured = Some(measured);
                e.load_secs = Some(secs);
                e.leases = e.waiters;
                e.waiters = 0;
                e.busy_since = now;
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
                let evicted = if self.over_limits() {
                    self.evict_down(now, EvictReason::Overcommit, false)
                } else {
                    Victims::new()
                };
                LoadDone { leases_granted: granted, evicted }
            }
        }
    }

    /// A request waiting on a load went away before the load ended.
    pub fn cancel_wait(&mut self, slot: Slot) {
        let e = &mut self.entries[slot as usize];
        if e.phase == Phase::Loading {
            e.waiters = e.waiters.saturating_sub(1);
        }
    }

    /// End one lease taken at `acquired_at`. Returns `true` when this was the model's last lease
    /// and the model must now leave memory: the driver unloads it and reports
    /// [`PoolState::reclaimed`]. That happens when it was draining, or when the pool is over its
    /// limits (after a lowered limit or an overcommitting load) and it is the first model to
    /// become evictable.
    #[inline]
    pub fn release(&mut self, slot: Slot, now: Nanos, acquired_at: Nanos) -> bool {
        let held = now.saturating_sub(acquired_at) as f64;
        self.ewma_lease = Some(match self.ewma_lease {
            None => held,
            Some(m) => m + 0.125 * (held - m),
        });
        self.end_lease(slot, now)
    }

    /// End a lease that a finished load granted to a request which went away before using it
    /// (it stopped waiting after the load landed). Like [`PoolState::release`], with the same
    /// return value, except that the unused lease is not counted as a request duration in the
    /// retry hints.
    pub fn release_unused(&mut self, slot: Slot, now: Nanos) -> bool {
        self.end_lease(slot, now)
    }

    #[inline]
    fn end_lease(&mut self, slot: Slot, now: Nanos) -> bool {
        let e = &mut self.entries[slot as usize];
        debug_assert!(e.leases > 0, "release without a lease");
        e.leases = e.leases.saturating_sub(1);
        e.last_used = Some(now);
        if e.leases > 0 {
            return false;
        }
        let (phase, pinned) = (e.phase, e.pinned);
        match phase {
            Phase::Draining => true,
            Phase::Resident if !pinned && self.over_limits() => {
                self.evict(slot, now, self.over_reason, None);
                true
            }
            _ => false,
        }
    }

    /// Whether resident and reserved memory (draining memory is on its way back) or the model
    /// count exceed the limits.
    #[inline]
    fn over_limits(&self) -> bool {
        let l = &self.ledger;
        l.committed() > l.limit || l.models > l.max_models
    }

    fn pin_resident(&mut self, slot: Slot, now: Nanos) {
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
        let evicted =
            if self.over_limits() { self.evict_down(now, self.over_reason, false) } else { Victims::new() };
        (was, evicted)
    }

    /// Evict a resident model on request. Pinned or busy models are refused unless `force`;
    /// a forced eviction of a busy model drains it (no new leases; freed after the last one).
    /// Returns `Ok(true)` if the driver must unload it now, `Ok(false)` if it waits for leases.
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
    pub fn set_limits(&mut self, limit: u64, max_models: usize, now: Nanos) -> Result<Victims, PoolError> {
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
        Ok(self.evict_down(now, EvictReason::LimitChanged, true))
    }

    /// Evict idle unpinned models in policy order until within limits; if `drain_busy`, then
    /// drain busy unpinned ones too. Returns the idle victims (to unload now). Memory already
    /// draining counts as on its way back, so it is not evicted for twice.
    fn evict_down(&mut self, now: Nanos, reason: EvictReason, drain_busy: bool) -> Victims {
        self.over_reason = reason;
        let l = self.ledger;
        let mut excess_bytes = l.committed().saturating_sub(l.limit);
        let mut excess_count = l.models.saturating_sub(l.max_models);
        let mut out = Victims::new();
        for busy_pass in [false, true] {
            if busy_pass && !drain_busy {
                break;
            }
            while excess_bytes > 0 || excess_count > 0 {
                let mut pick = None;
                self.policy.visit_victims(&mut |s| {
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
                if idle {
                    out.push(s);
                }
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

    fn lease_nanos(&self) -> f64 {
        self.ewma_lease.unwrap_or(NANOS_PER_SEC as f64)
    }

    fn drain_hint(&self, e: &Entry, now: Nanos) -> u32 {
        let t = if e.leases > 0 { self.busy_until(e, now) } else { now as f64 };
        secs_until(t, now)
    }

    /// When a busy model's requests are expected to have ended: after the typical request time
    /// if it has been busy for less than that; otherwise, as long again as it has been busy so
    /// far (a request that has outlived the mean is likely a long one, e.g. a long stream).
    fn busy_until(&self, e: &Entry, now: Nanos) -> f64 {
        let elapsed = now.saturating_sub(e.busy_since) as f64;
        let lease = self.lease_nanos();
        let remaining = if elapsed < lease { lease - elapsed } else { elapsed };
        now as f64 + remaining
    }

    /// Seconds until in-flight work is expected to free `bytes` and `count` models: busy models
    /// free after their typical request time, loads after their modelled load time plus that.
    fn retry_hint(&self, now: Nanos, bytes: u64, count: usize) -> u32 {
        let lease = self.lease_nanos();
        let mut frees: Vec<(f64, u64, usize)> = Vec::new();
        for e in &self.entries {
            match e.phase {
                Phase::Resident if !e.pinned && e.leases > 0 => {
                    frees.push((self.busy_until(e, now), e.bytes, 1));
                }
                Phase::Draining => {
                    let t = if e.leases > 0 { self.busy_until(e, now) } else { now as f64 };
                    frees.push((t, e.bytes, 0));
                }
                Phase::Loading if !e.pin_on_load => {
                    let load = self.load_cost(e, e.bytes) * NANOS_PER_SEC as f64;
                    frees.push(((e.load_started as f64 + load).max(now as f64) + lease, e.bytes, 1));
                }
                _ => {}
            }
        }
        frees.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (mut b, mut c) = (0u64, 0usize);
        let mut when = now as f64 + lease;
        for (t, fb, fc) in frees {
            b = b.saturating_add(fb);
            c += fc;
            when = t;
            if b >= bytes && c >= count {
                break;
            }
        }
        secs_until(when, now)
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
            pinned: e.pinned,
            leases: e.leases,
            waiters: e.waiters,
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

fn secs_until(t: f64, now: Nanos) -> u32 {
    let secs = ((t - now as f64) / NANOS_PER_SEC as f64).ceil();
    secs.clamp(1.0, 3600.0) as u32
}

impl Rejection {
    /// The engine error for this rejection of `model`.
    pub fn into_error(self, model: ModelId, max_models: usize) -> PoolError {
        let retry = self.retry_after_secs.unwrap_or(1);
        match self.code {
            RejectCode::InsufficientMemory => PoolError::InsufficientMemory {
                model,
                need: self.need,
                available: self.available,
                retry_after_secs: retry,
            },
            RejectCode::ModelTooLarge => {
                PoolError::ModelTooLarge { model, need: self.need, available: self.available }
            }
            RejectCode::MaxModels => {
                PoolError::MaxModelsReached { model, max_models, retry_after_secs: self.retry_after_secs }
            }
            RejectCode::Draining => PoolError::Draining { model, retry_after_secs: retry },
        }
    }
}
