//! The seam between the pool and whatever runs models: a [`Backend`] loads a [`ModelSpec`] into
//! a [`ModelHandle`] that serves inference and reports the bytes it really holds.
//!
//! Backends: [`fake::FakeBackend`] (deterministic, for tests and simulation) and, with the `mlx`
//! feature, the MLX backend. No backend type leaks into the decision core.

pub mod fake;
#[cfg(feature = "mlx")]
pub mod mlx;

use std::pin::Pin;
use std::sync::Arc;

use async_trait::async_trait;
use futures::Stream;
use serde::{Deserialize, Serialize};
/// The cancellation signal of [`Backend::load_cancellable`] (re-exported so backends outside
/// this crate name the same type).
pub use tokio_util::sync::CancellationToken;

use crate::types::{ModelSpec, ModelType};

/// A failure inside a backend. Cloneable so that every waiter of a shared load gets it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BackendError {
    /// The weights could not be read or the model could not be built.
    #[error("load failed: {0}")]
    Load(String),
    /// The model does not serve this kind of request (e.g. `embed` on a text-gen model).
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// The request was invalid for this model (e.g. a prompt longer than the context).
    #[error("invalid request: {0}")]
    InvalidRequest(String),
    /// The model's queue of waiting requests is full: retry shortly (HTTP 429).
    #[error("overloaded: {0}")]
    Overloaded(String),
    /// Inference failed after the model was loaded.
    #[error("inference failed: {0}")]
    Inference(String),
    /// The model was unloaded (or its worker stopped) while the call was running.
    #[error("model is no longer loaded")]
    Gone,
    /// A load was abandoned because its cancellation token fired
    /// ([`Backend::load_cancellable`]); nothing it allocated is still held.
    #[error("load cancelled")]
    Cancelled,
}

/// A decoded input image: 8-bit RGB, row-major, `width * height * 3` bytes, shared cheaply.
///
/// The HTTP layer makes these from the client's bytes (as mlx-vlm's `load_image` does: EXIF
/// orientation applied, alpha dropped); a backend resizes and normalises them itself. Neither
/// dimension is 0 and the buffer length is exact: [`Image::new`] guarantees both.
///
/// An image may carry a guard ([`Image::with_guard`]): it is dropped with the last clone of the
/// image, so whoever accounts for decoded pixels (the HTTP layer's `--max-image-memory`) keeps
/// them counted for exactly as long as any backend queue or worker holds them. Equality compares
/// the pixels only.
#[derive(Clone)]
pub struct Image {
    width: u32,
    height: u32,
    rgb: Arc<[u8]>,
    guard: Option<Arc<dyn std::any::Any + Send + Sync>>,
}

impl PartialEq for Image {
    fn eq(&self, other: &Self) -> bool {
        (self.width, self.height) == (other.width, other.height) && self.rgb == other.rgb
    }
}

impl Eq for Image {}

impl Image {
    /// An image of `width` x `height` RGB pixels; `None` when a dimension is 0 or `rgb` is not
    /// exactly `width * height * 3` bytes.
    pub fn new(width: u32, height: u32, rgb: Vec<u8>) -> Option<Self> {
        let want = (width as usize).checked_mul(height as usize)?.checked_mul(3)?;
        (width > 0 && height > 0 && rgb.len() == want).then(|| Self {
            width,
            height,
            rgb: rgb.into(),
            guard: None,
        })
    }

    /// This image holding `guard` until its last clone is dropped (replacing any earlier guard).
    pub fn with_guard(mut self, guard: impl std::any::Any + Send + Sync) -> Self {
        self.guard = Some(Arc::new(guard));
        self
    }

    /// Width in pixels (at least 1).
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels (at least 1).
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The pixels, row-major, 3 bytes (R, G, B) each.
    pub fn rgb(&self) -> &[u8] {
        &self.rgb
    }
}

impl std::fmt::Debug for Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Image({}x{})", self.width, self.height)
    }
}

/// One piece of a chat message's content, in the order the client sent them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContentPiece {
    /// A text part.
    Text(String),
    /// An image part.
    Image(Image),
}

/// One chat message (`role` is `system`, `user`, `assistant` or `tool`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// Speaker role.
    pub role: String,
    /// The text of the message: its text parts joined by newlines. What a model that takes no
    /// images sees.
    pub content: String,
    /// The message's parts in order, when it has at least one image; empty otherwise (then
    /// `content` is the whole message). Never serialised: images stay in memory.
    #[serde(skip)]
    pub pieces: Vec<ContentPiece>,
}

impl ChatMessage {
    /// A text-only message.
    pub fn text(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into(), pieces: Vec::new() }
    }

    /// The message's images, in order.
    pub fn images(&self) -> impl Iterator<Item = &Image> {
        self.pieces.iter().filter_map(|p| match p {
            ContentPiece::Image(i) => Some(i),
            ContentPiece::Text(_) => None,
        })
    }
}

/// What to generate from: raw text, or chat messages that the backend renders with the model's
/// chat template.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Prompt {
    /// A raw completion prompt.
    Text(String),
    /// Chat messages, rendered by the backend with the model's template.
    Chat(Vec<ChatMessage>),
}

