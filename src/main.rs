//! `modelpool`: the server binary. `modelpool serve --help` lists every flag; each is also an
//! environment variable `MODELPOOL_*`, and may come from a TOML file given with `--config`.

use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

use modelpool::backend::Backend;
use modelpool::backend::fake::FakeBackend;
use modelpool::config::{BackendKind, ServeArgs, ServeConfig};
use modelpool::http::{AppState, Auth, Metrics, TimedBackend};
use modelpool::{FileEstimator, Learned, ModelPool, PoolConfig, SizeEstimator, SysinfoMemory, SystemMemory};

#[derive(Debug, Parser)]
#[command(
    name = "modelpool",
    version,
    about = "Keeps several ML models hot in one process, evicts by policy under a memory limit, serves them over an OpenAI-compatible API"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Serve the OpenAI-compatible API and the admin API.
    Serve(ServeArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.cmd {
        Cmd::Serve(args) => {
            let cfg = match ServeConfig::resolve(&args) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("modelpool: {e}");
                    return ExitCode::from(2);
                }
            };
            init_tracing(&cfg.log_level);
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("modelpool: cannot start the async runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            match rt.block_on(serve(cfg)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("modelpool: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn init_tracing(filter: &str) {
    // The filter was validated by ServeConfig::resolve.
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn build_backend(cfg: &ServeConfig) -> anyhow::Result<Arc<dyn Backend>> {
    match cfg.backend {
        BackendKind::Fake => Ok(Arc::new(
            FakeBackend::new().with_timing(cfg.fake.timing).with_natural_tokens(cfg.fake.natural_tokens),
        )),
        #[cfg(feature = "mlx")]
        BackendKind::Mlx => {
            let opts = modelpool::backend::mlx::MlxOptions {
                max_batch: cfg.max_parallel,
                ..modelpool::backend::mlx::MlxOptions::default()
            };
            Ok(Arc::new(modelpool::backend::mlx::MlxBackend::new(opts)))
        }
        // ServeConfig already refuses mlx in a build without the feature.
        #[cfg(not(feature = "mlx"))]
        BackendKind::Mlx => anyhow::bail!(modelpool::config::MLX_MISSING),
    }
}

async fn serve(cfg: ServeConfig) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new());
    let backend: Arc<dyn Backend> = Arc::new(TimedBackend::new(build_backend(&cfg)?, metrics.clone()));
    let total = SysinfoMemory.total_bytes();
    let limit = cfg.memory_limit.resolve(&SysinfoMemory);
    let mut pc = PoolConfig::with_limit(limit);
    pc.max_models = cfg.max_models;
    pc.idle_ttl = cfg.idle_ttl.map(|d| d.as_nanos() as u64);
    pc.queue_timeout = cfg.queue_timeout.as_nanos() as u64;
    pc.max_queue = cfg.max_queue;
    pc.log = modelpool::LogMode::Ring(cfg.event_log);
    if cfg.backend == BackendKind::Fake {
        // The fake backend's own timings are the pool's prior for load costs and retry hints, as
        // a simulation with the same timing model assumes.
        pc.load_latency_secs = cfg.fake.timing.load_latency_secs;
        pc.load_bandwidth = cfg.fake.timing.load_bandwidth.unwrap_or(f64::INFINITY);
        pc.service_ns_per_token = cfg.fake.timing.service_prior_ns_per_token();
    }
    // The MLX backend holds GGUF weights dequantized (about 5.5x the file on CPU): size its
    // models from their tensor tables, not from file sizes.
    let files: Box<dyn SizeEstimator> = match cfg.backend {
        #[cfg(feature = "mlx")]
        BackendKind::Mlx => Box::new(modelpool::catalog::MlxFileEstimator::new(
            modelpool::backend::mlx::MlxOptions::default().dequantize,
        )),
        _ => Box::new(FileEstimator::default()),
    };
    let estimator: Box<dyn SizeEstimator> = match &cfg.sizes_file {
        Some(f) => Box::new(Learned::with_file(files, f).context("--sizes-file")?),
        None => Box::new(Learned::new(files)),
    };
    let pool: ModelPool = ModelPool::new(pc, cfg.policy.build(), estimator, backend);
    pool.set_predictive_preload(cfg.predictive_preload);
    for spec in &cfg.models {
        pool.register(spec.clone());
    }

    let listener = tokio::net::TcpListener::bind(cfg.listen)
        .await
        .with_context(|| format!("cannot listen on {}", cfg.listen))?;
    let addr = listener.local_addr().context("listener address")?;
    tracing::info!(
        backend = cfg.backend.as_str(),
        policy = %cfg.policy,
        memory_limit = %cfg.memory_limit,
        limit_bytes = limit,
        system_bytes = total,
        max_models = cfg.max_models,
        models = cfg.models.len(),
        "modelpool starting"
    );
    for m in pool.status().models {
        tracing::info!(model = %m.id, model_type = %m.model_type, estimate_bytes = m.estimate.bytes, source = %m.estimate.source, "model registered");
    }
    for id in &cfg.preload {
        pool.preload(id).await.with_context(|| format!("--preload {id}"))?;
        tracing::info!(model = %id, "preloaded and pinned");
    }
    if let Some(ttl) = cfg.idle_ttl {
        let pool = pool.clone();
        let every = (ttl / 4).clamp(Duration::from_secs(1), Duration::from_secs(60));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if pool.is_shutting_down() {
                    break;
                }
                for m in pool.expire_idle().await {
                    tracing::info!(model = %m, "evicted after idle ttl");
                }
            }
        });
    }
    let auth = Auth::new(&cfg.api_keys, &cfg.admin_keys, cfg.public_metrics);
    if cfg.insecure_no_auth && (cfg.api_keys.is_empty() || cfg.admin_keys.is_empty()) {
        tracing::warn!(
            listen = %cfg.listen,
            api_keys = cfg.api_keys.len(),
            admin_keys = cfg.admin_keys.len(),
            "--insecure-no-auth: routes without a key are open to anyone who can reach this address"
        );
    }
    tracing::info!(
        api_keys = cfg.api_keys.len(),
        admin_keys = cfg.admin_keys.len(),
        public_metrics = cfg.public_metrics,
        header_read_timeout = ?cfg.limits.header_read_timeout,
        body_read_timeout = ?cfg.limits.body_read_timeout,
        write_timeout = ?cfg.limits.write_timeout,
        max_connections = cfg.limits.max_connections,
        context_tokens = cfg.limits.context_tokens,
        "access and limits"
    );
    let state = AppState::new(pool, metrics)
        .with_max_body(cfg.max_body)
        .with_auth(auth)
        .with_limits(cfg.limits)
        .with_images(cfg.images.clone())
        .with_contexts(cfg.contexts.iter().cloned())
        .with_stream_wait_notice(cfg.stream_wait_notice)
        .with_node_id(&cfg.node_id)
        .with_busy_status(
            warp::http::StatusCode::from_u16(cfg.busy_status).expect("503 or 429, checked by ServeConfig"),
        );
    let shutdown = shutdown_signal()?;
    // Printed on stdout too, so scripts can wait for it and read the port (e.g. with :0).
    println!("modelpool listening on http://{addr}");
    tracing::info!(%addr, "listening");
    let live = modelpool::http::serve(listener, state, shutdown, cfg.shutdown_grace).await;
    if live > 0 {
        tracing::warn!(live, "stopped with requests still in flight");
    }
    tracing::info!("stopped");
    Ok(())
}

/// The shutdown trigger: SIGINT or SIGTERM. The handlers are installed when this is called (before
/// the server announces itself), so a signal sent right after start is never missed.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    #[cfg(unix)]
    let (mut term, mut int) = {
        use tokio::signal::unix::{SignalKind, signal};
        (
            signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        )
    };
    Ok(async move {
        #[cfg(unix)]
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            tracing::info!("Ctrl-C received");
        }
    })
}
