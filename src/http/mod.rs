//! The HTTP server: an OpenAI-compatible API and an admin API over a [`ModelPool`] (warp 0.4).
//! This module is the only place warp and HTTP types appear.
//!
//! Routes:
//! - `POST /v1/chat/completions`, `POST /v1/completions` (both stream with `"stream": true`),
//!   `POST /v1/embeddings`, `GET /v1/models`, `GET /v1/models/{id}`.
//! - `GET /admin/pool`, `GET /admin/events?limit=N` (also `/admin/pool/events`),
//!   `GET /admin/models/{id}`, `POST /admin/models/{id}/preload|pin|unpin|unload[?force=true]`,
//!   `GET /admin/models/{id}/dry-run`, `PUT|POST /admin/limits`.
//! - `GET /health`, `GET /metrics` (Prometheus).
//!
//! Model ids may contain `/` (`mlx-community/Llama-3.2-3B-Instruct-4bit`) and are
//! percent-decoded in paths.
//!
//! Errors: every engine error goes through the one mapping in [`error`]; routing failures
//! (unknown path, wrong method) are turned into OpenAI-style JSON by a single `recover`.
//!
//! Layout: this module holds the shared state, body reading, routing and [`serve`]; the OpenAI
//! endpoints are one file each under `openai/`, the admin API and `/health` in [`admin`], the
//! request checks in `validate`, SSE framing in `stream`, per-request timing in `timer`, the
//! wire shapes in [`api`] and [`admin`], and `/metrics` in [`metrics`].

pub mod admin;
pub mod api;
pub mod error;
pub mod metrics;
mod openai;
mod reply;
mod stream;
mod timer;
mod validate;

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

pub use error::ApiError;
pub use metrics::{Metrics, TimedBackend};
pub use openai::chat::DEFAULT_CHAT_MAX_TOKENS;
pub use openai::completions::DEFAULT_COMPLETION_MAX_TOKENS;
pub use openai::embeddings::MAX_EMBEDDING_INPUTS;
pub use stream::DONE_FRAME;

use crate::limit::SystemMemory;
use crate::pool::ModelPool;

/// Everything the handlers share. Cheap to clone.
#[derive(Clone)]
pub struct AppState {
    /// The pool requests are served from.
    pub pool: ModelPool,
    /// Server-side metrics (latency, load seconds).
    pub metrics: Arc<Metrics>,
    /// Total memory source for percentage limits set through the admin API.
    pub system_memory: Arc<dyn SystemMemory + Send + Sync>,
    /// Request bodies larger than this get 413.
    pub max_body: u64,
    /// Unix seconds at start (the `created` of every model).
    pub started_unix: u64,
}

