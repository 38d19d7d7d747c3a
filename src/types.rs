//! Vocabulary shared by the engine, the simulator, the backends and the HTTP layer.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
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

/// Bytes rendered as decimal gigabytes, the unit of the seed's 503 message.
pub fn gb(bytes: u64) -> f64 {
    bytes as f64 / GB as f64
}

/// What kind of inference a model serves. The wire names are `text-gen`, `vision`, `embeddings`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, Default)]
pub enum ModelType {
    /// Text generation (chat and completions). The default type of a model.
    #[default]
    #[serde(rename = "text-gen")]
    TextGen,
    /// Vision-language generation (chat with images).
    #[serde(rename = "vision")]
    Vision,
    /// Sentence embeddings.
    #[serde(rename = "embeddings")]
    Embeddings,
}

impl ModelType {
    /// Every model type, in wire-name order.
    pub const ALL: [ModelType; 3] = [ModelType::TextGen, ModelType::Vision, ModelType::Embeddings];

    /// The wire name (`text-gen`, `vision`, `embeddings`).
    pub fn as_str(self) -> &'static str {
        match self {
            ModelType::TextGen => "text-gen",
            ModelType::Vision => "vision",
            ModelType::Embeddings => "embeddings",
        }
    }

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

impl fmt::Display for ModelType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An unknown model type string; the message lists the accepted names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown model type '{0}': expected one of text-gen, vision, embeddings")]
pub struct ParseModelTypeError(pub String);

impl FromStr for ModelType {
    type Err = ParseModelTypeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "text-gen" => Ok(ModelType::TextGen),
            "vision" => Ok(ModelType::Vision),
            "embeddings" => Ok(ModelType::Embeddings),
            other => Err(ParseModelTypeError(other.to_string())),
        }
    }
}

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
}

impl ModelSpec {
    /// A text-gen model with no path and no size hint.
    pub fn new(id: impl Into<ModelId>) -> Self {
        ModelSpec { id: id.into(), model_type: ModelType::TextGen, path: None, size_hint: None }
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
