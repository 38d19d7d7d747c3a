//! Server configuration: `modelpool serve` flags (each also an environment variable
//! `MODELPOOL_*`), an optional TOML file, a model catalogue (from the file, a directory scan, or
//! the fake backend's built-in catalogue), validated into a [`ServeConfig`] before anything binds.
//!
//! Precedence: flag or environment variable, then the config file, then the default.
//!
//! ```toml
//! listen = "127.0.0.1:8080"
//! memory_limit = "75%"        # or "16GB", "16GiB", "512MB", "0.75"
//! max_models = 4
//! policy = "lru"              # lru | gdsf | lfu
//! backend = "fake"            # fake | mlx
//! preload = ["qwen2.5-0.5b-instruct"]
//! idle_ttl = "10m"            # evict idle unpinned models; "off" to keep them
//! shutdown_grace = "30s"
//! max_body = "4MB"
//! models_dir = "/models"      # every subdirectory with weights is a model
//! sizes_file = "sizes.json"   # remember measured sizes across restarts
//! log_level = "info"
//!
//! [fake]                      # fake backend only
//! load_time = "300ms"
//! token_delay = "0ms"
//!
//! [[models]]
//! id = "llama-3-8b-instruct"
//! type = "text-gen"           # text-gen | vision | embeddings
//! path = "/models/llama-3-8b" # optional: weights (estimates from file sizes)
//! size = "5GB"                # optional: known size, overrides every estimate
//! ```

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::limit::MemoryLimit;
use crate::policy::PolicyKind;
use crate::types::{GB, ModelSpec, ModelType};

/// A configuration problem, with a message that names the flag, variable or file field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// The request body cap when `--max-body` is not given: 4 MiB, room for long chat histories
/// while a runaway client cannot make the server buffer much.
pub const DEFAULT_MAX_BODY: u64 = 4 * 1024 * 1024;

/// Whether this build has the MLX backend (the `mlx` cargo feature).
pub const MLX_AVAILABLE: bool = cfg!(feature = "mlx");

/// The error for `--backend mlx` in a build without it.
pub const MLX_MISSING: &str = "--backend mlx: this modelpool was built without the mlx feature (rebuild with `cargo build --release --features mlx`)";

/// Which backend runs the models.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Deterministic in-process fake (no real inference): the default until a real backend is
    /// built in.
    #[default]
    Fake,
    /// Apple MLX (needs the `mlx` cargo feature).
    Mlx,
}

impl BackendKind {
    /// Config name.
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Fake => "fake",
            BackendKind::Mlx => "mlx",
        }
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration '{s}': {e} (e.g. 30s, 10m, 250ms)"))
}

/// `off`, `none`, `0` disable; otherwise a duration.
fn parse_ttl(s: &str) -> Result<Option<Duration>, String> {
    match s.trim() {
        "off" | "none" | "0" | "" => Ok(None),
        t => parse_duration(t).map(|d| (!d.is_zero()).then_some(d)),
    }
}

/// An idle time-to-live: a duration, or `off` (also `none`, `0`) for none.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdleTtl(pub Option<Duration>);

impl FromStr for IdleTtl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_ttl(s).map(IdleTtl)
    }
}

/// Bytes from `16GB`, `512MB`, `4MiB` (a percentage is refused).
fn parse_bytes(s: &str) -> Result<u64, String> {
    match MemoryLimit::from_str(s) {
        Ok(MemoryLimit::Bytes(b)) => Ok(b),
        Ok(MemoryLimit::Fraction(_)) => {
            Err(format!("'{s}' must be a size such as 4MB or 5GB, not a fraction"))
        }
        Err(e) => Err(e.to_string().replace("invalid memory limit", "invalid size")),
    }
}

