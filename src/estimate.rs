//! Size estimators: how many bytes a model will hold once loaded, decided before loading it.
//!
//! Every [`Estimate`] carries its [`EstimateSource`], so status pages and decision logs can say
//! how a number was derived. The pool replaces an estimate by the backend's measured size once
//! the model has loaded; [`Learned`] remembers those measurements (across restarts if given a
//! file) and corrects later estimates.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{LazyLock, Mutex};

use regex::Regex;
use serde::{Deserialize, Serialize};

use crate::types::{GB, ModelSpec};

/// Bytes a model is expected to hold, and how that number was derived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    /// Expected resident bytes.
    pub bytes: u64,
    /// Derivation.
    pub source: EstimateSource,
}

/// How an [`Estimate`] was derived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum EstimateSource {
    /// The spec carried an explicit size.
    SizeHint,
    /// The reference table (3B 2.0 GB, 7B 4.0, 8B 5.0, 13B 8.0, 70B 40.0) for a plain name: the
    /// sizes the original plan fixed, kept exactly.
    ReferenceTable {
        /// Billions of parameters read from the name.
        params_b: u32,
    },
    /// Parameter count and bytes per parameter read from the name.
    Params {
        /// Parameters read from the name (see [`params_from_name`] for mixtures of experts).
        params: u64,
        /// The quantization hint found, or `default-4bit`.
        quant: String,
        /// Bytes per parameter including runtime overhead.
        bytes_per_param: f64,
    },
    /// Nothing recognisable in the name: the reference 4.0 GB default.
    Default,
    /// Weight files on disk times an overhead factor.
    Files {
        /// Sum of the weight files' sizes.
        bytes_on_disk: u64,
        /// Multiplier applied.
        factor: f64,
    },
    /// A size measured by a backend on an earlier load.
    Measured,
}

impl fmt::Display for EstimateSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EstimateSource::SizeHint => write!(f, "size given in the model spec"),
            EstimateSource::ReferenceTable { params_b } => {
                write!(f, "reference table for a {params_b}B model")
            }
            EstimateSource::Params { params, quant, bytes_per_param } => {
                write!(f, "{:.3}B parameters x {bytes_per_param:.3} bytes ({quant})", *params as f64 / 1e9)
            }
            EstimateSource::Default => write!(f, "default 4.0 GB (no size in the name)"),
            EstimateSource::Files { bytes_on_disk, factor } => {
                write!(f, "{bytes_on_disk} bytes of weight files x {factor}")
            }
            EstimateSource::Measured => write!(f, "measured on an earlier load"),
        }
    }
}

/// Decides a model's size before it is loaded.
///
/// Shared between threads (`&self` everywhere): an estimator that learns keeps its state behind
/// its own lock. Estimators may do I/O (read weight files, GGUF headers, a measurement file):
/// drivers call them **outside** the decision core. [`crate::ModelPool`] estimates a model in
/// `register` before taking the pool lock and reports measurements after releasing it; only
/// [`crate::PoolState::register`] calls `estimate` directly, for drivers (the simulator, tests)
/// whose estimators are pure.
pub trait SizeEstimator: Send + Sync + 'static {
    /// Expected bytes for `spec`: deterministic for a given spec and estimator state, and > 0.
    fn estimate(&self, spec: &ModelSpec) -> Estimate;

    /// Learn from a measurement: the backend measured `measured` bytes for `spec` after a
    /// successful load. Called once per load, never under the pool lock. The default ignores it.
    fn observe(&self, _spec: &ModelSpec, _measured: u64) {}
}

impl SizeEstimator for Box<dyn SizeEstimator> {
    fn estimate(&self, spec: &ModelSpec) -> Estimate {
        (**self).estimate(spec)
    }
    fn observe(&self, spec: &ModelSpec, measured: u64) {
        (**self).observe(spec, measured)
    }
}

impl<E: SizeEstimator> SizeEstimator for std::sync::Arc<E> {
    fn estimate(&self, spec: &ModelSpec) -> Estimate {
        (**self).estimate(spec)
    }
    fn observe(&self, spec: &ModelSpec, measured: u64) {
        (**self).observe(spec, measured)
    }
}

/// The reference default when the name says nothing: 4.0 GB.
pub const DEFAULT_ESTIMATE: u64 = 4 * GB;

