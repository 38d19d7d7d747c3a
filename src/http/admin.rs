//! The admin API, the health check and the metrics endpoint: routes, handlers and the admin
//! API's typed replies.
//!
//! - `GET /admin/pool` ([`PoolReply`]), `GET /admin/residency` ([`ResidencyReply`]), `GET /admin/events?limit=N` (also `/admin/pool/events`,
//!   [`EventsReply`]), `GET /admin/models/{id}` ([`ModelStatus`]),
//!   `GET /admin/models/{id}/dry-run` ([`DryRun`]);
//! - `POST /admin/models/{id}/preload|pin` ([`PinReply`]), `…/unpin` ([`UnpinReply`]),
//!   `…/unload[?force=true]` ([`UnloadReply`]);
//! - `PUT|POST /admin/limits` with a [`LimitsRequest`] ([`LimitsReply`]);
//! - `GET /health` ([`HealthReply`], or 503 once shutdown began);
//! - `GET /metrics` (Prometheus text, see [`super::metrics`]).
//!
//! Model ids may contain `/` and are percent-decoded.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::{HeaderValue, Method, StatusCode, header};
use warp::reply::Response;

use super::app::{AppState, body, with_state};
use super::error::ApiError;
use super::reply::ok_json;
use super::timer::{ReqTimer, respond};
use super::validate::{bool_query, parse_body};
use crate::error::PoolError;
use crate::limit::MemoryLimit;
use crate::pool::{ConfigSummary, DryRun, PoolStatus, UnloadReport};
use crate::state::{Ledger, ModelStatus, Stats};
use crate::timing::TimingModel;
use crate::types::ModelId;
use crate::{Event, EvictReason, RejectCode};

/// `PUT/POST /admin/limits` body: either or both fields.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsRequest {
    /// The new memory limit as [`MemoryLimit`] parses it: `75%`, `0.75`, `16GB`, `16GiB`,
    /// `512MB`. A share resolves against the server's total memory.
    #[serde(default)]
    pub memory_limit: Option<String>,
    /// The new most models loaded at once, at least 1.
    #[serde(default)]
    pub max_models: Option<usize>,
}

/// `GET /admin/pool`: the pool's [`PoolStatus`], with the positional eviction and rejection
/// counters of [`Stats`] also keyed by name (`evictions_by_reason`, `rejections_by_code`).
#[derive(Debug, Clone, Serialize)]
#[allow(missing_docs)] // each field is the [`PoolStatus`] field of the same name
pub struct PoolReply {
    pub backend: &'static str,
    pub policy: &'static str,
    pub ledger: Ledger,
    pub over_limit: bool,
    pub stats: StatsReply,
    pub shutting_down: bool,
    pub models: Vec<ModelStatus>,
    pub config: ConfigSummary,
    pub timing: Option<TimingModel>,
}

/// [`Stats`] with its counter arrays also as maps from name to count (every name present).
#[derive(Debug, Clone, Serialize)]
pub struct StatsReply {
    /// The engine's counters, flattened into this object.
    #[serde(flatten)]
    pub counters: Stats,
    /// `evictions` by [`EvictReason`] name.
    pub evictions_by_reason: BTreeMap<&'static str, u64>,
    /// `rejections` by [`RejectCode`] name.
    pub rejections_by_code: BTreeMap<&'static str, u64>,
}

impl From<PoolStatus> for PoolReply {
    fn from(status: PoolStatus) -> Self {
        // Destructured whole, so a field added to PoolStatus fails to compile here rather than
        // going missing from the reply.
        let PoolStatus { backend, policy, ledger, over_limit, stats, shutting_down, models, config, timing } =
            status;
        let evictions_by_reason =
            EvictReason::ALL.iter().map(|r| (r.as_str(), stats.evictions_for(*r))).collect();
        let rejections_by_code =
            RejectCode::ALL.iter().map(|c| (c.as_str(), stats.rejections_for(*c))).collect();
        PoolReply {
            backend,
            policy,
            ledger,
            over_limit,
            stats: StatsReply { counters: stats, evictions_by_reason, rejections_by_code },
            shutting_down,
            models,
            config,
            timing,
        }
    }
}

/// `GET /admin/residency`: what this node holds and what a request for each model would cost
/// now ([`crate::pool::Residency`]), named by the node's id: the view a router's residency-aware
/// strategy polls.
#[derive(Debug, Clone, Serialize)]
pub struct ResidencyReply<'a> {
    /// `--node-id`.
    pub node: &'a str,
    /// Memory limit, bytes.
    pub limit: u64,
    /// Bytes committed now.
    pub used: u64,
    /// Per model: phase, leases, waiting requests, dry-run decision, bytes a load would evict,
    /// expected wait.
    pub models: Vec<crate::pool::ResidencyEntry>,
}

/// `GET /admin/events`: the most recent decision-log events, oldest first.
#[derive(Debug, Clone, Serialize)]
pub struct EventsReply {
    /// At most `limit` (default 100) events.
    pub events: Vec<Event>,
    /// Events recorded since the pool started, kept or not: the last event above is number
    /// `total` (a client that read `total = t` before takes the last `total - t` as new).
    pub total: u64,
}

