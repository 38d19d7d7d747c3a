//! Fleet mode: several modelpool nodes behind a router, each node the engine's own decision core
//! driven by the replay's [`Runner`] exactly as `replay` drives one pool.
//!
//! What is modelled, and what each part may see (nothing here reads a clock; the only
//! randomness, the `random` router, is a seeded ChaCha8 stream, so a run is reproducible bit for
//! bit):
//! - **Nodes**: N pools with their own limit and model slots, the same policy, timings, KV
//!   accounting and admission queue as `replay` (the [`SimConfig`] template). Admin operations of
//!   the trace are applied to every node.
//! - **Router** ([`RouterKind`]): sees only what the real one sees. LiteLLM's `simple-shuffle`
//!   (uniform random over the group's deployments) and `least-busy` (fewest requests it has in
//!   flight) see their own in-flight counts and cooldowns; `hash` is rendezvous hashing on the
//!   model id (a fixed order of nodes per model; the first one not cooling down); `residency` is
//!   the strategy of `tools/litellm/modelpool_routing.py`: it polls each node's
//!   `/admin/residency` (here: the engine's [`PoolState::admission_view`]) at most once per
//!   `view_ttl`, ranks nodes by [`class_of`] and [`choose`], and updates its cached view
//!   optimistically (a model it just sent becomes `join` there; a node that refused a model
//!   becomes `reject` for it) until the next poll; `placement` routes by the same rule among
//!   the nodes a [`Placement`] computed from the trace assigns to the model (the LiteLLM
//!   `model_list` of `--emit-litellm-config`).
//! - **Clients** ([`ClientModel`]): LiteLLM's retry layer (1.108, see `../shared/FLEET.md` and
//!   docs/server.md): `retries` re-selections after a failure, at once while another deployment
//!   of the group is healthy, else after the reply's `Retry-After` when 0 < it <= 60 s, else an
//!   exponential backoff (0.5 s doubling, at most 8 s); a failed deployment (model, node) cools
//!   down for its `Retry-After` (else `cooldown`) when the reply was a 429 and the group has
//!   other deployments, or when more than `allowed_fails` of its calls this minute failed, or
//!   more than half of at least 5; a single-deployment group never cools down; when every
//!   deployment of a group is cooling down the attempt fails at once without calling any node.
//!   With `honour_should_retry` a refusal marked `x-should-retry: false` is not retried (the
//!   official OpenAI clients' behaviour).
//!
//! Reported per node and for the fleet: hits, loads, refusals seen by nodes and failures
//! reaching clients after retries, the "avoidable" ones among them (some node could have admitted
//! the request at that moment), duplicate residency (bytes of a model held on more than one node,
//! time-weighted), added latency (first attempt to service start), against the pooled bound:
//! one node with the fleet's total memory and model slots.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use modelpool::{Decision, Gdsf, Lfu, Lru, Nanos, Phase, PolicyKind, Predictive, RejectCode, Slot};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};
use serde::Serialize;

use crate::config::{PolicyChoice, SimConfig};
use crate::oracle::SimPolicy;
use crate::replay::{NodeEvent, Runner};
use crate::report::Report;
use crate::trace::{NS, OpKind, Trace};

/// How the router picks a node for a request. Names (CLI, reports, JSON) are kebab case.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, strum::IntoStaticStr, strum::VariantArray, strum::EnumCount,
)]
#[strum(serialize_all = "kebab-case")]
pub enum RouterKind {
    /// LiteLLM's default `simple-shuffle`: uniform random over the group's deployments.
    Random,
    /// LiteLLM's `least-busy`: the fewest requests the router has in flight there.
    LeastBusy,
    /// Rendezvous hashing on the model id: each model's fixed order of nodes.
    Hash,
    /// Residency-aware: polled admission views, [`choose`].
    Residency,
    /// [`Placement`] from the trace; [`choose`] among the model's assigned nodes.
    Placement,
}

modelpool::name_table!(RouterKind, ParseRouterError, "router");

/// One node of the fleet.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeSpec {
    /// Its name in reports and the LiteLLM config.
    pub id: String,
    /// Memory limit, bytes.
    pub limit: u64,
    /// Maximum models loaded or loading at once.
    pub max_models: usize,
}

/// The client retry layer in front of the router (LiteLLM's, by default).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClientModel {
    /// Re-selections after a failed attempt (LiteLLM `num_retries`).
    pub retries: u32,
    /// Failures of a deployment in a minute before it cools down (LiteLLM `allowed_fails`).
    pub allowed_fails: u32,
    /// Cooldown of a failed deployment without `Retry-After`, seconds (`cooldown_time`).
    pub cooldown_secs: f64,
    /// Do not retry a refusal marked `x-should-retry: false`.
    pub honour_should_retry: bool,
    /// Nodes answer refusals that waiting cures with 429, not 503 (`--busy-status 429`).
    pub busy_429: bool,
}

impl Default for ClientModel {
    /// LiteLLM proxy defaults as measured: 2 retries, 3 allowed fails, 5 s cooldown, every
    /// refusal retried, busy refusals as 503.
    fn default() -> Self {
        ClientModel {
            retries: 2,
            allowed_fails: 3,
            cooldown_secs: 5.0,
            honour_should_retry: false,
            busy_429: false,
        }
    }
}

