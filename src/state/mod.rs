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

use std::collections::{HashMap, VecDeque};

use crate::estimate::{Estimate, SizeEstimator};
use crate::log::{DecisionLog, Event, EvictReason, RejectCode};
use crate::policy::{EvictionPolicy, Slot};
use crate::types::{ModelId, ModelSpec, Nanos};
use smallvec::SmallVec;

mod hints;
mod instant;
mod load;
mod operator;
mod prefetch;
mod queue;
mod status;
mod types;

pub use instant::Served;
pub use status::{AdmissionView, Decision};
pub use types::*;

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
    /// Loading: a predictive preload ([`PoolState::predictive_preload`]), which a real request
    /// may cancel while nobody waits on it ([`PoolState::is_cancelled_load`]).
    predictive: bool,
    /// Draining: its predictive preload was cancelled mid-load; the driver stops that load
    /// instead of unloading a handle.
    cancelled: bool,
    leases: u32,
    waiters: u32,
    /// Requests for this model waiting in the admission queue.
    queued: u32,
    /// KV cache bytes per token of context (see [`crate::estimate::kv_bytes_per_token`]).
    kv_per_token: u64,
    /// KV bytes in the ledger's `kv` column for this model's leases and joined waiters.
    kv: u64,
    /// Loading: KV bytes inside the reservation (`bytes`) for the request that started the load
    /// (less any of it given back by waiters that left); they join `kv` when the load lands.
    load_kv: u64,
    last_used: Option<Nanos>,
    busy_since: Nanos,
    /// Measured service nanoseconds per token of context of this model's requests (EWMA over
    /// ended leases that held KV), for retry hints.
    ns_per_token: Option<f64>,
    /// When this model's current leases are expected to have ended (the latest of their starts
    /// plus tokens x rate); 0 when unknown or idle.
    work_end: Nanos,
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
///
/// Slots are handed out by [`PoolState::register`]; every method taking a `Slot` panics on a
/// slot this state did not hand out (a driver bug, never a client's). Every `now` is the
/// driver's clock in nanoseconds and must not go backwards across calls.
///
/// One request's life, driven by hand (the async pool and the simulator do exactly this):
///
/// ```
/// use modelpool::{Admission, GB, Intent, Lru, ModelSpec, NameEstimator, PoolConfig, PoolState, RejectCode};
///
/// let mut st = PoolState::new(PoolConfig::with_limit(10 * GB), Lru::new(), NameEstimator);
/// let a = st.register(ModelSpec::new("a").with_size(6 * GB));
/// let b = st.register(ModelSpec::new("b").with_size(6 * GB));
///
/// // Cold: a load with nothing to evict. The driver loads `a` outside any lock, then reports
/// // the measured size; the request that asked now holds a lease.
/// let Admission::Load(plan) = st.admit(a, 0, Intent::Request) else { unreachable!() };
/// assert!(plan.victims.is_empty());
/// assert_eq!(st.load_finished(a, 1_000, Ok(6 * GB)).leases_granted, 1);
///
/// // `a` is busy, so `b` cannot fit: refused, and nothing is evicted for it.
/// let Admission::Reject(r) = st.admit(b, 2_000, Intent::Request) else { unreachable!() };
/// assert_eq!(r.code, RejectCode::InsufficientMemory);
///
/// // The request on `a` ends; now `b` loads with `a` as its victim. The driver unloads `a`,
/// // reports it reclaimed, loads `b` and reports that.
/// assert!(!st.release(a, 3_000, 1_000));
/// let Admission::Load(plan) = st.admit(b, 4_000, Intent::Request) else { unreachable!() };
/// assert_eq!(plan.victims.as_slice(), &[a]);
/// assert_eq!(st.reclaimed(a, 5_000), Some(b)); // b's last victim is gone: start its load
/// st.load_finished(b, 6_000, Ok(6 * GB));
/// assert!(!st.release(b, 7_000, 6_000));
/// st.check_invariants().unwrap();
/// ```
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
    /// The admission queue, in arrival order (see `queue.rs`).
    queue: VecDeque<queue::Queued>,
    /// Admissions decided for queued requests, for the driver to take.
    wakes: Vec<Wake>,
    next_ticket: Ticket,
    /// Idle models the core evicted by itself (to make room for a request's KV cache), for the
    /// driver to unload.
    unloads: Victims,
    /// Predictive preloads loading now (so plans skip looking for one to cancel when there is
    /// none).
    preloading: u32,
    /// Scratch space of the retry hints (kept so that refusals allocate nothing).
    hint_buf: std::cell::Cell<Vec<(f64, u64, usize)>>,
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
            queue: VecDeque::new(),
            wakes: Vec::new(),
            next_ticket: 1,
            unloads: Victims::new(),
            preloading: 0,
            hint_buf: std::cell::Cell::new(Vec::new()),
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
                e.kv_per_token = crate::estimate::kv_bytes_per_token(&spec, estimate.bytes);
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
        let kv_per_token = crate::estimate::kv_bytes_per_token(&spec, estimate.bytes);
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
            predictive: false,
            cancelled: false,
            leases: 0,
            waiters: 0,
            queued: 0,
            kv_per_token,
            kv: 0,
            load_kv: 0,
            last_used: None,
            busy_since: 0,
            ns_per_token: None,
            work_end: 0,
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

    /// The spec of a slot.
    ///
    /// # Panics
    /// On a slot this state did not hand out (as every method taking a `Slot`).
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

    /// Bytes an admission of `slot` would reserve now for its weights.
    pub fn need(&self, slot: Slot) -> u64 {
        self.entries[slot as usize].need()
    }

    /// Seconds a load of `slot` is expected to take: its last measured load time, else the
    /// configured prior for the bytes it needs (the cost policies and retry hints use).
    pub fn expected_load_secs(&self, slot: Slot) -> f64 {
        let e = &self.entries[slot as usize];
        self.load_cost(e, e.need())
    }

    /// KV cache bytes per token of context for `slot`: what [`PoolState::set_kv_bytes_per_token`]
    /// last set (the backend's figure), else the spec's, else the documented rule's.
    pub fn kv_bytes_per_token(&self, slot: Slot) -> u64 {
        self.entries[slot as usize].kv_per_token
    }

    /// The KV bytes a request of `tokens` tokens of context (prompt plus maximum new tokens)
    /// holds on `slot`, for [`PoolState::admit_request`]. Saturates.
    pub fn kv_for_tokens(&self, slot: Slot, tokens: u64) -> u64 {
        tokens.saturating_mul(self.entries[slot as usize].kv_per_token)
    }

    /// Set the KV bytes per token the backend reported for a loaded model. Requests admitted
    /// before keep the bytes they were admitted with (each gives back exactly what it took).
    pub fn set_kv_bytes_per_token(&mut self, slot: Slot, bytes: u64) {
        self.entries[slot as usize].kv_per_token = bytes;
    }

    /// Idle models the core evicted by itself since the last call (to make room for a request's
    /// KV cache; see [`PoolState::admit_request`]). The driver unloads each and reports it with
    /// [`PoolState::reclaimed`], like a load plan's victims. Check after every admission and
    /// every call that pumps the queue (where [`PoolState::take_wakes`] is checked).
    pub fn take_unloads(&mut self) -> Victims {
        std::mem::take(&mut self.unloads)
    }

    /// Whether [`PoolState::take_unloads`] has anything.
    #[inline]
    pub fn has_unloads(&self) -> bool {
        !self.unloads.is_empty()
    }

    /// The ledger.
    #[inline]
    pub fn ledger(&self) -> Ledger {
        self.ledger
    }

    /// Counters since the state was created (kept whatever the log mode).
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

    /// A victim candidate: resident, unpinned, idle, and (anti-thrash) with no request of its
    /// own waiting in the queue, which would reload it at once.
    fn evictable(&self, slot: Slot) -> bool {
        let e = &self.entries[slot as usize];
        e.phase == Phase::Resident && !e.pinned && e.leases == 0 && e.queued == 0
    }

    /// A predictive preload still loading that a real request may cancel for its room: nobody
    /// waits on it (no joined request, no queued one, no operator preload asking to pin it).
    /// It has no victims of its own: a predictive preload loads into free room only.
    fn cancellable(&self, slot: Slot) -> bool {
        let e = &self.entries[slot as usize];
        e.phase == Phase::Loading && e.predictive && e.waiters == 0 && e.queued == 0 && !e.pin_on_load
    }

    /// Victims of last resort, after every evictable resident model: push cancellable
    /// predictive preloads ([`Self::cancellable`]) onto `victims`, the one predicted to be
    /// requested latest first, adding their reservations to `freed`, until `more(freed,
    /// victims.len())` says enough. `except` is never pushed (the model being planned for).
    #[cold]
    fn push_cancellable(
        &self,
        now: Nanos,
        except: Slot,
        victims: &mut Victims,
        freed: &mut u128,
        more: impl Fn(u128, usize) -> bool,
    ) {
        let mut found: SmallVec<[(Nanos, Slot); 8]> = SmallVec::new();
        for s in 0..self.entries.len() as Slot {
            if s != except && self.cancellable(s) {
                found.push((self.policy.predicted_next(s, now).unwrap_or(Nanos::MAX), s));
            }
        }
        found.sort_unstable_by(|a, b| b.cmp(a));
        for (_, s) in found {
            if !more(*freed, victims.len()) {
                break;
            }
            victims.push(s);
            *freed += u128::from(self.entries[s as usize].bytes);
        }
    }

    /// `slot` is draining because the predictive preload loading it was cancelled for a real
    /// request's room (it was among that request's plan victims, or left in
    /// [`PoolState::take_unloads`]). The driver stops that load instead of unloading a handle,
    /// never reports [`PoolState::load_finished`] for it, and reports [`PoolState::reclaimed`]
    /// once whatever the load had allocated is freed (at once, if the backend can abort it; else
    /// after the load ends and the model is unloaded).
    pub fn is_cancelled_load(&self, slot: Slot) -> bool {
        let e = &self.entries[slot as usize];
        e.phase == Phase::Draining && e.cancelled
    }

    fn load_cost(&self, e: &Entry, bytes: u64) -> f64 {
        e.load_secs.unwrap_or(self.cfg.load_latency_secs + bytes as f64 / self.cfg.load_bandwidth)
    }

    #[inline]
    fn track_peak(&mut self) {
        let used = self.ledger.used();
        if used > self.stats.peak_used {
            self.stats.peak_used = used;
        }
        if self.ledger.kv > self.stats.peak_kv {
            self.stats.peak_kv = self.ledger.kv;
        }
    }

    /// Whether `kv` more bytes fit under the limit now.
    #[inline]
    fn kv_fits(&self, kv: u64) -> bool {
        kv == 0 || u128::from(self.ledger.used()) + u128::from(kv) <= u128::from(self.ledger.limit)
    }

    /// Decide for `slot` and carry the decision out in the ledger. A `Reject` and an
    /// `AwaitUnload` change nothing but counters and the log.
    ///
    /// What the driver must do next, by outcome:
    /// - `Hit`: a request now holds a lease; end it with [`PoolState::release`]. A preload pinned
    ///   the model.
    /// - `Join`: wait for the load in progress; a request is counted among its waiters and gets
    ///   its lease from [`PoolState::load_finished`] (or gives its place back with
    ///   [`PoolState::cancel_wait`]).
    /// - `Load(plan)`: the victims are already draining and the reservation is held. Unload each
    ///   victim and report it with [`PoolState::reclaimed`], then load and report
    ///   [`PoolState::load_finished`] exactly once, success or failure.
    /// - `AwaitUnload`: admit again after the next [`PoolState::reclaimed`] of this slot.
    /// - `Reject(r)`: refuse with `r` (see [`Rejection::into_error`]).
    ///
    /// The hot path (`Hit`) allocates nothing unless hits are logged.
    #[inline]
    pub fn admit(&mut self, slot: Slot, now: Nanos, intent: Intent) -> Admission {
        self.admit_kv(slot, now, intent, 0)
    }

    /// [`PoolState::admit`] for a request that holds `kv` bytes beside the weights while it runs
    /// (its KV cache: [`PoolState::kv_for_tokens`]). The bytes are in the ledger's `kv` column
    /// from a `Hit` or `Join` on (from the load's end for the request that starts a `Load`,
    /// whose reservation holds them until then) to the end of its lease, which must give the
    /// same `kv` back ([`PoolState::release_request`], [`PoolState::release_unused`],
    /// [`PoolState::cancel_wait`]).
    ///
    /// A request whose KV does not fit beside the resident or loading model it asks for is
    /// treated as a load would be: refused with `model_too_large` if it cannot fit even with
    /// everything unpinned gone; otherwise, if evicting idle models would make room once their
    /// memory is back, the core evicts them (left in [`PoolState::take_unloads`]) and the request
    /// waits: queued when the queue is on, else `AwaitUnload` (admit again after the next
    /// [`PoolState::reclaimed`] of any model). When only in-flight work can free the room, it is
    /// queued or refused with `insufficient_memory`, exactly like a load.
    #[inline]
    pub fn admit_request(&mut self, slot: Slot, now: Nanos, kv: u64) -> Admission {
        self.policy.on_request(slot, now);
        self.admit_kv(slot, now, Intent::Request, kv)
    }

    // Always inlined: the hot path (a hit) is a few stores; the rest is `admit_cold`, a call.
    #[inline(always)]
    fn admit_kv(&mut self, slot: Slot, now: Nanos, intent: Intent, kv: u64) -> Admission {
        let kv = if intent == Intent::Request { kv } else { 0 };
        let fits = self.kv_fits(kv);
        let e = &mut self.entries[slot as usize];
        if e.phase == Phase::Resident && fits {
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
                    if kv > 0 {
                        expect_work(e, now, kv, self.cfg.service_ns_per_token);
                        e.kv += kv;
                        self.ledger.kv += kv;
                        self.stats.peak_kv = self.stats.peak_kv.max(self.ledger.kv);
                        self.stats.peak_used = self.stats.peak_used.max(self.ledger.used());
                    }
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
        self.admit_cold(slot, now, intent, kv, fits)
    }

    fn admit_cold(&mut self, slot: Slot, now: Nanos, intent: Intent, kv: u64, fits: bool) -> Admission {
        match self.entries[slot as usize].phase {
            Phase::Resident | Phase::Loading if !fits => self.admit_kv_short(slot, now, kv),
            Phase::Loading => {
                let e = &mut self.entries[slot as usize];
                match intent {
                    Intent::Request => {
                        e.waiters += 1;
                        e.kv += kv;
                        self.ledger.kv += kv;
                    }
                    Intent::Preload => e.pin_on_load = true,
                }
                self.stats.joins += 1;
                if self.log.wants_hits() {
                    self.log.push(Event::Join { at: now, model: e.spec.id.clone() });
                }
                self.track_peak();
                Admission::Join
            }
            Phase::Draining if self.entries[slot as usize].leases == 0 => Admission::AwaitUnload,
            Phase::Draining => {
                let r = self.draining_rejection(slot, now);
                self.queue_or_reject(slot, now, intent, r, kv)
            }
            Phase::Absent => match self.plan_absent(slot, now, intent, kv) {
                Ok(plan) => {
                    self.commit_load(slot, now, intent, &plan);
                    Admission::Load(plan)
                }
                Err(r) => self.queue_or_reject(slot, now, intent, r, kv),
            },
            Phase::Resident => unreachable!("handled on the hot path"),
        }
    }

    /// A request whose `kv` does not fit now beside its resident or loading model (see
    /// [`PoolState::admit_request`]).
    fn admit_kv_short(&mut self, slot: Slot, now: Nanos, kv: u64) -> Admission {
        let victims = match self.plan_kv_room(slot, now, kv) {
            Ok(v) => v,
            Err(r) => return self.queue_or_reject(slot, now, Intent::Request, r, kv),
        };
        // It fits once the victims' (and other draining models') memory is back: wait for it.
        if !self.queue_on() {
            self.evict_for_kv(slot, now, &victims);
            return Admission::AwaitUnload;
        }
        let r = self.kv_rejection(slot, kv, 0, now);
        if let Admission::Reject(r) = self.queue_outcome(Intent::Request, r) {
            // Queue full: evict nothing for a request that is refused.
            self.record_reject(slot, now, r);
            return Admission::Reject(r);
        }
        self.evict_for_kv(slot, now, &victims);
        self.queue_or_reject(slot, now, Intent::Request, r, kv)
    }

    /// The refusal of a request whose KV cache is `short` bytes short beside its model.
    fn kv_rejection(&self, slot: Slot, kv: u64, short: u64, now: Nanos) -> Rejection {
        let l = self.ledger;
        Rejection {
            kv,
            code: RejectCode::InsufficientMemory,
            need: self.entries[slot as usize].bytes.saturating_add(kv),
            available: l.limit.saturating_sub(l.used()),
            retry_after_secs: Some(self.retry_hint(now, short, 0)),
            waited: 0,
        }
    }

    /// Idle models to evict so that `kv` more bytes fit beside `slot` once draining memory is
    /// back (`committed() + kv <= limit`), changing nothing; or why that cannot be done now.
    fn plan_kv_room(&self, slot: Slot, now: Nanos, kv: u64) -> Result<Victims, Rejection> {
        let l = self.ledger;
        let e = &self.entries[slot as usize];
        // The model's weights: a loading model's reservation also holds the KV of the request
        // that started the load, which ends with that request (so it is no reason for "never").
        let weights = e.bytes.saturating_sub(if e.phase == Phase::Loading { e.load_kv } else { 0 });
        let own = if e.pinned { 0 } else { weights };
        let room = l.limit.saturating_sub(l.pinned).saturating_sub(own);
        if kv > room {
            return Err(Rejection {
                kv,
                code: RejectCode::ModelTooLarge,
                need: weights.saturating_add(kv),
                available: l.limit.saturating_sub(l.pinned),
                retry_after_secs: None,
                waited: 0,
            });
        }
        let short = (u128::from(l.committed()) + u128::from(kv)).saturating_sub(u128::from(l.limit));
        let mut victims = Victims::new();
        if short == 0 {
            return Ok(victims);
        }
        let mut freed = 0u128;
        self.policy.walk_victims_at(now, |s| {
            if s != slot && self.evictable(s) {
                victims.push(s);
                freed += u128::from(self.entries[s as usize].bytes);
            }
            freed < short
        });
        if freed < short && self.preloading > 0 {
            self.push_cancellable(now, slot, &mut victims, &mut freed, |f, _| f < short);
        }
        if freed >= short {
            Ok(victims)
        } else {
            let short = u64::try_from(short - freed).unwrap_or(u64::MAX);
            Err(self.kv_rejection(slot, kv, short, now))
        }
    }

    /// Evict idle `victims` to make room for a request's KV on `slot`; the driver unloads them.
    fn evict_for_kv(&mut self, slot: Slot, now: Nanos, victims: &Victims) {
        for &v in victims {
            if self.entries[v as usize].phase == Phase::Loading {
                self.cancel_preload(v, now, None, slot);
            } else {
                self.evict_for(v, now, EvictReason::Capacity, None, Some(slot));
            }
            self.unloads.push(v);
        }
    }

    /// What [`PoolState::admit`] would decide for a request now, changing nothing (dry run).
    pub fn preview(&self, slot: Slot, now: Nanos) -> Admission {
        self.preview_or_refusal(slot, now).unwrap_or_else(|r| self.queue_outcome(Intent::Request, r))
    }

    /// [`PoolState::preview`] before the admission queue's part: the admission, or the refusal
    /// that the queue would then take (queue it, or refuse it).
    pub(super) fn preview_or_refusal(&self, slot: Slot, now: Nanos) -> Result<Admission, Rejection> {
        let e = &self.entries[slot as usize];
        match e.phase {
            Phase::Resident => Ok(Admission::Hit),
            Phase::Loading => Ok(Admission::Join),
            Phase::Draining if e.leases == 0 => Ok(Admission::AwaitUnload),
            Phase::Draining => Err(self.draining_rejection(slot, now)),
            Phase::Absent => self.plan_absent(slot, now, Intent::Request, 0).map(Admission::Load),
        }
    }

    /// The refusal of a request for a model drained with requests still on it.
    fn draining_rejection(&self, slot: Slot, now: Nanos) -> Rejection {
        let e = &self.entries[slot as usize];
        Rejection {
            kv: 0,
            code: RejectCode::Draining,
            need: e.need(),
            available: 0,
            retry_after_secs: Some(self.drain_hint(e, now)),
            waited: 0,
        }
    }

    /// [`PoolState::plan_load`] for a new arrival: while the queue's oldest waiter starves, a
    /// request may not start a load before it and is told to wait (a refusal with a hint).
    #[inline]
    fn plan_absent(&self, slot: Slot, now: Nanos, intent: Intent, kv: u64) -> Result<LoadPlan, Rejection> {
        let mut victims = Victims::new();
        self.plan_absent_into(slot, now, intent, kv, &mut victims)?;
        Ok(LoadPlan { reserve: self.entries[slot as usize].need(), kv, victims })
    }

    /// [`Self::plan_absent`] with the victims pushed onto `victims`, as
    /// [`Self::plan_load_into`].
    #[inline]
    fn plan_absent_into(
        &self,
        slot: Slot,
        now: Nanos,
        intent: Intent,
        kv: u64,
        victims: &mut Victims,
    ) -> Result<(), Rejection> {
        self.plan_load_into(slot, now, kv, victims)?;
        if intent == Intent::Request && self.queue_on() && self.head_starving(now) {
            return Err(Rejection {
                kv,
                code: RejectCode::InsufficientMemory,
                need: self.entries[slot as usize].need().saturating_add(kv),
                available: 0,
                retry_after_secs: Some(1),
                waited: 0,
            });
        }
        Ok(())
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

    /// Plan a load of an absent model, with `kv` bytes beside it for the request that asks,
    /// without changing anything.
    ///
    /// The arithmetic is done in `u128`: `used + need` can exceed `u64::MAX` for sizes near
    /// 2^64 bytes, and a saturated sum would understate the shortfall and overcommit.
    #[inline]
    fn plan_load(&self, slot: Slot, now: Nanos, kv: u64) -> Result<LoadPlan, Rejection> {
        let mut victims = Victims::new();
        self.plan_load_into(slot, now, kv, &mut victims)?;
        Ok(LoadPlan { reserve: self.entries[slot as usize].need(), kv, victims })
    }

    /// [`Self::plan_load`] with the victims pushed onto `victims` (empty on entry; left as
    /// pushed on a refusal, which the caller then ignores): the plan is `reserve` = the model's
    /// `need()`, `kv`, `victims`. For callers that keep the plan in place rather than move it.
    #[inline]
    fn plan_load_into(
        &self,
        slot: Slot,
        now: Nanos,
        kv: u64,
        victims: &mut Victims,
    ) -> Result<(), Rejection> {
        debug_assert!(victims.is_empty());
        let weights = self.entries[slot as usize].need();
        let need = weights.saturating_add(kv);
        let l = self.ledger;
        let room_beside_pins = l.limit.saturating_sub(l.pinned);
        if need > room_beside_pins {
            return Err(Rejection {
                kv,
                code: RejectCode::ModelTooLarge,
                need,
                available: room_beside_pins,
                retry_after_secs: None,
                waited: 0,
            });
        }
        if self.pinned_models >= l.max_models {
            // Every model slot is held by a pinned model, which no eviction frees: waiting
            // cannot help (the model-count analogue of `model_too_large`).
            return Err(Rejection {
                kv,
                code: RejectCode::MaxModels,
                need,
                available: 0,
                retry_after_secs: None,
                waited: 0,
            });
        }
        let used = u128::from(l.used());
        let bytes_short = (used + u128::from(need)).saturating_sub(u128::from(l.limit));
        let count_short = (l.models + 1).saturating_sub(l.max_models);
        if bytes_short == 0 && count_short == 0 {
            return Ok(());
        }
        let mut freed = self.push_evictable(now, bytes_short, count_short, victims);
        if (freed < bytes_short || victims.len() < count_short) && self.preloading > 0 {
            let more = |f: u128, n: usize| f < bytes_short || n < count_short;
            self.push_cancellable(now, slot, victims, &mut freed, more);
        }
        if freed >= bytes_short && victims.len() >= count_short {
            return Ok(());
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
            kv,
            code,
            need,
            available,
            retry_after_secs: Some(self.retry_hint(now, short_bytes, short_count)),
            waited: 0,
        })
    }

    /// A load plan's walk: push evictable models onto `victims` in the policy's order (as of
    /// `now`) until they free `bytes_short` bytes and number `count_short`, or the walk ends;
    /// returns the bytes they free.
    #[inline]
    fn push_evictable(
        &self,
        now: Nanos,
        bytes_short: u128,
        count_short: usize,
        victims: &mut Victims,
    ) -> u128 {
        let mut freed = 0u128;
        self.policy.walk_victims_at(now, |s| {
            if self.evictable(s) {
                victims.push(s);
                freed += u128::from(self.entries[s as usize].bytes);
            }
            freed < bytes_short || victims.len() < count_short
        });
        freed
    }

    #[inline]
    fn commit_load(&mut self, slot: Slot, now: Nanos, intent: Intent, plan: &LoadPlan) {
        self.commit_load_parts(slot, now, intent, plan.reserve, plan.kv, &plan.victims);
    }

    /// [`Self::commit_load`] of the plan (`reserve`, `kv`, `victims`).
    #[inline]
    fn commit_load_parts(
        &mut self,
        slot: Slot,
        now: Nanos,
        intent: Intent,
        reserve: u64,
        kv: u64,
        victims: &[Slot],
    ) {
        let generation = {
            let e = &mut self.entries[slot as usize];
            e.load_gen = e.load_gen.wrapping_add(1);
            e.load_gen
        };
        // The reservation holds the weights and the starting request's KV until the load lands.
        let reserve = reserve.saturating_add(kv);
        // Victims freed bytes if memory was short, otherwise they only made a model slot free.
        let reason = if self.ledger.used().saturating_add(reserve) > self.ledger.limit {
            EvictReason::Capacity
        } else {
            EvictReason::MaxModels
        };
        let mut victim_bytes = 0;
        for &v in victims {
            victim_bytes += self.entries[v as usize].bytes;
            if self.entries[v as usize].phase == Phase::Loading {
                self.cancel_preload(v, now, Some((slot, generation)), slot);
            } else {
                self.evict(v, now, reason, Some((slot, generation)));
            }
        }
        let e = &mut self.entries[slot as usize];
        e.phase = Phase::Loading;
        e.bytes = reserve;
        e.load_kv = kv;
        e.awaiting = reserve.min(victim_bytes);
        e.pending_victims = victims.len() as u32;
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
        let estimate = reserve - self.entries[slot as usize].load_kv;
        self.log_load(slot, now, estimate);
    }

    /// The decision log's `Load` event of `slot`, reserving `estimate` bytes for its weights:
    /// counted, and built only if the log keeps it.
    #[inline]
    fn log_load(&mut self, slot: Slot, now: Nanos, estimate: u64) {
        let e = &self.entries[slot as usize];
        self.log.push_with(|| Event::Load {
            at: now,
            model: e.spec.id.clone(),
            estimate,
            source: if e.measured.is_some() {
                crate::estimate::EstimateSource::Measured
            } else {
                e.estimate.source.clone()
            },
            predicted_in_secs: None,
        });
    }

    /// Cancel the predictive preload loading `slot` ([`Self::cancellable`]) for `for_slot`'s
    /// room: its reservation becomes draining memory (returned by [`PoolState::reclaimed`] once
    /// the driver has stopped the load), owned by `owner`'s load as an evicted victim's is.
    #[cold]
    fn cancel_preload(&mut self, slot: Slot, now: Nanos, owner: Option<(Slot, u32)>, for_slot: Slot) {
        let e = &mut self.entries[slot as usize];
        // Cancellable: a preload with no victims (so nothing awaited) and no request's KV.
        debug_assert!(e.phase == Phase::Loading && e.predictive && e.waiters == 0);
        debug_assert!(e.awaiting == 0 && e.pending_victims == 0 && e.load_kv == 0);
        self.ledger.reserved -= e.bytes;
        self.ledger.draining += e.bytes;
        e.predictive = false;
        e.cancelled = true;
        e.phase = Phase::Draining;
        e.owner = owner;
        self.preloading -= 1;
        self.ledger.models -= 1;
        self.stats.preloads_cancelled += 1;
        let bytes = e.bytes;
        let entries = &self.entries;
        self.log.push_with(|| Event::PreloadCancelled {
            at: now,
            model: entries[slot as usize].spec.id.clone(),
            bytes,
            for_model: entries[for_slot as usize].spec.id.clone(),
        });
    }

    /// Move a resident model to draining. `owner` is the load it makes room for.
    #[inline]
    fn evict(&mut self, slot: Slot, now: Nanos, reason: EvictReason, owner: Option<(Slot, u32)>) {
        self.evict_for(slot, now, reason, owner, owner.map(|(o, _)| o));
    }

    /// [`Self::evict`], logging `for_slot` as the model it made room for.
    #[inline]
    fn evict_for(
        &mut self,
        slot: Slot,
        now: Nanos,
        reason: EvictReason,
        owner: Option<(Slot, u32)>,
        for_slot: Option<Slot>,
    ) {
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
        self.log_evict(slot, now, reason, bytes, score, for_slot);
    }

    /// The decision log's `Evict` event of `slot` (holding `bytes`, the policy's `score`), made
    /// room for `for_slot`'s load: counted, and built only if the log keeps it.
    #[inline]
    fn log_evict(
        &mut self,
        slot: Slot,
        now: Nanos,
        reason: EvictReason,
        bytes: u64,
        score: Option<f64>,
        for_slot: Option<Slot>,
    ) {
        let entries = &self.entries;
        self.log.push_with(|| Event::Evict {
            at: now,
            model: entries[slot as usize].spec.id.clone(),
            reason,
            bytes,
            score,
            for_model: for_slot.map(|o| entries[o as usize].spec.id.clone()),
        });
    }

    /// End one lease taken at `acquired_at` (precondition: the slot holds a lease; checked in
    /// debug builds). Returns `true` when this was the model's last lease
    /// and the model must now leave memory: the driver unloads it and reports
    /// [`PoolState::reclaimed`]. That happens when it was draining, or when the pool is over its
    /// limits (after a lowered limit or an overcommitting load) and it is the first model to
    /// become evictable.
    #[inline]
    pub fn release(&mut self, slot: Slot, now: Nanos, acquired_at: Nanos) -> bool {
        self.release_request(slot, now, acquired_at, 0)
    }

    /// [`PoolState::release`] for a lease admitted with `kv` bytes
    /// ([`PoolState::admit_request`]): they leave the ledger's `kv` column.
    #[inline]
    pub fn release_request(&mut self, slot: Slot, now: Nanos, acquired_at: Nanos, kv: u64) -> bool {
        let held = now.saturating_sub(acquired_at) as f64;
        self.note_lease(held);
        let e = &mut self.entries[slot as usize];
        if kv > 0 && e.kv_per_token > 0 {
            let per_token = held / (kv / e.kv_per_token).max(1) as f64;
            e.ns_per_token = Some(match e.ns_per_token {
                None => per_token,
                Some(m) => m + 0.25 * (per_token - m),
            });
        }
        self.end_lease(slot, now, kv)
    }

    /// Fold a request's lease duration (`held` nanoseconds) into the average the retry hints
    /// use (weight 1/8 once started).
    #[inline(always)]
    fn note_lease(&mut self, held: f64) {
        self.ewma_lease = Some(match self.ewma_lease {
            None => held,
            Some(m) => m + 0.125 * (held - m),
        });
    }

    /// End a lease that a finished load (or a queue turn) granted to a request which went away
    /// before using it, admitted with `kv` bytes. Like [`PoolState::release_request`], with the
    /// same return value, except that the unused lease is not counted as a request duration in
    /// the retry hints.
    pub fn release_unused(&mut self, slot: Slot, now: Nanos, kv: u64) -> bool {
        self.end_lease(slot, now, kv)
    }

    #[inline]
    fn end_lease(&mut self, slot: Slot, now: Nanos, kv: u64) -> bool {
        let must_unload = self.end_lease_bytes(slot, now, kv);
        if !self.queue.is_empty() {
            self.pump_cold(now);
        }
        must_unload
    }

    #[inline]
    fn end_lease_bytes(&mut self, slot: Slot, now: Nanos, kv: u64) -> bool {
        let e = &mut self.entries[slot as usize];
        debug_assert!(e.leases > 0, "release without a lease");
        debug_assert!(e.kv >= kv, "release of more KV than the model's requests hold");
        if kv > 0 {
            // Skipped for none: the limit check below then reads no just-written ledger column.
            let kv = kv.min(e.kv);
            e.kv -= kv;
            self.ledger.kv -= kv;
        }
        e.leases = e.leases.saturating_sub(1);
        if e.leases == 0 {
            e.work_end = 0;
        }
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
}

/// A lease of `kv` bytes starts on `e` at `now`: move the model's expected end of work to
/// cover it (its context tokens at the model's measured rate, else `prior`).
#[inline]
fn expect_work(e: &mut Entry, now: Nanos, kv: u64, prior: Option<f64>) {
    if e.kv_per_token == 0 {
        return;
    }
    if let Some(rate) = e.ns_per_token.or(prior) {
        let tokens = (kv / e.kv_per_token).max(1) as f64;
        let end = now.saturating_add((tokens * rate).min(u64::MAX as f64 / 2.0) as u64);
        e.work_end = e.work_end.max(end);
    }
}