/// `modelpool serve` flags. Every flag is also read from the environment variable named in its
/// help; unset flags fall back to the config file, then to the defaults shown.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct ServeArgs {
    /// TOML config file (optional).
    #[arg(long, env = "MODELPOOL_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:8080].
    #[arg(long, env = "MODELPOOL_LISTEN", value_name = "ADDR")]
    pub listen: Option<SocketAddr>,
    /// Memory limit: a share of system memory (75%, 0.75) or a size (16GB, 16GiB, 512MB)
    /// [default: 75%].
    #[arg(long, env = "MODELPOOL_MEMORY_LIMIT", value_name = "LIMIT")]
    pub memory_limit: Option<MemoryLimit>,
    /// Most models loaded at once [default: 4].
    #[arg(long, env = "MODELPOOL_MAX_MODELS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_models: Option<u32>,
    /// Eviction policy: lru, gdsf or lfu [default: lru].
    #[arg(long, env = "MODELPOOL_POLICY", value_name = "POLICY")]
    pub policy: Option<PolicyKind>,
    /// Models to load and pin at start, comma-separated.
    #[arg(long, env = "MODELPOOL_PRELOAD", value_name = "IDS", value_delimiter = ',')]
    pub preload: Option<Vec<String>>,
    /// Backend [default: fake].
    #[arg(long, env = "MODELPOOL_BACKEND", value_enum)]
    pub backend: Option<BackendKind>,
    /// Directory whose subdirectories (with weight files or config.json) are models.
    #[arg(long, env = "MODELPOOL_MODELS_DIR", value_name = "DIR")]
    pub models_dir: Option<PathBuf>,
    /// Log filter: error, warn, info, debug, trace, or a tracing directive [default: info].
    #[arg(long, env = "MODELPOOL_LOG_LEVEL", value_name = "LEVEL")]
    pub log_level: Option<String>,
    /// Evict unpinned models idle this long (10m, 1h; "off" keeps them) [default: off].
    #[arg(long, env = "MODELPOOL_IDLE_TTL", value_name = "DURATION")]
    pub idle_ttl: Option<IdleTtl>,
    /// Longest wait for in-flight requests at shutdown [default: 30s].
    #[arg(long, env = "MODELPOOL_SHUTDOWN_GRACE", value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Largest request body accepted (larger gets 413) [default: 4MiB].
    #[arg(long, env = "MODELPOOL_MAX_BODY", value_name = "SIZE", value_parser = parse_bytes)]
    pub max_body: Option<u64>,
    /// JSON file where measured model sizes are remembered across restarts.
    #[arg(long, env = "MODELPOOL_SIZES_FILE", value_name = "FILE")]
    pub sizes_file: Option<PathBuf>,
    /// Fake backend: time a load takes [default: 300ms].
    #[arg(long, env = "MODELPOOL_FAKE_LOAD_TIME", value_name = "DURATION", value_parser = parse_duration)]
    pub fake_load_time: Option<Duration>,
    /// Fake backend: delay between generated tokens [default: 0ms].
    #[arg(long, env = "MODELPOOL_FAKE_TOKEN_DELAY", value_name = "DURATION", value_parser = parse_duration)]
    pub fake_token_delay: Option<Duration>,
}

/// The TOML file's shape. Unknown keys are errors (a typo should not be silently ignored).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`ServeArgs::listen`].
    pub listen: Option<String>,
    /// See [`ServeArgs::memory_limit`].
    pub memory_limit: Option<String>,
    /// See [`ServeArgs::max_models`].
    pub max_models: Option<u32>,
    /// See [`ServeArgs::policy`].
    pub policy: Option<String>,
    /// See [`ServeArgs::preload`].
    pub preload: Option<Vec<String>>,
    /// See [`ServeArgs::backend`].
    pub backend: Option<BackendKind>,
    /// See [`ServeArgs::models_dir`].
    pub models_dir: Option<PathBuf>,
    /// See [`ServeArgs::log_level`].
    pub log_level: Option<String>,
    /// See [`ServeArgs::idle_ttl`].
    pub idle_ttl: Option<String>,
    /// See [`ServeArgs::shutdown_grace`].
    pub shutdown_grace: Option<String>,
    /// See [`ServeArgs::max_body`].
    pub max_body: Option<String>,
    /// See [`ServeArgs::sizes_file`].
    pub sizes_file: Option<PathBuf>,
    /// Fake backend settings.
    #[serde(default)]
    pub fake: FakeFileConfig,
    /// The model catalogue.
    #[serde(default)]
    pub models: Vec<ModelEntry>,
}

/// `[fake]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeFileConfig {
    /// See [`ServeArgs::fake_load_time`].
    pub load_time: Option<String>,
    /// See [`ServeArgs::fake_token_delay`].
    pub token_delay: Option<String>,
}

/// One `[[models]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Public id (what clients put in `"model"`).
    pub id: String,
    /// `text-gen` (default), `vision` or `embeddings`.
    #[serde(rename = "type", default)]
    pub model_type: ModelType,
    /// Weights on disk.
    pub path: Option<PathBuf>,
    /// Known size (`5GB`): overrides every estimate.
    pub size: Option<String>,
}

