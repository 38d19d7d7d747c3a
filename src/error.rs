//! Engine errors. The HTTP layer maps each variant to a status and body in one place.

use crate::backend::BackendError;
use crate::log::RejectCode;
use crate::types::{ModelId, ModelType, gb};

/// Why a pool operation failed. Variants carry what a client or operator needs to act; `model`
/// is always the id of the model concerned. `src/http/error.rs` maps each variant to one HTTP
/// status and OpenAI error `code` (the only such mapping).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[allow(missing_docs)] // `model` is documented once, above.
pub enum PoolError {
    /// No model with this id is registered.
    #[error("model '{0}' not found")]
    ModelNotFound(String),

    /// The model exists but serves another kind of request.
    #[error(
        "model '{model}' is {} model; this endpoint needs {} model",
        actual.with_article(), expected.with_article()
    )]
    WrongModelType {
        model: ModelId,
        /// What the endpoint needs.
        expected: ModelType,
        /// What the model is.
        actual: ModelType,
    },

    /// Not enough memory even after evicting every evictable model; nothing was evicted.
    /// The message is the classic 503 text, in decimal GB (with the split between weights and
    /// the request's KV cache after the need when the request asked for KV).
    #[error(
        "Insufficient memory: need {:.1}GB{}, only {:.1}GB available after eviction",
        gb(*need), kv_part(*need, *kv), gb(*available)
    )]
    InsufficientMemory {
        model: ModelId,
        /// Bytes the model needs (weights, plus `kv`).
        need: u64,
        /// Bytes of `need` that are the request's KV cache.
        kv: u64,
        /// Bytes obtainable by evicting every evictable model.
        available: u64,
        /// Seconds after which in-flight work is expected to have freed enough (>= 1).
        retry_after_secs: u32,
    },

    /// Larger than the limit minus pinned models: no amount of waiting helps.
    #[error(
        "Model too large: '{model}' needs {:.1}GB{} but the limit minus pinned models leaves {:.1}GB",
        gb(*need), kv_part(*need, *kv), gb(*available)
    )]
    ModelTooLarge {
        model: ModelId,
        /// Bytes the model needs (weights, plus `kv`).
        need: u64,
        /// Bytes of `need` that are the request's KV cache (0 for a model too large by itself).
        kv: u64,
        /// Limit minus pinned bytes.
        available: u64,
    },

    /// `max_models` models are loaded or loading and none can be evicted now. Without a retry
    /// hint, every slot is held by a pinned model: no eviction can free one, so waiting cannot
    /// help until an operator unpins a model or raises `max_models`.
    #[error("{}", max_models_message(model, *max_models, retry_after_secs.is_none()))]
    MaxModelsReached {
        model: ModelId,
        /// The configured maximum.
        max_models: usize,
        /// Seconds after which a retry may succeed (>= 1); `None` when waiting cannot help.
        retry_after_secs: Option<u32>,
    },

    /// The model is being unloaded and takes no new requests until it has drained.
    #[error("model '{model}' is being unloaded; retry after it has drained")]
    Draining {
        model: ModelId,
        /// Seconds after which a retry may succeed (>= 1).
        retry_after_secs: u32,
    },

    /// The admission queue already holds `max_queue` requests.
    #[error("Queue full: '{model}' cannot wait for memory because the admission queue is full")]
    QueueFull {
        model: ModelId,
        /// Seconds after which a retry may succeed (>= 1).
        retry_after_secs: u32,
    },

    /// The request waited in the admission queue for the whole timeout.
    #[error(
        "Queue timeout: '{model}' waited {waited_secs:.1}s for memory or a model slot held by in-flight requests"
    )]
    QueueTimeout {
        model: ModelId,
        /// Seconds it waited.
        waited_secs: f64,
        /// Seconds after which a retry may succeed (>= 1).
        retry_after_secs: u32,
    },

    /// The backend failed to load the model. Every waiter of that load gets this.
    #[error("failed to load model '{model}': {source}")]
    LoadFailed {
        model: ModelId,
        /// The backend's error.
        source: BackendError,
    },

    /// Inference on a loaded model failed.
    #[error(transparent)]
    Backend(#[from] BackendError),

    /// An unload or unpin was refused; `reason` says why and how to force it.
    #[error("cannot unload '{model}': {reason}")]
    UnloadRefused {
        model: ModelId,
        /// Why (pinned, in use, loading, not loaded).
        reason: String,
    },

    /// The pool is shutting down and takes no new requests.
    #[error("server is shutting down")]
    ShuttingDown {
        /// Seconds after which a restarted server may answer.
        retry_after_secs: u32,
    },

    /// A runtime configuration change was invalid.
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
}

impl PoolError {
    /// The machine-readable code of an admission refusal, if this is one.
    pub fn reject_code(&self) -> Option<RejectCode> {
        match self {
            PoolError::InsufficientMemory { .. } => Some(RejectCode::InsufficientMemory),
            PoolError::ModelTooLarge { .. } => Some(RejectCode::ModelTooLarge),
            PoolError::MaxModelsReached { .. } => Some(RejectCode::MaxModels),
            PoolError::Draining { .. } => Some(RejectCode::Draining),
            PoolError::QueueFull { .. } => Some(RejectCode::QueueFull),
            PoolError::QueueTimeout { .. } => Some(RejectCode::QueueTimeout),
            _ => None,
        }
    }

    /// Seconds a client should wait before retrying, when waiting can help.
    pub fn retry_after_secs(&self) -> Option<u32> {
        match self {
            PoolError::MaxModelsReached { retry_after_secs, .. } => *retry_after_secs,
            PoolError::InsufficientMemory { retry_after_secs, .. }
            | PoolError::Draining { retry_after_secs, .. }
            | PoolError::QueueFull { retry_after_secs, .. }
            | PoolError::QueueTimeout { retry_after_secs, .. }
            | PoolError::ShuttingDown { retry_after_secs } => Some(*retry_after_secs),
            _ => None,
        }
    }
}

fn max_models_message(model: &str, max_models: usize, all_pinned: bool) -> String {
    if all_pinned {
        format!(
            "Too many models: '{model}' cannot load while all {max_models} model slots are held by pinned models; unpin one or raise max_models"
        )
    } else {
        format!(
            "Too many models: '{model}' cannot load while {max_models} models are loaded or loading and none can be evicted"
        )
    }
}

/// ` (X GB of weights + Y GB of KV cache for this request's context)` when the request's KV is
/// part of the need, else nothing.
fn kv_part(need: u64, kv: u64) -> String {
    if kv == 0 {
        return String::new();
    }
    // Small caches in MB: "0.0GB" would read as none.
    let kv_text =
        if kv < 100_000_000 { format!("{}MB", kv.div_ceil(1_000_000)) } else { format!("{:.1}GB", gb(kv)) };
    format!(
        " ({:.1}GB of weights + {kv_text} of KV cache for this request's context)",
        gb(need.saturating_sub(kv))
    )
}
