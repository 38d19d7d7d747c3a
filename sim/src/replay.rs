//! The replay: a discrete-event loop with virtual time that drives the engine's own
//! [`PoolState`] exactly as the async pool does.
//!
//! Events are trace operations (arrivals and admin events, in trace order) and internal events
//! (load completions, lease releases, unload completions, retries) in a binary heap ordered by
//! (time, sequence). At equal times internal events go first, then arrivals; both in the order
//! they were scheduled. Nothing reads a clock and the only randomness (injected load failures)
//! comes from a seeded ChaCha8 stream, so a replay is deterministic bit for bit.
//!
//! Driving protocol (the same as `ModelPool`'s): `admit` decides. `Hit`: the request holds a
//! lease for its service time, then `release`. `Join`: the request waits for the load in
//! progress. `Load(plan)`: every victim is unloaded (instantly, or after the modelled unload
//! time) and reported with `reclaimed`; when the last one is back the load starts and takes
//! `latency + bytes / bandwidth`; then `load_finished` grants the waiters their leases.
//! `AwaitUnload`: the model's own unload is under way; the request (or preload) is parked and
//! admitted again the moment that unload is reported, as the server's requests wait for it (or,
//! for a request whose KV cache waits for memory coming back, after the next unload of any
//! model). Requests hold their KV bytes (`SimConfig::kv_cache`) from admission to release, and
//! idle models the engine evicts for them (`take_unloads`) are unloaded like load victims.
//! `Reject`: a 503, counted by code; the request is dropped, or retried after the engine's
//! `retry_after_secs` if retries are enabled. A draining model whose last lease ends is unloaded.
//!
//! The loop allocates nothing per request once its buffers (heap, waiter lists) have grown.

use std::cmp::{Ordering, Reverse};
use std::collections::{BinaryHeap, HashMap};

use hdrhistogram::Histogram;
use modelpool::{
    Admission, Event, Gdsf, Intent, Lfu, LoadPlan, Lru, ModelSpec, NameEstimator, Nanos, PolicyKind,
    PoolConfig, PoolState, Predictive, RejectCode, Served, Slot, Ticket, TimingModel, Wake,
};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

use crate::config::{PolicyChoice, SimConfig};
use crate::oracle::{Belady, BeladyCost, SimPolicy, next_uses};
use crate::report::{ModelCounters, ModelRow, Report, Totals, build_report};
use crate::trace::{NS, Op, OpKind, Service, Trace};

/// A replay's result: the report and, if the config kept one, the decision log.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Aggregates.
    pub report: Report,
    /// Decision events kept by the configured [`LogMode`].
    pub events: Vec<Event>,
}

/// Replay `trace` under `cfg`. Deterministic: the same inputs give the same outcome.
pub fn run(trace: &Trace, cfg: &SimConfig) -> Result<Outcome, String> {
    check_setup(trace, cfg)?;
    if matches!(cfg.policy, PolicyChoice::Belady | PolicyChoice::BeladyCost) {
        // Offline policies read every operation before the replay (their next uses).
        check_ops(trace)?;
    }
    // Online policies check each operation as the replay reaches it (a pass of its own over a
    // 10 M-request trace costs about a tenth of the replay): a replay has no effect outside the
    // result, so stopping at the first bad operation gives the same error as checking first.
    dispatch(trace, cfg, false).map(|(o, _)| o)
}

/// The checks of the configuration and the models [`run`] makes before replaying.
fn check_setup(trace: &Trace, cfg: &SimConfig) -> Result<(), String> {
    cfg.validate()?;
    if u32::try_from(trace.ops.len()).is_err() {
        return Err(format!("a trace holds at most {} operations", u32::MAX));
    }
    let mut ids = std::collections::BTreeSet::new();
    if let Some(m) = trace.models.iter().find(|m| !ids.insert(&*m.id)) {
        return Err(format!("model '{}' is defined twice in the trace", m.id));
    }
    Ok(())
}

/// Every operation, in order, through [`OpCheck`].
fn check_ops(trace: &Trace) -> Result<(), String> {
    let mut c = OpCheck::new(trace);
    trace.ops.iter().try_for_each(|op| c.check(op))
}

/// The checks of one operation against the trace (a model index it has, times in order),
/// applied in trace order.
struct OpCheck {
    models: usize,
    last: Nanos,
}

impl OpCheck {
    fn new(trace: &Trace) -> Self {
        OpCheck { models: trace.models.len(), last: 0 }
    }

    #[inline]
    fn check(&mut self, op: &Op) -> Result<(), String> {
        if op.kind != OpKind::SetLimit && op.model as usize >= self.models {
            return Err(format!(
                "an operation at {} ns names model index {}, beyond the trace's models",
                op.at, op.model
            ));
        }
        if op.at < self.last {
            return Err("trace operations must be sorted by time".into());
        }
        self.last = op.at;
        Ok(())
    }
}

/// [`run`], also recording every request's outcome and the times of the replay's events
/// ([`Recording`]): what `modelpool-sim drive` compares with a server, and what `space` uses to
/// keep a trace's decisions apart in time.
pub fn run_recorded(trace: &Trace, cfg: &SimConfig) -> Result<(Outcome, Recording), String> {
    check_setup(trace, cfg)?;
    check_ops(trace)?;
    let (o, r) = dispatch(trace, cfg, true)?;
    Ok((o, r.expect("recording requested")))
}

fn dispatch(trace: &Trace, cfg: &SimConfig, record: bool) -> Result<(Outcome, Option<Recording>), String> {
    match cfg.policy {
        PolicyChoice::Online(PolicyKind::Lru) => Runner::new(trace, cfg, Lru::new(), record).run(),
        PolicyChoice::Online(PolicyKind::Gdsf) => Runner::new(trace, cfg, Gdsf::new(), record).run(),
        PolicyChoice::Online(PolicyKind::Lfu) => Runner::new(trace, cfg, Lfu::new(), record).run(),
        PolicyChoice::Online(PolicyKind::Predictive) => {
            Runner::new(trace, cfg, Predictive::new(), record).run()
        }
        PolicyChoice::Belady => Runner::new(trace, cfg, Belady::new(), record).run(),
        PolicyChoice::BeladyCost => Runner::new(trace, cfg, BeladyCost::new(), record).run(),
    }
}