/// A fleet run's settings besides the trace.
#[derive(Debug, Clone, PartialEq)]
pub struct FleetConfig {
    /// The nodes.
    pub nodes: Vec<NodeSpec>,
    /// The router.
    pub router: RouterKind,
    /// Every node's settings (policy, timings, queue, KV); `limit` and `max_models` come from
    /// [`NodeSpec`], node-level retries are off (the client layer retries).
    pub node: SimConfig,
    /// The client retry layer.
    pub client: ClientModel,
    /// Seconds a residency router keeps a node's polled view.
    pub view_ttl_secs: f64,
    /// Seed of the `random` router.
    pub seed: u64,
}

impl FleetConfig {
    /// Check the settings; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        if self.nodes.is_empty() {
            return Err("a fleet needs at least one node".into());
        }
        if self.nodes.len() > 64 {
            return Err("a fleet has at most 64 nodes".into());
        }
        for n in &self.nodes {
            SimConfig { limit: n.limit, max_models: n.max_models, ..self.node.clone() }
                .validate()
                .map_err(|e| format!("node {}: {e}", n.id))?;
        }
        if self.node.policy.is_offline() {
            return Err(format!(
                "policy {} sees the future of one pool's requests; a fleet's nodes use lru, gdsf or lfu",
                self.node.policy
            ));
        }
        if !(self.view_ttl_secs.is_finite() && self.view_ttl_secs >= 0.0) {
            return Err(format!("view ttl must be a finite number >= 0 (got {})", self.view_ttl_secs));
        }
        if !(self.client.cooldown_secs.is_finite() && self.client.cooldown_secs >= 0.0) {
            return Err(format!("cooldown must be a finite number >= 0 (got {})", self.client.cooldown_secs));
        }
        Ok(())
    }
}

/// Which nodes hold which models, computed from a trace ([`place`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Placement {
    /// Per trace model (in trace order): the indices of its nodes, primary first.
    pub nodes_of: Vec<Vec<usize>>,
}

/// Place a trace's models on nodes, before serving: models in order of request count (then
/// id); each goes to the node where it fits (bytes and model slots assigned so far) with the
/// fewest requests assigned, else (fits nowhere) to the node whose assigned bytes over limit
/// stay lowest, where its own policy shares the memory among its models. Then spare room gets
/// copies: in the same order, a model gets a second (third...) node where it fits whole in what
/// is left unassigned, so hot models are served by several nodes without pushing any node over
/// its memory. A model larger than every node goes to the largest (where it is refused as too
/// large, as it would be anywhere).
pub fn place(trace: &Trace, nodes: &[NodeSpec]) -> Placement {
    let n = trace.models.len();
    let mut requests = vec![0u64; n];
    for op in &trace.ops {
        if op.kind == OpKind::Request {
            requests[op.model as usize] += 1;
        }
    }
    let size = |m: usize| trace.models[m].size.unwrap_or(0);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        requests[b].cmp(&requests[a]).then_with(|| trace.models[a].id.cmp(&trace.models[b].id))
    });
    let mut bytes = vec![0u64; nodes.len()];
    let mut slots = vec![0usize; nodes.len()];
    let mut load = vec![0u64; nodes.len()];
    let mut nodes_of = vec![Vec::new(); n];
    let largest = (0..nodes.len()).max_by_key(|&k| (nodes[k].limit, Reverse(k))).unwrap_or(0);
    for &m in &order {
        let s = size(m);
        let fits = |k: usize| bytes[k] + s <= nodes[k].limit && slots[k] < nodes[k].max_models;
        let k = if s > nodes.iter().map(|x| x.limit).max().unwrap_or(0) {
            largest
        } else if let Some(k) = (0..nodes.len()).filter(|&k| fits(k)).min_by_key(|&k| (load[k], bytes[k], k))
        {
            k
        } else {
            (0..nodes.len())
                .min_by(|&a, &b| {
                    let r = |k: usize| (bytes[k] + s) as f64 / nodes[k].limit as f64;
                    r(a).total_cmp(&r(b)).then(a.cmp(&b))
                })
                .unwrap_or(0)
        };
        bytes[k] += s;
        slots[k] += 1;
        load[k] += requests[m];
        nodes_of[m].push(k);
    }
    for &m in &order {
        let s = size(m);
        if requests[m] == 0 || s == 0 {
            continue;
        }
        for k in 0..nodes.len() {
            if !nodes_of[m].contains(&k) && bytes[k] + s <= nodes[k].limit && slots[k] < nodes[k].max_models {
                bytes[k] += s;
                slots[k] += 1;
                nodes_of[m].push(k);
            }
        }
    }
    Placement { nodes_of }
}

/// Improve a placement by local search with the simulator itself: for each model, in order of
/// request count, try it alone on each other node (dropping its copies) and keep the move when
/// the fleet, replayed under `cfg` with the `placement` router, misses fewer requests (a failure
/// at a client counts as two misses). `passes` rounds over the models; each try is one fleet
/// replay, so this costs `passes x models x (nodes - 1)` replays. Deterministic.
pub fn search_placement(
    trace: &Trace,
    cfg: &FleetConfig,
    start: Placement,
    passes: u32,
) -> Result<Placement, String> {
    let cfg = FleetConfig { router: RouterKind::Placement, ..cfg.clone() };
    let score = |p: &Placement| -> Result<u64, String> {
        let r = run_fleet(trace, &cfg, Some(p))?;
        Ok((r.requests - r.hits) + 2 * r.client_failed)
    };
    let mut requests = vec![0u64; trace.models.len()];
    for op in &trace.ops {
        if op.kind == OpKind::Request {
            requests[op.model as usize] += 1;
        }
    }
    let mut order: Vec<usize> = (0..trace.models.len()).filter(|&m| requests[m] > 0).collect();
    order.sort_by(|&a, &b| requests[b].cmp(&requests[a]).then(a.cmp(&b)));
    let mut best = start;
    let mut best_score = score(&best)?;
    for _ in 0..passes {
        let mut improved = false;
        for &m in &order {
            for k in 0..cfg.nodes.len() {
                if best.nodes_of[m] == [k] {
                    continue;
                }
                let mut p = best.clone();
                p.nodes_of[m] = vec![k];
                let sc = score(&p)?;
                if sc < best_score {
                    (best, best_score, improved) = (p, sc, true);
                }
            }
        }
        if !improved {
            break;
        }
    }
    Ok(best)
}