/// Estimates from the model's name: a size hint wins; plain `3B/7B/8B/13B/70B` names give the
/// reference table; other sizes (`0.5B`, `135M`, `8x7B`: see [`params_from_name`]) and quantization
/// hints (`4bit`, `8bit`, `bf16`, `fp16`, `q4_k_m`, ...) give parameters x bytes per parameter;
/// otherwise 4.0 GB.
#[derive(Debug, Clone, Default)]
pub struct NameEstimator;

static SIZE_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"(?i)(?:^|[^a-z0-9.])(?:(\d+)x)?(\d+(?:\.\d+)?)([bm])(?:$|[^a-z0-9])").unwrap()
});

static QUANT_RE: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(
        r"(?i)(?:^|[^a-z0-9])(q[2-8]_k(?:_[sml])?|q[4-8]_[01]|iq[1-4]_[a-z]+|[2-8][-_]?bits?|bf16|fp16|f16|fp32|f32|fp8|int[48]|mxfp4)(?:$|[^a-z0-9])",
    )
    .unwrap()
});

/// Runtime overhead over raw weight bytes (activations, caches, allocator slack).
const OVERHEAD: f64 = 1.15;

/// Bits per weight for a quantization hint (lowercased), as stored on disk.
fn bits_per_weight(q: &str) -> Option<f64> {
    let q = q.replace('-', "_");
    Some(match q.as_str() {
        "bf16" | "fp16" | "f16" => 16.0,
        "fp32" | "f32" => 32.0,
        "fp8" | "int8" => 8.0,
        "int4" | "mxfp4" => 4.25,
        "q4_0" => 4.5,
        "q4_1" => 5.0,
        "q5_0" => 5.5,
        "q5_1" => 6.0,
        "q8_0" => 8.5,
        "q2_k" => 2.63,
        "q3_k" | "q3_k_s" | "q3_k_m" | "q3_k_l" => 3.9,
        "q4_k" | "q4_k_s" | "q4_k_m" => 4.85,
        "q5_k" | "q5_k_s" | "q5_k_m" => 5.7,
        "q6_k" => 6.56,
        "q8_k" => 8.5,
        _ if q.starts_with("iq") => 3.0,
        _ => {
            // "4bit", "4_bit", "8bits"
            let digits: String = q.chars().take_while(|c| c.is_ascii_digit()).collect();
            let bits: f64 = digits.parse().ok()?;
            // MLX affine quantization stores a scale and a bias per 64 weights: +0.5 bit.
            bits + 0.5
        }
    })
}

/// Published total parameter counts of mixture-of-experts shapes named `<experts>x<size>`:
/// `(experts, parameters per expert as named, total)`. The experts share attention, norms and
/// embeddings, which are counted once, so the total is well below experts x size.
const MOE_TOTALS: [(u32, u64, u64); 2] = [
    (8, 7_000_000_000, 46_700_000_000),   // Mixtral 8x7B
    (8, 22_000_000_000, 141_000_000_000), // Mixtral 8x22B
];

/// Parameter count read from a model name (`7B`, `0.5B`, `135M`, `8x7B`), if any, and whether
/// it was a plain integer count of billions (`7B`, not `0.5B`, `135M` or `8x7B`).
///
/// Mixture-of-experts names (`8x7B`) give the shape's published total when it is in a short
/// table of known shapes (Mixtral 8x7B: 46.7B, 8x22B: 141B), shared weights counted once; an
/// unknown shape gives experts x size, an upper bound. Names that state the active parameters
/// after the total (`30B-A3B`) give the total, which is what a load holds.
pub fn params_from_name(name: &str) -> Option<(u64, bool)> {
    let caps = SIZE_RE.captures(name)?;
    let experts: Option<u32> = caps.get(1).map(|m| m.as_str().parse()).transpose().ok()?;
    let n: f64 = caps[2].parse().ok()?;
    let unit = if caps[3].eq_ignore_ascii_case("b") { 1e9 } else { 1e6 };
    let plain_integer_b = experts.is_none() && !caps[2].contains('.') && unit == 1e9;
    let each = (n * unit).round();
    if each <= 0.0 || experts == Some(0) {
        return None;
    }
    let params = match experts {
        None => each as u64,
        Some(e) => MOE_TOTALS
            .iter()
            .find(|&&(te, tn, _)| te == e && tn == each as u64)
            .map_or((f64::from(e) * each) as u64, |&(_, _, total)| total),
    };
    Some((params, plain_integer_b))
}