/// How one trace operation ended, in the terms of the server's replies: the
/// `x-modelpool-admission` header of a served request (`hit`, `join`, `load`, `queued`: it
/// waited in the admission queue first), the error code of a refused one, `failed` when its
/// model's load failed; `admin` for admin operations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RequestOutcome {
    /// Not decided when the replay ended (cannot happen once the replay has drained).
    Pending,
    /// The model was resident.
    Hit,
    /// Joined a load in progress.
    Join,
    /// Started the load itself.
    Load,
    /// Waited in the admission queue, then was served.
    Queued,
    /// Refused with this code (after every retry).
    Rejected(RejectCode),
    /// Its model's load failed.
    Failed,
    /// An admin operation, not a request.
    Admin,
}

impl RequestOutcome {
    /// The name reports use: the header value, the error code, `failed`, `admin`, `pending`.
    pub fn as_str(self) -> &'static str {
        match self {
            RequestOutcome::Pending => "pending",
            RequestOutcome::Hit => "hit",
            RequestOutcome::Join => "join",
            RequestOutcome::Load => "load",
            RequestOutcome::Queued => "queued",
            RequestOutcome::Rejected(c) => c.as_str(),
            RequestOutcome::Failed => "failed",
            RequestOutcome::Admin => "admin",
        }
    }
}

impl std::fmt::Display for RequestOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One event of a recorded replay: a trace operation's arrival, or an internal event (a load
/// finishing, a lease ending, an unload finishing, a queue deadline) with the trace operation
/// whose processing scheduled it (its cause: delaying that operation delays the event).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    /// When it happened.
    pub at: Nanos,
    /// The trace operation it is (an arrival) or that scheduled it.
    pub cause: u32,
    /// Whether it is the arrival of operation `cause`.
    pub arrival: bool,
}

/// What [`run_recorded`] records besides the report.
#[derive(Debug, Clone, Default)]
pub struct Recording {
    /// Per trace operation, in trace order.
    pub outcomes: Vec<RequestOutcome>,
    /// Every arrival and internal event, in the order the replay handled them.
    pub marks: Vec<Mark>,
}

/// A request waiting for a load.
/// A request or preload parked until its model's own unload ends ([`Admission::AwaitUnload`]).
#[derive(Debug, Clone, Copy)]
struct Parked {
    /// Index of its trace operation.
    op: u32,
    first: Nanos,
    attempt: u32,
    service: Nanos,
}

#[derive(Debug, Clone, Copy)]
struct Waiter {
    /// Index of its trace operation.
    op: u32,
    /// Arrival of its first attempt (latency is measured from there).
    first: Nanos,
    service: Nanos,
    /// KV bytes it was admitted with.
    kv: u64,
    /// Whether this request started the load (else it joined).
    started: bool,
}

#[derive(Debug, Clone, Copy)]
enum Ev {
    /// A load ends, unless its epoch is stale (the load was a preload, cancelled since).
    LoadDone(Slot, u32),
    Release {
        slot: Slot,
        acquired: Nanos,
        kv: u64,
        /// Its trace operation.
        op: u32,
    },
    Unloaded(Slot),
    Retry {
        op: u32,
        attempt: u32,
        first: Nanos,
    },
    /// The periodic keep-alive check.
    Expire,
    /// The admission queue's next deadline (a waiter starts starving or times out).
    QueueTick,
}

/// A request waiting in the engine's admission queue.
#[derive(Debug, Clone, Copy)]
struct QueuedReq {
    op: u32,
    first: Nanos,
    attempt: u32,
    service: Nanos,
    since: Nanos,
}

#[derive(Debug, Clone, Copy)]
struct Timed {
    at: Nanos,
    seq: u64,
    /// The trace operation whose processing scheduled it (for [`Mark::cause`]).
    cause: u32,
    ev: Ev,
}

