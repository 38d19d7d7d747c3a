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
//! queue_timeout = "60s"       # wait for memory held by in-flight requests; "0s": 503 at once
//! stream_wait_notice = "5s"   # a waiting stream gets headers, then a comment this often
//! max_queue = 1024            # requests waiting at once
//! max_parallel = 8            # generations one MLX decoder runs together (continuous batching)
//! shutdown_grace = "30s"
//! max_body = "32MiB"         # room for one image at max_image_bytes, in base64
//! models_dir = "/models"      # every subdirectory with weights is a model
//! sizes_file = "sizes.json"   # remember measured sizes across restarts
//! log_level = "info"
//!
//! # Security (docs/server.md, "Security")
//! api_keys = ["sk-..."]       # Authorization: Bearer <key> on /v1/*
//! admin_keys = ["adm-..."]    # on /admin/* and /metrics
//! api_keys_file = "keys.txt"  # one key a line (# comments); adds to api_keys
//! admin_keys_file = "admin-keys.txt"
//! public_metrics = false      # /metrics without the admin key
//! insecure_no_auth = false    # allow a non-loopback listen without keys
//!
//! # Limits (docs/server.md, "Reliability")
//! header_read_timeout = "10s"
//! body_read_timeout = "30s"
//! write_timeout = "30s"
//! max_connections = 1024
//! context_tokens = 32768      # max_tokens above a model's context is a 400
//!
//! # Images in chat requests (docs/server.md, "Images")
//! max_images = 8              # image parts per request
//! max_image_pixels = 16777216 # width x height per image, read from the header
//! max_image_bytes = "20MiB"   # encoded bytes per image
//! max_image_memory = "1GiB"   # decoded pixels held at once, all requests together
//! remote_images = false       # fetch http(s) image URLs
//! remote_image_hosts = ["images.example.com"]  # exact hosts allowed (empty: none)
//! remote_image_timeout = "10s"
//!
//! event_log = 1024            # decision-log events kept for /admin/events
//! node_id = "node-1"          # x-modelpool-node on every response (default: host name)
//! busy_status = 503           # 429: curable refusals as 429 (routers that cool down on 429)
//!
//! [fake]                      # fake backend only: the simulator's timing model
//! load_time = "300ms"         # fixed part of a load
//! load_bandwidth = "10GB"     # bytes per second after it, or "inf"
//! prefill_time = "0ms"        # per prompt token
//! token_delay = "0ms"         # per generated token
//! unload_time = "0ms"
//! natural_tokens = 8          # a generation stops by itself after this many tokens
//!
//! [[models]]
//! id = "llama-3-8b-instruct"
//! type = "text-gen"           # text-gen | vision | embeddings
//! path = "/models/llama-3-8b" # optional: weights (estimates from file sizes)
//! size = "5GB"                # optional: known size, overrides every estimate
//! ```

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::limit::{ByteSize, MemoryLimit};
use crate::policy::PolicyKind;
use crate::timing::TimingModel;
use crate::types::{GB, ModelSpec, ModelType};

/// A configuration problem, with a message that names the flag, variable or file field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct ConfigError(pub String);

fn err<T>(msg: impl Into<String>) -> Result<T, ConfigError> {
    Err(ConfigError(msg.into()))
}

/// `--listen` when neither the flag nor the file sets it.
pub const DEFAULT_LISTEN: SocketAddr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 8080));
/// `--memory-limit` when neither the flag nor the file sets it: three quarters of system memory.
pub const DEFAULT_MEMORY_LIMIT: MemoryLimit = MemoryLimit::Fraction(0.75);
/// `--max-models` when neither the flag nor the file sets it.
pub const DEFAULT_MAX_MODELS: u32 = 4;
/// `--shutdown-grace` when neither the flag nor the file sets it.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(30);
/// How long a request may wait in the admission queue: the simulator's default too, chosen
/// from replays of the committed traces (docs/sim.md, "The admission queue").
pub const DEFAULT_QUEUE_TIMEOUT: Duration = Duration::from_secs(60);
/// Requests waiting in the admission queue at once.
pub const DEFAULT_MAX_QUEUE: usize = 1024;
/// Generations one MLX decoder runs together when `--max-parallel` is not given: 8, where the
/// batching benchmark's aggregate throughput was still rising (docs/mlx.md).
pub const DEFAULT_MAX_PARALLEL: usize = 8;
/// The request body cap when `--max-body` is not given: 32 MiB, room for one image at the
/// default `--max-image-bytes` (20 MiB, 26.7 MiB in base64) beside a long chat history, while a
/// runaway client still cannot make the server buffer without bound.
pub const DEFAULT_MAX_BODY: u64 = 32 * 1024 * 1024;
/// The smallest `--max-body` accepted: below this even a short chat request would get 413.
pub const MIN_MAX_BODY: u64 = 1024;
/// `--header-read-timeout`: a client must send a request's whole head within this.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// `--body-read-timeout`: a request body must arrive whole within this after its head.
pub const DEFAULT_BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// `--write-timeout`: a write to a client (a response, an SSE event) that makes no progress
/// for this long closes the connection, which releases a stream's lease.
pub const DEFAULT_WRITE_TIMEOUT: Duration = Duration::from_secs(30);
/// `--max-connections`: open connections at once (HTTP/1.1: at most one request in flight on
/// each, so this is also the cap on requests in progress); one more gets a 503 `server_busy`
/// and is closed.
pub const DEFAULT_MAX_CONNECTIONS: usize = 1024;
/// `--context-tokens`: the context length of a model whose `[[models]]` entry gives none;
/// `max_tokens` (or `max_completion_tokens`) above it is a 400.
pub const DEFAULT_CONTEXT_TOKENS: u32 = 32768;
/// `--max-images`: image parts one chat request may carry; one more is a 400.
pub const DEFAULT_MAX_IMAGES: usize = 8;
/// `--max-image-pixels`: width x height of one image (4096 x 4096), read from the image's header
/// before anything is decoded; more is a 400.
pub const DEFAULT_MAX_IMAGE_PIXELS: u64 = 16_777_216;
/// `--max-image-bytes`: encoded bytes of one image (after base64 decoding, or as fetched):
/// 20 MiB, OpenAI's own limit per image.
pub const DEFAULT_MAX_IMAGE_BYTES: u64 = 20 * 1024 * 1024;
/// `--max-image-memory`: decoded image bytes all requests together may hold at once (the
/// decoder's output and the RGB pixels, from each image's header, until the backend has turned
/// them into its own input): 1 GiB, about 20 images at the default `--max-image-pixels`. A
/// request whose images need more than this on their own is a 400; one that needs what others
/// hold waits for it.
pub const DEFAULT_MAX_IMAGE_MEMORY: u64 = 1 << 30;
/// `--remote-image-timeout`: a remote image must arrive whole within this.
pub const DEFAULT_REMOTE_IMAGE_TIMEOUT: Duration = Duration::from_secs(10);

