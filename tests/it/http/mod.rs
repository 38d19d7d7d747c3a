//! HTTP layer tests: warp route tests (OpenAI and admin) with the fake backend, OpenAI type
//! checks, a concurrency test, config and binary tests, and tests over a real socket.

mod admin;
mod auth;
mod concurrency;
mod config;
mod images;
mod limits;
mod openai_types;
mod routes;
mod socket;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use modelpool::backend::Backend;
use modelpool::backend::fake::FakeBackend;
use modelpool::http::{AppState, Metrics, TimedBackend};
use modelpool::{FixedMemory, GB, ModelPool, ModelSpec, ModelType, NameEstimator, PolicyKind, PoolConfig};
use serde_json::Value;
use warp::filters::BoxedFilter;
use warp::reply::Response;

/// A server over a fake backend, for route tests.
pub struct Harness {
    pub pool: ModelPool,
    pub fake: Arc<FakeBackend>,
    pub state: AppState,
    pub routes: BoxedFilter<(Response,)>,
}

/// The catalogue most tests use: sizes are explicit so the arithmetic is obvious.
pub fn catalogue() -> Vec<ModelSpec> {
    vec![
        ModelSpec::new("chat-a").with_size(2 * GB),
        ModelSpec::new("chat-b").with_size(2 * GB),
        ModelSpec::new("chat-big").with_size(5 * GB),
        ModelSpec::new("huge").with_size(50 * GB),
        ModelSpec::new("vis").with_type(ModelType::Vision).with_size(GB),
        ModelSpec::new("embed").with_type(ModelType::Embeddings).with_size(GB / 2),
        ModelSpec::new("mlx-community/Llama-3.2-3B-Instruct-4bit").with_size(GB),
    ]
}

impl Harness {
    /// `limit` bytes, `max_models`, the [`catalogue`], instant loads.
    pub fn new(limit: u64, max_models: usize) -> Self {
        Self::with_backend(limit, max_models, FakeBackend::new(), catalogue())
    }

    pub fn with_backend(limit: u64, max_models: usize, fake: FakeBackend, specs: Vec<ModelSpec>) -> Self {
        let fake = Arc::new(fake);
        Self::with_dyn_backend(limit, max_models, fake.clone() as Arc<dyn Backend>, fake, specs)
    }

    pub fn with_dyn_backend(
        limit: u64,
        max_models: usize,
        backend: Arc<dyn Backend>,
        fake: Arc<FakeBackend>,
        specs: Vec<ModelSpec>,
    ) -> Self {
        let mut cfg = PoolConfig::with_limit(limit);
        cfg.max_models = max_models;
        Self::with_config(cfg, backend, fake, specs)
    }

    /// The [`catalogue`] over the fake backend `fake`, with an admission queue of `timeout`
    /// holding at most `max_queue` requests.
    pub fn queued(limit: u64, timeout: Duration, max_queue: usize, fake: FakeBackend) -> Self {
        let fake = Arc::new(fake);
        let cfg = PoolConfig::with_limit(limit).with_queue(timeout.as_nanos() as u64, max_queue);
        Self::with_config(cfg, fake.clone() as Arc<dyn Backend>, fake, catalogue())
    }

    pub fn with_config(
        cfg: PoolConfig,
        backend: Arc<dyn Backend>,
        fake: Arc<FakeBackend>,
        specs: Vec<ModelSpec>,
    ) -> Self {
        let metrics = Arc::new(Metrics::new());
        let pool: ModelPool = ModelPool::new(
            cfg,
            PolicyKind::Lru.build(),
            Box::new(NameEstimator),
            Arc::new(TimedBackend::new(backend, metrics.clone())),
        );
        for s in specs {
            pool.register(s);
        }
        let state = AppState::new(pool.clone(), metrics)
            .with_max_body(64 * 1024)
            .with_system_memory(Arc::new(FixedMemory(16 * GB)));
        let routes = modelpool::http::routes(state.clone());
        Harness { pool, fake, state, routes }
    }