impl PartialEq for Timed {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl Eq for Timed {}
impl PartialOrd for Timed {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}
impl Ord for Timed {
    fn cmp(&self, o: &Self) -> Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

pub(crate) struct Runner<'t, P: SimPolicy> {
    trace: &'t Trace,
    cfg: &'t SimConfig,
    /// The engine's decision core, driven as the async pool drives it.
    core: PoolState<P, NameEstimator>,
    heap: BinaryHeap<Reverse<Timed>>,
    seq: u64,
    waiters: Vec<Vec<Waiter>>,
    /// Per model: requests and preloads awaiting its unload.
    parked: Vec<Vec<Parked>>,
    /// Requests whose KV cache awaits memory coming back from any unload.
    parked_any: Vec<Parked>,
    /// Requests in the engine's admission queue, by ticket.
    queued: HashMap<Ticket, QueuedReq>,
    /// Reused buffer for the engine's wakes.
    wake_buf: Vec<Wake>,
    /// The earliest queue tick scheduled, if any.
    tick_at: Option<Nanos>,
    /// Time spent in the admission queue by requests admitted from it, microseconds.
    wait_hist: Histogram<u64>,
    true_size: Vec<u64>,
    load_ns: Vec<u64>,
    unload_ns: u64,
    /// Per slot: nanoseconds per prompt token and per generated token (the global timings, or
    /// the model's own from [`SimConfig::model_timing`]).
    service_rates: Vec<(Nanos, Nanos)>,
    /// Every slot's rates are zero: a request given in tokens takes no time.
    tokens_free: bool,
    per_model: Vec<ModelCounters>,
    totals: Totals,
    hist: Histogram<u64>,
    zero_latency: u64,
    mem_t: Nanos,
    mem_used: u64,
    kv_used: u64,
    rng: ChaCha8Rng,
    next_use: Vec<u64>,
    /// Index of the next trace operation.
    next_op: usize,
    /// Period of the keep-alive check, if a TTL is set.
    expire_every: Option<Nanos>,
    /// The trace operation being processed, or the cause of the internal event being processed.
    cur: u32,
    /// Outcomes and marks, when recording.
    rec: Option<Recording>,
    /// Whether requests of no service time may take [`Runner::request_instant`]: every load and
    /// unload is instant, no KV cache, no injected failures, no keep-alive, no recording.
    instant: bool,
    /// As a node of the fleet simulator: where each request's start, end and refusal go.
    node_out: Option<Vec<NodeEvent>>,
    /// Predictive preload horizon, if on.
    preload_horizon: Option<Nanos>,
    /// Per model: when its predictive preload started, while no request has used it yet.
    preloaded: Vec<Option<Nanos>>,
    /// Per model: the epoch of its load in progress (bumped when a preload is cancelled, so
    /// its scheduled end is ignored).
    load_epoch: Vec<u32>,
    /// Refusals with a retry hint whose actual wait is still being measured.
    probes: Vec<Probe>,
}

/// Refusals whose wait is measured at once; more are counted in `with_hint` only.
const MAX_PROBES: usize = 4096;

/// A refusal's `Retry-After` against the time the same request would actually have been admitted
/// ([`Runner::check_probes`]).
#[derive(Debug, Clone, Copy)]
struct Probe {
    at: Nanos,
    slot: Slot,
    hint_secs: u32,
    kv: u64,
}

/// What happened to a request at a node of the fleet simulator ([`crate::fleet`]): what its
/// router and client see.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum NodeEvent {
    /// Its service began (it holds the model).
    Started { op: u32, at: Nanos },
    /// Its service ended (the response is complete).
    Finished { op: u32, at: Nanos },
    /// It was refused: the reply's code, `Retry-After` and whether a retry here never succeeds.
    Refused { op: u32, at: Nanos, code: RejectCode, retry_after: Option<u32>, never: bool },
    /// Its model's load failed.
    Failed { op: u32, at: Nanos },
}

fn secs_to_ns(s: f64) -> u64 {
    (s * NS as f64).round() as u64
}

impl<'t, P: SimPolicy> Runner<'t, P> {
    fn new(trace: &'t Trace, cfg: &'t SimConfig, policy: P, record: bool) -> Self {
        let pcfg = PoolConfig {
            limit: cfg.limit,
            max_models: cfg.max_models,
            log: cfg.log,
            idle_ttl: cfg.idle_ttl_secs.map(secs_to_ns),
            load_latency_secs: cfg.load_latency_secs,
            load_bandwidth: cfg.load_bandwidth,
            queue_timeout: secs_to_ns(cfg.queue_timeout_secs),
            max_queue: cfg.max_queue,
            service_ns_per_token: cfg.timing().service_prior_ns_per_token(),
        };
        let mut core = PoolState::new(pcfg, policy, NameEstimator);
        let mut true_size = Vec::with_capacity(trace.models.len());
        for (i, m) in trace.models.iter().enumerate() {
            let mut spec = ModelSpec::new(m.id.clone()).with_type(m.model_type);
            if !cfg.estimate_from_names {
                spec.size_hint = m.size;
            }
            spec.kv_bytes_per_token = m.kv_bytes_per_token;
            let slot = core.register(spec);
            assert_eq!(slot as usize, i, "trace models are distinct");
            let size = m
                .size
                .unwrap_or_else(|| ((core.need(slot) as f64 * cfg.measured_factor).round() as u64).max(1));
            true_size.push(size);
        }
        let timing = cfg.timing();
        let mut load_ns = Vec::with_capacity(trace.models.len());
        let mut service_rates = Vec::with_capacity(trace.models.len());
        for (m, &bytes) in trace.models.iter().zip(&true_size) {
            let own = cfg.model_timing.get(&*m.id).copied().unwrap_or_default();
            let t = TimingModel {
                prefill_secs_per_token: own.prefill_secs_per_token.unwrap_or(timing.prefill_secs_per_token),
                decode_secs_per_token: own.decode_secs_per_token.unwrap_or(timing.decode_secs_per_token),
                ..timing
            };
            load_ns.push(match own.load_secs {
                Some(s) => {
                    TimingModel { load_latency_secs: s, load_bandwidth: None, ..timing }.load_nanos(bytes)
                }
                None => timing.load_nanos(bytes),
            });
            service_rates.push((t.prefill_nanos(), t.decode_nanos()));
        }
        let tokens_free = service_rates.iter().all(|&r| r == (0, 0));
        let n = trace.models.len();
        let instant = load_ns.iter().all(|&t| t == 0)
            && timing.unload_nanos() == 0
            && !cfg.kv_cache
            && cfg.load_failure_rate == 0.0
            && cfg.idle_ttl_secs.is_none()
            && !record;
        Runner {
            trace,
            cfg,
            core,
            heap: BinaryHeap::with_capacity(1024),
            seq: 0,
            waiters: vec![Vec::new(); n],
            parked: vec![Vec::new(); n],
            parked_any: Vec::new(),
            queued: HashMap::new(),
            wake_buf: Vec::new(),
            tick_at: None,
            wait_hist: Histogram::new_with_bounds(1, 30 * 86_400 * 1_000_000, 3)
                .expect("valid histogram bounds"),
            true_size,
            load_ns,
            unload_ns: timing.unload_nanos(),
            service_rates,
            tokens_free,
            per_model: vec![ModelCounters::default(); n],
            totals: Totals::default(),
            // Microseconds, up to 30 days, 3 significant digits.
            hist: Histogram::new_with_bounds(1, 30 * 86_400 * 1_000_000, 3).expect("valid histogram bounds"),
            zero_latency: 0,
            mem_t: 0,
            mem_used: 0,
            kv_used: 0,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            next_use: if P::OFFLINE { next_uses(trace) } else { Vec::new() },
            next_op: 0,
            // The server's period: a quarter of the TTL, between 1 and 60 seconds.
            expire_every: cfg.idle_ttl_secs.map(|t| secs_to_ns(t / 4.0).clamp(NS, 60 * NS)),
            cur: 0,
            node_out: None,
            probes: Vec::new(),
            rec: record.then(|| Recording {
                outcomes: trace
                    .ops
                    .iter()
                    .map(|o| {
                        if o.kind == OpKind::Request {
                            RequestOutcome::Pending
                        } else {
                            RequestOutcome::Admin
                        }
                    })
                    .collect(),
                marks: Vec::new(),
            }),
            instant,
            preload_horizon: cfg.preload_horizon_secs.map(secs_to_ns),
            preloaded: vec![None; n],
            load_epoch: vec![0; n],
        }
    }