/// `--fake-load-time` when neither the flag nor the file sets it.
pub const DEFAULT_FAKE_LOAD_TIME: Duration = Duration::from_millis(300);
/// `--fake-load-bandwidth` when neither the flag nor the file sets it and the load time is not
/// zero (bytes per second: a load takes 1 s more per 10 GB). With a zero load time and no
/// bandwidth set, loads are instant.
pub const DEFAULT_FAKE_LOAD_BANDWIDTH: f64 = 10e9;
/// `--event-log`: decision-log events the server keeps for `/admin/events`.
pub const DEFAULT_EVENT_LOG: usize = 1024;

/// A load bandwidth in bytes per second (`10GB`, `800MB`, `1.5GiB`), or `inf` (instant).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bandwidth(pub Option<f64>);

impl std::str::FromStr for Bandwidth {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("inf") {
            return Ok(Bandwidth(None));
        }
        match t.parse::<ByteSize>() {
            Ok(ByteSize(0)) => Err(format!("bandwidth '{s}' must be greater than zero (or inf)")),
            Ok(ByteSize(b)) => Ok(Bandwidth(Some(b as f64))),
            Err(e) => Err(format!("bandwidth '{s}': {e} (bytes per second, or inf)")),
        }
    }
}

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
    /// The name flags and config files use (`fake`, `mlx`).
    pub fn as_str(self) -> &'static str {
        match self {
            BackendKind::Fake => "fake",
            BackendKind::Mlx => "mlx",
        }
    }
}

/// A secret key (`--api-key`, `--admin-key`): compared in constant time by the server, never
/// printed: its `Debug` is `ApiKey(***)`, so configs can be logged. Visible ASCII without
/// spaces (it travels in an HTTP header), at most 512 bytes.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(String);

impl ApiKey {
    /// The key's text, for the one place that hashes it ([`crate::http`]'s auth check).
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ApiKey(***)")
    }
}

impl FromStr for ApiKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let k = s.trim();
        if k.is_empty() {
            return Err("an API key must not be empty".into());
        }
        if k.len() > 512 || !k.bytes().all(|b| b.is_ascii_graphic()) {
            return Err(
                "an API key must be visible ASCII without spaces, at most 512 bytes (it is sent in an HTTP header)"
                    .into(),
            );
        }
        Ok(ApiKey(k.to_string()))
    }
}

impl<'de> Deserialize<'de> for ApiKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Keys from a keys file: one a line; blank lines and lines starting with `#` are skipped.
/// An unreadable file, a bad key (named by line, never printed) or a file with no key is an
/// error: a keys file that silently gave no keys would leave the routes open.
pub fn read_keys_file(path: &Path) -> Result<Vec<ApiKey>, ConfigError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError(format!("cannot read keys file {}: {e}", path.display())))?;
    let mut keys = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        keys.push(
            line.parse()
                .map_err(|e| ConfigError(format!("keys file {} line {}: {e}", path.display(), i + 1)))?,
        );
    }
    if keys.is_empty() {
        return err(format!("keys file {} has no keys", path.display()));
    }
    Ok(keys)
}

fn parse_node_id(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty() || t.len() > 128 || !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(format!("node id '{s}' must be 1 to 128 visible ASCII characters"));
    }
    Ok(t.to_string())
}

fn parse_busy_status(s: &str) -> Result<u16, String> {
    match s.trim() {
        "503" => Ok(503),
        "429" => Ok(429),
        _ => Err(format!("busy status '{s}' must be 503 or 429")),
    }
}

/// A host name for `--remote-image-hosts`: trimmed, lower-cased, without scheme, port, path or
/// spaces (the allow-list compares exact host names).
fn parse_image_host(s: &str) -> Result<String, String> {
    let t = s.trim();
    if t.is_empty()
        || t.len() > 253
        || !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'[' | b']' | b':'))
        || (t.contains(':') && !t.starts_with('['))
    {
        return Err(format!(
            "remote image host '{s}' must be a bare host name (images.example.com), without scheme, port or path"
        ));
    }
    Ok(t.to_ascii_lowercase())
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s.trim())
        .map_err(|e| format!("invalid duration '{s}': {e} (e.g. 30s, 10m, 250ms)"))
}

fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.trim().parse().map_err(|e| format!("invalid address '{s}': {e}"))
}

/// An idle time-to-live: a duration, or `off` (also `none`, `0`, empty) for none. A zero
/// duration (`0s`) also means none, so `Some` always holds a positive duration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct IdleTtl(pub Option<Duration>);

impl FromStr for IdleTtl {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" | "none" | "0" | "" => Ok(IdleTtl(None)),
            t => parse_duration(t).map(|d| IdleTtl((!d.is_zero()).then_some(d))),
        }
    }
}

