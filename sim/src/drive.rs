//! The trace driver: replays a trace against a running modelpool server over its HTTP API, as
//! clients do, and compares what the server did with what the simulator predicts for the same
//! trace and the server's own configuration.
//!
//! Each trace operation is sent at its trace time divided by the speed. Requests to text-gen and
//! vision models are chat completions (`max_tokens` = the trace's output tokens, temperature 0);
//! requests to embeddings models are embeddings calls; admin operations go through the admin API
//! (`preload`, `pin`, `unpin`, `unload` on `/admin/models/{id}/…`, `set_limit` as
//! `PUT /admin/limits`). At most `max_in_flight` requests are open at once; an arrival that finds
//! them all busy is sent late, and its lateness is recorded.
//!
//! The prompt is built so that the server counts exactly the trace's tokens: the server sizes a
//! chat request's KV cache as `ceil(content bytes / 3) + 4 + max_tokens` tokens and the fake
//! backend's prefill counts `role:` plus the content's words; a content of `input - 1` words
//! (`input - 10` of them `ab `, the rest `a `) meets both for `input >= 10`. Shorter prompts are
//! approximate (a few tokens).
//!
//! Per request the driver records the status, the error code, `Retry-After`, how the pool
//! admitted it (`x-modelpool-admission`: hit, join, load, queued; `waiting` when a stream got
//! its headers before its model), the pool's wait (`x-modelpool-wait-ms`), time to first byte
//! and total time. Before and after the run it reads `/admin/pool` (counters, configuration)
//! and `/admin/events` (the decision log; the server must keep enough events: `--event-log`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use modelpool::{Event, ModelType, RejectCode};
use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::config::{Calibration, ModelTiming, SimConfig};
use crate::replay::{Recording, RequestOutcome, run_recorded};
use crate::report::Report;
use crate::trace::{NS, OpKind, Service, Trace};

/// How to reach the server and how to send.
#[derive(Debug, Clone)]
pub struct DriveOptions {
    /// Base URL, e.g. `http://127.0.0.1:8080`.
    pub url: String,
    /// Trace seconds per real second (2: twice as fast).
    pub speed: f64,
    /// Requests open at once.
    pub max_in_flight: usize,
    /// Sent as `Authorization: Bearer` on `/v1/*`.
    pub api_key: Option<String>,
    /// Sent on `/admin/*`.
    pub admin_key: Option<String>,
    /// Stream chat completions (time to first byte is then the first SSE chunk).
    pub stream: bool,
    /// A request taking longer than this is abandoned (recorded as `timeout`).
    pub request_timeout: Duration,
    /// The URL is a router (e.g. a LiteLLM proxy), not a node: read no admin API (no pool
    /// counters or decision log in the result), and refuse traces with admin operations.
    pub no_admin: bool,
    /// Before the run, unload every model the server holds (through the admin API) and wait
    /// until none is left, so that the server starts as the simulation does: empty. A pinned
    /// model is an error (unpin it first: the simulation would not hold it).
    pub unload_first: bool,
}

/// What one trace operation got from the server.
#[derive(Debug, Clone, Serialize)]
pub struct RequestRecord {
    /// Index of the trace operation.
    pub op: u32,
    /// Model id.
    pub model: String,
    /// `request`, or the admin operation's name.
    pub kind: &'static str,
    /// Seconds after the trace's time (divided by the speed) that it was sent.
    pub late_secs: f64,
    /// HTTP status (0: no response).
    pub status: u16,
    /// `hit`, `join`, `load`, `queued`, `waiting`, the error code, `failed` (a load failure),
    /// `admin`, `timeout`, or `http_<status>` for anything else.
    pub outcome: String,
    /// The error's `code`, if any.
    pub code: Option<String>,
    /// `Retry-After`, seconds.
    pub retry_after: Option<u64>,
    /// `x-modelpool-wait-ms`.
    pub wait_ms: Option<u64>,
    /// Tokens generated, from the reply's `usage` (a non-streaming chat completion).
    pub completion_tokens: Option<u32>,
    /// The node that answered (`x-modelpool-node`, or LiteLLM's `llm_provider-` copy of it).
    pub node: Option<String>,
    /// Seconds to the first byte of the body (a stream's first chunk).
    pub ttfb_secs: f64,
    /// Seconds to the end of the response.
    pub total_secs: f64,
}

/// Everything a drive observed.
#[derive(Debug, Clone)]
pub struct Observed {
    /// One per trace operation, in trace order.
    pub records: Vec<RequestRecord>,
    /// `/admin/pool` before the run.
    pub before: Value,
    /// `/admin/pool` after the run.
    pub after: Value,
    /// Decision-log events recorded during the run, oldest first.
    pub events: Vec<Event>,
    /// Events the server recorded during the run but no longer kept (its `--event-log` ring was
    /// too small): 0 for a complete log.
    pub events_lost: u64,
    /// Wall seconds the run took.
    pub wall_secs: f64,
}

struct Client {
    http: reqwest::Client,
    base: String,
    api_key: Option<String>,
    admin_key: Option<String>,
}

impl Client {
    fn new(o: &DriveOptions) -> Result<Client> {
        let http = reqwest::Client::builder()
            .timeout(o.request_timeout)
            .pool_max_idle_per_host(o.max_in_flight)
            // Under the server's idle keep-alive (its header-read timeout, 10 s by default), so a pooled
            // connection is never reused just as the server closes it.
            .pool_idle_timeout(Duration::from_secs(4))
            .build()
            .context("building the HTTP client")?;
        Ok(Client {
            http,
            base: o.url.trim_end_matches('/').to_string(),
            api_key: o.api_key.clone(),
            admin_key: o.admin_key.clone(),
        })
    }

    fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let key = if path.starts_with("/admin") { &self.admin_key } else { &self.api_key };
        let r = self.http.request(method, format!("{}{path}", self.base));
        match key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    async fn get_json(&self, path: &str) -> Result<Value> {
        let r = self.req(reqwest::Method::GET, path).send().await.with_context(|| format!("GET {path}"))?;
        let status = r.status();
        let body = r.text().await.with_context(|| format!("GET {path}: reading the body"))?;
        if !status.is_success() {
            bail!("GET {path}: {status}: {body}");
        }
        serde_json::from_str(&body).with_context(|| format!("GET {path}: not JSON"))
    }
}

/// The chat message content for `input` prompt tokens (see the module docs).
pub fn prompt_for(input: u32) -> String {
    let input = input as usize;
    if input < 10 {
        return "ab ".repeat(input.saturating_sub(4).max(1));
    }
    let words = input - 1;
    let long = input - 10;
    let mut s = String::with_capacity(3 * (input - 4));
    s.push_str(&"ab ".repeat(long));
    s.push_str(&"a ".repeat(words - long));
    s
}

fn id_path(id: &str) -> String {
    utf8_percent_encode(id, NON_ALPHANUMERIC).to_string()
}

const NOT_RUNNING: &str = "reading the server's state (is it running?)";

/// The server's `/admin/pool` (its configuration, counters and models), as [`drive`] reads it.
pub async fn server_state(o: &DriveOptions) -> Result<Value> {
    Client::new(o)?.get_json("/admin/pool").await.context(NOT_RUNNING)
}

/// Unload every model the server at `o.url` holds and wait (at most a minute) until all are
/// absent. A pinned model is an error.
pub async fn unload_all(o: &DriveOptions) -> Result<()> {
    unload_all_with(&Client::new(o)?).await
}