    /// Start a predictive preload if the engine finds one (nothing waits, a model predicted
    /// within the horizon fits in the free room and a free model slot).
    #[inline]
    fn try_preload(&mut self, now: Nanos) {
        let Some(h) = self.preload_horizon else { return };
        if !self.parked_any.is_empty() {
            return;
        }
        let Some(slot) = self.core.predictive_preload(now, h) else { return };
        self.totals.predicted.get_or_insert_with(Default::default).started += 1;
        self.preloaded[slot as usize] = Some(now);
        self.mem_sync(now);
        self.begin_load(slot, now);
    }

    /// A first attempt found `slot` resident (`Hit`) or loading (`Join`): a preload pending on
    /// it was useful; it saved the part of its load done by now.
    #[inline]
    fn preload_used(&mut self, slot: Slot, now: Nanos) {
        if let Some(started) = self.preloaded[slot as usize].take() {
            let saved = (now - started).min(self.load_ns[slot as usize]);
            let p = self.totals.predicted.get_or_insert_with(Default::default);
            p.useful += 1;
            p.latency_saved_secs += saved as f64 / NS as f64;
        }
    }

    /// `slot` left memory (or its load failed): a preload pending on it was wasted.
    #[inline]
    fn preload_lost(&mut self, slot: Slot) {
        if self.preloaded[slot as usize].take().is_some() {
            self.totals.predicted.get_or_insert_with(Default::default).wasted += 1;
        }
    }

    /// Record operation `op`'s outcome, when recording.
    #[inline]
    fn outcome(&mut self, op: usize, o: RequestOutcome) {
        if let Some(r) = &mut self.rec {
            r.outcomes[op] = o;
        }
    }

    #[inline]
    fn schedule(&mut self, at: Nanos, ev: Ev) {
        self.seq += 1;
        self.heap.push(Reverse(Timed { at, seq: self.seq, cause: self.cur, ev }));
    }

    /// Account memory use up to `now`, then take the ledger's new value.
    #[inline]
    fn mem_sync(&mut self, now: Nanos) {
        let dt = u128::from(now - self.mem_t);
        self.totals.mem_area += u128::from(self.mem_used) * dt;
        self.totals.kv_area += u128::from(self.kv_used) * dt;
        self.mem_t = now;
        let l = self.core.ledger();
        self.mem_used = l.used();
        self.kv_used = l.kv;
    }

    /// KV bytes trace request `idx` holds on `slot`: its tokens in and out at the model's rate.
    #[inline]
    fn kv_of(&self, idx: usize, slot: Slot) -> u64 {
        if !self.cfg.kv_cache {
            return 0;
        }
        match self.trace.ops[idx].service() {
            Service::Tokens { input, output } => {
                self.core.kv_for_tokens(slot, u64::from(input) + u64::from(output))
            }
            Service::Duration(_) => 0,
        }
    }

    /// Unload the idle models the engine evicted by itself (room for a request's KV).
    fn flush_unloads(&mut self, now: Nanos) {
        if self.core.has_unloads() {
            self.mem_sync(now);
            for v in self.core.take_unloads() {
                self.unload(v, now);
            }
        }
    }

    /// Service time of a request for `slot`.
    #[inline]
    fn service_ns(&self, slot: Slot, s: Service) -> Nanos {
        match s {
            Service::Duration(d) => d,
            Service::Tokens { .. } if self.tokens_free => 0,
            Service::Tokens { input, output } => {
                let (prefill, decode) = self.service_rates[slot as usize];
                u64::from(input)
                    .saturating_mul(prefill)
                    .saturating_add(u64::from(output).saturating_mul(decode))
            }
        }
    }

    #[inline]
    fn record_latency(&mut self, ns: Nanos) {
        if ns == 0 {
            self.zero_latency += 1;
        } else {
            self.hist.saturating_record(ns.div_ceil(1000));
            self.totals.latency_sum += u128::from(ns);
            self.totals.latency_max = self.totals.latency_max.max(ns);
        }
    }

    fn run(mut self) -> Result<(Outcome, Option<Recording>), String> {
        let ops = &self.trace.ops;
        let mut i = 0usize;
        let mut ok = OpCheck::new(self.trace);
        if let Some(every) = self.expire_every {
            self.schedule(every, Ev::Expire);
        }
        loop {
            if self.instant {
                // Nothing is in flight between operations: requests of no service time are
                // served in one call each, until one leaves work for the heap.
                // `op` stays a reference into the trace: a copy on the stack, live across the
                // calls below, had its fields read back through a store just made (perf: a
                // store-forwarding stall on every request).
                while let Some(op) = ops.get(i) {
                    if !(self.heap.is_empty() && self.parked_any.is_empty())
                        || op.kind != OpKind::Request
                        || self.service_ns(op.model, op.service()) != 0
                    {
                        break;
                    }
                    ok.check(op)?;
                    self.cur = i as u32;
                    self.totals.requests += 1;
                    self.per_model[op.model as usize].requests += 1;
                    self.request_instant(i, op.model, op.at);
                    self.try_preload(op.at);
                    i += 1;
                }
                self.next_op = i;
            }
            let take_op = match (ops.get(i), self.heap.peek()) {
                (Some(op), Some(Reverse(ev))) => op.at < ev.at,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => break,
            };
            if take_op {
                let op = ops[i];
                ok.check(&op)?;
                self.cur = i as u32;
                if let Some(r) = &mut self.rec {
                    r.marks.push(Mark { at: op.at, cause: i as u32, arrival: true });
                }
                if op.kind == OpKind::Request {
                    self.totals.requests += 1;
                    self.per_model[op.model as usize].requests += 1;
                    let service = self.service_ns(op.model, op.service());
                    self.request(i, op.model, op.at, op.at, 0, service);
                    self.try_preload(op.at);
                } else {
                    self.admin(i, op.at);
                }
                if !self.probes.is_empty() {
                    self.check_probes(op.at);
                }
                i += 1;
                self.next_op = i;
            } else {
                let Some(Reverse(Timed { at, ev, cause, .. })) = self.heap.pop() else {
                    break;
                };
                self.cur = cause;
                if let Some(r) = &mut self.rec
                    && !matches!(ev, Ev::Expire)
                {
                    r.marks.push(Mark { at, cause, arrival: false });
                }
                self.internal(at, ev);
                if !self.probes.is_empty() {
                    self.check_probes(at);
                }
            }
        }
        Ok(self.finish())
    }