/// `deserialize_with` adapters: each file field runs the parser its flag runs, so a value means
/// the same in both places and fails with the same message. (serde_with's `DisplayFromStr` would
/// cover the `FromStr` types, and humantime-serde the durations but with a vaguer message,
/// "expected a duration"; the adapters are a few lines and keep one parser per field.)
mod de {
    use std::fmt::Display;
    use std::str::FromStr;
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    fn with<'de, D, T, E>(d: D, parse: impl FnOnce(&str) -> Result<T, E>) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        E: Display,
    {
        Option::<String>::deserialize(d)?.map(|s| parse(&s).map_err(serde::de::Error::custom)).transpose()
    }

    /// Any `FromStr` type: the flag's clap parser uses the same `FromStr`.
    pub fn parsed<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
    where
        D: Deserializer<'de>,
        T: FromStr<Err: Display>,
    {
        with(d, str::parse::<T>)
    }

    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        with(d, super::parse_duration)
    }

    pub fn listen<'de, D: Deserializer<'de>>(d: D) -> Result<Option<std::net::SocketAddr>, D::Error> {
        with(d, super::parse_listen)
    }

    pub fn node_id<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        with(d, super::parse_node_id)
    }

    /// A list of host names, each checked by the flag's parser.
    pub fn hosts<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
        Option::<Vec<String>>::deserialize(d)?
            .map(|v| v.iter().map(|h| super::parse_image_host(h).map_err(serde::de::Error::custom)).collect())
            .transpose()
    }

    /// An integer (`busy_status = 429`), checked by the flag's parser.
    pub fn busy_status<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u16>, D::Error> {
        Option::<u16>::deserialize(d)?
            .map(|v| super::parse_busy_status(&v.to_string()).map_err(serde::de::Error::custom))
            .transpose()
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
    /// Eviction policy: lru, gdsf, lfu or predictive [default: lru].
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
    /// Longest a request waits in the admission queue for memory or a model slot held by
    /// in-flight requests before a 503 `queue_timeout` ("0s": refuse at once) [default: 60s].
    #[arg(long, env = "MODELPOOL_QUEUE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub queue_timeout: Option<Duration>,
    /// Requests waiting in the admission queue at once; one more gets 503 `queue_full`
    /// [default: 1024].
    #[arg(long, env = "MODELPOOL_MAX_QUEUE", value_name = "N")]
    pub max_queue: Option<usize>,
    /// Generations one MLX decoder runs together (continuous batching, one decode step for all;
    /// more wait in the model's bounded command queue; 1: one at a time) [default: 8].
    #[arg(long, env = "MODELPOOL_MAX_PARALLEL", value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub max_parallel: Option<u16>,
    /// A streaming request still waiting for its model (queued, or a load running) after this
    /// long gets its response headers at once and an SSE comment this often while it waits
    /// [default: 5s].
    #[arg(long, env = "MODELPOOL_STREAM_WAIT_NOTICE", value_name = "DURATION", value_parser = parse_duration)]
    pub stream_wait_notice: Option<Duration>,
    /// Longest wait for in-flight requests at shutdown [default: 30s].
    #[arg(long, env = "MODELPOOL_SHUTDOWN_GRACE", value_name = "DURATION", value_parser = parse_duration)]
    pub shutdown_grace: Option<Duration>,
    /// Predictive preload: while nothing waits, load the model the policy expects to be
    /// requested soonest (within --preload-horizon) into free memory and a free model slot
    /// (policy predictive; with others it does nothing).
    #[arg(long, env = "MODELPOOL_PREDICTIVE_PRELOAD")]
    pub predictive_preload: bool,
    /// How far ahead a predicted request may be for its model to be preloaded [default: 60s].
    #[arg(long, env = "MODELPOOL_PRELOAD_HORIZON", value_name = "DURATION", value_parser = parse_duration)]
    pub preload_horizon: Option<Duration>,
    /// Largest request body accepted (larger gets 413) [default: 4MiB].
    #[arg(long, env = "MODELPOOL_MAX_BODY", value_name = "SIZE")]
    pub max_body: Option<ByteSize>,
    /// JSON file where measured model sizes are remembered across restarts.
    #[arg(long, env = "MODELPOOL_SIZES_FILE", value_name = "FILE")]
    pub sizes_file: Option<PathBuf>,
    /// API key required as `Authorization: Bearer KEY` on /v1/* (repeatable; the variable takes
    /// a comma list). Admin keys are accepted there too.
    #[arg(
        long = "api-key",
        env = "MODELPOOL_API_KEY",
        value_name = "KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub api_keys: Option<Vec<ApiKey>>,
    /// Admin key required on /admin/* and /metrics (repeatable; the variable takes a comma
    /// list). With any key configured and no admin key, the admin API is closed.
    #[arg(
        long = "admin-key",
        env = "MODELPOOL_ADMIN_KEY",
        value_name = "KEY",
        value_delimiter = ',',
        hide_env_values = true
    )]
    pub admin_keys: Option<Vec<ApiKey>>,
    /// File of API keys, one a line (`#` comments); added to --api-key.
    #[arg(long, env = "MODELPOOL_API_KEYS_FILE", value_name = "FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// File of admin keys, one a line (`#` comments); added to --admin-key.
    #[arg(long, env = "MODELPOOL_ADMIN_KEYS_FILE", value_name = "FILE")]
    pub admin_keys_file: Option<PathBuf>,
    /// Serve /metrics without the admin key.
    #[arg(long, env = "MODELPOOL_PUBLIC_METRICS")]
    pub public_metrics: bool,
    /// Allow listening on a non-loopback address without both an API key and an admin key
    /// (logs a warning at start).
    #[arg(long, env = "MODELPOOL_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// A client must send a request's whole head within this, or the connection is closed
    /// [default: 10s].
    #[arg(long, env = "MODELPOOL_HEADER_READ_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub header_read_timeout: Option<Duration>,
    /// A request's body must arrive whole within this, or 408 `request_timeout` [default: 30s].
    #[arg(long, env = "MODELPOOL_BODY_READ_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub body_read_timeout: Option<Duration>,
    /// A write to a client that makes no progress this long (a client that stopped reading a
    /// stream) closes the connection and releases its model [default: 30s].
    #[arg(long, env = "MODELPOOL_WRITE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub write_timeout: Option<Duration>,
    /// Open connections at once; one more gets a 503 and is closed [default: 1024].
    #[arg(long, env = "MODELPOOL_MAX_CONNECTIONS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_connections: Option<u32>,
    /// Context length of models whose [[models]] entry gives none; a larger `max_tokens` is a
    /// 400 [default: 32768].
    #[arg(long, env = "MODELPOOL_CONTEXT_TOKENS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub context_tokens: Option<u32>,
    /// Image parts one chat request may carry; more is a 400 [default: 8].
    #[arg(long, env = "MODELPOOL_MAX_IMAGES", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub max_images: Option<u32>,
    /// Pixels (width x height) of one image, read from its header before it is decoded; more
    /// is a 400 [default: 16777216, 4096 x 4096].
    #[arg(long, env = "MODELPOOL_MAX_IMAGE_PIXELS", value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_image_pixels: Option<u64>,
    /// Encoded bytes of one image (after base64 decoding, or as fetched); more is a 400
    /// [default: 20MiB].
    #[arg(long, env = "MODELPOOL_MAX_IMAGE_BYTES", value_name = "SIZE")]
    pub max_image_bytes: Option<ByteSize>,
    /// Decoded image bytes all requests together may hold at once; a request needing more on its
    /// own is a 400, one needing what others hold waits [default: 1GiB].
    #[arg(long, env = "MODELPOOL_MAX_IMAGE_MEMORY", value_name = "SIZE")]
    pub max_image_memory: Option<ByteSize>,
    /// Fetch `http(s)` image URLs in chat requests, from the hosts of --remote-image-hosts only
    /// (off: such URLs are a 400; `file:` URLs are refused always).
    #[arg(long, env = "MODELPOOL_REMOTE_IMAGES")]
    pub remote_images: bool,
    /// Hosts remote images may come from, exact names compared case-insensitively,
    /// comma-separated (empty: every host refused, even with --remote-images).
    #[arg(long, env = "MODELPOOL_REMOTE_IMAGE_HOSTS", value_name = "HOSTS", value_delimiter = ',', value_parser = parse_image_host)]
    pub remote_image_hosts: Option<Vec<String>>,
    /// A remote image must arrive whole within this [default: 10s].
    #[arg(long, env = "MODELPOOL_REMOTE_IMAGE_TIMEOUT", value_name = "DURATION", value_parser = parse_duration)]
    pub remote_image_timeout: Option<Duration>,
    /// Fake backend: time a load takes [default: 300ms].
    #[arg(long, env = "MODELPOOL_FAKE_LOAD_TIME", value_name = "DURATION", value_parser = parse_duration)]
    pub fake_load_time: Option<Duration>,
    /// Fake backend: delay between generated tokens [default: 0ms].
    #[arg(long, env = "MODELPOOL_FAKE_TOKEN_DELAY", value_name = "DURATION", value_parser = parse_duration)]
    pub fake_token_delay: Option<Duration>,
    /// Fake backend: bytes per second a load reads after its fixed time, or `inf`
    /// [default: 10GB, or inf when --fake-load-time is 0].
    #[arg(long, env = "MODELPOOL_FAKE_LOAD_BANDWIDTH", value_name = "BYTES")]
    pub fake_load_bandwidth: Option<Bandwidth>,
    /// Fake backend: service time per prompt token, before the first generated token (and per
    /// input token of an embeddings call) [default: 0ms].
    #[arg(long, env = "MODELPOOL_FAKE_PREFILL_TIME", value_name = "DURATION", value_parser = parse_duration)]
    pub fake_prefill_time: Option<Duration>,
    /// Fake backend: time an unload takes [default: 0ms].
    #[arg(long, env = "MODELPOOL_FAKE_UNLOAD_TIME", value_name = "DURATION", value_parser = parse_duration)]
    pub fake_unload_time: Option<Duration>,
    /// Fake backend: a generation ends on its own after this many tokens unless `max_tokens`
    /// ends it first [default: 8].
    #[arg(long, env = "MODELPOOL_FAKE_NATURAL_TOKENS", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub fake_natural_tokens: Option<u32>,
    /// This node's name in the `x-modelpool-node` header of every response [default: the host
    /// name].
    #[arg(long, env = "MODELPOOL_NODE_ID", value_name = "NAME", value_parser = parse_node_id)]
    pub node_id: Option<String>,
    /// Status of refusals that waiting cures (`insufficient_memory`, `max_models_reached` with a
    /// retry hint, `model_draining`, `queue_full`, `queue_timeout`): 503, or 429 for routers
    /// that cool a node down on 429 and try another [default: 503].
    #[arg(long, env = "MODELPOOL_BUSY_STATUS", value_name = "503|429", value_parser = parse_busy_status)]
    pub busy_status: Option<u16>,
    /// Decision-log events kept for `/admin/events` (a ring: older ones are dropped)
    /// [default: 1024].
    #[arg(long, env = "MODELPOOL_EVENT_LOG", value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub event_log: Option<u32>,
}