async fn unload_all_with(client: &Client) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let pool = client.get_json("/admin/pool").await.context(NOT_RUNNING)?;
        let held: Vec<&Value> = pool["models"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["phase"].as_str().is_some_and(|p| p != "absent"))
            .collect();
        if held.is_empty() {
            return Ok(());
        }
        if let Some(m) = held.iter().find(|m| m["pinned"].as_bool() == Some(true)) {
            bail!(
                "--unload-first: model '{}' is pinned on the server (unpin it first)",
                m["id"].as_str().unwrap_or("?")
            );
        }
        if Instant::now() >= deadline {
            bail!("--unload-first: models still held after 60 s: {}", held.len());
        }
        for m in held.iter().filter(|m| m["phase"].as_str() == Some("resident")) {
            let id = m["id"].as_str().unwrap_or_default();
            // A model still busy is refused (409): the next round asks again.
            let path = format!("/admin/models/{}/unload", id_path(id));
            client.req(reqwest::Method::POST, &path).send().await.with_context(|| format!("POST {path}"))?;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Run `trace` against the server. The server should have nothing loaded and hold the trace's
/// models with their sizes (see `modelpool-sim server-config`) for a comparison to be exact.
pub async fn drive(trace: &Trace, o: &DriveOptions) -> Result<Observed> {
    if !(o.speed.is_finite() && o.speed > 0.0) {
        bail!("--speed must be > 0");
    }
    let client = Arc::new(Client::new(o)?);
    if o.no_admin && trace.ops.iter().any(|op| op.kind != OpKind::Request) {
        bail!("the trace has admin operations, which a router does not forward: drive them against a node");
    }
    if o.unload_first {
        unload_all_with(&client).await?;
    }
    let (before, total0) = if o.no_admin {
        (Value::Null, 0)
    } else {
        let before = client.get_json("/admin/pool").await.context(NOT_RUNNING)?;
        (before, client.get_json("/admin/events?limit=1").await?["total"].as_u64().unwrap_or(0))
    };
    let decode = before["timing"]["decode_secs_per_token"].as_f64().unwrap_or(0.02);
    let sem = Arc::new(Semaphore::new(o.max_in_flight.max(1)));
    let start = Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::with_capacity(trace.ops.len());
    for (i, op) in trace.ops.iter().enumerate() {
        let at = start + Duration::from_secs_f64(op.at as f64 / NS as f64 / o.speed);
        tokio::time::sleep_until(at).await;
        let permit = sem.clone().acquire_owned().await.expect("the semaphore is never closed");
        let late = Instant::now().saturating_duration_since(at).as_secs_f64();
        let client = client.clone();
        let op = *op;
        let def = &trace.models[op.model.min(trace.models.len().saturating_sub(1) as u32) as usize];
        let (model, mtype) = (def.id.to_string(), def.model_type);
        let stream = o.stream;
        tasks.push(tokio::spawn(async move {
            let mut r = send(&client, i as u32, op.kind, &model, mtype, op, decode, stream).await;
            r.late_secs = late;
            drop(permit);
            r
        }));
    }
    let mut records = Vec::with_capacity(tasks.len());
    for t in tasks {
        records.push(t.await.map_err(|e| anyhow!("a request task failed: {e}"))?);
    }
    // Let background unloads of the last evictions finish before reading the counters.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let wall_secs = (Instant::now() - start).as_secs_f64();
    if o.no_admin {
        return Ok(Observed {
            records,
            before,
            after: Value::Null,
            events: Vec::new(),
            events_lost: 0,
            wall_secs,
        });
    }
    let after = client.get_json("/admin/pool").await?;
    let ev = client.get_json("/admin/events?limit=100000").await?;
    let total1 = ev["total"].as_u64().unwrap_or(0);
    let all: Vec<Event> = serde_json::from_value(ev["events"].clone()).context("/admin/events: events")?;
    let new = total1.saturating_sub(total0);
    let kept = (new as usize).min(all.len());
    let events = all[all.len() - kept..].to_vec();
    Ok(Observed { records, before, after, events, events_lost: new - kept as u64, wall_secs })
}

#[allow(clippy::too_many_arguments)]
async fn send(
    c: &Client,
    op_index: u32,
    kind: OpKind,
    model: &str,
    mtype: ModelType,
    op: crate::trace::Op,
    decode_secs: f64,
    stream: bool,
) -> RequestRecord {
    let t0 = Instant::now();
    let (method, path, body) = match kind {
        OpKind::Request => {
            let (input, output) = match op.service() {
                Service::Tokens { input, output } => (input, output),
                Service::Duration(d) => {
                    let out =
                        if decode_secs > 0.0 { (d as f64 / NS as f64 / decode_secs).round() } else { 1.0 };
                    (0, out as u32)
                }
            };
            if mtype == ModelType::Embeddings {
                let text = "ab ".repeat(input.max(1) as usize);
                ("POST", "/v1/embeddings".to_string(), json!({"model": model, "input": text}))
            } else {
                let body = json!({
                    "model": model,
                    "messages": [{"role": "user", "content": prompt_for(input)}],
                    "max_tokens": output.max(1),
                    "temperature": 0,
                    "stream": stream,
                });
                ("POST", "/v1/chat/completions".to_string(), body)
            }
        }
        OpKind::SetLimit => {
            let mut b = serde_json::Map::new();
            if op.arg != 0 {
                b.insert("memory_limit".into(), json!(format!("{}B", op.arg)));
            }
            if op.model != 0 {
                b.insert("max_models".into(), json!(op.model));
            }
            ("PUT", "/admin/limits".to_string(), Value::Object(b))
        }
        k => {
            let name: &'static str = k.into();
            ("POST", format!("/admin/models/{}/{name}", id_path(model)), json!({}))
        }
    };
    let kind_name: &'static str = kind.into();
    let mut rec = RequestRecord {
        op: op_index,
        model: model.to_string(),
        kind: kind_name,
        late_secs: 0.0,
        status: 0,
        outcome: String::new(),
        code: None,
        retry_after: None,
        wait_ms: None,
        completion_tokens: None,
        node: None,
        ttfb_secs: 0.0,
        total_secs: 0.0,
    };
    let method = if method == "PUT" { reqwest::Method::PUT } else { reqwest::Method::POST };
    let resp = match c.req(method, &path).json(&body).send().await {
        Ok(r) => r,
        Err(e) => {
            rec.outcome = if e.is_timeout() { "timeout".into() } else { format!("error: {e}") };
            rec.total_secs = t0.elapsed().as_secs_f64();
            return rec;
        }
    };
    rec.status = resp.status().as_u16();
    // Behind LiteLLM's proxy the node's headers arrive prefixed with `llm_provider-`.
    let header = |name: &str| {
        let h = resp.headers();
        h.get(name)
            .or_else(|| h.get(format!("llm_provider-{name}").as_str()))
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    rec.node = header("x-modelpool-node");
    let admission = header("x-modelpool-admission");
    rec.wait_ms = header("x-modelpool-wait-ms").and_then(|v| v.parse().ok());
    rec.retry_after = header("retry-after").and_then(|v| v.parse().ok());
    let mut resp = resp;
    let mut body = Vec::new();
    let mut first = true;
    loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => {
                if first {
                    rec.ttfb_secs = t0.elapsed().as_secs_f64();
                    first = false;
                }
                body.extend_from_slice(&chunk);
            }
            Ok(None) => break,
            Err(e) => {
                rec.outcome = if e.is_timeout() { "timeout".into() } else { format!("error: {e}") };
                rec.total_secs = t0.elapsed().as_secs_f64();
                return rec;
            }
        }
    }
    rec.total_secs = t0.elapsed().as_secs_f64();
    if first {
        rec.ttfb_secs = rec.total_secs;
    }
    if !(200..300).contains(&rec.status) {
        rec.code = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string));
    } else if !stream && kind == OpKind::Request {
        rec.completion_tokens = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v["usage"]["completion_tokens"].as_u64())
            .map(|n| n as u32);
    }
    rec.outcome = classify(kind, rec.status, admission.as_deref(), rec.code.as_deref());
    rec
}

fn classify(kind: OpKind, status: u16, admission: Option<&str>, code: Option<&str>) -> String {
    if kind != OpKind::Request {
        return "admin".into();
    }
    if (200..300).contains(&status) {
        return admission.unwrap_or("served").to_string();
    }
    match code {
        Some(c) if c.parse::<RejectCode>().is_ok() => c.to_string(),
        Some("model_load_failed") => "failed".into(),
        _ => format!("http_{status}"),
    }
}