/// Fake backend knobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FakeSettings {
    /// Time a load takes.
    pub load_time: Duration,
    /// Delay between generated tokens.
    pub token_delay: Duration,
}

/// A validated server configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct ServeConfig {
    /// Listen address.
    pub listen: SocketAddr,
    /// Memory limit (resolved against system memory at start).
    pub memory_limit: MemoryLimit,
    /// Most models loaded at once.
    pub max_models: usize,
    /// Eviction policy.
    pub policy: PolicyKind,
    /// Backend.
    pub backend: BackendKind,
    /// Models loaded and pinned at start (all in `models`).
    pub preload: Vec<String>,
    /// The catalogue, ids unique.
    pub models: Vec<ModelSpec>,
    /// Log filter.
    pub log_level: String,
    /// Idle eviction time, if any.
    pub idle_ttl: Option<Duration>,
    /// Longest drain at shutdown.
    pub shutdown_grace: Duration,
    /// Request body cap, bytes.
    pub max_body: u64,
    /// Where measured sizes persist.
    pub sizes_file: Option<PathBuf>,
    /// Fake backend knobs.
    pub fake: FakeSettings,
}

/// The fake backend's catalogue when none is configured: realistic names whose sizes come from
/// the name estimator (a size is given only where the name carries no parameter count).
pub fn default_fake_catalogue() -> Vec<ModelSpec> {
    vec![
        ModelSpec::new("qwen2.5-0.5b-instruct"),
        ModelSpec::new("llama-3.2-3b-instruct"),
        ModelSpec::new("mistral-7b-instruct-v0.3"),
        ModelSpec::new("llama-3-8b-instruct"),
        ModelSpec::new("llama-3-70b-instruct"),
        ModelSpec::new("qwen2-vl-2b-instruct").with_type(ModelType::Vision),
        ModelSpec::new("qwen3-embedding-0.6b").with_type(ModelType::Embeddings),
        // nomic-embed-text-v1.5 has 137M parameters, stored in fp16 with its runtime: ~0.3 GB.
        ModelSpec::new("nomic-embed-text-v1.5").with_type(ModelType::Embeddings).with_size(3 * GB / 10),
    ]
}

/// The models directory scan, shared with the MLX backend's tests: see
/// [`crate::catalog::scan_models_dir`].
pub fn scan_models_dir(dir: &Path) -> Result<Vec<ModelSpec>, ConfigError> {
    crate::catalog::scan_models_dir(dir).map_err(|e| ConfigError(format!("models dir: {e}")))
}