/// The TOML file's shape, typed: every value is parsed (with its flag's parser) when the file
/// is read, so a bad value is an error naming its field and line before anything is merged.
/// Unknown keys are errors too (a typo should not be silently ignored). Each field means what
/// the [`ServeArgs`] flag of the same name means.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// See [`ServeArgs::listen`].
    #[serde(default, deserialize_with = "de::listen")]
    pub listen: Option<SocketAddr>,
    /// See [`ServeArgs::memory_limit`].
    #[serde(default, deserialize_with = "de::parsed")]
    pub memory_limit: Option<MemoryLimit>,
    /// See [`ServeArgs::max_models`].
    pub max_models: Option<u32>,
    /// See [`ServeArgs::policy`].
    #[serde(default, deserialize_with = "de::parsed")]
    pub policy: Option<PolicyKind>,
    /// See [`ServeArgs::preload`].
    pub preload: Option<Vec<String>>,
    /// See [`ServeArgs::backend`].
    pub backend: Option<BackendKind>,
    /// See [`ServeArgs::models_dir`].
    pub models_dir: Option<PathBuf>,
    /// See [`ServeArgs::log_level`].
    pub log_level: Option<String>,
    /// See [`ServeArgs::idle_ttl`].
    #[serde(default, deserialize_with = "de::parsed")]
    pub idle_ttl: Option<IdleTtl>,
    /// See [`ServeArgs::shutdown_grace`].
    #[serde(default, deserialize_with = "de::duration")]
    pub shutdown_grace: Option<Duration>,
    /// See [`ServeArgs::predictive_preload`].
    pub predictive_preload: Option<bool>,
    /// See [`ServeArgs::preload_horizon`].
    #[serde(default, deserialize_with = "de::duration")]
    pub preload_horizon: Option<Duration>,
    /// See [`ServeArgs::queue_timeout`].
    #[serde(default, deserialize_with = "de::duration")]
    pub queue_timeout: Option<Duration>,
    /// See [`ServeArgs::max_queue`].
    pub max_queue: Option<usize>,
    /// See [`ServeArgs::max_parallel`].
    pub max_parallel: Option<u16>,
    /// See [`ServeArgs::event_log`].
    pub event_log: Option<u32>,
    /// See [`ServeArgs::node_id`].
    #[serde(default, deserialize_with = "de::node_id")]
    pub node_id: Option<String>,
    /// See [`ServeArgs::busy_status`].
    #[serde(default, deserialize_with = "de::busy_status")]
    pub busy_status: Option<u16>,
    /// See [`ServeArgs::stream_wait_notice`].
    #[serde(default, deserialize_with = "de::duration")]
    pub stream_wait_notice: Option<Duration>,
    /// See [`ServeArgs::max_body`].
    pub max_body: Option<ByteSize>,
    /// See [`ServeArgs::sizes_file`].
    pub sizes_file: Option<PathBuf>,
    /// See [`ServeArgs::api_keys`]; a flag or variable replaces this list.
    pub api_keys: Option<Vec<ApiKey>>,
    /// See [`ServeArgs::admin_keys`]; a flag or variable replaces this list.
    pub admin_keys: Option<Vec<ApiKey>>,
    /// See [`ServeArgs::api_keys_file`].
    pub api_keys_file: Option<PathBuf>,
    /// See [`ServeArgs::admin_keys_file`].
    pub admin_keys_file: Option<PathBuf>,
    /// See [`ServeArgs::public_metrics`] (either one set turns it on).
    pub public_metrics: Option<bool>,
    /// See [`ServeArgs::insecure_no_auth`] (either one set turns it on).
    pub insecure_no_auth: Option<bool>,
    /// See [`ServeArgs::header_read_timeout`].
    #[serde(default, deserialize_with = "de::duration")]
    pub header_read_timeout: Option<Duration>,
    /// See [`ServeArgs::body_read_timeout`].
    #[serde(default, deserialize_with = "de::duration")]
    pub body_read_timeout: Option<Duration>,
    /// See [`ServeArgs::write_timeout`].
    #[serde(default, deserialize_with = "de::duration")]
    pub write_timeout: Option<Duration>,
    /// See [`ServeArgs::max_connections`].
    pub max_connections: Option<u32>,
    /// See [`ServeArgs::context_tokens`].
    pub context_tokens: Option<u32>,
    /// See [`ServeArgs::max_images`].
    pub max_images: Option<u32>,
    /// See [`ServeArgs::max_image_pixels`].
    pub max_image_pixels: Option<u64>,
    /// See [`ServeArgs::max_image_bytes`].
    pub max_image_bytes: Option<ByteSize>,
    /// See [`ServeArgs::max_image_memory`].
    pub max_image_memory: Option<ByteSize>,
    /// See [`ServeArgs::remote_images`] (either one set turns it on).
    pub remote_images: Option<bool>,
    /// See [`ServeArgs::remote_image_hosts`]; a flag or variable replaces this list.
    #[serde(default, deserialize_with = "de::hosts")]
    pub remote_image_hosts: Option<Vec<String>>,
    /// See [`ServeArgs::remote_image_timeout`].
    #[serde(default, deserialize_with = "de::duration")]
    pub remote_image_timeout: Option<Duration>,
    /// The `[fake]` section: fake backend settings.
    #[serde(default)]
    pub fake: FakeFileConfig,
    /// The `[[models]]` entries: the model catalogue.
    #[serde(default)]
    pub models: Vec<ModelEntry>,
}