impl AppState {
    /// State over `pool`. `metrics` should be the one given to the [`TimedBackend`] wrapping the
    /// pool's backend, so load times appear in `/metrics`.
    pub fn new(pool: ModelPool, metrics: Arc<Metrics>) -> Self {
        AppState {
            pool,
            metrics,
            system_memory: Arc::new(crate::limit::SysinfoMemory),
            max_body: crate::config::DEFAULT_MAX_BODY,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    /// Builder: cap request bodies at `bytes`.
    pub fn with_max_body(mut self, bytes: u64) -> Self {
        self.max_body = bytes;
        self
    }

    /// Builder: resolve percentage limits against `mem` (tests use a fixed total).
    pub fn with_system_memory(mut self, mem: Arc<dyn SystemMemory + Send + Sync>) -> Self {
        self.system_memory = mem;
        self
    }
}

/// Read a request body up to `limit` bytes, with or without `Content-Length`. Larger bodies are
/// a 413; a broken body a 400.
async fn read_body<S, B>(len: Option<u64>, body: S, limit: u64) -> Result<Bytes, ApiError>
where
    S: Stream<Item = Result<B, warp::Error>>,
    B: Buf,
{
    let too_large = || {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "invalid_request_error",
            "payload_too_large",
            format!("request body exceeds the {limit}-byte limit"),
        )
    };
    if len.is_some_and(|l| l > limit) {
        return Err(too_large());
    }
    let mut buf = BytesMut::with_capacity(len.unwrap_or(0) as usize);
    let mut body = std::pin::pin!(body);
    while let Some(chunk) = body.next().await {
        let mut chunk =
            chunk.map_err(|e| ApiError::bad_request("body", format!("cannot read the request body: {e}")))?;
        if buf.len() + chunk.remaining() > limit as usize {
            return Err(too_large());
        }
        while chunk.has_remaining() {
            let c = chunk.chunk();
            buf.extend_from_slice(c);
            let n = c.len();
            chunk.advance(n);
        }
    }
    Ok(buf.freeze())
}

fn with_state(state: AppState) -> impl Filter<Extract = (AppState,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// The request body, capped, as `Result<Bytes, ApiError>` (handlers turn the error into a reply).
fn body(limit: u64) -> impl Filter<Extract = (Result<Bytes, ApiError>,), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length")
        .and(warp::body::stream())
        .then(move |len, s| read_body(len, s, limit))
}

/// Every route, with rejections turned into OpenAI-style JSON errors.
pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let limit = state.max_body;
    let s = || with_state(state.clone());
    let chat = warp::path!("v1" / "chat" / "completions")
        .and(warp::post())
        .and(s())
        .and(body(limit))
        .then(openai::chat::chat);
    let completions = warp::path!("v1" / "completions")
        .and(warp::post())
        .and(s())
        .and(body(limit))
        .then(openai::completions::completions);
    let embeddings = warp::path!("v1" / "embeddings")
        .and(warp::post())
        .and(s())
        .and(body(limit))
        .then(openai::embeddings::embeddings);
    let models = warp::path!("v1" / "models").and(warp::get()).and(s()).then(openai::models::list_models);
    let model =
        warp::path("v1").and(warp::path("models")).and(warp::path::tail()).and(warp::get()).and(s()).then(
            |tail: warp::path::Tail, state| {
                let id = percent_encoding::percent_decode_str(tail.as_str()).decode_utf8_lossy().into_owned();
                openai::models::get_model(state, id)
            },
        );
    let health = warp::path!("health").and(warp::get()).and(s()).then(admin::health);
    let metrics = warp::path!("metrics").and(warp::get()).and(s()).then(metrics::handler);

    let openai =
        chat.or(completions).unify().or(embeddings).unify().or(models).unify().or(model).unify().boxed();
    openai
        .or(admin::routes(state.clone()))
        .unify()
        .or(health)
        .unify()
        .or(metrics)
        .unify()
        .recover(recover)
        .unify()
        .boxed()
}

async fn recover(r: warp::Rejection) -> Result<Response, Infallible> {
    let e = if r.is_not_found() {
        ApiError::new(StatusCode::NOT_FOUND, "invalid_request_error", "not_found", "no such route")
    } else if r.find::<admin::MethodNotAllowed>().is_some()
        || r.find::<warp::reject::MethodNotAllowed>().is_some()
    {
        ApiError::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request_error",
            "method_not_allowed",
            "method not allowed on this route",
        )
    } else if let Some(q) = r.find::<warp::reject::InvalidQuery>() {
        ApiError::bad_request("query", format!("invalid query string: {q}"))
    } else if let Some(h) = r.find::<warp::reject::InvalidHeader>() {
        ApiError::bad_request("headers", h.to_string())
    } else {
        tracing::warn!(rejection = ?r, "unhandled rejection");
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_request_error", "bad_request", format!("{r:?}"))
    };
    Ok(e.into_response())
}

/// Serve `state` on `listener` until `shutdown` resolves, then drain:
/// 1. the pool stops taking requests: new ones (and `/health`) get 503 with `Retry-After` while
///    the listener still answers, so clients and load balancers learn why;
/// 2. in-flight requests get up to `grace` to finish, and idle models are unloaded;
/// 3. the listener closes and open connections get one more second before the server stops.
///
/// Returns the number of requests still in flight when `grace` ran out.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> u32 {
    let pool = state.pool.clone();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = warp::serve(routes(state))
        .incoming(listener)
        .graceful(async move {
            let _ = stop_rx.await;
        })
        .run();
    let mut server = tokio::spawn(server);
    tokio::select! {
        _ = shutdown => {}
        r = &mut server => {
            tracing::error!(result = ?r, "server stopped on its own");
            return 0;
        }
    }
    tracing::info!(grace_secs = grace.as_secs_f64(), "shutdown: refusing new requests, draining");
    let live = pool.shutdown(grace).await;
    if live > 0 {
        tracing::warn!(live, "shutdown: grace period over with requests still in flight");
    } else {
        tracing::info!("shutdown: drained, every model unloaded");
    }
    let _ = stop_tx.send(());
    if tokio::time::timeout(Duration::from_secs(1), &mut server).await.is_err() {
        server.abort();
    }
    live
}
