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

use super::error::ApiError;
use super::timer::ReqTimer;
use crate::backend::{FinishReason, GenerateEvent, GenerateStream, Usage};
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

/// Get a lease on `model` (loading it if needed) if it is one of `types`, noting in the
/// request line how long that took.
async fn acquire(
    state: &AppState,
    model: &str,
    types: &[ModelType],
    timer: &mut ReqTimer,
) -> Result<Lease, ApiError> {
    let t = Instant::now();
    let r = state.pool.acquire_as(model, types).await;
    timer.set_acquire(t.elapsed());
    let lease = r?;
    timer.set_admitted(lease.admitted().as_str(), lease.waited());
    Ok(lease)
}
