//! `modelpool-sim`: replay traces through modelpool's decision core, sweep limits and policies,
//! generate synthetic traces. See `docs/sim.md`.

use std::fs::File;
use std::io::{BufWriter, IsTerminal, Write};
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use modelpool::log::LogMode;
use modelpool::{MemoryLimit, ModelSpec, NameEstimator, SizeEstimator};
use modelpool_sim::fleet::{
    ClientModel, FleetConfig, FleetReport, NodeSpec, PooledBound, RouterKind, jitter_arrivals,
    litellm_config, place, pooled_bound, run_fleet, search_placement,
};
use modelpool_sim::generate::{Arrivals, GenConfig, generate};
use modelpool_sim::sweep::{Target, auto_limits, parse_limits, sweep};
use modelpool_sim::{PolicyChoice, SimConfig, Trace, run};

#[derive(Parser)]
#[command(
    name = "modelpool-sim",
    version,
    about = "Replay request traces through modelpool's own decision core: choose a memory limit and an eviction policy before deploying"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Replay a trace and print the report.
    Replay(ReplayArgs),
    /// Replay a trace under many memory limits and policies; write a CSV and an SVG chart.
    Sweep(SweepArgs),
    /// Replay a trace once per admission-queue timeout: 503s, latency, waits and loads side by
    /// side, to choose `--queue-timeout`.
    QueueSweep(QueueSweepArgs),
    /// Generate a seeded synthetic trace (CSV).
    Gen(GenArgs),
    /// Send a trace to a running server over its HTTP API (OpenAI routes for requests, the
    /// admin API for admin operations) at the trace's times; with --compare, also replay it in
    /// the simulator with the server's own configuration and print predicted against observed.
    Drive(DriveArgs),
    /// Write the `modelpool serve --config` file of a fake server holding a trace's models
    /// under these settings (what `drive --compare` is meant to predict exactly).
    ServerConfig(ServerConfigArgs),
    /// Move a trace's arrivals apart until no two events of different causes are closer than
    /// a margin, so a real server (with its jitter) decides exactly what the simulator predicts.
    Space(SpaceArgs),
    /// Write a trace's requests in libCacheSim's binary `oracleGeneral` format (sizes in the
    /// models' common unit, next uses for Belady); print what a comparison needs as JSON.
    ExportLibcachesim(ExportArgs),
    /// Replay a trace on a fleet of nodes behind a router (LiteLLM's, hashing, residency-aware,
    /// a placement computed from the trace) with LiteLLM's client retries; compare the routers
    /// with the pooled bound (one node with the fleet's memory).
    Fleet(FleetArgs),
    /// Replay a trace on fleets of several sizes and answer: how many nodes of what memory
    /// meet a failure-rate and p99 target, for each router.
    FleetSweep(FleetSweepArgs),
    /// Parse a trace, print its shape and the parse throughput.
    Check {
        /// Trace file (CSV or JSONL).
        trace: PathBuf,
    },
}

#[derive(Args, Clone)]
struct SimArgs {
    /// Maximum models loaded at once.
    #[arg(long, env = "MODELPOOL_SIM_MAX_MODELS", default_value_t = 4)]
    max_models: usize,
    /// Fixed part of a model load, seconds.
    #[arg(long, env = "MODELPOOL_SIM_LOAD_LATENCY", default_value_t = 0.5)]
    load_latency: f64,
    /// Load bandwidth per second (`3.2GB`, `800MB`, or `inf`).
    #[arg(long, env = "MODELPOOL_SIM_LOAD_BANDWIDTH", default_value = "3.2GB")]
    load_bandwidth: String,
    /// Seconds to unload a model (victims unload before the load that needs the room).
    #[arg(long, env = "MODELPOOL_SIM_UNLOAD_SECS", default_value_t = 0.0)]
    unload_secs: f64,
    /// Service milliseconds per input token.
    #[arg(long, env = "MODELPOOL_SIM_PREFILL_MS", default_value_t = 0.2)]
    prefill_ms: f64,
    /// Service milliseconds per output token.
    #[arg(long, env = "MODELPOOL_SIM_DECODE_MS", default_value_t = 20.0)]
    decode_ms: f64,
    /// Instant loads, unloads and service (a plain cache simulation; overrides the timings).
    #[arg(long)]
    instant: bool,
    /// The estimator sees model names only; trace sizes become the measured truth.
    #[arg(long)]
    estimate_from_names: bool,
    /// For models without a trace size: measured size = estimate x this factor.
    #[arg(long, default_value_t = 1.0)]
    measured_factor: f64,
    /// Retry a request refused with a retry hint up to this many times (after the hint).
    #[arg(long, default_value_t = 0)]
    retries: u32,
    /// Probability that a load fails (seeded).
    #[arg(long, default_value_t = 0.0)]
    load_failure_rate: f64,
    /// Seed of the replay's RNG (injected failures).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Keep-alive: evict unpinned models idle this many seconds after their last request.
    #[arg(long, env = "MODELPOOL_SIM_IDLE_TTL")]
    idle_ttl: Option<f64>,
    /// Seconds a request may wait in the admission queue for memory or a model slot held by
    /// in-flight work (0: refuse at once, no queue).
    #[arg(long, env = "MODELPOOL_SIM_QUEUE_TIMEOUT", default_value_t = modelpool_sim::config::DEFAULT_QUEUE_TIMEOUT_SECS)]
    queue_timeout: f64,
    /// Requests waiting at once; one more is refused with queue_full.
    #[arg(long, env = "MODELPOOL_SIM_MAX_QUEUE", default_value_t = 1024)]
    max_queue: usize,
    /// Count each request's KV cache ((input + output tokens) x the model's KV bytes per token)
    /// in the ledger, as the server does (`false`: weights only).
    #[arg(long, env = "MODELPOOL_SIM_KV_CACHE", default_value_t = true, action = clap::ArgAction::Set)]
    kv_cache: bool,
    /// Predictive preload: while nothing waits, load the model the policy expects soonest
    /// (within --preload-horizon) into free memory and a free model slot (policy predictive).
    #[arg(long)]
    predictive_preload: bool,
    /// How far ahead a predicted request may be for its model to be preloaded, seconds.
    #[arg(long, default_value_t = 60.0)]
    preload_horizon: f64,
}

