//! Prometheus metrics, rendered by hand in the text exposition format.
//!
//! Pool counters (hits, loads, evictions by reason, rejections by code) and ledger gauges are read
//! from [`PoolStatus`] at scrape time, so they cannot drift from the engine. Histograms the engine
//! does not keep are recorded here: request latency per route (by the handlers) and load seconds
//! (by [`TimedBackend`], a wrapper around the real backend).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::backend::{Backend, BackendError, CancellationToken, ModelHandle};
use crate::log::{EvictReason, RejectCode};
use crate::pool::PoolStatus;
use crate::state::Phase;
use crate::types::ModelSpec;

/// A fixed-bucket histogram with atomic counters (lock-free to record).
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// One count per bound, plus the +Inf bucket (not cumulative).
    counts: Vec<AtomicU64>,
    /// Sum in microseconds (seconds histograms) so it fits an atomic integer.
    sum_micros: AtomicU64,
}

/// Request latency buckets, seconds (50 us to 60 s).
pub const LATENCY_BUCKETS: &[f64] = &[
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
    10.0, 30.0, 60.0,
];

/// Model load buckets, seconds (10 ms to 10 min).
pub const LOAD_BUCKETS: &[f64] =
    &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0];

impl Histogram {
    /// An empty histogram over `bounds` (ascending upper bounds, seconds).
    pub fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    /// Record one observation.
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self.bounds.iter().position(|&b| secs <= b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        self.sum_micros.fetch_add(d.as_micros() as u64, Ordering::Relaxed);
    }

    /// Observations so far.
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    fn render(&self, out: &mut String, name: &str, labels: &str) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cum = 0;
        for (i, b) in self.bounds.iter().enumerate() {
            cum += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{b}\"}} {cum}");
        }
        cum += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cum}");
        let sum = self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6;
        if labels.is_empty() {
            let _ = writeln!(out, "{name}_sum {sum}\n{name}_count {cum}");
        } else {
            let _ = writeln!(out, "{name}_sum{{{labels}}} {sum}\n{name}_count{{{labels}}} {cum}");
        }
    }
}

/// The routes metrics are kept for.
pub const ROUTES: [&str; 7] =
    ["chat_completions", "completions", "embeddings", "models", "admin", "health", "metrics"];