/// `trace` with every operation delayed by a seeded uniform amount in `[0, max_ns)`, re-sorted
/// by time (stable): the small, random delays a real client and router add (LiteLLM's proxy adds
/// milliseconds per request). Fleets behind a residency router are sensitive to them (a request
/// that arrives just before or just after a poll can change where a model lives for the rest of
/// the run), so a prediction for a real run is an ensemble over seeds, not one replay.
pub fn jitter_arrivals(trace: &Trace, max_ns: u64, seed: u64) -> Trace {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut ops = trace.ops.clone();
    if max_ns > 0 {
        for op in &mut ops {
            op.at = op.at.saturating_add(rng.next_u64() % max_ns);
        }
        ops.sort_by_key(|o| o.at);
    }
    Trace { models: trace.models.clone(), ops }
}

/// A node's view of one model as a residency router ranks it (lower is better): `hit` 0, `join`
/// 1, `load` without eviction 2, `load` with eviction or `await_unload` 3, `queue` 4, `reject` 5;
/// a node not polled, unreachable, or not knowing the model is 6. The same table as
/// `tools/litellm/modelpool_routing.py` (tested on `tests/fleet/choices.json` by both).
pub fn class_of(decision: Decision, evict_bytes: u64) -> u8 {
    match decision {
        Decision::Hit => 0,
        Decision::Join => 1,
        Decision::Load if evict_bytes == 0 => 2,
        Decision::Load | Decision::AwaitUnload => 3,
        Decision::Queue => 4,
        Decision::Reject => 5,
    }
}

/// The class of a node without a view of the model.
pub const NO_VIEW: u8 = 6;

/// One candidate node as a residency router sees it for one model.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    /// [`class_of`] its view (or [`NO_VIEW`]).
    pub class: u8,
    /// Its place in the model's home order ([`home_order`] over the positions of the model's
    /// deployments in config order; 0: the model's home).
    pub home_rank: u32,
    /// Bytes a load there would evict.
    pub evict_bytes: u64,
    /// Expected wait, seconds (`None`: waiting cannot help; ranks as infinite).
    pub expected_wait_secs: Option<f64>,
    /// Requests the router has in flight there.
    pub in_flight: u32,
}

/// The residency rule: the index of the best candidate by (class; for a load, classes 2 and 3,
/// the node's rank in the model's home order; bytes evicted; expected wait; the router's
/// in-flight requests; position), `None` for no candidates. Deterministic: ties go to the
/// earlier candidate. A model held somewhere goes there (the least busy copy); a model held
/// nowhere goes to the first node of its home order that can load it (free memory first), so
/// reloads of a model keep landing on the same node instead of spreading copies (measured in
/// docs/fleet.md: against ranking loads by bytes evicted alone, 19.0% instead of 25.6% missed
/// on traces/multi-tenant.csv at 3 x 32 GB).
pub fn choose(candidates: &[Candidate]) -> Option<usize> {
    let key = |c: &Candidate| {
        let rank = if (2..=3).contains(&c.class) { c.home_rank } else { 0 };
        (c.class, rank, c.evict_bytes, c.expected_wait_secs.unwrap_or(f64::INFINITY), c.in_flight)
    };
    (0..candidates.len()).min_by(|&a, &b| {
        let (ka, kb) = (key(&candidates[a]), key(&candidates[b]));
        (ka.0, ka.1, ka.2)
            .cmp(&(kb.0, kb.1, kb.2))
            .then(ka.3.total_cmp(&kb.3))
            .then(ka.4.cmp(&kb.4))
            .then(a.cmp(&b))
    })
}

/// A model's rendezvous order of `nodes` nodes (highest-random-weight hashing of its id): the
/// `hash` router's order and the residency rule's home order. FNV-1a 64 of the id, mixed with
/// each node index by SplitMix64's finalizer; ties (never seen) by index. Stable across runs
/// and platforms; `tools/litellm/modelpool_routing.py` computes the same.
pub fn home_order(model_id: &str, nodes: usize) -> Vec<usize> {
    let key = fnv1a(model_id);
    let mut order: Vec<usize> = (0..nodes).collect();
    order.sort_by_key(|&k| (Reverse(mix64(key ^ mix64(k as u64))), k));
    order
}

/// Per node, in the fleet report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeRow {
    /// Node id.
    pub node: String,
    /// Its memory limit, bytes.
    pub limit_bytes: u64,
    /// Attempts that reached it.
    pub requests: u64,
    /// Of which found the model resident.
    pub hits: u64,
    /// Admissions that found the model resident, including requests admitted from the queue:
    /// the engine's own counter, the server's `/admin/pool` `stats.hits`.
    pub engine_hits: u64,
    /// Loads it made.
    pub loads: u64,
    /// Evictions.
    pub evictions: u64,
    /// Attempts it refused.
    pub refused: u64,
    /// Mean bytes resident (time-weighted, KV included).
    pub mean_used_bytes: u64,
}