/// The limit and policy of a single-configuration run (replay, queue-sweep).
#[derive(Args)]
struct OneRunArgs {
    /// Memory limit (`24GB`, `16GiB`, `512MB`).
    #[arg(long, env = "MODELPOOL_SIM_MEMORY_LIMIT", default_value = "24GB")]
    memory_limit: String,
    /// Eviction policy: lru, gdsf, lfu, predictive, belady (offline), belady-cost (offline).
    #[arg(long, env = "MODELPOOL_SIM_POLICY", default_value = "lru")]
    policy: PolicyChoice,
}

#[derive(Args)]
struct QueueSweepArgs {
    /// Trace file (CSV or JSONL).
    trace: PathBuf,
    /// Queue timeouts to compare, seconds (0: no queue).
    #[arg(long, default_value = "0,5,15,30,60,120", value_delimiter = ',')]
    timeouts: Vec<f64>,
    #[command(flatten)]
    one: OneRunArgs,
    #[command(flatten)]
    sim: SimArgs,
    /// Print the rows as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ReplayArgs {
    /// Trace file (CSV or JSONL).
    trace: PathBuf,
    #[command(flatten)]
    one: OneRunArgs,
    #[command(flatten)]
    sim: SimArgs,
    /// Print the report as JSON (no timing line).
    #[arg(long)]
    json: bool,
    /// Write every decision (loads, evictions, rejections...) as JSON lines to this file.
    #[arg(long)]
    events: Option<PathBuf>,
    /// Replay this many times and report the fastest (for the timing line; results are identical).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    repeat: u32,
}