/// The `[fake]` section.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FakeFileConfig {
    /// See [`ServeArgs::fake_load_time`].
    #[serde(default, deserialize_with = "de::duration")]
    pub load_time: Option<Duration>,
    /// See [`ServeArgs::fake_token_delay`].
    #[serde(default, deserialize_with = "de::duration")]
    pub token_delay: Option<Duration>,
    /// See [`ServeArgs::fake_load_bandwidth`].
    #[serde(default, deserialize_with = "de::parsed")]
    pub load_bandwidth: Option<Bandwidth>,
    /// See [`ServeArgs::fake_prefill_time`].
    #[serde(default, deserialize_with = "de::duration")]
    pub prefill_time: Option<Duration>,
    /// See [`ServeArgs::fake_unload_time`].
    #[serde(default, deserialize_with = "de::duration")]
    pub unload_time: Option<Duration>,
    /// See [`ServeArgs::fake_natural_tokens`].
    pub natural_tokens: Option<u32>,
}

/// One `[[models]]` entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelEntry {
    /// Public id (what clients put in `"model"`); must be non-empty and unique in the file.
    pub id: String,
    /// `text-gen` (default), `vision` or `embeddings`.
    #[serde(rename = "type", default)]
    pub model_type: ModelType,
    /// Weights on disk; must exist when the config is merged. Sizes are estimated from it.
    pub path: Option<PathBuf>,
    /// Known size (`5GB`): overrides every estimate.
    pub size: Option<ByteSize>,
    /// Context length in tokens (default `--context-tokens`): `max_tokens` above it is a 400.
    pub context: Option<u32>,
}