impl ServeConfig {
    /// Read the config file named by `args` (if any) and merge it under `args`. Every problem
    /// is an error naming its source; nothing is bound or loaded here.
    pub fn resolve(args: &ServeArgs) -> Result<Self, ConfigError> {
        let (file, src) = match &args.config {
            Some(path) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| ConfigError(format!("cannot read config file {}: {e}", path.display())))?;
                let f: FileConfig = toml::from_str(&text)
                    .map_err(|e| ConfigError(format!("config file {}: {e}", path.display())))?;
                (f, path.display().to_string())
            }
            None => (FileConfig::default(), String::new()),
        };
        Self::merge(args, file, &src)
    }

    /// Merge `args` over an already-parsed `file` (named `src` in messages).
    pub fn merge(args: &ServeArgs, file: FileConfig, src: &str) -> Result<Self, ConfigError> {
        let field = |name: &str, e: String| ConfigError(format!("config file {src}: {name}: {e}"));
        let listen = match (args.listen, &file.listen) {
            (Some(a), _) => a,
            (None, Some(s)) => {
                s.parse().map_err(|e| field("listen", format!("invalid address '{s}': {e}")))?
            }
            (None, None) => SocketAddr::from(([127, 0, 0, 1], 8080)),
        };
        let memory_limit = match (args.memory_limit, &file.memory_limit) {
            (Some(l), _) => l,
            (None, Some(s)) => {
                s.parse().map_err(|e: crate::limit::LimitError| field("memory_limit", e.to_string()))?
            }
            (None, None) => MemoryLimit::Fraction(0.75),
        };
        let max_models = match args.max_models.or(file.max_models) {
            Some(0) => return Err(field("max_models", "must be at least 1".into())),
            Some(n) => n as usize,
            None => 4,
        };
        let policy = match (args.policy, &file.policy) {
            (Some(p), _) => p,
            (None, Some(s)) => {
                s.parse().map_err(|e: crate::policy::ParsePolicyError| field("policy", e.to_string()))?
            }
            (None, None) => PolicyKind::Lru,
        };
        let backend = args.backend.or(file.backend).unwrap_or_default();
        if backend == BackendKind::Mlx && !MLX_AVAILABLE {
            return err(MLX_MISSING);
        }
        let log_level = args.log_level.clone().or(file.log_level).unwrap_or_else(|| "info".into());
        if tracing_subscriber::EnvFilter::try_new(&log_level).is_err() {
            return err(format!(
                "invalid log level '{log_level}': expected error, warn, info, debug, trace or a tracing directive"
            ));
        }
        let idle_ttl = match (args.idle_ttl, &file.idle_ttl) {
            (Some(t), _) => t.0,
            (None, Some(s)) => parse_ttl(s).map_err(|e| field("idle_ttl", e))?,
            (None, None) => None,
        };
        let shutdown_grace = match (args.shutdown_grace, &file.shutdown_grace) {
            (Some(d), _) => d,
            (None, Some(s)) => parse_duration(s).map_err(|e| field("shutdown_grace", e))?,
            (None, None) => Duration::from_secs(30),
        };
        let max_body = match (args.max_body, &file.max_body) {
            (Some(b), _) => b,
            (None, Some(s)) => parse_bytes(s).map_err(|e| field("max_body", e))?,
            (None, None) => DEFAULT_MAX_BODY,
        };
        if max_body < 1024 {
            return err(format!("max body size {max_body} bytes is too small (at least 1KB)"));
        }
        let fake = FakeSettings {
            load_time: match (args.fake_load_time, &file.fake.load_time) {
                (Some(d), _) => d,
                (None, Some(s)) => parse_duration(s).map_err(|e| field("fake.load_time", e))?,
                (None, None) => Duration::from_millis(300),
            },
            token_delay: match (args.fake_token_delay, &file.fake.token_delay) {
                (Some(d), _) => d,
                (None, Some(s)) => parse_duration(s).map_err(|e| field("fake.token_delay", e))?,
                (None, None) => Duration::ZERO,
            },
        };

        // Catalogue: [[models]] first, then the directory scan for ids not already listed.
        let mut models = Vec::new();
        let mut seen = BTreeSet::new();
        for (i, m) in file.models.iter().enumerate() {
            if m.id.trim().is_empty() {
                return Err(field(&format!("models[{i}].id"), "must not be empty".into()));
            }
            if !seen.insert(m.id.clone()) {
                return Err(field(&format!("models[{i}].id"), format!("duplicate model id '{}'", m.id)));
            }
            let mut spec = ModelSpec::new(m.id.as_str()).with_type(m.model_type);
            if let Some(p) = &m.path {
                if !p.exists() {
                    return Err(field(
                        &format!("models[{i}].path"),
                        format!("{} does not exist", p.display()),
                    ));
                }
                spec = spec.with_path(p);
            }
            if let Some(s) = &m.size {
                spec = spec.with_size(parse_bytes(s).map_err(|e| field(&format!("models[{i}].size"), e))?);
            }
            models.push(spec);
        }
        if let Some(dir) = args.models_dir.as_ref().or(file.models_dir.as_ref()) {
            if !dir.is_dir() {
                return err(format!("models dir {} is not a directory", dir.display()));
            }
            for spec in scan_models_dir(dir)? {
                if seen.insert(spec.id.to_string()) {
                    models.push(spec);
                }
            }
        }
        if models.is_empty() {
            match backend {
                BackendKind::Fake => models = default_fake_catalogue(),
                BackendKind::Mlx => {
                    return err(
                        "no models configured: give --models-dir DIR or [[models]] entries in --config FILE",
                    );
                }
            }
        }

        let preload = args.preload.clone().or(file.preload).unwrap_or_default();
        let preload: Vec<String> =
            preload.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect();
        for p in &preload {
            if !models.iter().any(|m| *m.id == **p) {
                let known: Vec<&str> = models.iter().map(|m| &*m.id).collect();
                return err(format!("cannot preload '{p}': no such model (known: {})", known.join(", ")));
            }
        }

        Ok(ServeConfig {
            listen,
            memory_limit,
            max_models,
            policy,
            backend,
            preload,
            models,
            log_level,
            idle_ttl,
            shutdown_grace,
            max_body,
            sizes_file: args.sizes_file.clone().or(file.sizes_file),
            fake,
        })
    }
}
