//! The HTTP server: an OpenAI-compatible API and an admin API over a [`ModelPool`](crate::ModelPool) (warp 0.4).
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
//! Keys ([`auth`]): with keys configured, `/v1/*` needs an API key, `/admin/*` and `/metrics`
//! an admin key, checked before routing (401 `invalid_api_key`); `/health` is open. Limits
//! (timeouts, the connection cap) are the accept loop's, in `conn`.
//!
//! Model ids may contain `/` (`mlx-community/Llama-3.2-3B-Instruct-4bit`) and are
//! percent-decoded in paths.
//!
//! Errors: every engine error goes through the one mapping in [`error`]; routing failures
//! (unknown path, wrong method) are turned into OpenAI-style JSON by a single `recover`.
//!
//! Layout, dependencies pointing one way (down this list): this module (routing, `recover`,
//! [`serve`]); the endpoints, one file each under `openai/`, and [`admin`] (admin API,
//! `/health`, `/metrics`); `stream` (SSE framing), `validate` (request checks), `reply` (JSON
//! replies); `timer` (per-request timing); `app` ([`AppState`], the capped body); [`api`]
//! (OpenAI shapes), [`error`] (the one error mapping), [`metrics`] (counters and rendering).

pub mod admin;
pub mod api;
mod app;
pub mod auth;
pub mod conn;
pub mod error;
pub mod images;
pub mod metrics;
mod openai;
mod reply;
mod stream;
mod timer;
mod validate;

use std::convert::Infallible;
use std::future::Future;
use std::time::Duration;

use warp::Filter;
use warp::filters::BoxedFilter;
use warp::http::StatusCode;
use warp::reply::Response;

pub use app::{AppState, DEFAULT_STREAM_WAIT_NOTICE, default_node_id};
pub use auth::Auth;
pub use error::ApiError;
pub use metrics::{Metrics, TimedBackend};
pub use openai::chat::{DEFAULT_CHAT_MAX_TOKENS, DEFAULT_IMAGE_TOKENS};
pub use openai::completions::DEFAULT_COMPLETION_MAX_TOKENS;
pub use openai::embeddings::MAX_EMBEDDING_INPUTS;
pub use stream::DONE_FRAME;

use app::{body, with_state};

/// Every route, with rejections turned into OpenAI-style JSON errors.
pub fn routes(state: AppState) -> BoxedFilter<(Response,)> {
    let limit = state.max_body;
    let body_timeout = state.limits.body_read_timeout;
    let body = move || body(limit, body_timeout);
    let s = || with_state(state.clone());
    let chat = warp::path!("v1" / "chat" / "completions")
        .and(warp::post())
        .and(s())
        .and(body())
        .then(openai::chat::chat);
    let completions = warp::path!("v1" / "completions")
        .and(warp::post())
        .and(s())
        .and(body())
        .then(openai::completions::completions);
    let embeddings = warp::path!("v1" / "embeddings")
        .and(warp::post())
        .and(s())
        .and(body())
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
    let metrics = warp::path!("metrics").and(warp::get()).and(s()).then(admin::metrics);

    let openai =
        chat.or(completions).unify().or(embeddings).unify().or(models).unify().or(model).unify().boxed();
    let all = openai.or(admin::routes(state.clone())).unify().or(health).unify().or(metrics).unify();
    let node = warp::http::HeaderValue::from_str(&state.node_id)
        .unwrap_or_else(|_| warp::http::HeaderValue::from_static("modelpool"));
    let busy_status = state.busy_status;
    auth_guard(&state)
        .and(all)
        .recover(recover)
        .unify()
        .map(move |mut r: Response| {
            if busy_status != StatusCode::SERVICE_UNAVAILABLE && r.extensions().get::<error::Busy>().is_some()
            {
                *r.status_mut() = busy_status;
            }
            r.headers_mut().insert("x-modelpool-node", node.clone());
            r
        })
        .boxed()
}

/// A rejection from the key check: ends routing (no other route is tried).
#[derive(Debug)]
struct Unauthorized(auth::AuthFailure);

impl warp::reject::Reject for Unauthorized {}

/// The key check in front of every route: passes or rejects with [`Unauthorized`]. Without
/// keys it reads nothing.
fn auth_guard(state: &AppState) -> BoxedFilter<()> {
    let auth = state.auth.clone();
    if !auth.enabled() {
        return warp::any().boxed();
    }
    let metrics = state.metrics.clone();
    warp::path::full()
        .and(warp::header::headers_cloned())
        .and_then(move |path: warp::path::FullPath, headers: warp::http::HeaderMap| {
            let result = auth.check(path.as_str(), headers.get(warp::http::header::AUTHORIZATION));
            let metrics = metrics.clone();
            async move {
                result.map_err(|why| {
                    metrics.record("auth", 401, Duration::ZERO);
                    // The path and the reason only: a presented key is never logged.
                    tracing::warn!(path = path.as_str(), reason = why.as_str(), "request refused: API key");
                    warp::reject::custom(Unauthorized(why))
                })
            }
        })
        .untuple_one()
        .boxed()
}

async fn recover(r: warp::Rejection) -> Result<Response, Infallible> {
    let e = if let Some(Unauthorized(why)) = r.find() {
        ApiError::unauthorized(*why)
    } else if r.is_not_found() {
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
    let (limits, metrics) = (state.limits, state.metrics.clone());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = conn::accept_loop(listener, routes(state), limits, metrics, async move {
        let _ = stop_rx.await;
    });
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