#[derive(Args)]
struct SweepArgs {
    /// Trace file (CSV or JSONL).
    trace: PathBuf,
    /// Limits: `8GB,16GB,24GB` or `8GB..64GB:15`. Default: 12 limits from the largest model
    /// to the sum of the `max-models` largest.
    #[arg(long)]
    limits: Option<String>,
    /// Policies to compare (comma-separated).
    #[arg(long, default_value = "lru,gdsf,lfu,predictive,belady,belady-cost", value_delimiter = ',')]
    policies: Vec<PolicyChoice>,
    #[command(flatten)]
    sim: SimArgs,
    /// Target: highest acceptable 503 rate, percent.
    #[arg(long, default_value_t = 0.1)]
    target_503_pct: f64,
    /// Target: highest acceptable p99 added latency, seconds.
    #[arg(long, default_value_t = 2.0)]
    target_p99: f64,
    /// Write one CSV row per (limit, policy) here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Write the SVG chart here.
    #[arg(long)]
    svg: Option<PathBuf>,
    /// Replays to run in parallel.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// Print the sweep as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DriveArgs {
    /// Trace file (CSV or JSONL).
    trace: PathBuf,
    /// The server's base URL.
    #[arg(long, env = "MODELPOOL_URL", default_value = "http://127.0.0.1:8080")]
    url: String,
    /// Trace seconds per real second (2: twice as fast; decisions then need twice the margin).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Requests open at once; later arrivals wait (and are reported late).
    #[arg(long, default_value_t = 256)]
    max_in_flight: usize,
    /// API key for /v1/* (Authorization: Bearer).
    #[arg(long, env = "MODELPOOL_API_KEY")]
    api_key: Option<String>,
    /// Admin key for /admin/*.
    #[arg(long, env = "MODELPOOL_ADMIN_KEY")]
    admin_key: Option<String>,
    /// Stream chat completions (time to first byte = the first SSE chunk).
    #[arg(long)]
    stream: bool,
    /// Abandon a request after this many seconds.
    #[arg(long, default_value_t = 600.0)]
    request_timeout: f64,
    /// Also replay the trace in the simulator with the server's configuration (from
    /// /admin/pool) and print predicted against observed.
    #[arg(long)]
    compare: bool,
    /// With --compare: exit with status 1 unless the decision logs are equal and every request's
    /// outcome agrees.
    #[arg(long)]
    expect_exact: bool,
    /// With --compare, for a real backend: service seconds per generated token the simulation
    /// assumes (the fake backend reports its own).
    #[arg(long, default_value_t = 0.02)]
    decode_secs: f64,
    /// With --compare, for a real backend: service seconds per prompt token.
    #[arg(long, default_value_t = 0.0002)]
    prefill_secs: f64,
    /// With --compare: the timing model to predict with (JSON, as --calibrate-out writes it)
    /// instead of the server's own (a real backend has none).
    #[arg(long)]
    timing: Option<PathBuf>,
    /// Fit a timing model to what this run measured (load times per byte from /admin/pool,
    /// service per token from each request's time minus its wait) and write it here (JSON).
    #[arg(long)]
    calibrate_out: Option<PathBuf>,
    /// The URL is a router (a LiteLLM proxy): send requests only, read no admin API (the nodes'
    /// counters are read from the nodes themselves).
    #[arg(long)]
    no_admin: bool,
    /// Write one JSON line per operation (status, outcome, code, Retry-After, waits, times).
    #[arg(long)]
    records: Option<PathBuf>,
    /// Unload every model the server holds before the run (the simulation starts empty).
    #[arg(long)]
    unload_first: bool,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

/// What a fleet run shares with `replay` besides the trace: node settings and client model.
#[derive(Args)]
struct FleetCommon {
    /// Eviction policy of every node: lru, gdsf, lfu.
    #[arg(long, default_value = "lru")]
    policy: PolicyChoice,
    /// Seconds a residency-aware router keeps a node's polled view (`/admin/residency`).
    #[arg(long, default_value_t = 1.0)]
    view_ttl: f64,
    /// Client retries after a failed attempt (LiteLLM `num_retries`).
    #[arg(long, default_value_t = 2)]
    client_retries: u32,
    /// Failures of a deployment per minute before it cools down (LiteLLM `allowed_fails`).
    #[arg(long, default_value_t = 3)]
    allowed_fails: u32,
    /// Cooldown of a failed deployment without Retry-After, seconds (LiteLLM `cooldown_time`).
    #[arg(long, default_value_t = 5.0)]
    cooldown: f64,
    /// The client does not retry a refusal marked `x-should-retry: false` (the official OpenAI
    /// clients; LiteLLM retries it).
    #[arg(long)]
    honour_should_retry: bool,
    /// Nodes answer busy refusals with 429 (`modelpool serve --busy-status 429`).
    #[arg(long)]
    busy_429: bool,
    /// Rounds of local search that improve the trace's placement with the simulator (0: the
    /// greedy placement alone).
    #[arg(long, default_value_t = 2)]
    search_passes: u32,
    #[command(flatten)]
    sim: SimArgs,
}

#[derive(Args)]
struct FleetArgs {
    /// Trace file (CSV or JSONL).
    trace: PathBuf,
    /// Number of nodes (when --node-memory gives one size).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Memory of each node (`64GB`), or one per node (`64GB,32GB,32GB`).
    #[arg(long, default_value = "64GB", value_delimiter = ',')]
    node_memory: Vec<String>,
    /// Router: random (LiteLLM's default), least-busy, hash, residency, placement, or all.
    #[arg(long, default_value = "all")]
    router: String,
    #[command(flatten)]
    common: FleetCommon,
    /// Delay each arrival by a seeded random amount below this many milliseconds (--seed): the
    /// latency a real client and router add; run several seeds for a prediction's spread.
    #[arg(long, default_value_t = 0.0)]
    arrival_jitter_ms: f64,
    /// Write the LiteLLM proxy config of the computed placement here (YAML).
    #[arg(long)]
    emit_litellm_config: Option<PathBuf>,
    /// Nodes' base URLs for --emit-litellm-config, in node order.
    #[arg(long, value_delimiter = ',')]
    node_urls: Vec<String>,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct FleetSweepArgs {
    /// Trace file (CSV or JSONL).
    trace: PathBuf,
    /// Node counts to try.
    #[arg(long, default_value = "1,2,3,4,6", value_delimiter = ',')]
    nodes: Vec<usize>,
    /// Node memory sizes to try.
    #[arg(long, default_value = "16GB,24GB,32GB,64GB", value_delimiter = ',')]
    node_memory: Vec<String>,
    /// Routers to try.
    #[arg(long, default_value = "random,hash,residency,placement", value_delimiter = ',')]
    routers: Vec<modelpool_sim::fleet::RouterKind>,
    /// Target: at most this share of requests failing at clients (0.01 = 1%).
    #[arg(long, default_value_t = 0.01)]
    max_failed: f64,
    /// Target: p99 added latency at most this many seconds.
    #[arg(long, default_value_t = 10.0)]
    max_p99: f64,
    #[command(flatten)]
    common: FleetCommon,
    /// Print JSON instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct ServerConfigArgs {
    /// Trace file (CSV or JSONL).
    trace: PathBuf,
    #[command(flatten)]
    one: OneRunArgs,
    #[command(flatten)]
    sim: SimArgs,
    /// Decision-log events the server keeps (enough for the whole run, for --compare).
    #[arg(long, default_value_t = 100_000)]
    event_log: usize,
    /// Output file (default: standard output).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

#[derive(Args)]
struct SpaceArgs {
    /// Trace file (CSV or JSONL).
    trace: PathBuf,
    /// Smallest time between two events of different causes, seconds of trace time.
    #[arg(long, default_value_t = 0.05)]
    margin: f64,
    /// Give up after this many moves.
    #[arg(long, default_value_t = 100_000)]
    max_moves: usize,
    #[command(flatten)]
    one: OneRunArgs,
    #[command(flatten)]
    sim: SimArgs,
    /// Output file (default: standard output).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

#[derive(Args)]
struct ExportArgs {
    /// Trace file (CSV or JSONL), requests only, every model with a size.
    trace: PathBuf,
    /// Output file (`.oracleGeneral`).
    #[arg(short, long)]
    output: PathBuf,
    /// Cache size to report, as a fraction of the working set (bytes of the distinct models).
    #[arg(long, default_value_t = 0.25)]
    cache_fraction: f64,
}

#[derive(Args)]
struct GenArgs {
    /// Seed of the ChaCha8 stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Requests to generate.
    #[arg(long, default_value_t = 5000)]
    requests: u64,
    /// Distinct models (30 in the catalogue; more become fine-tuned variants).
    #[arg(long, default_value_t = 12)]
    models: usize,
    /// Zipf exponent of model popularity.
    #[arg(long, default_value_t = 1.0)]
    zipf: f64,
    /// Mean requests per second.
    #[arg(long, default_value_t = 2.0)]
    rate: f64,
    /// Arrival process: poisson, gamma:SHAPE, onoff:ON_SECS:OFF_SECS.
    #[arg(long, default_value = "poisson")]
    arrivals: Arrivals,
    /// Diurnal amplitude in [0, 1).
    #[arg(long, default_value_t = 0.0)]
    diurnal: f64,
    /// Diurnal period, seconds.
    #[arg(long, default_value_t = 86400.0)]
    period: f64,
    /// Probability a request goes to the previous request's model.
    #[arg(long, default_value_t = 0.0)]
    sticky: f64,
    /// Preload and pin this model at time 0 (repeatable).
    #[arg(long)]
    pin: Vec<String>,
    /// Structured mode: mean requests per user session (0: off). Sessions overlap, each on
    /// one model.
    #[arg(long, default_value_t = 0.0)]
    sessions: f64,
    /// Structured mode: mean think time between a session's requests, seconds.
    #[arg(long, default_value_t = 30.0)]
    think: f64,
    /// Structured mode: periodic per-model jobs (period 300..3600 s, bursts of 1-4 requests).
    #[arg(long, default_value_t = 0)]
    jobs: usize,
    /// Structured mode: a seeded diurnal phase per model.
    #[arg(long)]
    phase: bool,
    /// Output file (default: standard output).
    #[arg(short, long)]
    output: Option<PathBuf>,
}

fn parse_bytes(s: &str, what: &str) -> Result<u64> {
    match s.parse::<MemoryLimit>() {
        Ok(MemoryLimit::Bytes(b)) => Ok(b),
        Ok(MemoryLimit::Fraction(_)) => {
            bail!("{what} '{s}': the simulator needs absolute bytes (e.g. 24GB), not a fraction")
        }
        Err(e) => Err(anyhow::anyhow!("{what}: {e}")),
    }
}

fn sim_config(a: &SimArgs, limit: u64, policy: PolicyChoice, log: LogMode) -> Result<SimConfig> {
    let bandwidth = if a.load_bandwidth.trim().eq_ignore_ascii_case("inf") {
        f64::INFINITY
    } else {
        parse_bytes(&a.load_bandwidth, "--load-bandwidth")? as f64
    };
    let mut cfg = SimConfig {
        limit,
        max_models: a.max_models,
        policy,
        load_latency_secs: a.load_latency,
        load_bandwidth: bandwidth,
        unload_secs: a.unload_secs,
        prefill_secs_per_token: a.prefill_ms / 1e3,
        decode_secs_per_token: a.decode_ms / 1e3,
        estimate_from_names: a.estimate_from_names,
        measured_factor: a.measured_factor,
        retries: a.retries,
        load_failure_rate: a.load_failure_rate,
        seed: a.seed,
        idle_ttl_secs: a.idle_ttl,
        queue_timeout_secs: a.queue_timeout,
        max_queue: a.max_queue,
        kv_cache: a.kv_cache,
        preload_horizon_secs: a.predictive_preload.then_some(a.preload_horizon),
        model_timing: Default::default(),
        log,
    };
    if a.instant {
        cfg = cfg.with_instant_timing();
    }
    cfg.validate().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

fn load_trace(path: &std::path::Path) -> Result<(Trace, f64)> {
    let t0 = Instant::now();
    let trace = Trace::from_path(path)?;
    Ok((trace, t0.elapsed().as_secs_f64()))
}

fn main() -> std::process::ExitCode {
    match real_main() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            // One clear line (with its causes), no backtrace: bad input is not a crash.
            eprintln!("modelpool-sim: {e:#}");
            std::process::ExitCode::from(2)
        }
    }
}

fn real_main() -> Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Replay(a) => replay(a),
        Cmd::Sweep(a) => sweep_cmd(a),
        Cmd::QueueSweep(a) => queue_sweep_cmd(a),
        Cmd::Gen(a) => gen_cmd(a),
        Cmd::Drive(a) => drive_cmd(a),
        Cmd::ServerConfig(a) => server_config_cmd(a),
        Cmd::Space(a) => space_cmd(a),
        Cmd::ExportLibcachesim(a) => export_cmd(a),
        Cmd::Fleet(a) => fleet_cmd(a),
        Cmd::FleetSweep(a) => fleet_sweep_cmd(a),
        Cmd::Check { trace } => {
            let bytes = std::fs::metadata(&trace).with_context(|| format!("{}", trace.display()))?.len();
            let (t, secs) = load_trace(&trace)?;
            println!(
                "{}: {} operations ({} requests) over {} models, {:.1} s of trace",
                trace.display(),
                t.ops.len(),
                t.requests(),
                t.models.len(),
                t.duration() as f64 / 1e9
            );
            println!(
                "parsed {:.1} MB in {:.3} s: {:.0} MB/s, {:.1} M lines/s",
                bytes as f64 / 1e6,
                secs,
                bytes as f64 / 1e6 / secs,
                t.ops.len() as f64 / 1e6 / secs
            );
            Ok(())
        }
    }
}

/// Write `items` to `path`, one JSON object a line.
fn write_jsonl<T: serde::Serialize>(path: &std::path::Path, items: &[T]) -> Result<()> {
    let mut w = BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
    for item in items {
        serde_json::to_writer(&mut w, item)?;
        w.write_all(b"\n")?;
    }
    w.flush()?;
    Ok(())
}

fn drive_cmd(a: DriveArgs) -> Result<()> {
    use modelpool_sim::drive::{self, DriveOptions};
    let (trace, _) = load_trace(&a.trace)?;
    let opts = DriveOptions {
        url: a.url.clone(),
        speed: a.speed,
        max_in_flight: a.max_in_flight,
        api_key: a.api_key.clone(),
        admin_key: a.admin_key.clone(),
        stream: a.stream,
        request_timeout: std::time::Duration::from_secs_f64(a.request_timeout.max(0.001)),
        no_admin: a.no_admin,
        unload_first: a.unload_first,
    };
    if a.no_admin && (a.compare || a.calibrate_out.is_some()) {
        bail!("--compare and --calibrate-out read the node's admin API: not with --no-admin");
    }
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().context("starting tokio")?;
    if a.unload_first {
        rt.block_on(drive::unload_all(&opts))?;
    }
    let problems = if a.compare {
        let pool = rt.block_on(drive::server_state(&opts))?;
        drive::preconditions(&trace, &pool)
    } else {
        Vec::new()
    };
    if a.compare {
        for p in &problems {
            eprintln!("modelpool-sim drive: warning: {p}");
        }
    }
    let obs = rt.block_on(drive::drive(&trace, &opts))?;
    if let Some(path) = &a.records {
        write_jsonl(path, &obs.records)?;
    }
    if let Some(path) = &a.calibrate_out {
        let c = drive::calibrate(&trace, &obs)?;
        std::fs::write(path, serde_json::to_string_pretty(&c)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
        let t = &c.timing;
        eprintln!(
            "modelpool-sim drive: calibrated: loads {:.3} s + bytes at {}, prefill {:.3} ms/token, decode {:.2} ms/token, {} models with their own timings -> {}",
            t.load_latency_secs,
            t.load_bandwidth.map(|b| format!("{:.2} GB/s", b / 1e9)).unwrap_or_else(|| "inf".into()),
            t.prefill_secs_per_token * 1e3,
            t.decode_secs_per_token * 1e3,
            c.models.len(),
            path.display()
        );
    }
    if !a.compare {
        if a.json {
            println!("{}", serde_json::to_string_pretty(&drive::observed_side(&trace, &obs))?);
        } else {
            print!("{}", drive::render_observed(&trace, &obs));
        }
        return Ok(());
    }
    let base = SimConfig {
        decode_secs_per_token: a.decode_secs,
        prefill_secs_per_token: a.prefill_secs,
        ..SimConfig::default()
    };
    let mut cfg = drive::sim_config_for(&obs.before, &base)?;
    if let Some(path) = &a.timing {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let c: modelpool_sim::Calibration =
            serde_json::from_str(&text).with_context(|| format!("{}: not a timing model", path.display()))?;
        c.validate().map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        cfg = cfg.with_calibration(&c);
    }
    let trace = drive::with_server_sizes(&trace, &obs.after);
    let cmp = drive::compare(&trace, a.speed, &cfg, &obs)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&cmp)?);
    } else {
        let late = obs.records.iter().map(|r| r.late_secs).fold(0.0, f64::max);
        println!(
            "modelpool-sim drive {} --speed {} against {} ({} backend): {} operations in {:.1} s, latest send {:.1} ms late",
            a.trace.display(),
            a.speed,
            a.url,
            obs.before["backend"].as_str().unwrap_or("?"),
            obs.records.len(),
            obs.wall_secs,
            late * 1e3
        );
        if let Ok(Some(g)) = modelpool_sim::space::decision_gap(&drive::at_speed(&trace, a.speed), &cfg) {
            println!(
                "closest events of different causes in the prediction at this speed: {:.1} ms (the margin for the server's jitter)",
                g.gap as f64 / 1e6,
            );
        }
        println!();
        print!("{}", drive::render_comparison(&cmp));
    }
    if a.expect_exact && !(cmp.decisions_equal && cmp.agree == cmp.compared && problems.is_empty()) {
        bail!(
            "the server did not decide exactly as predicted ({} of {} outcomes agree, decision logs {})",
            cmp.agree,
            cmp.compared,
            if cmp.decisions_equal { "equal" } else { "differ" }
        );
    }
    Ok(())
}