/// `POST /admin/models/{id}/preload` and `…/pin`: the model is now pinned.
#[derive(Debug, Clone, Serialize)]
pub struct PinReply {
    /// The id as requested.
    pub model: String,
    /// Always true.
    pub pinned: bool,
    /// The model's state after the call.
    pub status: ModelStatus,
}

/// `POST /admin/models/{id}/unpin`.
#[derive(Debug, Clone, Serialize)]
pub struct UnpinReply {
    /// The id as requested.
    pub model: String,
    /// Whether the model was pinned before the call.
    pub was_pinned: bool,
    /// The model's state after the call (possibly drained, if over the limit).
    pub status: ModelStatus,
}

/// `POST /admin/models/{id}/unload`.
#[derive(Debug, Clone, Serialize)]
pub struct UnloadReply {
    /// What the unload did.
    pub report: UnloadReport,
    /// The model's state after the call.
    pub status: ModelStatus,
}

/// `PUT|POST /admin/limits`.
#[derive(Debug, Clone, Serialize)]
pub struct LimitsReply {
    /// The ledger under the new limits (it may still be over them while evicted models drain).
    pub ledger: Ledger,
    /// Models evicted to meet the new limits, in eviction order.
    pub evicted: Vec<ModelId>,
}

/// `GET /health` while serving.
#[derive(Debug, Clone, Serialize)]
pub struct HealthReply {
    /// Always `ok`.
    pub status: &'static str,
    /// Models resident or loading.
    pub models_loaded: usize,
    /// Bytes resident, reserved by loads and draining.
    pub used_bytes: u64,
    /// The memory limit, bytes.
    pub limit_bytes: u64,
}

/// What an admin route asks for.
#[derive(Debug, Clone)]
enum AdminOp {
    Status,
    Residency,
    Events(BTreeMap<String, String>),
    Model(String),
    Preload(String),
    Pin(String),
    Unpin(String),
    Unload(String, BTreeMap<String, String>),
    DryRun(String),
    Limits(Result<Bytes, ApiError>),
}

/// A known path with a method it does not take: turned into a 405 by the server's `recover`.
#[derive(Debug)]
pub(super) struct MethodNotAllowed;
impl warp::reject::Reject for MethodNotAllowed {}

/// Split `models/<id...>/<action>` tails: the id may contain `/`, and is percent-decoded.
fn split_model_tail(tail: &str) -> (String, Option<&'static str>) {
    const ACTIONS: [&str; 5] = ["preload", "pin", "unpin", "unload", "dry-run"];
    let decode = |s: &str| percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned();
    if let Some((id, last)) = tail.rsplit_once('/')
        && let Some(a) = ACTIONS.iter().find(|a| **a == last)
    {
        return (decode(id), Some(a));
    }
    (decode(tail), None)
}

/// Every `/admin` route.
pub(super) fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let s = with_state(state.clone());
    let limit = state.max_body;
    let status = warp::path!("admin" / "pool").and(warp::get()).map(|| AdminOp::Status);
    let residency = warp::path!("admin" / "residency").and(warp::get()).map(|| AdminOp::Residency);
    let events = warp::path!("admin" / "events")
        .or(warp::path!("admin" / "pool" / "events"))
        .unify()
        .and(warp::get())
        .and(warp::query::<BTreeMap<String, String>>())
        .map(AdminOp::Events);
    let limits = warp::path!("admin" / "limits")
        .and(warp::put().or(warp::post()).unify())
        .and(body(limit, state.limits.body_read_timeout))
        .map(AdminOp::Limits);
    let models = warp::path("admin")
        .and(warp::path("models"))
        .and(warp::path::tail())
        .and(warp::method())
        .and(warp::query::<BTreeMap<String, String>>())
        .and_then(|tail: warp::path::Tail, method: Method, q: BTreeMap<String, String>| async move {
            let (id, action) = split_model_tail(tail.as_str());
            if id.is_empty() {
                return Err(warp::reject::not_found());
            }
            Ok(match (action, method) {
                (None, Method::GET) => AdminOp::Model(id),
                (Some("dry-run"), Method::GET) => AdminOp::DryRun(id),
                (Some("preload"), Method::POST) => AdminOp::Preload(id),
                (Some("pin"), Method::POST) => AdminOp::Pin(id),
                (Some("unpin"), Method::POST) => AdminOp::Unpin(id),
                (Some("unload"), Method::POST) => AdminOp::Unload(id, q),
                _ => return Err(warp::reject::custom(MethodNotAllowed)),
            })
        });
    status
        .or(residency)
        .unify()
        .or(events)
        .unify()
        .or(limits)
        .unify()
        .or(models)
        .unify()
        .and(s)
        .then(|op, state| admin(state, op))
        .boxed()
}