impl FileConfig {
    /// Parse a config file's `text` (named `src` in messages). A TOML syntax error is reported
    /// as toml writes it (with the line shown); a bad value or unknown key as
    /// `config file SRC: FIELD: PROBLEM (line N)`, FIELD being the path (`models[0].size`).
    pub fn from_toml(text: &str, src: &str) -> Result<Self, ConfigError> {
        let de =
            toml::Deserializer::parse(text).map_err(|e| ConfigError(format!("config file {src}: {e}")))?;
        serde_path_to_error::deserialize(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner();
            let line = inner.span().map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1);
            let mut msg = format!("config file {src}: ");
            if path != "." {
                msg += &format!("{path}: ");
            }
            msg += inner.message().trim_end();
            if let Some(l) = line {
                msg += &format!(" (line {l})");
            }
            ConfigError(msg)
        })
    }
}

/// Fake backend knobs: its [`TimingModel`] (the simulator's, so a fake server and a simulation
/// with the same settings are meant to agree) and when generations end.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FakeSettings {
    /// Load, service and unload times.
    pub timing: TimingModel,
    /// Tokens after which a generation stops on its own, at least 1.
    pub natural_tokens: u32,
}

/// A validated server configuration: every value parsed and in range, the catalogue non-empty
/// with unique ids, every preload in the catalogue, model paths existing. Built by
/// [`ServeConfig::resolve`] before anything binds or loads.
#[derive(Debug, Clone, PartialEq)]
#[allow(missing_docs)] // each field is the flag of the same name in [`ServeArgs`], defaulted
pub struct ServeConfig {
    pub listen: SocketAddr,
    /// Resolved against system memory when the pool starts.
    pub memory_limit: MemoryLimit,
    /// At least 1.
    pub max_models: usize,
    pub policy: PolicyKind,
    pub backend: BackendKind,
    /// Models loaded and pinned at start, every one in `models`.
    pub preload: Vec<String>,
    /// The catalogue: `[[models]]` first, then the models dir scan (ids unique).
    pub models: Vec<ModelSpec>,
    /// A valid tracing filter.
    pub log_level: String,
    /// `None`: idle models stay.
    pub idle_ttl: Option<Duration>,
    pub shutdown_grace: Duration,
    /// Predictive preload's horizon; `None`: off.
    pub predictive_preload: Option<Duration>,
    /// Zero: no queue.
    pub queue_timeout: Duration,
    pub max_queue: usize,
    /// At least 1 (MLX decoders).
    pub max_parallel: usize,
    /// Events kept by the decision log, at least 1.
    pub event_log: usize,
    /// `x-modelpool-node`: visible ASCII.
    pub node_id: String,
    /// 503 or 429.
    pub busy_status: u16,
    /// At least 10 ms.
    pub stream_wait_notice: Duration,
    /// Request body cap in bytes, at least [`MIN_MAX_BODY`].
    pub max_body: u64,
    pub sizes_file: Option<PathBuf>,
    pub fake: FakeSettings,
    /// Keys accepted on /v1/* (admin keys are too); empty with no admin key: open.
    pub api_keys: Vec<ApiKey>,
    /// Keys accepted on /admin/* (and /metrics unless `public_metrics`).
    pub admin_keys: Vec<ApiKey>,
    pub public_metrics: bool,
    /// Set: a non-loopback `listen` without keys was allowed explicitly.
    pub insecure_no_auth: bool,
    pub limits: ServerLimitsConfig,
    /// Per-model context lengths from `[[models]]` entries (others: `limits.context_tokens`).
    pub contexts: Vec<(String, u32)>,
    /// Images in chat requests: limits and remote fetching.
    pub images: ImageConfig,
}

/// How chat requests may carry images: each field is the flag of the same name in
/// [`ServeArgs`], defaulted (`DEFAULT_*`). Every limit is at least 1.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageConfig {
    /// `--max-images`: image parts per request.
    pub max_images: usize,
    /// `--max-image-pixels`: width x height per image.
    pub max_image_pixels: u64,
    /// `--max-image-bytes`: encoded bytes per image.
    pub max_image_bytes: u64,
    /// `--max-image-memory`: decoded image bytes held at once, all requests together.
    pub max_image_memory: u64,
    /// `--remote-images`: whether `http(s)` URLs are fetched at all.
    pub remote_images: bool,
    /// `--remote-image-hosts`: lower-case host names remote images may come from (empty: none).
    pub remote_image_hosts: Vec<String>,
    /// `--remote-image-timeout`: more than 0.
    pub remote_image_timeout: Duration,
}

impl Default for ImageConfig {
    /// The defaults: 8 images, 16777216 pixels and 20 MiB each, 1 GiB decoded at once, remote
    /// URLs off.
    fn default() -> Self {
        ImageConfig {
            max_images: DEFAULT_MAX_IMAGES,
            max_image_pixels: DEFAULT_MAX_IMAGE_PIXELS,
            max_image_bytes: DEFAULT_MAX_IMAGE_BYTES,
            max_image_memory: DEFAULT_MAX_IMAGE_MEMORY,
            remote_images: false,
            remote_image_hosts: Vec::new(),
            remote_image_timeout: DEFAULT_REMOTE_IMAGE_TIMEOUT,
        }
    }
}