fn server_config_cmd(a: ServerConfigArgs) -> Result<()> {
    let limit = parse_bytes(&a.one.memory_limit, "--memory-limit")?;
    let cfg = sim_config(&a.sim, limit, a.one.policy, LogMode::Off)?;
    if cfg.policy.is_offline() {
        bail!("--policy {}: a server runs online policies only (lru, gdsf, lfu, predictive)", cfg.policy);
    }
    let (trace, _) = load_trace(&a.trace)?;
    let text = modelpool_sim::drive::server_config(&trace, &cfg, a.event_log);
    match &a.output {
        Some(p) => std::fs::write(p, text).with_context(|| format!("writing {}", p.display()))?,
        None => print!("{text}"),
    }
    Ok(())
}

fn space_cmd(a: SpaceArgs) -> Result<()> {
    let limit = parse_bytes(&a.one.memory_limit, "--memory-limit")?;
    let cfg = sim_config(&a.sim, limit, a.one.policy, LogMode::Off)?;
    let (trace, _) = load_trace(&a.trace)?;
    if !(a.margin.is_finite() && a.margin > 0.0) {
        bail!("--margin must be > 0 seconds");
    }
    let margin = (a.margin * 1e9).round() as u64;
    let spaced =
        modelpool_sim::space::space(&trace, &cfg, margin, a.max_moves).map_err(anyhow::Error::msg)?;
    let gap = spaced.gap.map(|g| g.gap as f64 / 1e6).unwrap_or(f64::INFINITY);
    let comments = vec![
        format!(
            "spaced by: modelpool-sim space {} --margin {} ({} moves; closest events of different causes {:.1} ms apart)",
            a.trace.display(),
            a.margin,
            spaced.moves,
            gap
        ),
        "format: docs/sim.md (time in seconds; size_bytes on a model's first line)".to_string(),
    ];
    match &a.output {
        Some(p) => {
            let f = File::create(p).with_context(|| format!("creating {}", p.display()))?;
            spaced.trace.write_csv(BufWriter::new(f), &comments)?;
        }
        None => spaced.trace.write_csv(std::io::stdout().lock(), &comments)?,
    }
    eprintln!("modelpool-sim space: {} moves, closest events {:.1} ms apart", spaced.moves, gap);
    Ok(())
}