    #[inline]
    fn request(&mut self, idx: usize, slot: Slot, now: Nanos, first: Nanos, attempt: u32, service: Nanos) {
        if P::OFFLINE {
            let next = self.next_use[idx];
            self.core.policy_mut().set_next_use(slot, next, idx as u64);
        }
        let kv = self.kv_of(idx, slot);
        let admission = self.core.admit_request(slot, now, kv);
        self.carry_out(idx, slot, now, first, attempt, service, kv, admission, attempt == 0);
        // After carrying it out: an instant unload pumps the queue, which may wake this request.
        self.flush_unloads(now);
    }

    /// A first attempt of trace request `idx` with no service time, when every load and unload
    /// is instant: [`PoolState::serve_instant`] makes the same calls the generic path
    /// ([`Runner::request`], [`Runner::carry_out`]) makes in this case, in one; other
    /// admissions are carried out by the generic path.
    #[inline]
    fn request_instant(&mut self, idx: usize, slot: Slot, now: Nanos) {
        if P::OFFLINE {
            let next = self.next_use[idx];
            self.core.policy_mut().set_next_use(slot, next, idx as u64);
        }
        let per_model = &mut self.per_model;
        let (preloaded, predicted) = (&mut self.preloaded, &mut self.totals.predicted);
        let mut unloads = 0u32;
        let served = self.core.serve_instant(slot, now, self.true_size[slot as usize], |v| {
            per_model[v as usize].unloads += 1;
            unloads += 1;
            // `Runner::preload_lost`, inline (the closure cannot borrow the runner).
            if let (Some(_), Some(p)) = (preloaded[v as usize].take(), predicted.as_mut()) {
                p.wasted += 1;
            }
        });
        // The ledger changed (a load, or an unload after a hit): account memory as the generic
        // path's syncs at this same instant add up to.
        let changed = match served {
            Served::Hit => {
                self.totals.hits += 1;
                self.per_model[slot as usize].hits += 1;
                if self.preload_horizon.is_some() {
                    self.preload_used(slot, now);
                }
                unloads > 0
            }
            Served::Loaded => {
                self.totals.cold_loads += 1;
                true
            }
            Served::Admitted(admission) => {
                self.carry_out(idx, slot, now, now, 0, 0, 0, admission, true);
                self.flush_unloads(now);
                return;
            }
        };
        self.totals.served += 1;
        self.zero_latency += 1;
        if changed {
            self.mem_sync(now);
        }
    }

    /// Carry out a request's admission (`fresh`: its first attempt, admitted directly).
    #[allow(clippy::too_many_arguments)]
    #[inline]
    fn carry_out(
        &mut self,
        idx: usize,
        slot: Slot,
        now: Nanos,
        first: Nanos,
        attempt: u32,
        service: Nanos,
        kv: u64,
        admission: Admission,
        fresh: bool,
    ) {
        if self.rec.is_some() {
            let o = match (&admission, fresh) {
                (Admission::Reject(r), _) => Some(RequestOutcome::Rejected(r.code)),
                (_, false) => None,
                (Admission::Hit, true) => Some(RequestOutcome::Hit),
                (Admission::Join, true) => Some(RequestOutcome::Join),
                (Admission::Load(_), true) => Some(RequestOutcome::Load),
                (Admission::Queued(_), true) => Some(RequestOutcome::Queued),
                (Admission::AwaitUnload, true) => None,
            };
            if let Some(o) = o {
                self.outcome(idx, o);
            }
        }
        match admission {
            Admission::Hit => {
                if fresh {
                    self.totals.hits += 1;
                    self.per_model[slot as usize].hits += 1;
                    self.preload_used(slot, now);
                }
                self.totals.served += 1;
                self.record_latency(now - first);
                if kv > 0 {
                    self.mem_sync(now);
                }
                self.start_service(slot, now, service, kv, idx as u32);
            }
            Admission::Join => {
                if fresh {
                    self.preload_used(slot, now);
                }
                if kv > 0 {
                    self.mem_sync(now);
                }
                self.waiters[slot as usize].push(Waiter {
                    op: idx as u32,
                    first,
                    service,
                    kv,
                    started: false,
                });
            }
            Admission::Load(plan) => {
                self.totals.cold_loads += 1;
                self.waiters[slot as usize].push(Waiter {
                    op: idx as u32,
                    first,
                    service,
                    kv,
                    started: true,
                });
                self.start_load(slot, now, &plan);
            }
            Admission::AwaitUnload => {
                let p = Parked { op: idx as u32, first, attempt, service };
                if self.core.phase(slot) == modelpool::Phase::Draining {
                    self.parked[slot as usize].push(p);
                } else {
                    // Its KV waits for memory that any unload may bring back.
                    self.parked_any.push(p);
                }
            }
            Admission::Queued(ticket) => {
                self.totals.queued += 1;
                self.queued.insert(ticket, QueuedReq { op: idx as u32, first, attempt, service, since: now });
                self.schedule_queue_tick(now);
            }
            Admission::Reject(r) => {
                if let Some(hint_secs) = r.retry_after_secs {
                    self.totals.hints.with_hint += 1;
                    // Bounded: each pending probe is checked after every event.
                    if self.probes.len() < MAX_PROBES {
                        self.probes.push(Probe { at: now, slot, hint_secs, kv });
                    }
                }
                if let Some(out) = &mut self.node_out {
                    let (code, retry_after, never) = (r.code, r.retry_after_secs, r.never_succeeds());
                    out.push(NodeEvent::Refused { op: idx as u32, at: now, code, retry_after, never });
                }
                self.totals.rejections[code_index(r.code)] += 1;
                if attempt == 0 {
                    self.totals.first_503 += 1;
                }
                match r.retry_after_secs {
                    Some(secs) if attempt < self.cfg.retries => {
                        self.totals.retried += 1;
                        let at = now.saturating_add(u64::from(secs) * NS);
                        self.schedule(at, Ev::Retry { op: idx as u32, attempt: attempt + 1, first });
                    }
                    _ => {
                        self.totals.dropped += 1;
                        self.per_model[slot as usize].rejected += 1;
                    }
                }
            }
        }
    }

