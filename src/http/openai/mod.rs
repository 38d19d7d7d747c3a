//! The OpenAI-compatible endpoints, one file each: `POST /v1/chat/completions` ([`chat`]),
//! `POST /v1/completions` ([`completions`]), `POST /v1/embeddings` ([`embeddings`]) and
//! `GET /v1/models[/{id}]` ([`models`]). Each handler returns a complete reply: application
//! errors are JSON bodies with their status (never warp rejections), built by [`ApiError`].
//!
//! Every handler runs the same steps: parse and validate the body ([`super::validate`]), take a
//! lease on the model (loading it if needed), run the backend, reply as JSON or as an SSE
//! stream ([`super::stream`]) that holds the lease until it ends.

pub(crate) mod chat;
pub(crate) mod completions;
pub(crate) mod embeddings;
pub(crate) mod models;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use warp::http::StatusCode;
use warp::reply::Response;

use super::error::ApiError;
use super::stream::{ChunkFormat, Ready, sse_response, sse_waiting};
use super::timer::ReqTimer;
use crate::backend::{FinishReason, GenerateEvent, GenerateRequest, GenerateStream, Usage};
use crate::http::app::AppState;
use crate::pool::Lease;
use crate::types::ModelType;

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A response id, `{prefix}-{16 hex digits}`, distinct within the process.
fn new_id(prefix: &str) -> String {
    let n = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let salt = unix_now().wrapping_mul(0x9e37_79b9_7f4a_7c15);
    format!("{prefix}-{:016x}", salt ^ n)
}

/// Run a generation to its end: text, finish reason, usage. A generation that ends without a
/// finish reason is a 500.
async fn collect(mut generation: GenerateStream) -> Result<(String, FinishReason, Usage), ApiError> {
    let mut text = String::new();
    while let Some(ev) = generation.next().await {
        match ev? {
            GenerateEvent::Delta(t) => text.push_str(&t),
            GenerateEvent::Done { finish_reason, usage } => return Ok((text, finish_reason, usage)),
        }
    }
    Err(ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "server_error",
        "inference_failed",
        "the backend ended the generation without a finish reason",
    ))
}

/// Tokens of context a generation may hold in its KV cache, for the pool's ledger: the prompt's
/// (estimated before tokenizing, at 3 bytes of UTF-8 per token, which over-counts English
/// (about 4) and is near the mark for code and most other scripts; plus 4 per chat message for
/// the template's markers) and `max_tokens` new ones.
fn context_tokens(prompt_bytes: usize, messages: usize, max_tokens: u32) -> u64 {
    prompt_bytes.div_ceil(3) as u64 + 4 * messages as u64 + u64::from(max_tokens)
}

/// Acquire `model` (one of `types`, `tokens` of context) and start `greq` on it: a streaming
/// request's wait, as a future its stream can own.
fn ready_future(
    state: &AppState,
    model: String,
    types: &'static [ModelType],
    tokens: u64,
    greq: GenerateRequest,
) -> Ready {
    let pool = state.pool.clone();
    Box::pin(async move {
        let lease = pool.acquire_for(&model, types, tokens).await?;
        let generation = lease.handle().generate(greq).await?;
        Ok((generation, lease))
    })
}

/// Reply to a streaming request once `ready` gives its generation: as a plain SSE stream (or
/// error reply, with its status) if that takes less than the state's `stream_wait_notice`;
/// otherwise with the waiting stream of `http::stream`, which sends comments while it waits.
async fn stream_when_ready<F: ChunkFormat + Unpin>(
    state: &AppState,
    timer: &mut ReqTimer,
    fmt: F,
    mut ready: Ready,
) -> Result<Response, ApiError> {
    // Tokio's clock: the waiting stream counts its seconds with it too.
    let t = tokio::time::Instant::now();
    let notice = state.stream_wait_notice;
    tokio::select! {
        r = &mut ready => {
            let (generation, lease) = r?;
            timer.set_acquire(t.elapsed());
            timer.set_admitted(lease.admitted().as_str(), lease.waited());
            Ok(sse_response(generation, lease, fmt, timer.hand_over()))
        }
        _ = tokio::time::sleep(notice) => Ok(sse_waiting(ready, fmt, timer.hand_over(), notice, t.elapsed())),
    }
}

/// Get a lease on `model` (loading it if needed) if it is one of `types`, for a request of
/// `tokens` tokens of context (see [`context_tokens`]; 0 for requests that keep no KV cache),
/// noting in the request line how long that took.
async fn acquire(
    state: &AppState,
    model: &str,
    types: &[ModelType],
    tokens: u64,
    timer: &mut ReqTimer,
) -> Result<Lease, ApiError> {
    let t = Instant::now();
    let r = state.pool.acquire_for(model, types, tokens).await;
    timer.set_acquire(t.elapsed());
    let lease = r?;
    timer.set_admitted(lease.admitted().as_str(), lease.waited());
    Ok(lease)
}