/// KV cache bytes per token of context for `spec`, before its backend has said (a loaded model's
/// own figure replaces it: [`crate::PoolState::set_kv_bytes_per_token`]). The rule, in order:
/// - the spec's `kv_bytes_per_token` (the catalogue reads it from the model's config or GGUF
///   header: layers x KV heads x head dim x 2 (K and V) x bytes per element);
/// - `0` for embeddings models (an encoder keeps no cache between steps);
/// - otherwise `2 x sqrt(parameters)` bytes for a 16-bit cache (doubled for names that say
///   `f32`/`fp32`), parameters from the name ([`params_from_name`]) or, failing that, half the
///   size estimate (2 bytes per parameter). Against published configs (16-bit cache) it is
///   exact for SmolLM2 135M (23 KB), over for grouped-query models (Llama 3 8B 179 KB against
///   131 KB, Llama 3 70B 531 KB against 328 KB, Qwen2.5 7B 174 KB against 57 KB) and under for
///   models without grouped-query attention (Llama 2 13B 228 KB against 819 KB): a catalogued
///   model's own config is read first for that reason.
pub fn kv_bytes_per_token(spec: &ModelSpec, estimate_bytes: u64) -> u64 {
    if let Some(kv) = spec.kv_bytes_per_token {
        return kv;
    }
    if spec.model_type == crate::types::ModelType::Embeddings {
        return 0;
    }
    let params = params_from_name(&spec.id).map_or(estimate_bytes as f64 / 2.0, |(p, _)| p as f64);
    let wide = QUANT_RE
        .captures(&spec.id)
        .is_some_and(|c| matches!(c[1].to_ascii_lowercase().as_str(), "f32" | "fp32"));
    let per = 2.0 * params.max(1.0).sqrt() * if wide { 2.0 } else { 1.0 };
    per.round() as u64
}

impl NameEstimator {
    fn reference_table(params_b: u64) -> Option<u64> {
        // Exactly the reference table, in decimal GB.
        Some(match params_b {
            3 => 2 * GB,
            7 => 4 * GB,
            8 => 5 * GB,
            13 => 8 * GB,
            70 => 40 * GB,
            _ => return None,
        })
    }
}

impl SizeEstimator for NameEstimator {
    fn estimate(&self, spec: &ModelSpec) -> Estimate {
        if let Some(bytes) = spec.size_hint {
            return Estimate { bytes: bytes.max(1), source: EstimateSource::SizeHint };
        }
        let name: &str = &spec.id;
        let quant = QUANT_RE.captures(name).map(|c| c[1].to_ascii_lowercase());
        let Some((params, plain)) = params_from_name(name) else {
            return Estimate { bytes: DEFAULT_ESTIMATE, source: EstimateSource::Default };
        };
        if plain
            && quant.is_none()
            && let Some(bytes) = Self::reference_table(params / 1_000_000_000)
        {
            let params_b = (params / 1_000_000_000) as u32;
            return Estimate { bytes, source: EstimateSource::ReferenceTable { params_b } };
        }
        let (quant_name, bytes_per_param) =
            match quant.as_deref().and_then(|q| Some((q, bits_per_weight(q)?))) {
                Some((q, bits)) => (q.to_string(), bits / 8.0 * OVERHEAD),
                // The reference table implies about 0.6 bytes per parameter: 4-bit weights as MLX ships.
                None => ("default-4bit".to_string(), 0.625),
            };
        let bytes = ((params as f64) * bytes_per_param).round().max(1.0) as u64;
        Estimate { bytes, source: EstimateSource::Params { params, quant: quant_name, bytes_per_param } }
    }
}

/// Estimates from weight files on disk (`*.safetensors`, `*.gguf`, `*.bin`, `*.npz`, `*.pt`)
/// times `factor`; falls back to `fallback` when the spec has no path or no weight files.
#[derive(Debug, Clone)]
pub struct FileEstimator<F = NameEstimator> {
    /// Multiplier over bytes on disk (runtime overhead, or dequantization growth).
    pub factor: f64,
    /// Used when there is nothing on disk to measure.
    pub fallback: F,
}

impl Default for FileEstimator<NameEstimator> {
    fn default() -> Self {
        FileEstimator { factor: 1.25, fallback: NameEstimator }
    }
}

