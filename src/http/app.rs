//! What every handler shares: the [`AppState`], and the request body filter that caps it.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use futures::{Stream, StreamExt};
use warp::Filter;
use warp::http::StatusCode;

use super::auth::Auth;
use super::error::ApiError;
use super::metrics::Metrics;
use crate::config::{ImageConfig, ServerLimitsConfig};
use crate::limit::SystemMemory;
use crate::pool::ModelPool;

/// Default of [`AppState::stream_wait_notice`]: 5 s, well inside common proxy and client idle
/// timeouts (nginx 60 s, the OpenAI Python client's 600 s).
pub const DEFAULT_STREAM_WAIT_NOTICE: std::time::Duration = std::time::Duration::from_secs(5);

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
    /// The API and admin keys ([`Auth::open`] by default: no keys, every route open).
    pub auth: Arc<Auth>,
    /// Timeouts, connection and in-flight caps, the default context length.
    pub limits: ServerLimitsConfig,
    /// Context lengths of the models that have their own (others: `limits.context_tokens`).
    pub contexts: Arc<std::collections::BTreeMap<String, u32>>,
    /// A streaming request still waiting for its model after this long gets its response
    /// headers and then an SSE comment this often until it is admitted (see `http::stream`).
    pub stream_wait_notice: std::time::Duration,
    /// This node's name, sent on every response as `x-modelpool-node` (routers and clients
    /// see which node served or refused them).
    pub node_id: Arc<str>,
    /// The status of a refusal that waiting cures (503, or 429 for routers that cool a node
    /// down on 429).
    pub busy_status: warp::http::StatusCode,
    /// Limits on images in chat requests, and whether remote ones are fetched (default:
    /// [`ImageConfig::default`]).
    pub images: Arc<ImageConfig>,
    /// The decoded-image budget of `images.max_image_memory`, in KiB permits, shared by every
    /// request (see [`super::images::load_all`]).
    pub image_memory: Arc<tokio::sync::Semaphore>,
}

impl AppState {
    /// State over `pool`. `metrics` should be the one given to the [`TimedBackend`](super::metrics::TimedBackend) wrapping the
    /// pool's backend, so load times appear in `/metrics`.
    pub fn new(pool: ModelPool, metrics: Arc<Metrics>) -> Self {
        AppState {
            pool,
            metrics,
            system_memory: Arc::new(crate::limit::SysinfoMemory),
            max_body: crate::config::DEFAULT_MAX_BODY,
            stream_wait_notice: DEFAULT_STREAM_WAIT_NOTICE,
            started_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            auth: Arc::new(Auth::open()),
            limits: ServerLimitsConfig::default(),
            contexts: Arc::default(),
            node_id: Arc::from(default_node_id()),
            busy_status: warp::http::StatusCode::SERVICE_UNAVAILABLE,
            images: Arc::new(ImageConfig::default()),
            image_memory: super::images::memory_semaphore(&ImageConfig::default()),
        }
    }

    /// Builder: name this node in `x-modelpool-node` (default: the host name).
    pub fn with_node_id(mut self, id: &str) -> Self {
        self.node_id = Arc::from(id);
        self
    }

    /// Builder: answer refusals that waiting cures with `status` (503 or 429).
    pub fn with_busy_status(mut self, status: warp::http::StatusCode) -> Self {
        self.busy_status = status;
        self
    }

    /// Builder: the image limits and remote-image settings (see [`super::images`]).
    pub fn with_images(mut self, images: ImageConfig) -> Self {
        self.image_memory = super::images::memory_semaphore(&images);
        self.images = Arc::new(images);
        self
    }

    /// Builder: require these keys (see [`super::auth`]).
    pub fn with_auth(mut self, auth: Auth) -> Self {
        self.auth = Arc::new(auth);
        self
    }

    /// Builder: the connection and request limits.
    pub fn with_limits(mut self, limits: ServerLimitsConfig) -> Self {
        self.limits = limits;
        self
    }

    /// Builder: per-model context lengths (model id, tokens).
    pub fn with_contexts(mut self, contexts: impl IntoIterator<Item = (String, u32)>) -> Self {
        self.contexts = Arc::new(contexts.into_iter().collect());
        self
    }

    /// The context length of `model` in tokens: its own, else `limits.context_tokens`.
    pub fn context_of(&self, model: &str) -> u32 {
        self.contexts.get(model).copied().unwrap_or(self.limits.context_tokens)
    }

    /// Builder: send waiting streams their headers, then a comment, every `every`.
    pub fn with_stream_wait_notice(mut self, every: std::time::Duration) -> Self {
        self.stream_wait_notice = every;
        self
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

/// The host name (what `--node-id` defaults to), or `modelpool` if it cannot be read or is not
/// a valid header value.
pub fn default_node_id() -> String {
    sysinfo::System::host_name()
        .ok()
        .filter(|h| !h.is_empty() && warp::http::HeaderValue::from_str(h).is_ok())
        .unwrap_or_else(|| "modelpool".to_string())
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

pub(super) fn with_state(state: AppState) -> impl Filter<Extract = (AppState,), Error = Infallible> + Clone {
    warp::any().map(move || state.clone())
}

/// The request body, capped at `limit` bytes and `timeout` (a 408 after it), as
/// `Result<Bytes, ApiError>` (handlers turn the error into a reply).
pub(super) fn body(
    limit: u64,
    timeout: std::time::Duration,
) -> impl Filter<Extract = (Result<Bytes, ApiError>,), Error = warp::Rejection> + Clone {
    warp::header::optional::<u64>("content-length").and(warp::body::stream()).then(move |len, s| async move {
        tokio::time::timeout(timeout, read_body(len, s, limit))
            .await
            .unwrap_or_else(|_| Err(ApiError::body_timeout(timeout.as_secs_f64())))
    })
}