fn replay(a: ReplayArgs) -> Result<()> {
    let limit = parse_bytes(&a.one.memory_limit, "--memory-limit")?;
    let log = if a.events.is_some() { LogMode::Decisions } else { LogMode::Off };
    let cfg = sim_config(&a.sim, limit, a.one.policy, log)?;
    let (trace, parse_secs) = load_trace(&a.trace)?;
    let mut replay_secs = f64::INFINITY;
    let mut out = None;
    for _ in 0..a.repeat {
        let t0 = Instant::now();
        let o = run(&trace, &cfg).map_err(anyhow::Error::msg)?;
        replay_secs = replay_secs.min(t0.elapsed().as_secs_f64());
        out = Some(o);
    }
    let out = out.expect("at least one replay");
    if let Some(path) = &a.events {
        write_jsonl(path, &out.events)?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out.report)?);
        return Ok(());
    }
    println!("modelpool-sim replay {}", a.trace.display());
    print!("{}", out.report.to_text());
    println!();
    println!(
        "timing: parsed in {:.3} s; replayed {} requests in {:.3} s ({:.2} M requests/s{})",
        parse_secs,
        out.report.requests,
        replay_secs,
        out.report.requests as f64 / replay_secs.max(1e-9) / 1e6,
        if a.repeat > 1 { format!(", fastest of {}", a.repeat) } else { String::new() }
    );
    Ok(())
}