    /// The same pool with its state changed by `f` (keys, limits), routes rebuilt.
    pub fn with_state(mut self, f: impl FnOnce(AppState) -> AppState) -> Self {
        self.state = f(self.state);
        self.routes = modelpool::http::routes(self.state.clone());
        self
    }

    pub async fn post(&self, path: &str, body: Value) -> warp::http::Response<Bytes> {
        warp::test::request()
            .method("POST")
            .path(path)
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .reply(&self.routes)
            .await
    }

    pub async fn post_raw(&self, path: &str, body: &[u8]) -> warp::http::Response<Bytes> {
        warp::test::request().method("POST").path(path).body(body).reply(&self.routes).await
    }

    pub async fn req(&self, method: &str, path: &str) -> warp::http::Response<Bytes> {
        warp::test::request().method(method).path(path).reply(&self.routes).await
    }

    pub fn model(&self, id: &str) -> modelpool::ModelStatus {
        self.pool
            .status()
            .models
            .into_iter()
            .find(|m| &*m.id == id)
            .unwrap_or_else(|| panic!("no model {id}"))
    }

    pub fn check_invariants(&self) {
        self.pool.with_state(|s| s.check_invariants()).expect("pool invariants hold");
    }
}

/// The JSON body of a reply.
pub fn json(r: &warp::http::Response<Bytes>) -> Value {
    serde_json::from_slice(r.body())
        .unwrap_or_else(|e| panic!("body is not JSON ({e}): {}", String::from_utf8_lossy(r.body())))
}

/// Assert `r` is an OpenAI error with `status` and `code`; returns the error object.
pub fn assert_error(r: &warp::http::Response<Bytes>, status: u16, code: &str) -> Value {
    assert_eq!(r.status().as_u16(), status, "body: {}", String::from_utf8_lossy(r.body()));
    assert_eq!(r.headers().get("content-type").map(|v| v.to_str().unwrap()), Some("application/json"));
    let v = json(r);
    let e = v.get("error").unwrap_or_else(|| panic!("no error object in {v}")).clone();
    assert_eq!(e["code"], code, "error: {e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()), "error: {e}");
    assert!(e["type"].as_str().is_some_and(|m| !m.is_empty()), "error: {e}");
    assert!(e.get("param").is_some(), "param key present (maybe null): {e}");
    e
}

/// The `Retry-After` seconds of a reply, if any.
pub fn retry_after(r: &warp::http::Response<Bytes>) -> Option<u64> {
    r.headers()
        .get("retry-after")
        .map(|v| v.to_str().unwrap().parse().expect("Retry-After is integer seconds"))
}

/// Split an SSE body into its `data:` payloads, checking the framing: every event is one
/// `data: ` line followed by a blank line. Comment events (`:`, the keep-alives) are legal SSE
/// that clients ignore, and are skipped.
pub fn sse_data(body: &[u8]) -> Vec<String> {
    let text = std::str::from_utf8(body).expect("SSE body is UTF-8");
    assert!(text.ends_with("\n\n"), "SSE body ends with a blank line: {text:?}");
    text.split("\n\n")
        .filter(|e| !e.is_empty() && !e.starts_with(':'))
        .map(|e| {
            assert!(!e.contains('\n'), "one line per event: {e:?}");
            e.strip_prefix("data: ").unwrap_or_else(|| panic!("event without 'data: ': {e:?}")).to_string()
        })
        .collect()
}

pub fn chat_body(model: &str, stream: bool) -> Value {
    serde_json::json!({
        "model": model,
        "messages": [{"role": "user", "content": "hello there"}],
        "stream": stream,
    })
}

/// Wait (polling) until `f` holds, up to `timeout`.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Assert a 400 validation error naming `param` (OpenAI leaves `code` null for these).
pub fn assert_bad_request(r: &warp::http::Response<Bytes>, param: &str) -> Value {
    assert_eq!(r.status().as_u16(), 400, "body: {}", String::from_utf8_lossy(r.body()));
    let v = json(r);
    let e = v["error"].clone();
    assert_eq!(e["type"], "invalid_request_error", "{e}");
    assert_eq!(e["param"], param, "{e}");
    assert!(e["code"].is_null(), "{e}");
    assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    e
}