/// What reached clients and what the fleet did: one router on one fleet.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FleetReport {
    /// The router.
    pub router: RouterKind,
    /// Nodes.
    pub nodes: usize,
    /// Fleet memory, bytes.
    pub total_bytes: u64,
    /// Client requests in the trace.
    pub requests: u64,
    /// Served in the end (after retries).
    pub served: u64,
    /// Served by a node that had the model resident at the attempt that served them.
    pub hits: u64,
    /// The nodes' engine hit counters summed (`/admin/pool` `stats.hits` of each node: also
    /// requests that found their model resident after waiting in the queue).
    pub engine_hits: u64,
    /// 1 - hits / requests.
    pub miss_ratio: f64,
    /// Loads over all nodes.
    pub loads: u64,
    /// Attempts refused by nodes (every code).
    pub node_refusals: u64,
    /// Requests that failed at the client after its retries, by final code (`no_deployment`:
    /// every deployment of its group was cooling down).
    pub client_failures: std::collections::BTreeMap<&'static str, u64>,
    /// Total of `client_failures`.
    pub client_failed: u64,
    /// Of those, failed while some node could have admitted the request at the moment of the
    /// failure (its dry run says hit, join or load, and the request's KV cache fits there).
    pub avoidable_failures: u64,
    /// Attempts in total (first tries and retries).
    pub attempts: u64,
    /// Mean bytes of models held (resident or loading) on more than one node, beyond the first
    /// copy, time-weighted.
    pub duplicate_bytes_mean: f64,
    /// Mean number of distinct models held somewhere, time-weighted.
    pub distinct_models_mean: f64,
    /// Added latency of served requests (first attempt to service start), seconds: median.
    pub latency_p50: f64,
    /// 99th percentile.
    pub latency_p99: f64,
    /// Per node.
    pub per_node: Vec<NodeRow>,
}

/// The pooled bound of a fleet: one node with its memory and model slots.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PooledBound {
    /// Memory, bytes.
    pub limit_bytes: u64,
    /// Model slots.
    pub max_models: usize,
    /// Object miss ratio.
    pub miss_ratio: f64,
    /// Loads.
    pub loads: u64,
    /// Requests refused in the end.
    pub failed: u64,
    /// Added latency median, seconds.
    pub latency_p50: f64,
    /// 99th percentile.
    pub latency_p99: f64,
}

/// Replay `trace` on one node with the fleet's total memory and slots, the same node settings
/// and the client's retries: the bound no routing of the same fleet is expected to beat.
pub fn pooled_bound(trace: &Trace, cfg: &FleetConfig) -> Result<PooledBound, String> {
    let limit = cfg.nodes.iter().map(|n| n.limit).sum();
    let max_models = cfg.nodes.iter().map(|n| n.max_models).sum();
    let sim = SimConfig { limit, max_models, retries: cfg.client.retries, ..cfg.node.clone() };
    let r: Report = crate::run(trace, &sim)?.report;
    Ok(PooledBound {
        limit_bytes: limit,
        max_models,
        miss_ratio: r.miss_ratio.object,
        loads: r.loads,
        failed: r.dropped + r.failed,
        latency_p50: r.added_latency.p50,
        latency_p99: r.added_latency.p99,
    })
}

/// Run `trace` on the fleet. `placement` is required by the `placement` router (else computed
/// by [`place`]). Deterministic.
pub fn run_fleet(
    trace: &Trace,
    cfg: &FleetConfig,
    placement: Option<&Placement>,
) -> Result<FleetReport, String> {
    cfg.validate()?;
    if u32::try_from(trace.ops.len()).is_err() {
        return Err(format!("a trace holds at most {} operations", u32::MAX));
    }
    let computed;
    let placement = match placement {
        Some(p) => p,
        None => {
            computed = place(trace, &cfg.nodes);
            &computed
        }
    };
    if placement.nodes_of.len() != trace.models.len()
        || placement.nodes_of.iter().any(|v| v.is_empty() || v.iter().any(|&k| k >= cfg.nodes.len()))
    {
        return Err("the placement must give every trace model at least one of the fleet's nodes".into());
    }
    let node_cfgs: Vec<SimConfig> = cfg
        .nodes
        .iter()
        .map(|n| SimConfig { limit: n.limit, max_models: n.max_models, retries: 0, ..cfg.node.clone() })
        .collect();
    Ok(match cfg.node.policy {
        PolicyChoice::Online(PolicyKind::Lru) => {
            Fleet::new(trace, cfg, &node_cfgs, placement, Lru::new).run()
        }
        PolicyChoice::Online(PolicyKind::Gdsf) => {
            Fleet::new(trace, cfg, &node_cfgs, placement, Gdsf::new).run()
        }
        PolicyChoice::Online(PolicyKind::Lfu) => {
            Fleet::new(trace, cfg, &node_cfgs, placement, Lfu::new).run()
        }
        PolicyChoice::Online(PolicyKind::Predictive) => {
            Fleet::new(trace, cfg, &node_cfgs, placement, Predictive::new).run()
        }
        PolicyChoice::Belady | PolicyChoice::BeladyCost => unreachable!("validated: online policies only"),
    })
}