/// Sum of the sizes of weight files at `path` (a file, or a directory searched recursively).
pub fn weight_bytes_on_disk(path: &Path) -> std::io::Result<u64> {
    const EXT: [&str; 5] = ["safetensors", "gguf", "bin", "npz", "pt"];
    let meta = std::fs::metadata(path)?;
    if meta.is_file() {
        return Ok(meta.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let p = entry?.path();
        if p.is_dir() {
            total += weight_bytes_on_disk(&p)?;
        } else if p.extension().and_then(|e| e.to_str()).is_some_and(|e| EXT.contains(&e)) {
            total += std::fs::metadata(&p)?.len();
        }
    }
    Ok(total)
}

impl<F: SizeEstimator> SizeEstimator for FileEstimator<F> {
    fn estimate(&self, spec: &ModelSpec) -> Estimate {
        if spec.size_hint.is_none()
            && let Some(path) = &spec.path
            && let Ok(on_disk) = weight_bytes_on_disk(path)
            && on_disk > 0
        {
            return Estimate {
                bytes: ((on_disk as f64) * self.factor).round() as u64,
                source: EstimateSource::Files { bytes_on_disk: on_disk, factor: self.factor },
            };
        }
        self.fallback.estimate(spec)
    }

    fn observe(&self, spec: &ModelSpec, measured: u64) {
        self.fallback.observe(spec, measured)
    }
}

/// Remembers measured sizes per model id and returns them instead of the inner estimate.
/// With a file, measurements are loaded at construction and written after each new one, so
/// they survive restarts. A size hint in the spec still wins.
///
/// Crash-safe: each write goes to a temporary file in the same directory, is synced, and is
/// renamed over the file (then the directory is synced), so the file is always either the old
/// or the new whole map. A corrupt or truncated file (from another writer, a disk fault) is
/// reported with a `tracing` warning and ignored: estimates start afresh and the next write
/// replaces it.
///
/// The measurements sit behind a mutex of their own (never the pool's); the file is written
/// under it, so concurrent observations are persisted in order and the last write holds them all.
#[derive(Debug)]
pub struct Learned<E> {
    inner: E,
    measured: Mutex<BTreeMap<String, u64>>,
    file: Option<PathBuf>,
}

/// Failure reading a [`Learned`] measurement file.
#[derive(Debug, thiserror::Error)]
pub enum LearnedError {
    /// The file exists but could not be read.
    #[error("cannot read size file {path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
}

impl<E: SizeEstimator> Learned<E> {
    /// Remember measurements in memory only.
    pub fn new(inner: E) -> Self {
        Learned { inner, measured: Mutex::new(BTreeMap::new()), file: None }
    }

    /// Remember measurements in `file` (created on the first measurement if missing). A file
    /// that is not a JSON object of model id to bytes is warned about and ignored; only a file
    /// that exists but cannot be read is an error.
    pub fn with_file(inner: E, file: impl Into<PathBuf>) -> Result<Self, LearnedError> {
        let file = file.into();
        let measured = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %file.display(), error = %e, "size file is corrupt or truncated; ignoring it (the next measurement rewrites it)");
                BTreeMap::new()
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(source) => return Err(LearnedError::Io { path: file, source }),
        };
        Ok(Learned { inner, measured: Mutex::new(measured), file: Some(file) })
    }

    /// A copy of the measurements known so far.
    pub fn measurements(&self) -> BTreeMap<String, u64> {
        self.lock().clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, u64>> {
        // The map is consistent after any panic (single inserts), so a poisoned lock is usable.
        self.measured.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<E: SizeEstimator> SizeEstimator for Learned<E> {
    fn estimate(&self, spec: &ModelSpec) -> Estimate {
        let known = if spec.size_hint.is_none() { self.lock().get(&*spec.id).copied() } else { None };
        match known {
            Some(bytes) => Estimate { bytes, source: EstimateSource::Measured },
            None => self.inner.estimate(spec),
        }
    }

    fn observe(&self, spec: &ModelSpec, measured: u64) {
        self.inner.observe(spec, measured);
        let mut map = self.lock();
        if map.insert(spec.id.to_string(), measured) != Some(measured)
            && let Some(file) = &self.file
        {
            // Best effort: a failed write loses a hint, never a request.
            let json = serde_json::to_vec_pretty(&*map).unwrap_or_default();
            if let Err(e) = write_atomically(file, &json) {
                tracing::warn!(file = %file.display(), error = %e, "could not persist measured model sizes");
            }
        }
    }
}

/// Replace `file` with `bytes` so that a crash at any point leaves the old or the new content,
/// never a mix: write a temporary file next to it (same directory, so the rename is atomic),
/// sync it, rename it over `file`, sync the directory. The temporary file is removed on error.
pub fn write_atomically(file: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = file.file_name().map_or_else(|| "sizes".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        drop(f);
        std::fs::rename(&tmp, file)?;
        // Make the rename itself durable (directories can be opened and synced on Unix).
        #[cfg(unix)]
        std::fs::File::open(dir)?.sync_all()?;
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}