/// The connection and request limits, each a flag with a documented default (`DEFAULT_*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs)] // each field is the flag of the same name in [`ServeArgs`], defaulted
pub struct ServerLimitsConfig {
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
    pub write_timeout: Duration,
    /// At least 1.
    pub max_connections: usize,
    /// At least 1.
    pub context_tokens: u32,
}

impl Default for ServerLimitsConfig {
    fn default() -> Self {
        ServerLimitsConfig {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            body_read_timeout: DEFAULT_BODY_READ_TIMEOUT,
            write_timeout: DEFAULT_WRITE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            context_tokens: DEFAULT_CONTEXT_TOKENS,
        }
    }
}

/// The message for a non-loopback `--listen` without keys: how to set them, or opt out.
pub fn insecure_listen_message(listen: SocketAddr) -> String {
    format!(
        "refusing to listen on {listen} (not a loopback address) without authentication: anyone who can reach it could run and unload models. \
         Set an API key and an admin key (--api-key KEY --admin-key KEY, or MODELPOOL_API_KEY / MODELPOOL_ADMIN_KEY, \
         or api_keys / admin_keys or api_keys_file / admin_keys_file in the config file), \
         or pass --insecure-no-auth to serve without them"
    )
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
                let src = path.display().to_string();
                (FileConfig::from_toml(&text, &src)?, src)
            }
            None => (FileConfig::default(), String::new()),
        };
        Self::merge(args, file, &src)
    }

    /// Merge `args` over an already-parsed `file` (named `src` in messages), then the defaults,
    /// and check what single values cannot: ranges, the catalogue, preloads.
    pub fn merge(args: &ServeArgs, file: FileConfig, src: &str) -> Result<Self, ConfigError> {
        let field = |name: &str, e: String| ConfigError(format!("config file {src}: {name}: {e}"));
        let listen = args.listen.or(file.listen).unwrap_or(DEFAULT_LISTEN);
        let memory_limit = args.memory_limit.or(file.memory_limit).unwrap_or(DEFAULT_MEMORY_LIMIT);
        // Only the file can give 0: clap refuses it for the flag.
        let max_models = args.max_models.or(file.max_models).unwrap_or(DEFAULT_MAX_MODELS);
        if max_models == 0 {
            return Err(field("max_models", "must be at least 1".into()));
        }
        let policy = args.policy.or(file.policy).unwrap_or_default();
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
        let idle_ttl = args.idle_ttl.or(file.idle_ttl).unwrap_or_default().0;
        let shutdown_grace = args.shutdown_grace.or(file.shutdown_grace).unwrap_or(DEFAULT_SHUTDOWN_GRACE);
        let predictive_preload = (args.predictive_preload || file.predictive_preload.unwrap_or(false))
            .then(|| args.preload_horizon.or(file.preload_horizon).unwrap_or(Duration::from_secs(60)));
        let queue_timeout = args.queue_timeout.or(file.queue_timeout).unwrap_or(DEFAULT_QUEUE_TIMEOUT);
        let max_queue = args.max_queue.or(file.max_queue).unwrap_or(DEFAULT_MAX_QUEUE);
        let max_parallel = match args.max_parallel.or(file.max_parallel) {
            Some(0) => return err("max_parallel must be at least 1"),
            Some(n) => usize::from(n),
            None => DEFAULT_MAX_PARALLEL,
        };
        let event_log = match args.event_log.or(file.event_log) {
            Some(0) => return err("event_log must be at least 1"),
            Some(n) => n as usize,
            None => DEFAULT_EVENT_LOG,
        };
        let stream_wait_notice = args
            .stream_wait_notice
            .or(file.stream_wait_notice)
            .unwrap_or(crate::http::DEFAULT_STREAM_WAIT_NOTICE);
        if stream_wait_notice < Duration::from_millis(10) {
            return err(format!("stream wait notice {stream_wait_notice:?} is too short (at least 10ms)"));
        }
        let max_body = args.max_body.or(file.max_body).map_or(DEFAULT_MAX_BODY, u64::from);
        if max_body < MIN_MAX_BODY {
            return err(format!("max body size {max_body} bytes is too small (at least 1KB)"));
        }
        let positive = |name: &str, d: Duration| {
            if d.is_zero() { err(format!("--{name} must be more than 0s")) } else { Ok(d) }
        };
        let limits = ServerLimitsConfig {
            header_read_timeout: positive(
                "header-read-timeout",
                args.header_read_timeout.or(file.header_read_timeout).unwrap_or(DEFAULT_HEADER_READ_TIMEOUT),
            )?,
            body_read_timeout: positive(
                "body-read-timeout",
                args.body_read_timeout.or(file.body_read_timeout).unwrap_or(DEFAULT_BODY_READ_TIMEOUT),
            )?,
            write_timeout: positive(
                "write-timeout",
                args.write_timeout.or(file.write_timeout).unwrap_or(DEFAULT_WRITE_TIMEOUT),
            )?,
            max_connections: args
                .max_connections
                .or(file.max_connections)
                .map_or(DEFAULT_MAX_CONNECTIONS, |n| n as usize),
            context_tokens: args.context_tokens.or(file.context_tokens).unwrap_or(DEFAULT_CONTEXT_TOKENS),
        };
        // Only the file can give 0: clap refuses it for the flags.
        for (name, v) in
            [("max_connections", limits.max_connections), ("context_tokens", limits.context_tokens as usize)]
        {
            if v == 0 {
                return Err(field(name, "must be at least 1".into()));
            }
        }

        let images = ImageConfig {
            max_images: args.max_images.or(file.max_images).map_or(DEFAULT_MAX_IMAGES, |n| n as usize),
            max_image_pixels: args
                .max_image_pixels
                .or(file.max_image_pixels)
                .unwrap_or(DEFAULT_MAX_IMAGE_PIXELS),
            max_image_bytes: args
                .max_image_bytes
                .or(file.max_image_bytes)
                .map_or(DEFAULT_MAX_IMAGE_BYTES, u64::from),
            max_image_memory: args
                .max_image_memory
                .or(file.max_image_memory)
                .map_or(DEFAULT_MAX_IMAGE_MEMORY, u64::from),
            remote_images: args.remote_images || file.remote_images.unwrap_or(false),
            remote_image_hosts: args
                .remote_image_hosts
                .clone()
                .or(file.remote_image_hosts)
                .unwrap_or_default(),
            remote_image_timeout: positive(
                "remote-image-timeout",
                args.remote_image_timeout
                    .or(file.remote_image_timeout)
                    .unwrap_or(DEFAULT_REMOTE_IMAGE_TIMEOUT),
            )?,
        };
        // Only the file can give 0: clap refuses it for the flags.
        for (name, v) in [
            ("max_images", images.max_images as u64),
            ("max_image_pixels", images.max_image_pixels),
            ("max_image_bytes", images.max_image_bytes),
            ("max_image_memory", images.max_image_memory),
        ] {
            if v == 0 {
                return Err(field(name, "must be at least 1".into()));
            }
        }

        // Keys: a flag or variable replaces the file's list; a keys file adds to either.
        let mut api_keys = args.api_keys.clone().or(file.api_keys).unwrap_or_default();
        if let Some(f) = args.api_keys_file.as_ref().or(file.api_keys_file.as_ref()) {
            api_keys.extend(read_keys_file(f)?);
        }
        let mut admin_keys = args.admin_keys.clone().or(file.admin_keys).unwrap_or_default();
        if let Some(f) = args.admin_keys_file.as_ref().or(file.admin_keys_file.as_ref()) {
            admin_keys.extend(read_keys_file(f)?);
        }
        let public_metrics = args.public_metrics || file.public_metrics.unwrap_or(false);
        let insecure_no_auth = args.insecure_no_auth || file.insecure_no_auth.unwrap_or(false);
        if !listen.ip().is_loopback() && (api_keys.is_empty() || admin_keys.is_empty()) && !insecure_no_auth {
            return err(insecure_listen_message(listen));
        }

        let load_time = args.fake_load_time.or(file.fake.load_time).unwrap_or(DEFAULT_FAKE_LOAD_TIME);
        let load_bandwidth = match args.fake_load_bandwidth.or(file.fake.load_bandwidth) {
            Some(Bandwidth(b)) => b,
            None if load_time.is_zero() => None,
            None => Some(DEFAULT_FAKE_LOAD_BANDWIDTH),
        };
        let natural_tokens = args.fake_natural_tokens.or(file.fake.natural_tokens).unwrap_or(8);
        if natural_tokens == 0 {
            return err("[fake] natural_tokens must be at least 1");
        }
        let fake = FakeSettings {
            timing: TimingModel {
                load_latency_secs: load_time.as_secs_f64(),
                load_bandwidth,
                unload_secs: args
                    .fake_unload_time
                    .or(file.fake.unload_time)
                    .unwrap_or_default()
                    .as_secs_f64(),
                prefill_secs_per_token: args
                    .fake_prefill_time
                    .or(file.fake.prefill_time)
                    .unwrap_or_default()
                    .as_secs_f64(),
                decode_secs_per_token: args
                    .fake_token_delay
                    .or(file.fake.token_delay)
                    .unwrap_or_default()
                    .as_secs_f64(),
            },
            natural_tokens,
        };

        // Catalogue: [[models]] first, then the directory scan for ids not already listed.
        let mut models = Vec::new();
        let mut seen = BTreeSet::new();
        let mut contexts = Vec::new();
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
            if let Some(size) = m.size {
                spec = spec.with_size(size.0);
            }
            match m.context {
                Some(0) => return Err(field(&format!("models[{i}].context"), "must be at least 1".into())),
                Some(c) => contexts.push((m.id.clone(), c)),
                None => {}
            }
            models.push(spec);
        }
        if let Some(dir) = args.models_dir.as_ref().or(file.models_dir.as_ref()) {
            if !dir.is_dir() {
                return err(format!("models dir {} is not a directory", dir.display()));
            }
            for spec in scan_models_dir(dir)? {
                if seen.insert(spec.id.to_string()) {
                    // A Hugging Face / MLX directory's own context bounds max_tokens (GGUF files
                    // and configs without one fall back to --context-tokens).
                    let decoder = spec.model_type != crate::types::ModelType::Embeddings;
                    let config =
                        spec.path.as_deref().filter(|p| decoder && p.is_dir()).map(|p| p.join("config.json"));
                    if let Some(c) = config.filter(|c| c.is_file())
                        && let Ok(v) = crate::catalog::read_config(c.parent().expect("a file in a dir"))
                        && let Some(ctx) = crate::catalog::context_of_config(&v)
                    {
                        contexts.push((spec.id.to_string(), ctx));
                    }
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
            max_models: max_models as usize,
            policy,
            backend,
            preload,
            models,
            log_level,
            idle_ttl,
            shutdown_grace,
            predictive_preload,
            queue_timeout,
            max_queue,
            max_parallel,
            event_log,
            node_id: args.node_id.clone().or(file.node_id).unwrap_or_else(crate::http::default_node_id),
            busy_status: args.busy_status.or(file.busy_status).unwrap_or(503),
            stream_wait_notice,
            max_body,
            sizes_file: args.sizes_file.clone().or(file.sizes_file),
            fake,
            api_keys,
            admin_keys,
            public_metrics,
            insecure_no_auth,
            limits,
            contexts,
            images,
        })
    }
}
