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

/// Bytes rendered as decimal gigabytes, the unit of the classic 503 message
/// (`Insufficient memory: need 8.0GB, only 7.0GB available after eviction`).
pub fn gb(bytes: u64) -> f64 {
    bytes as f64 / GB as f64
}

/// Parse `s` (trimmed) as one of `T`'s names, as strum derives them from the variant list.
/// The one name table of each vocabulary enum is its strum attributes; this, serde (through
/// [`impl_serde_by_name`]) and `Display` all read it.
pub(crate) fn parse_by_name<T>(s: &str) -> Option<T>
where
    T: strum::VariantArray + Copy + Into<&'static str>,
{
    let s = s.trim();
    T::VARIANTS.iter().copied().find(|v| (*v).into() == s)
}

/// `Serialize` as the name and `Deserialize` through `FromStr`, so the wire names are the strum
/// names and are written once.
macro_rules! impl_serde_by_name {
    ($t:ty) => {
        impl serde::Serialize for $t {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }
        impl<'de> serde::Deserialize<'de> for $t {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
                s.parse().map_err(serde::de::Error::custom)
            }
        }
    };
}
pub(crate) use impl_serde_by_name;

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

impl ModelType {
    /// Every model type, in wire-name order.
    pub const ALL: [Self; <Self as strum::EnumCount>::COUNT] =
        *<Self as strum::VariantArray>::VARIANTS.first_chunk().expect("one entry per variant");

    /// The wire name (`text-gen`, `vision`, `embeddings`).
    pub fn as_str(self) -> &'static str {
        self.into()
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
        parse_by_name(s).ok_or_else(|| ParseModelTypeError(s.trim().to_string()))
    }
}

impl_serde_by_name!(ModelType);

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

impl EvictReason {
    /// Every reason, in declaration order: counters are indexed by `reason as usize`.
    pub const ALL: [Self; <Self as strum::EnumCount>::COUNT] =
        *<Self as strum::VariantArray>::VARIANTS.first_chunk().expect("one entry per variant");

    /// Snake-case name, as in the decision log and metrics labels.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// An unknown eviction reason name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown eviction reason '{0}'")]
pub struct ParseEvictReasonError(pub String);

impl FromStr for EvictReason {
    type Err = ParseEvictReasonError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_by_name(s).ok_or_else(|| ParseEvictReasonError(s.trim().to_string()))
    }
}

impl_serde_by_name!(EvictReason);

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
}

impl RejectCode {
    /// Every code, in declaration order: counters are indexed by `code as usize`.
    pub const ALL: [Self; <Self as strum::EnumCount>::COUNT] =
        *<Self as strum::VariantArray>::VARIANTS.first_chunk().expect("one entry per variant");

    /// Snake-case name (the `code` of the HTTP error body).
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}

/// An unknown rejection code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown rejection code '{0}'")]
pub struct ParseRejectCodeError(pub String);

impl FromStr for RejectCode {
    type Err = ParseRejectCodeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_by_name(s).ok_or_else(|| ParseRejectCodeError(s.trim().to_string()))
    }
}

impl_serde_by_name!(RejectCode);

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