async fn admin(state: AppState, op: AdminOp) -> Response {
    let mut timer = ReqTimer::start(&state, "admin");
    let res = admin_inner(&state, op, &mut timer).await;
    respond(timer, res)
}

fn model_status(state: &AppState, id: &str) -> Result<ModelStatus, ApiError> {
    state
        .pool
        .status()
        .models
        .into_iter()
        .find(|m| *m.id == *id)
        .ok_or_else(|| PoolError::ModelNotFound(id.to_string()).into())
}

/// `limit` for `/admin/events`: 1 to 100 000, 100 when not given.
fn events_limit(q: &BTreeMap<String, String>) -> Result<usize, ApiError> {
    let Some(v) = q.get("limit") else { return Ok(100) };
    v.parse::<usize>().ok().filter(|n| (1..=100_000).contains(n)).ok_or_else(|| {
        ApiError::bad_request("limit", format!("limit must be an integer between 1 and 100000, got '{v}'"))
    })
}

async fn admin_inner(state: &AppState, op: AdminOp, timer: &mut ReqTimer) -> Result<Response, ApiError> {
    let pool = &state.pool;
    match op {
        AdminOp::Status => ok_json(&PoolReply::from(pool.status())),
        AdminOp::Residency => {
            let r = pool.residency();
            ok_json(&ResidencyReply { node: &state.node_id, limit: r.limit, used: r.used, models: r.models })
        }
        AdminOp::Events(q) => {
            let (events, total) = pool.events_since_start(events_limit(&q)?);
            ok_json(&EventsReply { events, total })
        }
        AdminOp::Model(id) => {
            timer.set_model(&id);
            ok_json(&model_status(state, &id)?)
        }
        AdminOp::Preload(id) => {
            timer.set_model(&id);
            pool.preload(&id).await?;
            tracing::info!(model = %id, "preloaded and pinned");
            let status = model_status(state, &id)?;
            ok_json(&PinReply { model: id, pinned: true, status })
        }
        AdminOp::Pin(id) => {
            timer.set_model(&id);
            pool.pin(&id)?;
            let status = model_status(state, &id)?;
            ok_json(&PinReply { model: id, pinned: true, status })
        }
        AdminOp::Unpin(id) => {
            timer.set_model(&id);
            let was_pinned = pool.unpin(&id).await?;
            let status = model_status(state, &id)?;
            ok_json(&UnpinReply { model: id, was_pinned, status })
        }
        AdminOp::Unload(id, q) => {
            timer.set_model(&id);
            let force = bool_query(&q, "force")?;
            let report = pool.unload(&id, force).await?;
            tracing::info!(model = %id, force, unloaded_now = report.unloaded_now, "unload");
            ok_json(&UnloadReply { report, status: model_status(state, &id)? })
        }
        AdminOp::DryRun(id) => {
            timer.set_model(&id);
            ok_json::<DryRun>(&pool.dry_run(&id)?)
        }
        AdminOp::Limits(body) => {
            let req: LimitsRequest = parse_body(&body?)?;
            if req.memory_limit.is_none() && req.max_models.is_none() {
                return Err(ApiError::bad_request("body", "give memory_limit and/or max_models"));
            }
            let limit = match &req.memory_limit {
                Some(s) => {
                    let l: MemoryLimit = s.parse().map_err(|e: crate::limit::LimitError| {
                        ApiError::bad_request("memory_limit", e.to_string())
                    })?;
                    Some(l.resolve(state.system_memory.as_ref()))
                }
                None => None,
            };
            if req.max_models == Some(0) {
                return Err(ApiError::bad_request("max_models", "max_models must be at least 1"));
            }
            let evicted = pool.set_limits(limit, req.max_models).await?;
            tracing::info!(limit = ?limit, max_models = ?req.max_models, evicted = evicted.len(), "limits changed");
            ok_json(&LimitsReply { ledger: pool.ledger(), evicted })
        }
    }
}

/// `GET /health`: 200 with a [`HealthReply`] while serving, 503 `shutting_down` (with
/// `Retry-After: 5`) once shutdown began, so load balancers stop sending traffic.
pub(super) async fn health(state: AppState) -> Response {
    let timer = ReqTimer::start(&state, "health");
    let l = state.pool.ledger();
    let res = if state.pool.is_shutting_down() {
        let mut e = ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "server_error",
            "shutting_down",
            "server is shutting down",
        );
        e.retry_after = Some(5);
        Err(e)
    } else {
        ok_json(&HealthReply {
            status: "ok",
            models_loaded: l.models,
            used_bytes: l.used(),
            limit_bytes: l.limit,
        })
    };
    respond(timer, res)
}

/// `GET /metrics`: [`Metrics::render`](super::metrics::Metrics::render) of the pool's status now, in the Prometheus text format.
pub(super) async fn metrics(state: AppState) -> Response {
    let timer = ReqTimer::start(&state, "metrics");
    let text = state.metrics.render(&state.pool.status());
    let mut r = Response::new(text.into());
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"));
    respond(timer, Ok(r))
}