    #[inline]
    fn start_service(&mut self, slot: Slot, now: Nanos, service: Nanos, kv: u64, op: u32) {
        if let Some(out) = &mut self.node_out {
            out.push(NodeEvent::Started { op, at: now });
        }
        if service == 0 {
            self.end_lease(slot, now, now, kv, op);
        } else {
            self.schedule(now.saturating_add(service), Ev::Release { slot, acquired: now, kv, op });
        }
    }

    /// End a lease; the engine says whether the model must now leave memory (it was draining,
    /// or the pool is over its limits and this model just became evictable).
    #[inline]
    fn end_lease(&mut self, slot: Slot, now: Nanos, acquired: Nanos, kv: u64, op: u32) {
        if let Some(out) = &mut self.node_out {
            out.push(NodeEvent::Finished { op, at: now });
        }
        if self.core.release_request(slot, now, acquired, kv) {
            self.mem_sync(now);
            self.unload(slot, now);
        } else if kv > 0 {
            self.mem_sync(now);
        }
        if self.core.has_wakes() || self.core.has_unloads() {
            self.drain_wakes(now);
        }
    }

    /// Carry out the admissions the engine decided for queued requests, as the server does.
    fn drain_wakes(&mut self, now: Nanos) {
        self.flush_unloads(now);
        while self.core.has_wakes() {
            let mut buf = std::mem::take(&mut self.wake_buf);
            buf.extend(self.core.take_wakes());
            self.mem_sync(now);
            for w in buf.drain(..) {
                let Some(q) = self.queued.remove(&w.ticket) else { continue };
                if !matches!(w.outcome, Admission::Reject(_)) {
                    self.wait_hist.saturating_record(now.saturating_sub(q.since).div_ceil(1000).max(1));
                }
                let (op, slot, kv) = (q.op as usize, w.slot, w.kv);
                self.carry_out(op, slot, now, q.first, q.attempt, q.service, kv, w.outcome, false);
                self.flush_unloads(now);
            }
            if self.wake_buf.capacity() < buf.capacity() {
                self.wake_buf = buf;
            }
        }
        self.schedule_queue_tick(now);
    }

    /// Make sure a queue tick is scheduled at the engine's next queue deadline.
    fn schedule_queue_tick(&mut self, now: Nanos) {
        if let Some(at) = self.core.next_queue_deadline(now)
            && self.tick_at.is_none_or(|t| at < t)
        {
            self.tick_at = Some(at);
            self.schedule(at.max(now), Ev::QueueTick);
        }
    }

    fn unload(&mut self, slot: Slot, now: Nanos) {
        if self.core.is_cancelled_load(slot) {
            // A predictive preload cancelled mid-load for a request's room: as the fake
            // backend does, the load stops at once and held nothing, so its memory is back now
            // (no unload time). Its pending `LoadDone` goes stale.
            self.load_epoch[slot as usize] = self.load_epoch[slot as usize].wrapping_add(1);
            self.totals.predicted.get_or_insert_with(Default::default).cancelled += 1;
            self.memory_back(slot, now);
            return;
        }
        if self.unload_ns == 0 {
            self.reclaim(slot, now);
        } else {
            self.schedule(now.saturating_add(self.unload_ns), Ev::Unloaded(slot));
        }
    }

    fn reclaim(&mut self, slot: Slot, now: Nanos) {
        self.per_model[slot as usize].unloads += 1;
        self.memory_back(slot, now);
    }

    /// `slot`'s memory came back (an unload, or a cancelled preload's load stopped): report it
    /// and carry on with whatever waited for it.
    fn memory_back(&mut self, slot: Slot, now: Nanos) {
        self.preload_lost(slot);
        let owner = self.core.reclaimed(slot, now);
        self.mem_sync(now);
        if let Some(o) = owner {
            self.begin_load(o, now);
        }
        if self.core.has_wakes() || self.core.has_unloads() {
            self.drain_wakes(now);
        }
        if !self.parked_any.is_empty() {
            let mut parked = std::mem::take(&mut self.parked_any);
            for p in &parked {
                let model = self.trace.ops[p.op as usize].model;
                self.request(p.op as usize, model, now, p.first, p.attempt, p.service);
            }
            parked.clear();
            if self.parked_any.is_empty() {
                self.parked_any = parked;
            }
        }
        if !self.parked[slot as usize].is_empty() {
            let mut parked = std::mem::take(&mut self.parked[slot as usize]);
            for p in &parked {
                let op = self.trace.ops[p.op as usize];
                if op.kind == OpKind::Request {
                    self.request(p.op as usize, slot, now, p.first, p.attempt, p.service);
                } else {
                    self.preload(p.op as usize, slot, now);
                }
            }
            parked.clear();
            if self.parked[slot as usize].is_empty() {
                self.parked[slot as usize] = parked;
            }
        }
    }