/// A deployment's failure accounting (one model on one node), LiteLLM-style.
#[derive(Debug, Clone, Copy, Default)]
struct Deployment {
    /// Minute of `calls` and `fails`.
    minute: u64,
    calls: u32,
    fails: u32,
    cooldown_until: Nanos,
}

/// The router's cached view of one node.
#[derive(Debug, Clone, Default)]
struct View {
    polled_at: Option<Nanos>,
    /// Per model: (class, evict bytes, expected wait).
    entries: Vec<(u8, u64, Option<f64>)>,
}

#[derive(Debug, Clone, Copy, Default)]
struct ReqState {
    first: Nanos,
    /// Attempts made so far.
    attempts: u32,
    /// Node of the attempt in flight.
    node: u16,
    done: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Retry {
    at: Nanos,
    seq: u64,
    op: u32,
}

struct Fleet<'t, P: SimPolicy> {
    trace: &'t Trace,
    cfg: &'t FleetConfig,
    nodes: Vec<Runner<'t, P>>,
    reqs: Vec<ReqState>,
    retries: BinaryHeap<Reverse<Retry>>,
    seq: u64,
    in_flight: Vec<u32>,
    deployments: Vec<Deployment>,
    views: Vec<View>,
    /// Per model: its group, the nodes the router may pick, in config order (the placement's
    /// for the `placement` router, else every node).
    groups: Vec<Vec<usize>>,
    /// Per model and node: the node's rank in the model's home order over its group
    /// ([`home_order`]; `u32::MAX` outside the group). For `hash`, the rendezvous order.
    home_rank: Vec<Vec<u32>>,
    rng: ChaCha8Rng,
    events: Vec<NodeEvent>,
    cand: Vec<usize>,
    /// Reused buffer of the residency rule's candidates.
    ranked: Vec<Candidate>,
    hist: Histogram<u64>,
    zero_latency: u64,
    served: u64,
    attempts: u64,
    failures: [u64; RejectCode::ALL.len() + 2],
    avoidable: u64,
    dup_area: u128,
    distinct_area: u128,
    sample_t: Nanos,
    dup_now: u64,
    distinct_now: u64,
}

/// Index of `no_deployment` and `failed` in [`Fleet::failures`].
const NO_DEPLOYMENT: usize = RejectCode::ALL.len();
const LOAD_FAILED: usize = RejectCode::ALL.len() + 1;

fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a of a model id: the stable key of rendezvous hashing.
fn fnv1a(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

impl<'t, P: SimPolicy> Fleet<'t, P> {
    fn new(
        trace: &'t Trace,
        cfg: &'t FleetConfig,
        node_cfgs: &'t [SimConfig],
        placement: &'t Placement,
        policy: impl Fn() -> P,
    ) -> Self {
        let n_nodes = cfg.nodes.len();
        let n_models = trace.models.len();
        let nodes = node_cfgs.iter().map(|c| Runner::node(trace, c, policy())).collect();
        let groups: Vec<Vec<usize>> = (0..n_models)
            .map(|m| {
                if cfg.router == RouterKind::Placement {
                    placement.nodes_of[m].clone()
                } else {
                    (0..n_nodes).collect()
                }
            })
            .collect();
        let home_rank = trace
            .models
            .iter()
            .zip(&groups)
            .map(|(def, group)| {
                let mut rank = vec![u32::MAX; n_nodes];
                for (r, pos) in home_order(&def.id, group.len()).into_iter().enumerate() {
                    rank[group[pos]] = r as u32;
                }
                rank
            })
            .collect();
        Fleet {
            trace,
            cfg,
            nodes,
            reqs: vec![ReqState::default(); trace.ops.len()],
            retries: BinaryHeap::new(),
            seq: 0,
            in_flight: vec![0; n_nodes],
            deployments: vec![Deployment::default(); n_models * n_nodes],
            views: vec![View::default(); n_nodes],
            groups,
            home_rank,
            rng: ChaCha8Rng::seed_from_u64(cfg.seed),
            events: Vec::new(),
            cand: Vec::with_capacity(n_nodes),
            ranked: Vec::with_capacity(n_nodes),
            hist: Histogram::new_with_bounds(1, 30 * 86_400 * 1_000_000, 3).expect("valid histogram bounds"),
            zero_latency: 0,
            served: 0,
            attempts: 0,
            failures: [0; RejectCode::ALL.len() + 2],
            avoidable: 0,
            dup_area: 0,
            distinct_area: 0,
            sample_t: 0,
            dup_now: 0,
            distinct_now: 0,
        }
    }

    fn run(mut self) -> FleetReport {
        let ops = &self.trace.ops;
        let mut i = 0usize;
        loop {
            let node_next =
                (0..self.nodes.len()).filter_map(|k| self.nodes[k].next_at().map(|t| (t, k))).min();
            let retry_next = self.retries.peek().map(|Reverse(r)| r.at);
            let op_next = ops.get(i).map(|o| o.at);
            // At equal times: node events first (as in one pool), then retries, then arrivals.
            let t_retry = retry_next.unwrap_or(u64::MAX);
            let t_op = op_next.unwrap_or(u64::MAX);
            if node_next.is_none() && retry_next.is_none() && op_next.is_none() {
                break;
            }
            if let Some((t, k)) = node_next
                && t <= t_retry
                && t <= t_op
            {
                self.sample(t);
                self.nodes[k].step();
                self.drain(k);
            } else if t_retry <= t_op {
                let Some(Reverse(r)) = self.retries.pop() else { break };
                self.sample(r.at);
                self.attempt(r.op as usize, r.at);
            } else {
                let op = ops[i];
                self.sample(op.at);
                if op.kind == OpKind::Request {
                    self.reqs[i].first = op.at;
                    self.attempt(i, op.at);
                } else {
                    for k in 0..self.nodes.len() {
                        self.nodes[k].admin_op(i, op.at);
                        self.drain(k);
                    }
                }
                i += 1;
            }
        }
        self.finish()
    }

    /// Account duplicate residency up to `now` and take its new value.
    fn sample(&mut self, now: Nanos) {
        if now <= self.sample_t {
            return;
        }
        let dt = u128::from(now - self.sample_t);
        self.dup_area += u128::from(self.dup_now) * dt;
        self.distinct_area += u128::from(self.distinct_now) * dt;
        self.sample_t = now;
        let (mut dup, mut distinct) = (0u64, 0u64);
        for m in 0..self.trace.models.len() as Slot {
            let held = self
                .nodes
                .iter()
                .filter(|n| matches!(n.core().phase(m), Phase::Resident | Phase::Loading))
                .count() as u64;
            if held > 0 {
                distinct += 1;
                dup += (held - 1) * self.nodes[0].true_size(m);
            }
        }
        self.dup_now = dup;
        self.distinct_now = distinct;
    }

    /// The deployments of `model` the router may pick (placement: its nodes; else all).
    fn group(&self, model: usize) -> &[usize] {
        &self.groups[model]
    }

    fn deployment(&mut self, model: usize, node: usize) -> &mut Deployment {
        &mut self.deployments[model * self.cfg.nodes.len() + node]
    }

    /// Make one attempt of request `op` at `now`: pick a node, or fail at once.
    fn attempt(&mut self, op: usize, now: Nanos) {
        self.attempts += 1;
        self.reqs[op].attempts += 1;
        let model = self.trace.ops[op].model as usize;
        let n_nodes = self.cfg.nodes.len();
        let mut cand = std::mem::take(&mut self.cand);
        cand.clear();
        cand.extend_from_slice(self.group(model));
        let single = cand.len() == 1;
        cand.retain(|&k| single || self.deployments[model * n_nodes + k].cooldown_until <= now);
        let pick = match self.cfg.router {
            _ if cand.is_empty() => None,
            RouterKind::Random => Some(cand[(self.rng.next_u64() % cand.len() as u64) as usize]),
            RouterKind::LeastBusy => cand.iter().copied().min_by_key(|&k| (self.in_flight[k], k)),
            RouterKind::Hash => cand.iter().copied().min_by_key(|&k| self.home_rank[model][k]),
            RouterKind::Residency | RouterKind::Placement => {
                let mut ranked = std::mem::take(&mut self.ranked);
                ranked.clear();
                for &k in &cand {
                    self.poll(k, now);
                    let (class, evict_bytes, expected_wait_secs) =
                        self.views[k].entries.get(model).copied().unwrap_or((NO_VIEW, 0, None));
                    let (home_rank, in_flight) = (self.home_rank[model][k], self.in_flight[k]);
                    ranked.push(Candidate { class, home_rank, evict_bytes, expected_wait_secs, in_flight });
                }
                let best = choose(&ranked).map(|i| (cand[i], ranked[i]));
                self.ranked = ranked;
                if let Some((k, c)) = best
                    && (2..=4).contains(&c.class)
                {
                    self.views[k].entries[model] = (1, 0, c.expected_wait_secs);
                }
                best.map(|(k, _)| k)
            }
        };
        self.cand = cand;
        let Some(k) = pick else {
            self.failed_attempt(op, now, NO_DEPLOYMENT, None, false);
            return;
        };
        self.reqs[op].node = k as u16;
        self.in_flight[k] += 1;
        let first = self.reqs[op].first;
        self.nodes[k].arrive(op, now, first);
        self.drain(k);
    }

    /// Refresh the router's view of node `k` if it is older than the TTL.
    fn poll(&mut self, k: usize, now: Nanos) {
        let ttl = (self.cfg.view_ttl_secs * NS as f64).round() as u64;
        if self.views[k].polled_at.is_some_and(|t| now.saturating_sub(t) < ttl.max(1)) {
            return;
        }
        let core = self.nodes[k].core();
        let v = &mut self.views[k];
        v.polled_at = Some(now);
        v.entries.clear();
        v.entries.extend((0..self.trace.models.len() as Slot).map(|m| {
            let a = core.admission_view(m, now);
            (class_of(a.decision, a.evict_bytes), a.evict_bytes, a.expected_wait_secs)
        }));
    }

    /// Handle node `k`'s request events.
    fn drain(&mut self, k: usize) {
        let mut events = std::mem::take(&mut self.events);
        self.nodes[k].drain_events(&mut events);
        for e in events.drain(..) {
            match e {
                NodeEvent::Started { op, at } => {
                    let ns = at - self.reqs[op as usize].first;
                    if ns == 0 {
                        self.zero_latency += 1;
                    } else {
                        self.hist.saturating_record(ns.div_ceil(1000));
                    }
                    self.served += 1;
                    self.reqs[op as usize].done = true;
                }
                NodeEvent::Finished { op, at } => {
                    let _ = at;
                    let node = self.reqs[op as usize].node as usize;
                    self.in_flight[node] -= 1;
                    let model = self.trace.ops[op as usize].model as usize;
                    self.count_call(model, node, at, false, None, false);
                }
                NodeEvent::Refused { op, at, code, retry_after, never } => {
                    let node = self.reqs[op as usize].node as usize;
                    self.in_flight[node] -= 1;
                    let model = self.trace.ops[op as usize].model as usize;
                    let busy = retry_after.is_some() && !never;
                    self.count_call(model, node, at, true, retry_after, busy && self.cfg.client.busy_429);
                    // The router learns from the refusal until its next poll of that node.
                    if let Some(e) = self.views[node].entries.get_mut(model) {
                        *e = (5, 0, retry_after.map(f64::from));
                    }
                    self.failed_attempt(op as usize, at, code as usize, retry_after, never);
                }
                NodeEvent::Failed { op, at } => {
                    let node = self.reqs[op as usize].node as usize;
                    self.in_flight[node] -= 1;
                    let model = self.trace.ops[op as usize].model as usize;
                    self.count_call(model, node, at, true, None, false);
                    self.failed_attempt(op as usize, at, LOAD_FAILED, None, false);
                }
            }
        }
        self.events = events;
    }

    /// Count a call of deployment (model, node) and cool it down as LiteLLM would.
    fn count_call(
        &mut self,
        model: usize,
        node: usize,
        now: Nanos,
        failed: bool,
        retry_after: Option<u32>,
        is_429: bool,
    ) {
        let allowed = self.cfg.client.allowed_fails;
        let cooldown = retry_after
            .filter(|&s| s > 0)
            .map_or((self.cfg.client.cooldown_secs * NS as f64).round() as u64, |s| u64::from(s) * NS);
        let alternatives = self.group(model).len() > 1;
        let d = self.deployment(model, node);
        let minute = now / (60 * NS);
        if d.minute != minute {
            *d = Deployment { minute, calls: 0, fails: 0, cooldown_until: d.cooldown_until };
        }
        d.calls += 1;
        if !failed {
            return;
        }
        d.fails += 1;
        let cool = alternatives && (is_429 || d.fails > allowed || (d.calls >= 5 && d.fails * 2 > d.calls));
        if cool {
            d.cooldown_until = d.cooldown_until.max(now.saturating_add(cooldown));
        }
    }

    /// An attempt of `op` failed at `now` (`code`: index in `failures`): retry it or give up.
    fn failed_attempt(&mut self, op: usize, now: Nanos, code: usize, retry_after: Option<u32>, never: bool) {
        let r = self.reqs[op];
        let c = &self.cfg.client;
        if r.attempts <= c.retries && !(never && c.honour_should_retry) {
            // LiteLLM retries at once while another deployment of the group is healthy (not
            // cooling down); only when none is does it sleep the reply's Retry-After, else back off.
            let model = self.trace.ops[op].model as usize;
            let failed = (code != NO_DEPLOYMENT).then_some(r.node as usize);
            let n_nodes = self.cfg.nodes.len();
            let healthy =
                |k: usize| Some(k) != failed && self.deployments[model * n_nodes + k].cooldown_until <= now;
            let other_healthy = self.group(model).iter().any(|&k| healthy(k));
            let sleep = match retry_after {
                _ if other_healthy => 0,
                Some(s) if (1..=60).contains(&s) => u64::from(s) * NS,
                _ => (NS / 2).saturating_mul(1 << (r.attempts - 1).min(4)).min(8 * NS),
            };
            self.seq += 1;
            self.retries.push(Reverse(Retry { at: now.saturating_add(sleep), seq: self.seq, op: op as u32 }));
            return;
        }
        self.failures[code] += 1;
        if self.nodes.iter().any(|n| n.could_admit(op, now)) {
            self.avoidable += 1;
        }
    }

    fn finish(mut self) -> FleetReport {
        let end = self.sample_t.max(self.trace.duration());
        self.sample(end + 1);
        if self.zero_latency > 0 {
            let _ = self.hist.record_n(0, self.zero_latency);
        }
        let q =
            |h: &Histogram<u64>, p: f64| if h.is_empty() { 0.0 } else { h.value_at_quantile(p) as f64 / 1e6 };
        let (p50, p99) = (q(&self.hist, 0.5), q(&self.hist, 0.99));
        let mut client_failures = std::collections::BTreeMap::new();
        for (i, &n) in self.failures.iter().enumerate() {
            if n > 0 {
                let name = match i {
                    NO_DEPLOYMENT => "no_deployment",
                    LOAD_FAILED => "load_failed",
                    _ => RejectCode::ALL[i].as_str(),
                };
                client_failures.insert(name, n);
            }
        }
        let span = end.max(1) as f64;
        let requests = self.trace.requests();
        let (dup, distinct) = (self.dup_area as f64 / span, self.distinct_area as f64 / span);
        let cfg = self.cfg;
        let router = cfg.router;
        let (served, attempts, avoidable) = (self.served, self.attempts, self.avoidable);
        let client_failed = self.failures.iter().sum();
        let per_node: Vec<NodeRow> = self
            .nodes
            .into_iter()
            .zip(&cfg.nodes)
            .map(|(n, spec)| {
                let engine_hits = n.core().stats().hits;
                let r = n.finish_node().report;
                NodeRow {
                    node: spec.id.clone(),
                    limit_bytes: spec.limit,
                    requests: r.requests,
                    hits: r.hits,
                    engine_hits,
                    loads: r.loads,
                    evictions: r.evictions_total,
                    refused: r.rejections.values().sum(),
                    mean_used_bytes: r.memory.mean_bytes,
                }
            })
            .collect();
        let hits = per_node.iter().map(|n| n.hits).sum();
        let engine_hits = per_node.iter().map(|n| n.engine_hits).sum();
        FleetReport {
            router,
            nodes: cfg.nodes.len(),
            total_bytes: cfg.nodes.iter().map(|n| n.limit).sum(),
            requests,
            served,
            hits,
            engine_hits,
            miss_ratio: if requests == 0 { 0.0 } else { 1.0 - hits as f64 / requests as f64 },
            loads: per_node.iter().map(|n| n.loads).sum(),
            node_refusals: per_node.iter().map(|n| n.refused).sum(),
            client_failures,
            client_failed,
            avoidable_failures: avoidable,
            attempts,
            duplicate_bytes_mean: dup,
            distinct_models_mean: distinct,
            latency_p50: p50,
            latency_p99: p99,
            per_node,
        }
    }
}

/// The LiteLLM proxy configuration (`model_list` and `router_settings`) for a placement: one
/// deployment per (model, node) the placement assigns, the node's OpenAI base URL from
/// `urls` (by node index), and the settings docs/fleet.md recommends for modelpool nodes.
pub fn litellm_config(trace: &Trace, placement: &Placement, urls: &[String], client: &ClientModel) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# LiteLLM proxy config for modelpool nodes, written by `modelpool-sim fleet --emit-litellm-config`."
    );
    let _ =
        writeln!(s, "# One deployment per (model, node) of the simulator's placement; see docs/fleet.md.");
    let _ = writeln!(s, "model_list:");
    for (m, nodes) in trace.models.iter().zip(&placement.nodes_of) {
        for &k in nodes {
            let _ = writeln!(s, "  - model_name: \"{}\"", m.id);
            let _ = writeln!(s, "    litellm_params:");
            let _ = writeln!(s, "      model: \"openai/{}\"", m.id);
            let _ = writeln!(s, "      api_base: \"{}/v1\"", urls[k].trim_end_matches('/'));
            let _ = writeln!(s, "      api_key: os.environ/MODELPOOL_API_KEY");
            let _ = writeln!(s, "    model_info:");
            let _ = writeln!(s, "      id: \"{}@node{}\"", m.id, k);
        }
    }
    let _ = writeln!(s, "litellm_settings:");
    let _ =
        writeln!(s, "  # The residency-aware strategy (tools/litellm/modelpool_routing.py on PYTHONPATH).");
    let _ = writeln!(s, "  callbacks: [\"modelpool_routing.proxy_handler\"]");
    let _ = writeln!(s, "  request_timeout: 600");
    let _ = writeln!(s, "router_settings:");
    let _ = writeln!(s, "  routing_strategy: simple-shuffle");
    let _ = writeln!(s, "  num_retries: {}", client.retries);
    let _ = writeln!(s, "  allowed_fails: {}", client.allowed_fails);
    let _ = writeln!(s, "  cooldown_time: {}", client.cooldown_secs);
    let _ = writeln!(s, "  retry_after: 0");
    let _ = writeln!(s, "general_settings:");
    let _ = writeln!(s, "  master_key: os.environ/LITELLM_MASTER_KEY");
    let _ = writeln!(
        s,
        "  # Health checks send a real request to every deployment: on modelpool that loads every"
    );
    let _ = writeln!(s, "  # model on every node. Keep them off.");
    let _ = writeln!(s, "  background_health_checks: false");
    let _ = writeln!(s, "environment_variables:");
    let _ = writeln!(s, "  HF_HUB_OFFLINE: \"1\"");
    s
}