/// The simulator configuration that predicts the server described by `pool` (its
/// `/admin/pool`): its limits, policy, keep-alive, queue and timing model; `base` gives the rest.
pub fn sim_config_for(pool: &Value, base: &SimConfig) -> Result<SimConfig> {
    let l = &pool["ledger"];
    let c = &pool["config"];
    let policy =
        c["policy"].as_str().ok_or_else(|| anyhow!("/admin/pool has no config.policy (an older server?)"))?;
    let mut cfg = SimConfig {
        limit: l["limit"].as_u64().ok_or_else(|| anyhow!("/admin/pool: ledger.limit"))?,
        max_models: l["max_models"].as_u64().ok_or_else(|| anyhow!("/admin/pool: ledger.max_models"))?
            as usize,
        policy: policy.parse().map_err(|e: String| anyhow!(e))?,
        idle_ttl_secs: c["idle_ttl_secs"].as_f64(),
        queue_timeout_secs: c["queue_timeout_secs"].as_f64().unwrap_or(base.queue_timeout_secs),
        max_queue: c["max_queue"].as_u64().map(|v| v as usize).unwrap_or(base.max_queue),
        kv_cache: true,
        retries: 0,
        ..base.clone()
    };
    if let Ok(t) = serde_json::from_value::<modelpool::TimingModel>(pool["timing"].clone()) {
        cfg = cfg.with_timing(&t);
    } else {
        // A real backend: the prior the pool itself uses for loads; service from `base`.
        cfg.load_latency_secs = c["load_latency_secs"].as_f64().unwrap_or(cfg.load_latency_secs);
        cfg.load_bandwidth = c["load_bandwidth"].as_f64().unwrap_or(f64::INFINITY);
    }
    Ok(cfg)
}

/// Problems that make a prediction of this server inexact: models loaded before the run,
/// trace models missing from its catalogue or sized differently.
pub fn preconditions(trace: &Trace, pool: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let models = pool["models"].as_array().cloned().unwrap_or_default();
    for m in &models {
        let phase = m["phase"].as_str().unwrap_or("");
        if phase != "absent" {
            out.push(format!("model '{}' is {phase} before the run (the simulation starts empty)", m["id"]));
        }
    }
    for d in &trace.models {
        match models.iter().find(|m| m["id"].as_str() == Some(&*d.id)) {
            None => out.push(format!("trace model '{}' is not in the server's catalogue", d.id)),
            Some(m) => {
                if let Some(size) = d.size {
                    let est = m["estimate"]["bytes"].as_u64().unwrap_or(0);
                    if est != size {
                        out.push(format!(
                            "model '{}': the server estimates {est} bytes, the trace says {size}",
                            d.id
                        ));
                    }
                }
            }
        }
    }
    out
}

/// One side of a comparison: counts by outcome and the decisions.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Side {
    /// Requests.
    pub requests: u64,
    /// Requests by outcome (`hit`, `join`, `load`, `queued`, error codes, `failed`, ...).
    pub outcomes: BTreeMap<String, u64>,
    /// Hits / requests.
    pub hit_ratio: f64,
    /// Loads (by requests and preloads).
    pub loads: u64,
    /// Evictions by reason.
    pub evictions: BTreeMap<String, u64>,
    /// Added latency (arrival to lease) p50 over served requests, seconds.
    pub latency_p50: f64,
    /// Added latency p99, seconds.
    pub latency_p99: f64,
    /// Per model: (hits, loads).
    pub models: BTreeMap<String, (u64, u64)>,
}

/// Predicted against observed.
#[derive(Debug, Clone, Serialize)]
pub struct Comparison {
    /// The simulator's prediction.
    pub predicted: Side,
    /// What the server did.
    pub observed: Side,
    /// Requests whose outcome is the same on both sides.
    pub agree: u64,
    /// Requests compared.
    pub compared: u64,
    /// The requests that differ: (operation, model, predicted, observed), at most 50.
    pub differ: Vec<(u32, String, String, String)>,
    /// Whether the decision logs (per model: loads, evictions with reason and beneficiary,
    /// refusals by code, queueing, unloads, pins; and the limit changes) are equal.
    pub decisions_equal: bool,
    /// Where they first differ, per model.
    pub decision_diffs: Vec<String>,
    /// Events the server did not keep (0: its log was complete).
    pub events_lost: u64,
}

fn quantile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn side_from_sim(trace: &Trace, report: &Report, rec: &Recording) -> Side {
    let mut s = Side::default();
    for (i, o) in rec.outcomes.iter().enumerate() {
        if *o == RequestOutcome::Admin {
            continue;
        }
        s.requests += 1;
        *s.outcomes.entry(o.as_str().to_string()).or_default() += 1;
        let m = trace.models[trace.ops[i].model as usize].id.to_string();
        if *o == RequestOutcome::Hit {
            s.models.entry(m).or_default().0 += 1;
        }
    }
    s.hit_ratio = ratio(s.outcomes.get("hit").copied().unwrap_or(0), s.requests);
    s.loads = report.loads;
    s.evictions =
        report.evictions.iter().filter(|(_, n)| **n > 0).map(|(k, n)| (k.to_string(), *n)).collect();
    s.latency_p50 = report.added_latency.p50;
    s.latency_p99 = report.added_latency.p99;
    for r in &report.models {
        s.models.entry(r.model.clone()).or_default().1 = r.loads;
    }
    s
}

fn ratio(a: u64, b: u64) -> f64 {
    if b == 0 { 0.0 } else { crate::report::r6(a as f64 / b as f64) }
}

fn delta(after: &Value, before: &Value) -> u64 {
    after.as_u64().unwrap_or(0).saturating_sub(before.as_u64().unwrap_or(0))
}