/// Sampling and stopping parameters for one generation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerateRequest {
    /// Input.
    pub prompt: Prompt,
    /// Upper bound on new tokens.
    pub max_tokens: u32,
    /// 0 means greedy.
    pub temperature: f32,
    /// Nucleus sampling mass in (0, 1]; 1 disables it.
    pub top_p: f32,
    /// Seed for sampling; same seed, same request, same output.
    pub seed: Option<u64>,
    /// Generation stops before any of these strings would be emitted.
    pub stop: Vec<String>,
}

impl GenerateRequest {
    /// Greedy generation of at most `max_tokens` tokens from `prompt`.
    pub fn greedy(prompt: Prompt, max_tokens: u32) -> Self {
        GenerateRequest { prompt, max_tokens, temperature: 0.0, top_p: 1.0, seed: None, stop: Vec::new() }
    }
}

/// Why a generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// End-of-sequence token or a stop string.
    Stop,
    /// `max_tokens` reached (or the context is full).
    Length,
}

/// Token counts for one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Usage {
    /// Tokens in the rendered prompt.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
}

/// One item of a generation stream: text pieces, then exactly one `Done`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum GenerateEvent {
    /// A piece of generated text (one or more tokens' worth of valid UTF-8).
    Delta(String),
    /// The end: why, and the token counts.
    Done {
        /// Why generation ended.
        finish_reason: FinishReason,
        /// Token counts.
        usage: Usage,
    },
}

/// A stream of generation events. Dropping it cancels the generation.
pub type GenerateStream = Pin<Box<dyn Stream<Item = Result<GenerateEvent, BackendError>> + Send>>;

/// Embedding vectors, one per input, in input order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embeddings {
    /// One vector per input.
    pub vectors: Vec<Vec<f32>>,
    /// Tokens consumed over all inputs.
    pub prompt_tokens: u32,
}

/// A loaded model. The pool holds one per resident model and hands clones to leases; it calls
/// [`ModelHandle::unload`] only when no lease is live.
#[async_trait]
pub trait ModelHandle: Send + Sync + 'static {
    /// Bytes this model holds, measured by the backend for this model alone (not the process).
    /// Constant while the model is loaded.
    fn measured_bytes(&self) -> u64;

    /// KV cache bytes one token of context holds while a request runs (for a decoder: layers x
    /// KV heads x head dim x 2 x bytes per element; 0 for a model that keeps no cache). `None`
    /// (the default) leaves the pool's figure from the spec or the estimate rule in place.
    fn kv_bytes_per_token(&self) -> Option<u64> {
        None
    }

    /// What the model's scheduler is doing now (requests running and waiting in its own queue,
    /// KV bytes). `None` (the default) for a backend without one.
    fn serving(&self) -> Option<crate::types::ServingStatus> {
        None
    }

    /// Start a generation. Text-gen and vision models; others return `Unsupported`.
    async fn generate(&self, req: GenerateRequest) -> Result<GenerateStream, BackendError>;

    /// Embed every input. Embeddings models; others return `Unsupported`.
    async fn embed(&self, inputs: Vec<String>) -> Result<Embeddings, BackendError>;

    /// Free the model's memory. Returns the bytes the backend saw come back. Called once, after
    /// the last lease dropped; later calls on this handle fail with `Gone`.
    async fn unload(&self) -> Result<u64, BackendError>;
}

/// Loads models. Shared by the pool behind an `Arc`; loads of different models may run at once.
#[async_trait]
pub trait Backend: Send + Sync + 'static {
    /// Short name for logs and status (`fake`, `mlx`).
    fn name(&self) -> &'static str;

    /// Load `spec`. The returned handle's `measured_bytes` replaces the estimate in the ledger.
    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn ModelHandle>, BackendError>;

    /// [`Backend::load`], which the pool may give up on by firing `cancel` (it does so for a
    /// predictive preload whose room a real request needs). The contract: when this returns,
    /// whatever the attempt allocated is either in the returned handle (the pool then unloads
    /// it) or freed, so the pool can count the memory as back. A backend that can stop early
    /// returns [`BackendError::Cancelled`] as soon as it has freed what it held; the default
    /// ignores `cancel` and loads to the end, which keeps the contract at the cost of time (the
    /// MLX backend does this: its worker thread reads the weights in one piece).
    async fn load_cancellable(
        &self,
        spec: &ModelSpec,
        cancel: CancellationToken,
    ) -> Result<Arc<dyn ModelHandle>, BackendError> {
        let _ = cancel;
        self.load(spec).await
    }

    /// The timing model this backend follows by construction, if it has one (the fake backend
    /// with [`with_timing`](fake::FakeBackend::with_timing)); a real backend has none (its
    /// timings are measured, not set). A simulator predicting this server replays with it.
    fn timing(&self) -> Option<crate::timing::TimingModel> {
        None
    }
}

/// Checks that a handle of type `actual` can serve a request that needs one of `wanted`.
pub fn check_type(actual: ModelType, wanted: &[ModelType], what: &str) -> Result<(), BackendError> {
    if wanted.contains(&actual) {
        Ok(())
    } else {
        Err(BackendError::Unsupported(format!("{what} is not served by a {actual} model")))
    }
}