    /// Admit a preload (trace operation `idx`) of `slot`.
    fn preload(&mut self, idx: usize, slot: Slot, now: Nanos) {
        match self.core.admit(slot, now, Intent::Preload) {
            Admission::Hit | Admission::Join => {}
            Admission::Load(plan) => self.start_load(slot, now, &plan),
            Admission::AwaitUnload => {
                self.parked[slot as usize].push(Parked {
                    op: idx as u32,
                    first: now,
                    attempt: 0,
                    service: 0,
                });
            }
            Admission::Reject(_) => self.totals.admin_refused += 1,
            Admission::Queued(_) => unreachable!("preloads are never queued"),
        }
    }

    fn start_load(&mut self, slot: Slot, now: Nanos, plan: &LoadPlan) {
        self.mem_sync(now);
        if plan.victims.is_empty() {
            self.begin_load(slot, now);
        } else {
            for &v in &plan.victims {
                self.unload(v, now);
            }
        }
    }

    fn begin_load(&mut self, slot: Slot, now: Nanos) {
        let t = self.load_ns[slot as usize];
        if t == 0 {
            self.finish_load(slot, now);
        } else {
            let epoch = self.load_epoch[slot as usize];
            self.schedule(now.saturating_add(t), Ev::LoadDone(slot, epoch));
        }
    }