/// Server-side metrics not kept by the engine.
#[derive(Debug)]
pub struct Metrics {
    latency: Vec<Histogram>,
    responses: Mutex<BTreeMap<(&'static str, u16), u64>>,
    load_seconds: Histogram,
    /// Time requests admitted from the admission queue waited (their whole wait for the lease).
    queue_wait: Histogram,
    load_failures: AtomicU64,
    started: Instant,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// Metrics with every counter and histogram at zero.
    pub fn new() -> Self {
        Metrics {
            latency: ROUTES.iter().map(|_| Histogram::new(LATENCY_BUCKETS)).collect(),
            responses: Mutex::new(BTreeMap::new()),
            load_seconds: Histogram::new(LOAD_BUCKETS),
            queue_wait: Histogram::new(LOAD_BUCKETS),
            load_failures: AtomicU64::new(0),
            started: Instant::now(),
        }
    }

    /// Record one finished request on `route` (one of [`ROUTES`]).
    pub fn record(&self, route: &'static str, status: u16, elapsed: Duration) {
        if let Some(i) = ROUTES.iter().position(|r| *r == route) {
            self.latency[i].observe(elapsed);
        }
        let mut m = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        *m.entry((route, status)).or_insert(0) += 1;
    }

    /// Requests recorded with `status` on `route`.
    pub fn responses(&self, route: &'static str, status: u16) -> u64 {
        let m = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        m.get(&(route, status)).copied().unwrap_or(0)
    }

    /// Record the wait of a request admitted from the admission queue.
    pub fn observe_queue_wait(&self, waited: Duration) {
        self.queue_wait.observe(waited);
    }

    /// The queue-wait histogram.
    pub fn queue_wait(&self) -> &Histogram {
        &self.queue_wait
    }

    /// The load-seconds histogram.
    pub fn load_seconds(&self) -> &Histogram {
        &self.load_seconds
    }

    /// Render everything, with pool counters and gauges from `status`.
    pub fn render(&self, status: &PoolStatus) -> String {
        let mut o = String::with_capacity(8192);
        let s = &status.stats;
        let l = &status.ledger;
        let counter = |o: &mut String, name: &str, help: &str, v: u64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        let gauge = |o: &mut String, name: &str, help: &str, v: f64| {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        counter(&mut o, "modelpool_hits_total", "Requests that found their model resident.", s.hits);
        counter(&mut o, "modelpool_joins_total", "Requests that joined a load in progress.", s.joins);
        counter(&mut o, "modelpool_loads_total", "Loads admitted.", s.loads);
        counter(&mut o, "modelpool_loads_completed_total", "Loads that finished successfully.", s.loaded);
        counter(&mut o, "modelpool_load_failures_total", "Loads that failed.", s.load_failures);
        counter(
            &mut o,
            "modelpool_preloads_cancelled_total",
            "Predictive preloads cancelled mid-load because a request needed their room.",
            s.preloads_cancelled,
        );
        counter(
            &mut o,
            "modelpool_bytes_loaded_total",
            "Bytes measured over successful loads.",
            s.bytes_loaded,
        );

        let _ = writeln!(
            o,
            "# HELP modelpool_evictions_total Models evicted, by reason.\n# TYPE modelpool_evictions_total counter"
        );
        for r in EvictReason::ALL {
            let _ =
                writeln!(o, "modelpool_evictions_total{{reason=\"{}\"}} {}", r.as_str(), s.evictions_for(r));
        }
        let _ = writeln!(
            o,
            "# HELP modelpool_rejections_total Admissions refused, by code.\n# TYPE modelpool_rejections_total counter"
        );
        for c in RejectCode::ALL {
            let _ =
                writeln!(o, "modelpool_rejections_total{{code=\"{}\"}} {}", c.as_str(), s.rejections_for(c));
        }

        gauge(&mut o, "modelpool_memory_limit_bytes", "Memory limit.", l.limit as f64);
        gauge(&mut o, "modelpool_resident_bytes", "Bytes of resident models (measured).", l.resident as f64);
        gauge(&mut o, "modelpool_reserved_bytes", "Bytes reserved by loads in progress.", l.reserved as f64);
        gauge(
            &mut o,
            "modelpool_draining_bytes",
            "Bytes of evicted models not yet returned.",
            l.draining as f64,
        );
        gauge(
            &mut o,
            "modelpool_pinned_bytes",
            "Bytes of pinned models (part of resident).",
            l.pinned as f64,
        );
        gauge(
            &mut o,
            "modelpool_peak_used_bytes",
            "Highest resident+reserved+draining seen.",
            s.peak_used as f64,
        );
        counter(&mut o, "modelpool_queued_total", "Requests that waited in the admission queue.", s.queued);
        counter(
            &mut o,
            "modelpool_dequeued_total",
            "Requests admitted from the admission queue.",
            s.dequeued,
        );
        gauge(
            &mut o,
            "modelpool_queue_length",
            "Requests waiting in the admission queue now.",
            status.models.iter().map(|m| m.queued as f64).sum(),
        );
        gauge(
            &mut o,
            "modelpool_queue_peak_length",
            "Longest the admission queue has been.",
            s.peak_queue as f64,
        );
        gauge(
            &mut o,
            "modelpool_kv_bytes",
            "Bytes held by requests' KV caches (prompt + max new tokens each).",
            l.kv as f64,
        );
        gauge(&mut o, "modelpool_kv_peak_bytes", "Highest KV cache bytes held at once.", s.peak_kv as f64);
        let _ = writeln!(
            o,
            "# HELP modelpool_queue_wait_seconds Wait of requests admitted from the admission queue (timeouts are modelpool_rejections_total{{code=\"queue_timeout\"}}).\n# TYPE modelpool_queue_wait_seconds histogram"
        );
        self.queue_wait.render(&mut o, "modelpool_queue_wait_seconds", "");
        gauge(&mut o, "modelpool_models_loaded", "Models resident or loading.", l.models as f64);
        gauge(&mut o, "modelpool_max_models", "Maximum models resident or loading.", l.max_models as f64);
        gauge(
            &mut o,
            "modelpool_shutting_down",
            "1 while the server drains for shutdown.",
            if status.shutting_down { 1.0 } else { 0.0 },
        );
        gauge(
            &mut o,
            "modelpool_uptime_seconds",
            "Seconds since the server started.",
            self.started.elapsed().as_secs_f64(),
        );

        self.render_endpoint_picker(&mut o, status);

        let _ = writeln!(
            o,
            "# HELP modelpool_model_leases Requests in flight per model.\n# TYPE modelpool_model_leases gauge"
        );
        for m in &status.models {
            let _ = writeln!(o, "modelpool_model_leases{{model=\"{}\"}} {}", escape(&m.id), m.leases);
        }
        let _ = writeln!(
            o,
            "# HELP modelpool_model_bytes Bytes counted in the ledger per model (0 when absent).\n# TYPE modelpool_model_bytes gauge"
        );
        for m in &status.models {
            let _ = writeln!(o, "modelpool_model_bytes{{model=\"{}\"}} {}", escape(&m.id), m.ledger_bytes);
        }
        let _ = writeln!(
            o,
            "# HELP modelpool_model_kv_bytes KV cache bytes held by each model's requests.\n# TYPE modelpool_model_kv_bytes gauge"
        );
        for m in &status.models {
            let _ = writeln!(o, "modelpool_model_kv_bytes{{model=\"{}\"}} {}", escape(&m.id), m.kv_bytes);
        }

        let serving: Vec<_> =
            status.models.iter().filter_map(|m| Some((escape(&m.id), m.serving?))).collect();
        type Field = fn(&crate::types::ServingStatus) -> u64;
        let per_model: [(&str, &str, Field); 4] = [
            (
                "modelpool_backend_running",
                "Requests the backend serves at once on each model now (a decoder's batch).",
                |s| s.running,
            ),
            (
                "modelpool_backend_waiting",
                "Requests waiting in each model's own bounded queue beyond its max_parallel.",
                |s| s.waiting,
            ),
            ("modelpool_backend_max_parallel", "Most requests each model serves at once.", |s| {
                s.max_parallel
            }),
            (
                "modelpool_backend_kv_cache_bytes",
                "Bytes each model's KV caches hold now (allocated, live or free).",
                |s| s.kv_cache_bytes,
            ),
        ];
        for (name, help, value) in per_model {
            let _ = writeln!(o, "# HELP {name} {help}\n# TYPE {name} gauge");
            for (id, s) in &serving {
                let _ = writeln!(o, "{name}{{model=\"{id}\"}} {}", value(s));
            }
        }

        let _ = writeln!(
            o,
            "# HELP modelpool_load_seconds Backend load duration, successful loads.\n# TYPE modelpool_load_seconds histogram"
        );
        self.load_seconds.render(&mut o, "modelpool_load_seconds", "");
        counter(
            &mut o,
            "modelpool_backend_load_errors_total",
            "Backend load calls that returned an error.",
            self.load_failures.load(Ordering::Relaxed),
        );

        let _ = writeln!(
            o,
            "# HELP modelpool_request_duration_seconds Time from request to the end of the response body, by route.\n# TYPE modelpool_request_duration_seconds histogram"
        );
        for (i, r) in ROUTES.iter().enumerate() {
            self.latency[i].render(&mut o, "modelpool_request_duration_seconds", &format!("route=\"{r}\""));
        }
        let _ = writeln!(
            o,
            "# HELP modelpool_http_responses_total Responses by route and status.\n# TYPE modelpool_http_responses_total counter"
        );
        let m = self.responses.lock().unwrap_or_else(|p| p.into_inner());
        for ((route, status), n) in m.iter() {
            let _ =
                writeln!(o, "modelpool_http_responses_total{{route=\"{route}\",status=\"{status}\"}} {n}");
        }
        o
    }
}

impl Metrics {
    /// The Gateway API Inference Extension's model-server protocol (docs/server.md, "Behind a
    /// router"): waiting and running requests, the share of memory that cannot be freed now
    /// (pinned or busy models, loads in progress, draining models, KV caches; an idle resident
    /// model is not counted, since admitting another model may evict it), and the resident and
    /// loading models in the label form of the protocol's adapter info gauge (its value is the
    /// time of this scrape, Unix seconds, as the protocol asks).
    fn render_endpoint_picker(&self, o: &mut String, status: &PoolStatus) {
        let l = &status.ledger;
        let waiting: u64 = status.models.iter().map(|m| u64::from(m.queued) + u64::from(m.waiters)).sum();
        let running: u64 = status.models.iter().map(|m| u64::from(m.leases)).sum();
        let busy_resident: u64 = status
            .models
            .iter()
            .filter(|m| m.phase == Phase::Resident && (m.pinned || m.leases > 0))
            .map(|m| m.ledger_bytes)
            .sum();
        let fixed = busy_resident + l.reserved + l.draining + l.kv;
        let usage = if l.limit == 0 { 0.0 } else { (fixed as f64 / l.limit as f64).min(1.0) };
        let names = |phase: Phase| {
            status
                .models
                .iter()
                .filter(|m| m.phase == phase)
                .map(|m| escape(&m.id))
                .collect::<Vec<_>>()
                .join(",")
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        let _ = writeln!(
            o,
            "# HELP modelpool_num_requests_waiting Requests waiting for a model (admission queue and loads in progress).\n# TYPE modelpool_num_requests_waiting gauge\nmodelpool_num_requests_waiting {waiting}"
        );
        let _ = writeln!(
            o,
            "# HELP modelpool_num_requests_running Requests holding a model now.\n# TYPE modelpool_num_requests_running gauge\nmodelpool_num_requests_running {running}"
        );
        let _ = writeln!(
            o,
            "# HELP modelpool_memory_usage_perc Share (0-1) of the memory limit that cannot be freed now: pinned or busy models, loads, draining models, KV caches.\n# TYPE modelpool_memory_usage_perc gauge\nmodelpool_memory_usage_perc {usage}"
        );
        let _ = writeln!(
            o,
            "# HELP modelpool_models_info Resident (running_lora_adapters) and loading (waiting_lora_adapters) models, max_lora = max models; value: scrape time.\n# TYPE modelpool_models_info gauge\nmodelpool_models_info{{running_lora_adapters=\"{}\",waiting_lora_adapters=\"{}\",max_lora=\"{}\"}} {now}",
            names(Phase::Resident),
            names(Phase::Loading),
            l.max_models
        );
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

/// Wraps a backend to time every load into [`Metrics::load_seconds`].
pub struct TimedBackend {
    inner: Arc<dyn Backend>,
    metrics: Arc<Metrics>,
}

impl TimedBackend {
    /// Time `inner`'s loads into `metrics`.
    pub fn new(inner: Arc<dyn Backend>, metrics: Arc<Metrics>) -> Self {
        TimedBackend { inner, metrics }
    }
}

#[async_trait]
impl Backend for TimedBackend {
    fn name(&self) -> &'static str {
        self.inner.name()
    }

    fn timing(&self) -> Option<crate::timing::TimingModel> {
        self.inner.timing()
    }

    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn ModelHandle>, BackendError> {
        self.load_cancellable(spec, CancellationToken::new()).await
    }

    /// The inner backend's, timed; a cancelled load is neither a load time nor a failure.
    async fn load_cancellable(
        &self,
        spec: &ModelSpec,
        cancel: CancellationToken,
    ) -> Result<Arc<dyn ModelHandle>, BackendError> {
        let t = Instant::now();
        let r = self.inner.load_cancellable(spec, cancel).await;
        match &r {
            Ok(_) => self.metrics.load_seconds.observe(t.elapsed()),
            Err(BackendError::Cancelled) => {}
            Err(_) => {
                self.metrics.load_failures.fetch_add(1, Ordering::Relaxed);
            }
        }
        r
    }
}
