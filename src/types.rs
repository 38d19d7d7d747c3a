//! Vocabulary shared by the engine, the simulator, the backends and the HTTP layer.

use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// A model's public identifier (what clients put in `"model"`). Cheap to clone.
pub type ModelId = Arc<str>;

/// Time as nanoseconds on a monotonic clock chosen by the caller.
///
/// The decision core never reads a clock: the server passes nanoseconds since the pool started,
/// the simulator passes virtual time, tests pass fixed instants.
pub type Nanos = u64;

/// Nanoseconds per second, for converting [`Nanos`].
pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// One gigabyte as the engine reports it (decimal: 10^9 bytes, as in `16GB`).
pub const GB: u64 = 1_000_000_000;

/// Bytes rendered as decimal gigabytes, the unit of the classic 503 message
/// (`Insufficient memory: need 8.0GB, only 7.0GB available after eviction`).
pub fn gb(bytes: u64) -> f64 {
    bytes as f64 / GB as f64
}

/// What kind of inference a model serves. The wire names are `text-gen`, `vision`, `embeddings`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    Default,
    strum::IntoStaticStr,
    strum::VariantArray,
    strum::EnumCount,
)]
pub enum ModelType {
    /// Text generation (chat and completions). The default type of a model.
    #[default]
    #[strum(serialize = "text-gen")]
    TextGen,
    /// Vision-language generation (chat with images).
    #[strum(serialize = "vision")]
    Vision,
    /// Sentence embeddings.
    #[strum(serialize = "embeddings")]
    Embeddings,
}

crate::name_table!(ModelType, ParseModelTypeError, "model type");

impl ModelType {
    /// The wire name with its indefinite article, for messages: `a text-gen`, `a vision`,
    /// `an embeddings`.
    pub fn with_article(self) -> &'static str {
        match self {
            ModelType::TextGen => "a text-gen",
            ModelType::Vision => "a vision",
            ModelType::Embeddings => "an embeddings",
        }
    }
}

/// Why a model left memory. Names (snake case) are the decision log's and the metrics' labels.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    strum::IntoStaticStr,
    strum::VariantArray,
    strum::EnumCount,
)]
#[strum(serialize_all = "snake_case")]
pub enum EvictReason {
    /// Memory was needed to load another model.
    Capacity,
    /// `max_models` was reached and another model had to load.
    MaxModels,
    /// The memory limit or `max_models` was lowered at run time.
    LimitChanged,
    /// A load measured more than its estimate and pushed the pool over its limit.
    Overcommit,
    /// Idle longer than the keep-alive time.
    Expired,
    /// An operator asked for it.
    Explicit,
    /// The pool is shutting down.
    Shutdown,
}

crate::name_table!(EvictReason, ParseEvictReasonError, "eviction reason");

/// Machine-readable reason an admission was refused: the `code` of the HTTP error body.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    PartialOrd,
    Ord,
    strum::IntoStaticStr,
    strum::VariantArray,
    strum::EnumCount,
)]
#[strum(serialize_all = "snake_case")]
pub enum RejectCode {
    /// Would fit after in-flight work ends; retry later.
    InsufficientMemory,
    /// Larger than the limit minus pinned models: waiting will not help.
    ModelTooLarge,
    /// `max_models` models are loaded or loading and none can be evicted now (or, without a
    /// retry hint, every slot is held by a pinned model).
    #[strum(serialize = "max_models_reached")]
    MaxModels,
    /// The model was drained with requests still on it; retry after it has unloaded.
    #[strum(serialize = "model_draining")]
    Draining,
    /// The admission queue is full (`max_queue` requests already wait).
    QueueFull,
    /// The request waited the whole `queue_timeout` without memory or a slot coming free.
    QueueTimeout,
}

crate::name_table!(RejectCode, ParseRejectCodeError, "rejection code");

/// Everything the engine knows about a model before it is loaded.
///
/// `size_hint` (bytes), when given, overrides the estimator; `path` points at the weights for
/// backends and file-based estimators.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSpec {
    /// Public identifier.
    pub id: ModelId,
    /// Kind of inference served.
    #[serde(default)]
    pub model_type: ModelType,
    /// Weights on disk (a directory or a single file), if any.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Known size in bytes; when set, estimators return it as is.
    #[serde(default)]
    pub size_hint: Option<u64>,
    /// Known KV cache bytes per token of context (from the model's config); when unset, the
    /// rule of [`crate::estimate::kv_bytes_per_token`] applies until the backend says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kv_bytes_per_token: Option<u64>,
    /// Most prompt tokens one image can become in this (vision) model, from its processor
    /// settings ([`crate::catalog::image_tokens_of_dir`]); the HTTP layer counts this many per
    /// image in a request's KV reservation before the exact count is known. `None`: unknown
    /// (the HTTP layer's documented default applies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_tokens: Option<u32>,
}

impl ModelSpec {
    /// A text-gen model with no path and no size hint.
    pub fn new(id: impl Into<ModelId>) -> Self {
        ModelSpec {
            id: id.into(),
            model_type: ModelType::TextGen,
            path: None,
            size_hint: None,
            kv_bytes_per_token: None,
            image_tokens: None,
        }
    }

    /// Builder: set a known KV cache size per token of context, in bytes.
    pub fn with_kv_per_token(mut self, bytes: u64) -> Self {
        self.kv_bytes_per_token = Some(bytes);
        self
    }

    /// Builder: set the model type.
    pub fn with_type(mut self, model_type: ModelType) -> Self {
        self.model_type = model_type;
        self
    }

    /// Builder: set a known size in bytes.
    pub fn with_size(mut self, bytes: u64) -> Self {
        self.size_hint = Some(bytes);
        self
    }

    /// Builder: set the weights path.
    pub fn with_path(mut self, path: impl Into<PathBuf>) -> Self {
        self.path = Some(path.into());
        self
    }
}

/// What a backend's scheduler is doing for one loaded model, as the backend reports it (the
/// admin API's `serving` field per model and the `modelpool_backend_*` gauges). A snapshot:
/// each number is as of the scheduler's last iteration, not a promise about the next.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServingStatus {
    /// Requests the model serves at once now (a decoder: sequences in its batch, prefilling or
    /// decoding; an encoder: requests in the call it is running).
    pub running: u64,
    /// Requests waiting in the model's own bounded queue behind those (beyond `max_parallel`).
    pub waiting: u64,
    /// The most requests it serves at once (a decoder's batch size limit; an encoder gathers
    /// what waits into one call).
    pub max_parallel: u64,
    /// The most requests it has served in one step so far.
    pub peak_batch: u64,
    /// Bytes its KV caches hold now (allocated, live or free; 0 for an encoder).
    pub kv_cache_bytes: u64,
}