    fn finish_load(&mut self, slot: Slot, now: Nanos) {
        let fail = self.cfg.load_failure_rate > 0.0
            && ((self.rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64) < self.cfg.load_failure_rate;
        let mut waiters = std::mem::take(&mut self.waiters[slot as usize]);
        if fail {
            self.core.load_finished(slot, now, Err("injected load failure"));
            self.preload_lost(slot);
            self.mem_sync(now);
            self.totals.failed += waiters.len() as u64;
            self.per_model[slot as usize].failed += waiters.len() as u64;
            for w in &waiters {
                self.outcome(w.op as usize, RequestOutcome::Failed);
                if let Some(out) = &mut self.node_out {
                    out.push(NodeEvent::Failed { op: w.op, at: now });
                }
            }
        } else {
            let done = self.core.load_finished(slot, now, Ok(self.true_size[slot as usize]));
            debug_assert_eq!(done.leases_granted as usize, waiters.len());
            self.mem_sync(now);
            for &v in &done.evicted {
                self.unload(v, now);
            }
            for w in &waiters {
                if !w.started {
                    self.totals.joined += 1;
                }
                self.totals.served += 1;
                self.record_latency(now - w.first);
                self.start_service(slot, now, w.service, w.kv, w.op);
            }
        }
        waiters.clear();
        if self.waiters[slot as usize].is_empty() {
            self.waiters[slot as usize] = waiters;
        }
        if self.core.has_wakes() || self.core.has_unloads() {
            self.drain_wakes(now);
        }
    }

    fn internal(&mut self, now: Nanos, ev: Ev) {
        match ev {
            Ev::Release { slot, acquired, kv, op } => self.end_lease(slot, now, acquired, kv, op),
            Ev::LoadDone(slot, epoch) => {
                if epoch == self.load_epoch[slot as usize] {
                    self.finish_load(slot, now);
                }
            }
            Ev::Unloaded(slot) => self.reclaim(slot, now),
            Ev::Retry { op, attempt, first } => {
                let o = self.trace.ops[op as usize];
                let service = self.service_ns(o.model, o.service());
                self.request(op as usize, o.model, now, first, attempt, service);
            }
            Ev::QueueTick => {
                if self.tick_at.is_some_and(|t| t <= now) {
                    self.tick_at = None;
                }
                self.core.queue_tick(now);
                self.drain_wakes(now);
            }
            Ev::Expire => {
                let expired = self.core.expire_idle(now);
                if !expired.is_empty() {
                    self.mem_sync(now);
                }
                for v in expired {
                    self.unload(v, now);
                }
                // Keep ticking while anything is left to happen, including expiries themselves.
                let expirable = (0..self.trace.models.len() as Slot)
                    .any(|s| self.core.phase(s) == modelpool::Phase::Resident && !self.core.is_pinned(s));
                if let Some(every) = self.expire_every
                    && (self.next_op < self.trace.ops.len() || !self.heap.is_empty() || expirable)
                {
                    self.schedule(now.saturating_add(every), Ev::Expire);
                }
            }
        }
    }

    fn admin(&mut self, idx: usize, now: Nanos) {
        let op = self.trace.ops[idx];
        self.totals.admin_ops += 1;
        let slot = op.model;
        match op.kind {
            OpKind::Request => unreachable!("requests are handled by the caller"),
            OpKind::Preload => {
                self.totals.preloads += 1;
                self.preload(idx, slot, now);
            }
            OpKind::Pin => {
                if !self.core.pin(slot, now) {
                    self.totals.admin_refused += 1;
                }
            }
            OpKind::Unpin => {
                let (_, evicted) = self.core.unpin(slot, now);
                if !evicted.is_empty() {
                    self.mem_sync(now);
                }
                for v in evicted {
                    self.unload(v, now);
                }
                self.drain_wakes(now);
            }
            OpKind::Unload => match self.core.unload(slot, now, false) {
                Ok(true) => {
                    self.mem_sync(now);
                    self.unload(slot, now);
                }
                Ok(false) => self.mem_sync(now),
                Err(_) => self.totals.admin_refused += 1,
            },
            OpKind::SetLimit => {
                let l = self.core.ledger();
                let limit = if op.arg == 0 { l.limit } else { op.arg };
                let max = if op.model == 0 { l.max_models } else { op.model as usize };
                match self.core.set_limits(limit, max, now) {
                    Ok(evicted) => {
                        self.mem_sync(now);
                        for v in evicted.unload_now {
                            self.unload(v, now);
                        }
                        self.drain_wakes(now);
                    }
                    Err(_) => self.totals.admin_refused += 1,
                }
            }
        }
    }

    /// A node of the fleet simulator: this runner, fed arrivals by [`Runner::arrive`] and
    /// stepped by [`Runner::step`] instead of replaying the trace itself; the trace supplies the
    /// models and the requests' shapes.
    pub(crate) fn node(trace: &'t Trace, cfg: &'t SimConfig, policy: P) -> Self {
        let mut r = Runner::new(trace, cfg, policy, false);
        r.instant = false;
        r.node_out = Some(Vec::new());
        if let Some(every) = r.expire_every {
            r.schedule(every, Ev::Expire);
        }
        r
    }

    /// When the node's next internal event happens, if any.
    pub(crate) fn next_at(&self) -> Option<Nanos> {
        self.heap.peek().map(|Reverse(t)| t.at)
    }

    /// Handle the node's next internal event.
    pub(crate) fn step(&mut self) {
        if let Some(Reverse(Timed { at, ev, cause, .. })) = self.heap.pop() {
            self.cur = cause;
            self.internal(at, ev);
        }
    }

    /// Trace request `idx` arrives at this node at `now` (`first`: its first attempt anywhere,
    /// where its latency counts from).
    pub(crate) fn arrive(&mut self, idx: usize, now: Nanos, first: Nanos) {
        let op = self.trace.ops[idx];
        self.cur = idx as u32;
        self.next_op = self.next_op.max(idx + 1);
        self.totals.requests += 1;
        self.per_model[op.model as usize].requests += 1;
        let service = self.service_ns(op.model, op.service());
        self.request(idx, op.model, now, first, 0, service);
    }

    /// Trace admin operation `idx`, applied to this node at `now`.
    pub(crate) fn admin_op(&mut self, idx: usize, now: Nanos) {
        self.cur = idx as u32;
        self.next_op = self.next_op.max(idx + 1);
        self.admin(idx, now);
    }

    /// Move the node's request events since the last call into `into`.
    pub(crate) fn drain_events(&mut self, into: &mut Vec<NodeEvent>) {
        if let Some(out) = &mut self.node_out {
            into.append(out);
        }
    }

    /// The engine core, read-only (router views, residency).
    pub(crate) fn core(&self) -> &PoolState<P, NameEstimator> {
        &self.core
    }

    /// Whether this node could admit trace request `idx` at `now` without waiting: its dry run
    /// ([`PoolState::admission_view`]) says hit, join or load, and the request's KV cache fits
    /// beside the model within the limit less pinned models.
    pub(crate) fn could_admit(&self, idx: usize, now: Nanos) -> bool {
        let slot = self.trace.ops[idx].model;
        self.admissible(slot, self.kv_of(idx, slot), now)
    }

    /// Whether a request for `slot` holding `kv` bytes would be admitted at `now` without
    /// waiting in the queue or being refused: the dry run says hit (and the KV fits in what is
    /// free now), join or load (and weights plus KV fit beside the pinned models).
    fn admissible(&self, slot: Slot, kv: u64, now: Nanos) -> bool {
        let l = self.core.ledger();
        match self.core.admission_view(slot, now).decision {
            modelpool::Decision::Hit => l.used().saturating_add(kv) <= l.limit,
            modelpool::Decision::Join | modelpool::Decision::Load => {
                self.core.need(slot).saturating_add(kv) <= l.limit.saturating_sub(l.pinned)
            }
            _ => false,
        }
    }

    /// Resolve the refusals whose request would now be admitted: their hint against the wait.
    /// Runs after every event while some are pending; the state changes only at events, so the
    /// first event after which a request is admissible is when its wait ended.
    fn check_probes(&mut self, now: Nanos) {
        let mut probes = std::mem::take(&mut self.probes);
        probes.retain(|p| {
            if !self.admissible(p.slot, p.kv, now) {
                return true;
            }
            self.totals.hints.resolve(u64::from(p.hint_secs) * NS, now - p.at);
            false
        });
        self.probes = probes;
    }

    /// The node's measured size of trace model `slot`.
    pub(crate) fn true_size(&self, slot: Slot) -> u64 {
        self.true_size[slot as usize]
    }

    /// The node's report once the fleet has drained.
    pub(crate) fn finish_node(self) -> Outcome {
        self.finish().0
    }

    fn finish(mut self) -> (Outcome, Option<Recording>) {
        if self.preload_horizon.is_some() {
            let unused = self.preloaded.iter().filter(|p| p.is_some()).count() as u64;
            self.totals.predicted.get_or_insert_with(Default::default).unused_at_end = unused;
        }
        let end = self.mem_t.max(self.trace.duration());
        self.mem_sync(end);
        self.totals.end = end;
        if self.zero_latency > 0 {
            let _ = self.hist.record_n(0, self.zero_latency);
        }
        let rows: Vec<ModelRow> = self
            .trace
            .models
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let c = self.per_model[i];
                let status = self.core.model_status(i as Slot);
                ModelRow {
                    model: m.id.to_string(),
                    model_type: m.model_type.to_string(),
                    size_bytes: self.true_size[i],
                    requests: c.requests,
                    hits: c.hits,
                    misses: c.requests - c.hits,
                    loads: status.loads,
                    unloads: c.unloads,
                    rejected: c.rejected,
                    failed: c.failed,
                    load_cost_secs: self.cfg.load_secs(self.true_size[i]),
                }
            })
            .collect();
        let report = build_report(
            self.cfg,
            self.trace,
            &self.totals,
            self.core.stats(),
            self.core.ledger(),
            &self.hist,
            &self.wait_hist,
            rows,
        );
        debug_assert!(self.core.check_invariants().is_ok());
        let events = self.core.log_mut().drain();
        (Outcome { report, events }, self.rec.take())
    }
}

/// Index of a code in per-code counters (`RejectCode::ALL` order).
pub(crate) fn code_index(c: RejectCode) -> usize {
    c as usize
}