fn queue_sweep_cmd(a: QueueSweepArgs) -> Result<()> {
    let limit = parse_bytes(&a.one.memory_limit, "--memory-limit")?;
    if let Some(t) = a.timeouts.iter().find(|t| !(t.is_finite() && **t >= 0.0)) {
        bail!("--timeouts: {t} is not a number of seconds >= 0");
    }
    let base = sim_config(&a.sim, limit, a.one.policy, LogMode::Off)?;
    let (trace, _) = load_trace(&a.trace)?;
    let rows = modelpool_sim::sweep::queue_sweep(&trace, &base, &a.timeouts).map_err(anyhow::Error::msg)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        println!(
            "modelpool-sim queue-sweep {} (memory limit {}, max models {}, policy {}, retries {})",
            a.trace.display(),
            modelpool_sim::report::fmt_bytes(limit),
            base.max_models,
            base.policy,
            base.retries
        );
        print!("{}", modelpool_sim::sweep::queue_table(&rows));
    }
    Ok(())
}

fn sweep_cmd(a: SweepArgs) -> Result<()> {
    let base = sim_config(&a.sim, 1, PolicyChoice::LRU, LogMode::Off)?;
    let (trace, _) = load_trace(&a.trace)?;
    let limits = match &a.limits {
        Some(s) => parse_limits(s).map_err(anyhow::Error::msg)?,
        None => {
            let est = NameEstimator;
            auto_limits(&trace, base.max_models, 12, |i| {
                let m = &trace.models[i];
                m.size.unwrap_or_else(|| {
                    est.estimate(&ModelSpec::new(m.id.clone()).with_type(m.model_type)).bytes
                })
            })
        }
    };
    if !(a.target_503_pct.is_finite() && (0.0..=100.0).contains(&a.target_503_pct)) {
        bail!("--target-503-pct must be a percentage in [0, 100]");
    }
    if !(a.target_p99.is_finite() && a.target_p99 >= 0.0) {
        bail!("--target-p99 must be a number of seconds >= 0");
    }
    let target = Target { max_503_rate: a.target_503_pct / 100.0, max_p99_secs: a.target_p99 };
    let total = (limits.len() * a.policies.len()) as u64;
    let pb = if std::io::stderr().is_terminal() {
        let pb = ProgressBar::new(total);
        pb.set_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} replays, {elapsed} (eta {eta})")
                .expect("valid template"),
        );
        pb
    } else {
        ProgressBar::hidden()
    };
    let t0 = Instant::now();
    let s = sweep(&trace, &base, &limits, &a.policies, target, a.jobs, &|| pb.inc(1))
        .map_err(anyhow::Error::msg)?;
    pb.finish_and_clear();
    let secs = t0.elapsed().as_secs_f64();
    if let Some(p) = &a.csv {
        std::fs::write(p, s.to_csv()).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &a.svg {
        let title =
            format!("{}: {} requests, {} models", a.trace.display(), trace.requests(), trace.models.len());
        std::fs::write(p, s.to_svg(&title)).with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    println!(
        "modelpool-sim sweep {}: {} limits x {} policies",
        a.trace.display(),
        s.limits.len(),
        s.policies.len()
    );
    print!("{}", s.to_text());
    for (what, p) in [("csv", &a.csv), ("chart", &a.svg)] {
        if let Some(p) = p {
            println!("{what}: {}", p.display());
        }
    }
    let reqs = trace.requests() * total;
    println!(
        "timing: {} replays in {:.2} s ({:.2} M requests/s)",
        total,
        secs,
        reqs as f64 / secs.max(1e-9) / 1e6
    );
    Ok(())
}

/// The JSON `export-libcachesim` prints: the export's numbers and the cache size both sides use.
#[derive(serde::Serialize)]
struct ExportSummary {
    #[serde(flatten)]
    export: modelpool_sim::trace::OracleExport,
    /// The fraction of the working set asked for.
    cache_fraction: f64,
    /// Cache size for libCacheSim, in the file's size units.
    cache_units: u64,
    /// The same cache in bytes (`cache_units x unit_bytes`): modelpool's `--memory-limit`.
    cache_bytes: u64,
}

fn export_cmd(a: ExportArgs) -> Result<()> {
    if !(a.cache_fraction > 0.0 && a.cache_fraction <= 1.0) {
        bail!("--cache-fraction {} is not in (0, 1]", a.cache_fraction);
    }
    let (trace, _) = load_trace(&a.trace)?;
    let f = File::create(&a.output).with_context(|| format!("creating {}", a.output.display()))?;
    let export = trace
        .write_oracle_general(BufWriter::with_capacity(1 << 20, f))
        .with_context(|| format!("{}", a.trace.display()))?;
    let cache_units =
        ((export.working_set_bytes / export.unit_bytes) as f64 * a.cache_fraction).floor() as u64;
    let summary = ExportSummary {
        export,
        cache_fraction: a.cache_fraction,
        cache_units,
        cache_bytes: cache_units * export.unit_bytes,
    };
    println!("{}", serde_json::to_string(&summary)?);
    Ok(())
}

fn gen_cmd(a: GenArgs) -> Result<()> {
    let cfg = GenConfig {
        seed: a.seed,
        requests: a.requests,
        models: a.models,
        zipf: a.zipf,
        rate: a.rate,
        arrivals: a.arrivals,
        diurnal: a.diurnal,
        period: a.period,
        sticky: a.sticky,
        pin: a.pin.clone(),
        sessions: a.sessions,
        think: a.think,
        jobs: a.jobs,
        phase: a.phase,
    };
    let trace = generate(&cfg)?;
    let mut cmd = format!(
        "modelpool-sim gen --seed {} --requests {} --models {} --zipf {} --rate {} --arrivals {} --diurnal {} --period {} --sticky {}",
        cfg.seed,
        cfg.requests,
        cfg.models,
        cfg.zipf,
        cfg.rate,
        cfg.arrivals,
        cfg.diurnal,
        cfg.period,
        cfg.sticky
    );
    for p in &cfg.pin {
        cmd.push_str(&format!(" --pin {p}"));
    }
    if cfg.sessions > 0.0 || cfg.jobs > 0 || cfg.phase {
        cmd.push_str(&format!(" --sessions {} --think {} --jobs {}", cfg.sessions, cfg.think, cfg.jobs));
        if cfg.phase {
            cmd.push_str(" --phase");
        }
    }
    let comments = vec![
        format!("generated by: {cmd}"),
        "format: docs/sim.md (time in seconds; size_bytes on a model's first line)".to_string(),
    ];
    match &a.output {
        Some(p) => {
            let f = File::create(p).with_context(|| format!("creating {}", p.display()))?;
            trace.write_csv(BufWriter::with_capacity(1 << 20, f), &comments)?;
        }
        None => {
            let out = std::io::stdout().lock();
            trace.write_csv(BufWriter::with_capacity(1 << 20, out), &comments)?;
        }
    }
    Ok(())
}

/// A fleet of `n` nodes of `bytes` each (ids `node-0`...).
fn fleet_nodes(sizes: &[u64], max_models: usize) -> Vec<NodeSpec> {
    sizes
        .iter()
        .enumerate()
        .map(|(k, &limit)| NodeSpec { id: format!("node-{k}"), limit, max_models })
        .collect()
}

fn fleet_config(c: &FleetCommon, nodes: Vec<NodeSpec>, router: RouterKind) -> Result<FleetConfig> {
    if c.sim.retries != 0 {
        bail!("in fleet mode the client retries: use --client-retries, not --retries");
    }
    let node = sim_config(&c.sim, nodes[0].limit, c.policy, LogMode::Off)?;
    let cfg = FleetConfig {
        nodes,
        router,
        node,
        client: ClientModel {
            retries: c.client_retries,
            allowed_fails: c.allowed_fails,
            cooldown_secs: c.cooldown,
            honour_should_retry: c.honour_should_retry,
            busy_429: c.busy_429,
        },
        view_ttl_secs: c.view_ttl,
        seed: c.sim.seed,
    };
    cfg.validate().map_err(anyhow::Error::msg)?;
    Ok(cfg)
}

#[derive(serde::Serialize)]
struct FleetOutput {
    placement: Vec<(String, Vec<String>)>,
    routers: Vec<FleetReport>,
    pooled: PooledBound,
}

fn fleet_cmd(a: FleetArgs) -> Result<()> {
    let sizes: Vec<u64> =
        a.node_memory.iter().map(|s| parse_bytes(s, "--node-memory")).collect::<Result<_>>()?;
    let sizes = match sizes.as_slice() {
        [one] => vec![*one; a.nodes],
        many => many.to_vec(),
    };
    if sizes.is_empty() || a.nodes == 0 {
        bail!("--nodes must be at least 1");
    }
    let routers: Vec<RouterKind> = if a.router == "all" {
        RouterKind::ALL.to_vec()
    } else {
        vec![a.router.parse().map_err(anyhow::Error::msg)?]
    };
    let nodes = fleet_nodes(&sizes, a.common.sim.max_models);
    let (trace, _) = load_trace(&a.trace)?;
    if !(a.arrival_jitter_ms.is_finite() && a.arrival_jitter_ms >= 0.0) {
        bail!("--arrival-jitter-ms must be a finite number >= 0");
    }
    let trace = jitter_arrivals(&trace, (a.arrival_jitter_ms * 1e6).round() as u64, a.common.sim.seed);
    let placement = search_placement(
        &trace,
        &fleet_config(&a.common, nodes.clone(), RouterKind::Placement)?,
        place(&trace, &nodes),
        a.common.search_passes,
    )
    .map_err(anyhow::Error::msg)?;
    if let Some(path) = &a.emit_litellm_config {
        let urls: Vec<String> = if a.node_urls.is_empty() {
            (0..nodes.len()).map(|k| format!("http://node-{k}:8080")).collect()
        } else if a.node_urls.len() == nodes.len() {
            a.node_urls.clone()
        } else {
            bail!("--node-urls gives {} URLs for {} nodes", a.node_urls.len(), nodes.len());
        };
        let cfg = fleet_config(&a.common, nodes.clone(), RouterKind::Placement)?;
        std::fs::write(path, litellm_config(&trace, &placement, &urls, &cfg.client))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let mut reports = Vec::new();
    for &r in &routers {
        let cfg = fleet_config(&a.common, nodes.clone(), r)?;
        reports.push(run_fleet(&trace, &cfg, Some(&placement)).map_err(anyhow::Error::msg)?);
    }
    let pooled = pooled_bound(&trace, &fleet_config(&a.common, nodes.clone(), RouterKind::Residency)?)
        .map_err(anyhow::Error::msg)?;
    let named: Vec<(String, Vec<String>)> = trace
        .models
        .iter()
        .zip(&placement.nodes_of)
        .map(|(m, ks)| (m.id.to_string(), ks.iter().map(|&k| nodes[k].id.clone()).collect()))
        .collect();
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&FleetOutput { placement: named, routers: reports, pooled })?
        );
        return Ok(());
    }
    let gb = |b: u64| b as f64 / 1e9;
    println!(
        "modelpool-sim fleet {}: {} requests, {} models; {} nodes ({}), policy {}, client retries {}",
        a.trace.display(),
        trace.requests(),
        trace.models.len(),
        nodes.len(),
        sizes.iter().map(|&b| format!("{:.0} GB", gb(b))).collect::<Vec<_>>().join(" + "),
        a.common.policy,
        a.common.client_retries
    );
    println!("{}", FleetReport::header());
    for r in &reports {
        println!("{}", r.row());
    }
    println!("{}", pooled.row());
    println!(
        "(miss: requests not served from a resident model; refusals: attempts nodes refused; failed: requests \
         failing at clients after retries; avoidable: of those, some node could have admitted them; dup GB: \
         mean bytes of extra copies; models: mean distinct models held; pooled: one node of {:.0} GB)",
        gb(pooled.limit_bytes)
    );
    if routers.len() == 1 {
        println!(
            "\nper node:\n{:<10} {:>8} {:>8} {:>8} {:>7} {:>9} {:>8} {:>9}",
            "node", "GB", "requests", "hits", "loads", "evictions", "refused", "mean GB"
        );
        for n in &reports[0].per_node {
            println!(
                "{:<10} {:>8.1} {:>8} {:>8} {:>7} {:>9} {:>8} {:>9.1}",
                n.node,
                gb(n.limit_bytes),
                n.requests,
                n.hits,
                n.loads,
                n.evictions,
                n.refused,
                gb(n.mean_used_bytes)
            );
        }
    }
    println!("\nplacement (router `placement`, --emit-litellm-config):");
    for (m, ks) in &named {
        println!("  {m}: {}", ks.join(", "));
    }
    Ok(())
}