/// The observed side of a drive: the same shape as a comparison's `predicted`, so the two can be
/// diffed.
pub fn observed_side(trace: &Trace, obs: &Observed) -> Side {
    let mut s = Side::default();
    let mut lat = Vec::new();
    for r in obs.records.iter().filter(|r| r.kind == "request") {
        s.requests += 1;
        *s.outcomes.entry(r.outcome.clone()).or_default() += 1;
        if r.outcome == "hit" {
            s.models.entry(r.model.clone()).or_default().0 += 1;
        }
        if (200..300).contains(&r.status) {
            lat.push(r.wait_ms.unwrap_or(0) as f64 / 1e3);
        }
    }
    lat.sort_by(f64::total_cmp);
    s.latency_p50 = quantile(&lat, 0.5);
    s.latency_p99 = quantile(&lat, 0.99);
    s.hit_ratio = ratio(s.outcomes.get("hit").copied().unwrap_or(0), s.requests);
    let (a, b) = (&obs.after["stats"], &obs.before["stats"]);
    s.loads = delta(&a["loads"], &b["loads"]);
    if let Some(map) = a["evictions_by_reason"].as_object() {
        for (k, v) in map {
            let n = delta(v, &b["evictions_by_reason"][k]);
            if n > 0 {
                s.evictions.insert(k.clone(), n);
            }
        }
    }
    let find = |pool: &Value, id: &str| {
        pool["models"].as_array().and_then(|ms| ms.iter().find(|m| m["id"].as_str() == Some(id)).cloned())
    };
    for d in &trace.models {
        let loads = match (find(&obs.after, &d.id), find(&obs.before, &d.id)) {
            (Some(a), Some(b)) => delta(&a["loads"], &b["loads"]),
            (Some(a), None) => a["loads"].as_u64().unwrap_or(0),
            _ => 0,
        };
        s.models.entry(d.id.to_string()).or_default().1 = loads;
    }
    s
}

/// The decision log as comparable lines per model (`*` for limit changes): every event but
/// hits and joins, without times, sizes or scores.
pub fn decisions(events: &[Event]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for e in events {
        let line = match e {
            Event::Hit { .. } | Event::Join { .. } => continue,
            Event::Load { .. } => "load".to_string(),
            Event::Loaded { .. } => "loaded".to_string(),
            Event::LoadFailed { .. } => "load_failed".to_string(),
            Event::Evict { reason, for_model, .. } => match for_model {
                Some(m) => format!("evict {reason} for {m}"),
                None => format!("evict {reason}"),
            },
            Event::PreloadCancelled { for_model, .. } => format!("preload_cancelled for {for_model}"),
            Event::Reject { code, .. } => format!("reject {code}"),
            Event::Queued { .. } => "queued".to_string(),
            Event::Unload { .. } => "unload".to_string(),
            Event::Pin { .. } => "pin".to_string(),
            Event::Unpin { .. } => "unpin".to_string(),
            Event::LimitChanged { limit, max_models, .. } => {
                out.entry("*".into()).or_default().push(format!("limit {limit} max_models {max_models}"));
                continue;
            }
        };
        let m = e.model().map(|m| m.to_string()).unwrap_or_default();
        out.entry(m).or_default().push(line);
    }
    out
}

/// `trace` as the server saw it when driven at `speed`: every time divided by the speed (the
/// server's loads and services are not sped up, only the arrivals).
pub fn at_speed(trace: &Trace, speed: f64) -> Trace {
    let mut t = trace.clone();
    if speed != 1.0 {
        for o in &mut t.ops {
            o.at = (o.at as f64 / speed).round() as u64;
        }
    }
    t
}

/// Replay `trace` as driven at `speed` in the simulator with `cfg` and compare with what the
/// server did.
pub fn compare(trace: &Trace, speed: f64, cfg: &SimConfig, obs: &Observed) -> Result<Comparison> {
    let cfg = SimConfig { log: modelpool::LogMode::Decisions, ..cfg.clone() };
    let trace = &at_speed(trace, speed);
    let (outcome, rec) = run_recorded(trace, &cfg).map_err(|e| anyhow!(e))?;
    let predicted = side_from_sim(trace, &outcome.report, &rec);
    let observed = observed_side(trace, obs);
    let mut agree = 0;
    let mut compared = 0;
    let mut differ = Vec::new();
    for (i, o) in rec.outcomes.iter().enumerate() {
        if *o == RequestOutcome::Admin {
            continue;
        }
        compared += 1;
        let seen = &obs.records[i].outcome;
        if o.as_str() == seen {
            agree += 1;
        } else if differ.len() < 50 {
            differ.push((i as u32, obs.records[i].model.clone(), o.as_str().to_string(), seen.clone()));
        }
    }
    let p = decisions(&outcome.events);
    let s = decisions(&obs.events);
    let mut decision_diffs = Vec::new();
    for m in p.keys().chain(s.keys()).collect::<std::collections::BTreeSet<_>>() {
        let (a, b) = (p.get(m).map(Vec::as_slice).unwrap_or(&[]), s.get(m).map(Vec::as_slice).unwrap_or(&[]));
        if a != b {
            let i = a.iter().zip(b).take_while(|(x, y)| x == y).count();
            decision_diffs.push(format!(
                "{m}: decision {} differs: predicted {:?}, observed {:?} ({} vs {} decisions)",
                i + 1,
                a.get(i).map(String::as_str).unwrap_or("(none)"),
                b.get(i).map(String::as_str).unwrap_or("(none)"),
                a.len(),
                b.len()
            ));
        }
    }
    Ok(Comparison {
        predicted,
        observed,
        agree,
        compared,
        differ,
        decisions_equal: decision_diffs.is_empty() && obs.events_lost == 0,
        decision_diffs,
        events_lost: obs.events_lost,
    })
}