impl FleetReport {
    /// One row of the comparison table: router, miss ratio, loads, refusals, client failures,
    /// avoidable ones, duplicate GB, distinct models, latency.
    pub fn row(&self) -> String {
        format!(
            "{:<12} {:>7.2}% {:>7} {:>9} {:>8} {:>9} {:>9.1} {:>8.1} {:>8.2} {:>8.2}",
            self.router.as_str(),
            self.miss_ratio * 100.0,
            self.loads,
            self.node_refusals,
            self.client_failed,
            self.avoidable_failures,
            self.duplicate_bytes_mean / 1e9,
            self.distinct_models_mean,
            self.latency_p50,
            self.latency_p99
        )
    }

    /// The table's header, aligned with [`FleetReport::row`] and [`PooledBound::row`].
    pub fn header() -> String {
        format!(
            "{:<12} {:>8} {:>7} {:>9} {:>8} {:>9} {:>9} {:>8} {:>8} {:>8}",
            "router",
            "miss",
            "loads",
            "refusals",
            "failed",
            "avoidable",
            "dup GB",
            "models",
            "p50 s",
            "p99 s"
        )
    }
}

impl PooledBound {
    /// Its row in the comparison table ([`FleetReport::header`]): what one node measures, `-`
    /// for the fleet-only columns.
    pub fn row(&self) -> String {
        format!(
            "{:<12} {:>7.2}% {:>7} {:>9} {:>8} {:>9} {:>9} {:>8} {:>8.2} {:>8.2}",
            "pooled",
            self.miss_ratio * 100.0,
            self.loads,
            "-",
            self.failed,
            "-",
            "-",
            "-",
            self.latency_p50,
            self.latency_p99
        )
    }
}