#[derive(serde::Serialize)]
struct FleetSweepRow {
    nodes: usize,
    node_bytes: u64,
    total_bytes: u64,
    router: RouterKind,
    miss_ratio: f64,
    failed_share: f64,
    latency_p99: f64,
    meets: bool,
}

fn fleet_sweep_cmd(a: FleetSweepArgs) -> Result<()> {
    let sizes: Vec<u64> =
        a.node_memory.iter().map(|s| parse_bytes(s, "--node-memory")).collect::<Result<_>>()?;
    if a.nodes.contains(&0) {
        bail!("--nodes: every count must be at least 1");
    }
    let (trace, _) = load_trace(&a.trace)?;
    let requests = trace.requests().max(1) as f64;
    let mut rows = Vec::new();
    for &n in &a.nodes {
        for &b in &sizes {
            let nodes = fleet_nodes(&vec![b; n], a.common.sim.max_models);
            let greedy = place(&trace, &nodes);
            let placement = if a.routers.contains(&RouterKind::Placement) {
                let cfg = fleet_config(&a.common, nodes.clone(), RouterKind::Placement)?;
                search_placement(&trace, &cfg, greedy, a.common.search_passes).map_err(anyhow::Error::msg)?
            } else {
                greedy
            };
            for &r in &a.routers {
                let cfg = fleet_config(&a.common, nodes.clone(), r)?;
                let rep = run_fleet(&trace, &cfg, Some(&placement)).map_err(anyhow::Error::msg)?;
                let failed_share = rep.client_failed as f64 / requests;
                rows.push(FleetSweepRow {
                    nodes: n,
                    node_bytes: b,
                    total_bytes: b * n as u64,
                    router: r,
                    miss_ratio: rep.miss_ratio,
                    failed_share,
                    latency_p99: rep.latency_p99,
                    meets: failed_share <= a.max_failed && rep.latency_p99 <= a.max_p99,
                });
            }
        }
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "modelpool-sim fleet-sweep {}: target failed <= {:.2}%, p99 <= {} s",
        a.trace.display(),
        a.max_failed * 100.0,
        a.max_p99
    );
    println!(
        "{:>5} {:>8} {:>9} {:<11} {:>8} {:>8} {:>8} {:>5}",
        "nodes", "node GB", "total GB", "router", "miss", "failed", "p99 s", "meets"
    );
    for r in &rows {
        println!(
            "{:>5} {:>8.0} {:>9.0} {:<11} {:>7.2}% {:>7.2}% {:>8.2} {:>5}",
            r.nodes,
            r.node_bytes as f64 / 1e9,
            r.total_bytes as f64 / 1e9,
            r.router.as_str(),
            r.miss_ratio * 100.0,
            r.failed_share * 100.0,
            r.latency_p99,
            if r.meets { "yes" } else { "no" }
        );
    }
    println!();
    for &router in &a.routers {
        let best =
            rows.iter().filter(|r| r.router == router && r.meets).min_by_key(|r| (r.total_bytes, r.nodes));
        match best {
            Some(r) => println!(
                "{:<11} smallest fleet meeting the target: {} x {:.0} GB ({:.0} GB in all)",
                router.as_str(),
                r.nodes,
                r.node_bytes as f64 / 1e9,
                r.total_bytes as f64 / 1e9
            ),
            None => println!("{:<11} no fleet tried meets the target", router.as_str()),
        }
    }
    Ok(())
}
