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
    /// Generate a seeded synthetic trace (CSV).
    Gen(GenArgs),
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
}

#[derive(Args)]
struct ReplayArgs {
    /// Trace file (CSV or JSONL).
    trace: PathBuf,
    /// Memory limit (`24GB`, `16GiB`, `512MB`).
    #[arg(long, env = "MODELPOOL_SIM_MEMORY_LIMIT", default_value = "24GB")]
    memory_limit: String,
    /// Eviction policy: lru, gdsf, lfu, belady (offline), belady-cost (offline).
    #[arg(long, env = "MODELPOOL_SIM_POLICY", default_value = "lru")]
    policy: PolicyChoice,
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
    #[arg(long, default_value = "lru,gdsf,lfu,belady,belady-cost", value_delimiter = ',')]
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
struct GenArgs {
    /// Seed of the ChaCha8 stream.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Requests to generate.
    #[arg(long, default_value_t = 5000)]
    requests: u64,
    /// Distinct models (24 in the catalogue; more become fine-tuned variants).
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
        Cmd::Gen(a) => gen_cmd(a),
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

fn replay(a: ReplayArgs) -> Result<()> {
    let limit = parse_bytes(&a.memory_limit, "--memory-limit")?;
    let log = if a.events.is_some() { LogMode::Decisions } else { LogMode::Off };
    let cfg = sim_config(&a.sim, limit, a.policy, log)?;
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
        let mut w =
            BufWriter::new(File::create(path).with_context(|| format!("creating {}", path.display()))?);
        for e in &out.events {
            serde_json::to_writer(&mut w, e)?;
            w.write_all(b"\n")?;
        }
        w.flush()?;
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