/// The observed side alone, as text (a drive without `--compare`).
pub fn render_observed(trace: &Trace, obs: &Observed) -> String {
    let s = observed_side(trace, obs);
    let mut out = String::new();
    let late = obs.records.iter().map(|r| r.late_secs).fold(0.0, f64::max);
    let _ = writeln!(
        out,
        "drive: {} operations in {:.1} s (latest send {:.1} ms after its time)",
        obs.records.len(),
        obs.wall_secs,
        late * 1e3
    );
    render_side_rows(&mut out, &[("observed", &s)]);
    out
}

fn render_side_rows(out: &mut String, sides: &[(&str, &Side)]) {
    let mut outcome_keys: Vec<&String> = sides.iter().flat_map(|(_, s)| s.outcomes.keys()).collect();
    outcome_keys.sort();
    outcome_keys.dedup();
    let mut evict_keys: Vec<&String> = sides.iter().flat_map(|(_, s)| s.evictions.keys()).collect();
    evict_keys.sort();
    evict_keys.dedup();
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    rows.push(("requests".into(), sides.iter().map(|(_, s)| s.requests.to_string()).collect()));
    for k in outcome_keys {
        rows.push((
            format!("  {k}"),
            sides.iter().map(|(_, s)| s.outcomes.get(k).copied().unwrap_or(0).to_string()).collect(),
        ));
    }
    rows.push(("hit ratio".into(), sides.iter().map(|(_, s)| format!("{:.4}", s.hit_ratio)).collect()));
    rows.push(("loads".into(), sides.iter().map(|(_, s)| s.loads.to_string()).collect()));
    for k in evict_keys {
        rows.push((
            format!("evictions {k}"),
            sides.iter().map(|(_, s)| s.evictions.get(k).copied().unwrap_or(0).to_string()).collect(),
        ));
    }
    rows.push((
        "added latency p50 s".into(),
        sides.iter().map(|(_, s)| format!("{:.3}", s.latency_p50)).collect(),
    ));
    rows.push((
        "added latency p99 s".into(),
        sides.iter().map(|(_, s)| format!("{:.3}", s.latency_p99)).collect(),
    ));
    let _ = write!(out, "{:<28}", "");
    for (name, _) in sides {
        let _ = write!(out, "{name:>12}");
    }
    if sides.len() == 2 {
        let _ = write!(out, "{:>12}", "diff");
    }
    out.push('\n');
    for (label, vals) in rows {
        let _ = write!(out, "{label:<28}");
        for v in &vals {
            let _ = write!(out, "{v:>12}");
        }
        if vals.len() == 2 {
            let d = match (vals[0].parse::<f64>(), vals[1].parse::<f64>()) {
                (Ok(a), Ok(b)) if a == b => "=".to_string(),
                (Ok(a), Ok(b)) if a != 0.0 => format!("{:+.1}%", (b - a) / a * 100.0),
                (Ok(_), Ok(b)) => format!("+{b}"),
                _ => String::new(),
            };
            let _ = write!(out, "{d:>12}");
        }
        out.push('\n');
    }
}

/// A comparison as text: the side-by-side table, per-model hits and loads, agreement, decisions.
pub fn render_comparison(c: &Comparison) -> String {
    let mut out = String::new();
    render_side_rows(&mut out, &[("predicted", &c.predicted), ("observed", &c.observed)]);
    let _ = writeln!(out, "\n{:<32}{:>12}{:>12}", "per model (hits / loads)", "predicted", "observed");
    for (m, p) in &c.predicted.models {
        let o = c.observed.models.get(m).copied().unwrap_or_default();
        let mark = if *p == o { "" } else { "  *" };
        let _ = writeln!(
            out,
            "  {m:<26}{:>12}{:>12}{mark}",
            format!("{} / {}", p.0, p.1),
            format!("{} / {}", o.0, o.1)
        );
    }
    let _ = writeln!(
        out,
        "\nper-request outcomes agree: {} of {} ({:.2}%)",
        c.agree,
        c.compared,
        if c.compared == 0 { 100.0 } else { c.agree as f64 * 100.0 / c.compared as f64 }
    );
    for (op, m, p, o) in c.differ.iter().take(10) {
        let _ = writeln!(out, "  op {op} ({m}): predicted {p}, observed {o}");
    }
    if c.differ.len() > 10 {
        let _ = writeln!(out, "  ... {} more listed in --json", c.differ.len() - 10);
    }
    if c.events_lost > 0 {
        let _ = writeln!(
            out,
            "decision logs: the server dropped {} events (raise its --event-log)",
            c.events_lost
        );
    } else if c.decisions_equal {
        let _ = writeln!(
            out,
            "decision logs: equal (every model's loads, evictions, refusals, unloads and pins)"
        );
    } else {
        let _ = writeln!(out, "decision logs: differ");
        for d in &c.decision_diffs {
            let _ = writeln!(out, "  {d}");
        }
    }
    out
}

/// A `modelpool serve --config` file (TOML) for the fake backend that holds `trace`'s models
/// with their sizes and types, under `cfg`'s limits, policy, queue and timing model: the server
/// a drive of this trace is compared against.
pub fn server_config(trace: &Trace, cfg: &SimConfig, event_log: usize) -> String {
    let t = cfg.timing();
    let dur = |secs: f64| format!("\"{}ns\"", (secs * 1e9).round() as u64);
    let mut s = String::new();
    let _ = writeln!(
        s,
        "# modelpool serve --config FILE: the fake server that `modelpool-sim drive --compare` predicts"
    );
    let _ = writeln!(s, "backend = \"fake\"");
    let _ = writeln!(s, "memory_limit = \"{}B\"", cfg.limit);
    let _ = writeln!(s, "max_models = {}", cfg.max_models);
    let _ = writeln!(s, "policy = \"{}\"", cfg.policy.as_str());
    let _ = writeln!(s, "queue_timeout = {}", dur(cfg.queue_timeout_secs));
    let _ = writeln!(s, "max_queue = {}", cfg.max_queue);
    if let Some(ttl) = cfg.idle_ttl_secs {
        let _ = writeln!(s, "idle_ttl = {}", dur(ttl));
    }
    let _ = writeln!(s, "event_log = {event_log}");
    let _ = writeln!(s, "\n[fake]");
    let _ = writeln!(s, "load_time = {}", dur(t.load_latency_secs));
    match t.load_bandwidth {
        Some(b) => {
            let _ = writeln!(s, "load_bandwidth = \"{}B\"", b.round() as u64);
        }
        None => {
            let _ = writeln!(s, "load_bandwidth = \"inf\"");
        }
    }
    let _ = writeln!(s, "prefill_time = {}", dur(t.prefill_secs_per_token));
    let _ = writeln!(s, "token_delay = {}", dur(t.decode_secs_per_token));
    let _ = writeln!(s, "unload_time = {}", dur(t.unload_secs));
    let max_out = trace
        .ops
        .iter()
        .filter_map(|o| match o.service() {
            Service::Tokens { output, .. } if o.kind == OpKind::Request => Some(output),
            _ => None,
        })
        .max()
        .unwrap_or(8);
    let _ = writeln!(s, "natural_tokens = {}", max_out.max(1));
    for m in &trace.models {
        let _ = writeln!(s, "\n[[models]]\nid = \"{}\"\ntype = \"{}\"", m.id, m.model_type);
        if let Some(b) = m.size {
            let _ = writeln!(s, "size = \"{b}B\"");
        }
    }
    s
}

/// Least squares `y = a + b x` over `pts` (`None` with fewer than two distinct `x`).
fn fit_line(pts: &[(f64, f64)]) -> Option<(f64, f64)> {
    let n = pts.len() as f64;
    let (sx, sy) = pts.iter().fold((0.0, 0.0), |(a, b), (x, y)| (a + x, b + y));
    let (mx, my) = (sx / n, sy / n);
    let sxx: f64 = pts.iter().map(|(x, _)| (x - mx) * (x - mx)).sum();
    if pts.len() < 2 || sxx <= 0.0 {
        return None;
    }
    let sxy: f64 = pts.iter().map(|(x, y)| (x - mx) * (y - my)).sum();
    let b = sxy / sxx;
    Some((my - b * mx, b))
}

/// Least squares `y = p u + d v` through the origin (both >= 0; one is dropped when the data
/// cannot tell them apart).
fn fit_two(pts: &[(f64, f64, f64)]) -> (f64, f64) {
    let (mut suu, mut svv, mut suv, mut suy, mut svy) = (0.0, 0.0, 0.0, 0.0, 0.0);
    for &(u, v, y) in pts {
        suu += u * u;
        svv += v * v;
        suv += u * v;
        suy += u * y;
        svy += v * y;
    }
    let det = suu * svv - suv * suv;
    let only_v = if svv > 0.0 { (0.0, (svy / svv).max(0.0)) } else { (0.0, 0.0) };
    let only_u = if suu > 0.0 { ((suy / suu).max(0.0), 0.0) } else { (0.0, 0.0) };
    if det.abs() <= 1e-12 * suu.max(1.0) * svv.max(1.0) {
        return if svv > 0.0 { only_v } else { only_u };
    }
    let p = (suy * svv - svy * suv) / det;
    let d = (svy * suu - suy * suv) / det;
    match (p >= 0.0, d >= 0.0) {
        (true, true) => (p, d),
        (false, _) => only_v,
        (_, false) => only_u,
    }
}

/// Fewest requests served at once (admission `hit`) for a model to get its own service rates
/// in a [`Calibration`]; models with fewer follow the global fit.
const MIN_OWN_FIT: usize = 3;

/// The timings a drive measured, for predicting a real backend.
///
/// Loads: fitted as `latency + bytes / bandwidth` over the models' last measured loads
/// (`/admin/pool` `models[].load_secs` and `measured` after the run), and each model that
/// loaded during the run gets its own load time, the mean of its `loaded` events' durations
/// (a 4-bit directory dequantized at load takes longer than a GGUF of the same size, which no
/// line over bytes says). Service: `prefill x prompt tokens + decode x generated tokens`,
/// fitted over the requests served at once (admission `hit`: a request that waited for a load
/// or in the queue ran while the load or the other work shared the cores, and its time says
/// more about them than about its own service), against each one's prompt tokens and the
/// tokens it really generated; globally, and per model for each model with at least three such
/// requests (an embeddings model's prompt tokens cost far less than a generator's). Unloads
/// instant. The fit needs at least one load and one request served at once.
pub fn calibrate(trace: &Trace, obs: &Observed) -> Result<Calibration> {
    let mut loads = Vec::new();
    for m in obs.after["models"].as_array().into_iter().flatten() {
        if let (Some(b), Some(s)) = (m["measured"].as_u64(), m["load_secs"].as_f64()) {
            loads.push((b as f64, s));
        }
    }
    if loads.is_empty() {
        bail!("calibration: no model loaded during the run");
    }
    let (latency, per_byte) = match fit_line(&loads) {
        Some((a, b)) if a >= 0.0 && b > 0.0 => (a, b),
        _ => (loads.iter().map(|l| l.1).sum::<f64>() / loads.len() as f64, 0.0),
    };
    let mut models: BTreeMap<String, ModelTiming> = BTreeMap::new();
    let mut load_secs: BTreeMap<&str, (f64, u32)> = BTreeMap::new();
    for e in &obs.events {
        if let Event::Loaded { model, secs, .. } = e {
            let s = load_secs.entry(&**model).or_default();
            s.0 += secs;
            s.1 += 1;
        }
    }
    for (id, (sum, n)) in load_secs {
        models.entry(id.to_string()).or_default().load_secs = Some(sum / f64::from(n));
    }
    let mut service: Vec<(u32, (f64, f64, f64))> = Vec::new();
    for r in obs.records.iter().filter(|r| r.kind == "request" && r.outcome == "hit") {
        let op = trace.ops[r.op as usize];
        if let Service::Tokens { input, output } = op.service() {
            let secs = (r.total_secs - r.wait_ms.unwrap_or(0) as f64 / 1e3).max(0.0);
            let embeddings = trace.models[op.model as usize].model_type == ModelType::Embeddings;
            // The tokens really generated (a model may stop before max_tokens).
            let out = if embeddings { 0 } else { r.completion_tokens.unwrap_or(output) };
            service.push((op.model, (f64::from(input), f64::from(out), secs)));
        }
    }
    if service.is_empty() {
        bail!("calibration: no request was served at once (admission hit)");
    }
    let all: Vec<_> = service.iter().map(|s| s.1).collect();
    let (prefill, decode) = fit_two(&all);
    for (slot, def) in trace.models.iter().enumerate() {
        let own: Vec<_> = service.iter().filter(|s| s.0 as usize == slot).map(|s| s.1).collect();
        if own.len() < MIN_OWN_FIT {
            continue;
        }
        let (p, d) = fit_two(&own);
        let t = models.entry(def.id.to_string()).or_default();
        t.prefill_secs_per_token = Some(p);
        // An embeddings model generates nothing: its decode rate cannot be told.
        t.decode_secs_per_token = (def.model_type != ModelType::Embeddings).then_some(d);
    }
    Ok(Calibration {
        timing: modelpool::TimingModel {
            load_latency_secs: latency,
            load_bandwidth: (per_byte > 0.0).then(|| 1.0 / per_byte),
            unload_secs: 0.0,
            prefill_secs_per_token: prefill,
            decode_secs_per_token: decode,
        },
        models,
    })
}

/// `trace` with every model that has no size given the size the server measured (after the
/// run), else its estimate: what a simulation of a real backend must assume.
pub fn with_server_sizes(trace: &Trace, pool: &Value) -> Trace {
    let mut t = trace.clone();
    for d in &mut t.models {
        if d.size.is_some() {
            continue;
        }
        if let Some(m) =
            pool["models"].as_array().and_then(|ms| ms.iter().find(|m| m["id"].as_str() == Some(&*d.id)))
        {
            d.size = m["measured"].as_u64().or_else(|| m["estimate"]["bytes"].as_u64());
        }
    }
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_count_as_the_trace_says() {
        for input in [10u32, 11, 57, 500, 2002] {
            let p = prompt_for(input);
            // The server's KV count: ceil(bytes / 3) + 4 per message.
            assert_eq!(p.len().div_ceil(3) + 4, input as usize, "kv tokens for {input}");
            // The fake backend's prompt tokens: `user:` plus the words.
            assert_eq!(p.split_whitespace().count() + 1, input as usize, "words for {input}");
        }
    }

    #[test]
    fn fits_recover_the_parameters() {
        let loads: Vec<(f64, f64)> = [1e9, 2e9, 5e9].iter().map(|&b| (b, 0.3 + b / 4e9)).collect();
        let (a, b) = fit_line(&loads).unwrap();
        assert!((a - 0.3).abs() < 1e-9 && (1.0 / b - 4e9).abs() < 1.0);
        let pts: Vec<(f64, f64, f64)> = [(100.0, 10.0), (500.0, 40.0), (20.0, 200.0)]
            .iter()
            .map(|&(u, v)| (u, v, u * 2e-4 + v * 0.03))
            .collect();
        let (p, d) = fit_two(&pts);
        assert!((p - 2e-4).abs() < 1e-9 && (d - 0.03).abs() < 1e-9, "{p} {d}");
        // Only prompts (embeddings): decode cannot be told and stays 0.
        assert_eq!(fit_two(&[(10.0, 0.0, 1e-3), (20.0, 0.0, 2e-3)]), (1e-4, 0.0));
    }

    #[test]
    fn classification_follows_the_reply() {
        assert_eq!(classify(OpKind::Request, 200, Some("hit"), None), "hit");
        assert_eq!(classify(OpKind::Request, 503, None, Some("queue_timeout")), "queue_timeout");
        assert_eq!(classify(OpKind::Request, 500, None, Some("model_load_failed")), "failed");
        assert_eq!(classify(OpKind::Request, 400, None, Some("invalid_request_error")), "http_400");
        assert_eq!(classify(OpKind::Pin, 200, None, None), "admin");
    }
}
