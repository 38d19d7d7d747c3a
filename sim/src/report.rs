//! The replay report: what a user reads (text) and what tools read (`--json`).
//!
//! Ratios are rounded to 6 decimals and seconds to the microsecond so reports compare equal
//! across runs and read well in snapshot diffs. Wall-clock timing is not part of a report.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use hdrhistogram::Histogram;
use modelpool::{EvictReason, Ledger, Nanos, RejectCode, Stats};
use serde::Serialize;

use crate::config::SimConfig;
use crate::trace::{NS, Trace};

/// Per-model counters kept by the replay (the engine keeps hits and loads itself).
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ModelCounters {
    pub requests: u64,
    /// First attempts that found the model resident.
    pub hits: u64,
    /// Requests finally refused.
    pub rejected: u64,
    /// Requests whose load failed.
    pub failed: u64,
    /// Times its memory came back (after an eviction or unload).
    pub unloads: u64,
}

/// Totals kept by the replay.
#[derive(Debug, Clone, Default)]
pub(crate) struct Totals {
    pub requests: u64,
    pub hits: u64,
    pub cold_loads: u64,
    pub joined: u64,
    pub served: u64,
    pub dropped: u64,
    pub failed: u64,
    pub retried: u64,
    /// Requests whose first attempt got a 503.
    pub first_503: u64,
    /// 503 responses by code (every attempt).
    pub rejections: [u64; RejectCode::ALL.len()],
    pub preloads: u64,
    pub admin_ops: u64,
    pub admin_refused: u64,
    /// Requests that waited in the admission queue.
    pub queued: u64,
    /// Exact sum and maximum of added latency, ns (quantiles come from the histogram).
    pub latency_sum: u128,
    pub latency_max: Nanos,
    pub mem_area: u128,
    /// Integral of the KV column over time (bytes x ns).
    pub kv_area: u128,
    pub end: Nanos,
    /// Predictive preloads (`None` when off).
    pub predicted: Option<PreloadSummary>,
    /// Retry hints against actual waits.
    pub hints: HintTotals,
}

/// Accumulates retry hints against the waits they predicted.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct HintTotals {
    pub with_hint: u64,
    pub resolved: u64,
    pub too_short: u64,
    pub over_1s: u64,
    pub err_sum: i128,
    pub max_over: Nanos,
    pub max_short: Nanos,
}

impl HintTotals {
    /// A refusal with hint `hint` ns whose request became admissible after `waited` ns.
    pub fn resolve(&mut self, hint: Nanos, waited: Nanos) {
        self.resolved += 1;
        self.err_sum += i128::from(hint) - i128::from(waited);
        if waited > hint {
            self.too_short += 1;
            self.max_short = self.max_short.max(waited - hint);
        } else {
            self.max_over = self.max_over.max(hint - waited);
            if hint - waited > NS {
                self.over_1s += 1;
            }
        }
    }
}

/// Retry hints (`Retry-After` of refusals) against the time the same request would actually
/// have been admitted (the first event after which the engine's dry run admits it).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RetryHints {
    /// Refusals that carried a hint.
    pub with_hint: u64,
    /// Of which the request became admissible before the replay ended (at most 4096 are
    /// followed at once).
    pub resolved: u64,
    /// Of those, a retry at the hint would have been early (the wait was longer).
    pub too_short: u64,
    /// Of those, the hint was more than a second longer than the wait (hints are whole
    /// seconds, so up to one second over is rounding).
    pub over_by_more_than_1s: u64,
    /// Mean of hint minus wait, seconds.
    pub mean_error_secs: f64,
    /// Largest hint minus wait, seconds.
    pub max_over_secs: f64,
    /// Largest wait minus hint, seconds.
    pub max_short_secs: f64,
}

/// Round to 6 decimals.
pub fn r6(x: f64) -> f64 {
    if x.is_finite() { (x * 1e6).round() / 1e6 } else { x }
}

/// Everything a replay measured. See `docs/sim.md` for each field's definition.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    /// The configuration replayed.
    pub config: ConfigSummary,
    /// The trace's shape.
    pub trace: TraceSummary,
    /// Requests in the trace.
    pub requests: u64,
    /// Requests whose first attempt found their model resident.
    pub hits: u64,
    /// Loads started by requests (cold starts).
    pub cold_loads: u64,
    /// Requests that waited for a load another request (or a preload) started.
    pub joined: u64,
    /// Requests served (hit, joined or loaded, possibly after retries).
    pub served: u64,
    /// Requests finally refused with a 503.
    pub dropped: u64,
    /// Requests whose model failed to load.
    pub failed: u64,
    /// 503 responses by code (every attempt, retried or not).
    pub rejections: BTreeMap<&'static str, u64>,
    /// Refused attempts that were retried.
    pub retried: u64,
    /// Share of requests that saw at least one 503.
    pub rate_503: f64,
    /// Evictions by reason.
    pub evictions: BTreeMap<&'static str, u64>,
    /// All evictions.
    pub evictions_total: u64,
    /// Loads admitted (by requests and preloads).
    pub loads: u64,
    /// Bytes measured over finished loads.
    pub bytes_loaded: u64,
    /// Seconds spent loading.
    pub load_secs: f64,
    /// Miss ratios (a miss: a request's first attempt did not find its model resident).
    pub miss_ratio: MissRatios,
    /// Time from arrival to holding a lease, over served requests.
    pub added_latency: Latency,
    /// The engine's admission queue.
    pub queue: QueueSummary,
    /// Memory committed (resident + reserved + draining).
    pub memory: Memory,
    /// Admin operations in the trace and how many were refused.
    pub admin: Admin,
    /// Predictive preloads, when enabled (`SimConfig::preload_horizon_secs`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub predictive_preload: Option<PreloadSummary>,
    /// Retry hints against actual waits.
    pub retry_hints: RetryHints,
    /// Per-model breakdown, in trace order.
    pub models: Vec<ModelRow>,
}

/// What predictive preloads did. A preload is useful when a request found its model resident
/// (or loading) before it left memory, wasted when it left unused (evicted, its load failed, or
/// it was cancelled mid-load for a real request's room).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct PreloadSummary {
    /// Preloads started.
    pub started: u64,
    /// Preloads a request then used.
    pub useful: u64,
    /// Preloads that left memory unused.
    pub wasted: u64,
    /// Of the wasted, those cancelled while still loading because a real request needed the
    /// room (the request did not wait for them).
    pub cancelled: u64,
    /// Preloads still resident and unused when the trace ended.
    pub unused_at_end: u64,
    /// Added latency the useful ones saved, seconds: per useful preload, the part of its load
    /// done before its first request arrived (the whole modelled load time for a hit).
    pub latency_saved_secs: f64,
}

/// The knobs that shaped a report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConfigSummary {
    /// Policy name.
    pub policy: &'static str,
    /// Memory limit, bytes.
    pub limit_bytes: u64,
    /// Max models.
    pub max_models: usize,
    /// Load latency, seconds.
    pub load_latency_secs: f64,
    /// Load bandwidth, bytes/s (`null` when infinite).
    pub load_bandwidth: Option<f64>,
    /// Unload time, seconds.
    pub unload_secs: f64,
    /// Seconds per input token.
    pub prefill_secs_per_token: f64,
    /// Seconds per output token.
    pub decode_secs_per_token: f64,
    /// Retries after a 503 with a retry hint.
    pub retries: u32,
    /// Injected load failure probability.
    pub load_failure_rate: f64,
    /// Estimator sees names only.
    pub estimate_from_names: bool,
    /// RNG seed.
    pub seed: u64,
    /// Keep-alive TTL, seconds (`null`: none).
    pub idle_ttl_secs: Option<f64>,
    /// Requests' KV cache counted in the ledger.
    pub kv_cache: bool,
}

/// The trace's shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct TraceSummary {
    /// Distinct models.
    pub models: usize,
    /// Operations (requests and admin).
    pub ops: usize,
    /// Seconds from time 0 to the last event (including the drain after the last arrival).
    pub span_secs: f64,
}

/// Object, byte and load-cost miss ratios.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MissRatios {
    /// Misses / requests.
    pub object: f64,
    /// Sum of missed models' sizes / sum of requested models' sizes.
    pub byte: f64,
    /// Sum of missed models' modelled load costs / sum over all requests.
    pub cost: f64,
}

/// Added latency in seconds: quantiles from an HdrHistogram (microseconds, 3 significant
/// digits), maximum and mean exact.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Latency {
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Maximum.
    pub max: f64,
    /// Mean.
    pub mean: f64,
}

/// What the admission queue did.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueSummary {
    /// Queue timeout, seconds (`0`: no queue, refusals are immediate).
    pub timeout_secs: f64,
    /// Requests that waited in the queue (each time they entered it).
    pub queued: u64,
    /// Of which admitted from it (the rest timed out or could no longer be served).
    pub admitted: u64,
    /// Refused with `queue_timeout` after waiting the whole timeout.
    pub timeouts: u64,
    /// Refused with `queue_full`.
    pub full: u64,
    /// Longest the queue was.
    pub peak_len: u64,
    /// Time in the queue of the admitted ones, seconds: median.
    pub wait_p50: f64,
    /// 99th percentile.
    pub wait_p99: f64,
    /// Maximum.
    pub wait_max: f64,
}

/// Memory committed over the replay.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Memory {
    /// Limit at the end of the replay, bytes.
    pub limit_bytes: u64,
    /// Highest committed bytes.
    pub peak_bytes: u64,
    /// Time-weighted mean of committed bytes.
    pub mean_bytes: u64,
    /// Highest bytes held by requests' KV caches (the ledger's `kv` column).
    pub kv_peak_bytes: u64,
    /// Time-weighted mean of the KV column.
    pub kv_mean_bytes: u64,
}

/// Admin operations.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Admin {
    /// Admin operations in the trace.
    pub ops: u64,
    /// Of which preloads.
    pub preloads: u64,
    /// Refused (preload rejected, pin of an absent model, unload of a pinned or busy one...).
    pub refused: u64,
}

/// One model's line.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelRow {
    /// Model id.
    pub model: String,
    /// Model type.
    pub model_type: String,
    /// Real size, bytes.
    pub size_bytes: u64,
    /// Requests.
    pub requests: u64,
    /// First-attempt hits.
    pub hits: u64,
    /// Requests - hits.
    pub misses: u64,
    /// Loads started.
    pub loads: u64,
    /// Times its memory was returned.
    pub unloads: u64,
    /// Requests finally refused.
    pub rejected: u64,
    /// Requests whose load failed.
    pub failed: u64,
    /// Modelled load seconds (the weight of its misses in the cost miss ratio).
    pub load_cost_secs: f64,
}

fn secs(us: u64) -> f64 {
    r6(us as f64 / 1e6)
}

// Every input is a distinct part of the replay's end state; bundling them would only rename.
#[allow(clippy::too_many_arguments)]
pub(crate) fn build_report(
    cfg: &SimConfig,
    trace: &Trace,
    t: &Totals,
    stats: &Stats,
    ledger: Ledger,
    hist: &Histogram<u64>,
    wait_hist: &Histogram<u64>,
    mut models: Vec<ModelRow>,
) -> Report {
    let (mut byte_all, mut byte_miss, mut cost_all, mut cost_miss) = (0f64, 0f64, 0f64, 0f64);
    for m in &mut models {
        let size = m.size_bytes as f64;
        // A zero-cost load (instant model) weighs like any other, so the ratio stays defined.
        let cost = m.load_cost_secs.max(1e-9);
        byte_all += size * m.requests as f64;
        byte_miss += size * m.misses as f64;
        cost_all += cost * m.requests as f64;
        cost_miss += cost * m.misses as f64;
        m.load_cost_secs = r6(m.load_cost_secs);
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { r6(a / b) } else { 0.0 };
    let misses = t.requests - t.hits;
    let empty = hist.is_empty();
    let q = |x: f64| if empty { 0.0 } else { secs(hist.value_at_quantile(x)) };
    Report {
        config: ConfigSummary {
            policy: cfg.policy.as_str(),
            limit_bytes: cfg.limit,
            max_models: cfg.max_models,
            load_latency_secs: cfg.load_latency_secs,
            load_bandwidth: cfg.load_bandwidth.is_finite().then_some(cfg.load_bandwidth),
            unload_secs: cfg.unload_secs,
            prefill_secs_per_token: cfg.prefill_secs_per_token,
            decode_secs_per_token: cfg.decode_secs_per_token,
            retries: cfg.retries,
            load_failure_rate: cfg.load_failure_rate,
            estimate_from_names: cfg.estimate_from_names,
            seed: cfg.seed,
            idle_ttl_secs: cfg.idle_ttl_secs,
            kv_cache: cfg.kv_cache,
        },
        trace: TraceSummary {
            models: trace.models.len(),
            ops: trace.ops.len(),
            span_secs: r6(t.end as f64 / NS as f64),
        },
        requests: t.requests,
        hits: t.hits,
        cold_loads: t.cold_loads,
        joined: t.joined,
        served: t.served,
        dropped: t.dropped,
        failed: t.failed,
        rejections: RejectCode::ALL.iter().zip(t.rejections).map(|(c, n)| (c.as_str(), n)).collect(),
        retried: t.retried,
        rate_503: ratio(t.first_503 as f64, t.requests as f64),
        evictions: EvictReason::ALL
            .iter()
            .map(|r| (r.as_str(), stats.evictions_for(*r)))
            .filter(|(_, n)| *n > 0)
            .collect(),
        evictions_total: stats.total_evictions(),
        loads: stats.loads,
        bytes_loaded: stats.bytes_loaded,
        load_secs: r6(stats.load_secs),
        miss_ratio: MissRatios {
            object: ratio(misses as f64, t.requests as f64),
            byte: ratio(byte_miss, byte_all),
            cost: ratio(cost_miss, cost_all),
        },
        added_latency: Latency {
            p50: q(0.5),
            p99: q(0.99),
            p999: q(0.999),
            max: r6(t.latency_max as f64 / NS as f64),
            mean: if t.served == 0 { 0.0 } else { r6(t.latency_sum as f64 / t.served as f64 / NS as f64) },
        },
        queue: {
            let wq = |x: f64| if wait_hist.is_empty() { 0.0 } else { secs(wait_hist.value_at_quantile(x)) };
            QueueSummary {
                timeout_secs: cfg.queue_timeout_secs,
                queued: t.queued,
                admitted: stats.dequeued,
                timeouts: t.rejections[RejectCode::QueueTimeout as usize],
                full: t.rejections[RejectCode::QueueFull as usize],
                peak_len: stats.peak_queue,
                wait_p50: wq(0.5),
                wait_p99: wq(0.99),
                wait_max: if wait_hist.is_empty() { 0.0 } else { secs(wait_hist.max()) },
            }
        },
        memory: Memory {
            limit_bytes: ledger.limit,
            peak_bytes: stats.peak_used,
            mean_bytes: if t.end == 0 { 0 } else { (t.mem_area / u128::from(t.end)) as u64 },
            kv_peak_bytes: stats.peak_kv,
            kv_mean_bytes: if t.end == 0 { 0 } else { (t.kv_area / u128::from(t.end)) as u64 },
        },
        admin: Admin { ops: t.admin_ops, preloads: t.preloads, refused: t.admin_refused },
        predictive_preload: t
            .predicted
            .map(|p| PreloadSummary { latency_saved_secs: r6(p.latency_saved_secs), ..p }),
        retry_hints: {
            let h = t.hints;
            let secs = |ns: Nanos| r6(ns as f64 / NS as f64);
            RetryHints {
                with_hint: h.with_hint,
                resolved: h.resolved,
                too_short: h.too_short,
                over_by_more_than_1s: h.over_1s,
                mean_error_secs: if h.resolved == 0 {
                    0.0
                } else {
                    r6(h.err_sum as f64 / h.resolved as f64 / NS as f64)
                },
                max_over_secs: secs(h.max_over),
                max_short_secs: secs(h.max_short),
            }
        },
        models,
    }
}

/// Bytes as decimal GB with one decimal (`24.0 GB`), or MB below 1 GB.
pub fn fmt_bytes(b: u64) -> String {
    if b >= 1_000_000_000 { format!("{:.1} GB", b as f64 / 1e9) } else { format!("{:.0} MB", b as f64 / 1e6) }
}

/// Seconds, compact (`0`, `850 ms`, `2.41 s`).
pub fn fmt_secs(s: f64) -> String {
    if s == 0.0 {
        "0".into()
    } else if s < 1.0 {
        format!("{:.0} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

fn pct(x: f64) -> String {
    format!("{:.2}%", x * 100.0)
}

impl Report {
    /// Requests refused with 503 over all requests... as a percentage string.
    fn share(&self, n: u64) -> String {
        if self.requests == 0 { "-".into() } else { pct(n as f64 / self.requests as f64) }
    }

    /// The human report (text tables). Deterministic; no wall-clock numbers.
    pub fn to_text(&self) -> String {
        let c = &self.config;
        let mut o = String::new();
        let bw = c.load_bandwidth.map_or("instant".to_string(), |b| format!("{:.1} GB/s", b / 1e9));
        let _ = writeln!(
            o,
            "policy {}, memory limit {}, max models {}, loads {} + bytes at {}, unload {}",
            c.policy,
            fmt_bytes(c.limit_bytes),
            c.max_models,
            fmt_secs(c.load_latency_secs),
            bw,
            fmt_secs(c.unload_secs)
        );
        if let Some(ttl) = c.idle_ttl_secs {
            let _ = writeln!(o, "keep-alive: unpinned models idle {} are evicted", fmt_secs(ttl));
        }
        let _ = writeln!(
            o,
            "trace: {} requests, {} admin ops, {} models, {:.1} s simulated",
            self.requests, self.admin.ops, self.trace.models, self.trace.span_secs
        );
        let _ = writeln!(o);
        let kv = |o: &mut String, k: &str, v: String| {
            let _ = writeln!(o, "  {k:<16} {v}");
        };
        kv(&mut o, "requests", self.requests.to_string());
        kv(&mut o, "hits", format!("{} ({})", self.hits, self.share(self.hits)));
        kv(&mut o, "cold loads", format!("{} (+{} joined a load in progress)", self.cold_loads, self.joined));
        let codes: Vec<String> =
            self.rejections.iter().filter(|(_, n)| **n > 0).map(|(k, n)| format!("{k} {n}")).collect();
        kv(
            &mut o,
            "503s",
            format!(
                "{} responses{}; {} requests dropped, 503 rate {}",
                self.rejections.values().sum::<u64>(),
                if codes.is_empty() { String::new() } else { format!(" ({})", codes.join(", ")) },
                self.dropped,
                pct(self.rate_503)
            ),
        );
        if self.retried > 0 || c.retries > 0 {
            kv(&mut o, "retried", format!("{} attempts", self.retried));
        }
        if self.failed > 0 {
            kv(&mut o, "load failures", format!("{} requests failed", self.failed));
        }
        let ev: Vec<String> = self.evictions.iter().map(|(k, n)| format!("{k} {n}")).collect();
        kv(
            &mut o,
            "evictions",
            format!(
                "{}{}",
                self.evictions_total,
                if ev.is_empty() { String::new() } else { format!(" ({})", ev.join(", ")) }
            ),
        );
        kv(
            &mut o,
            "loaded",
            format!(
                "{} loads, {} in {:.1} s of loading",
                self.loads,
                fmt_bytes(self.bytes_loaded),
                self.load_secs
            ),
        );
        kv(
            &mut o,
            "miss ratio",
            format!(
                "object {:.4}  byte {:.4}  load-cost {:.4}",
                self.miss_ratio.object, self.miss_ratio.byte, self.miss_ratio.cost
            ),
        );
        let l = &self.added_latency;
        kv(
            &mut o,
            "added latency",
            format!(
                "p50 {}  p99 {}  p99.9 {}  max {}  mean {}",
                fmt_secs(l.p50),
                fmt_secs(l.p99),
                fmt_secs(l.p999),
                fmt_secs(l.max),
                fmt_secs(l.mean)
            ),
        );
        let qs = &self.queue;
        if qs.timeout_secs > 0.0 {
            kv(
                &mut o,
                "queue",
                format!(
                    "{} waited (timeout {}), {} admitted, {} timed out, {} full; wait p50 {}  p99 {}  max {}; peak length {}",
                    qs.queued,
                    fmt_secs(qs.timeout_secs),
                    qs.admitted,
                    qs.timeouts,
                    qs.full,
                    fmt_secs(qs.wait_p50),
                    fmt_secs(qs.wait_p99),
                    fmt_secs(qs.wait_max),
                    qs.peak_len
                ),
            );
        }
        let m = &self.memory;
        kv(
            &mut o,
            "memory",
            format!(
                "peak {} ({:.1}% of limit), mean {}",
                fmt_bytes(m.peak_bytes),
                m.peak_bytes as f64 * 100.0 / m.limit_bytes.max(1) as f64,
                fmt_bytes(m.mean_bytes)
            ),
        );
        if self.config.kv_cache {
            kv(
                &mut o,
                "kv cache",
                format!("peak {}, mean {}", fmt_bytes(m.kv_peak_bytes), fmt_bytes(m.kv_mean_bytes)),
            );
        }
        if self.admin.ops > 0 {
            kv(
                &mut o,
                "admin ops",
                format!(
                    "{} ({} preloads), {} refused",
                    self.admin.ops, self.admin.preloads, self.admin.refused
                ),
            );
        }
        let h = &self.retry_hints;
        if h.with_hint > 0 {
            kv(
                &mut o,
                "retry hints",
                format!(
                    "{} refusals with Retry-After, {} resolved: {} too short (by up to {}), {} over by more than 1 s (by up to {}), mean hint - wait {}",
                    h.with_hint,
                    h.resolved,
                    h.too_short,
                    fmt_secs(h.max_short_secs),
                    h.over_by_more_than_1s,
                    fmt_secs(h.max_over_secs),
                    fmt_secs(h.mean_error_secs)
                ),
            );
        }
        if let Some(p) = &self.predictive_preload {
            kv(
                &mut o,
                "preloads",
                format!(
                    "{} predicted: {} useful, {} wasted ({} cancelled mid-load), {} unused at the end; {} of added latency saved",
                    p.started,
                    p.useful,
                    p.wasted,
                    p.cancelled,
                    p.unused_at_end,
                    fmt_secs(p.latency_saved_secs)
                ),
            );
        }
        let _ = writeln!(o);
        let w = self.models.iter().map(|r| r.model.len()).max().unwrap_or(5).max(5);
        let _ = writeln!(
            o,
            "  {:<w$}  {:<10} {:>9} {:>8} {:>8} {:>7} {:>6} {:>7} {:>6}",
            "model", "type", "size", "requests", "hit%", "misses", "loads", "unloads", "503s"
        );
        for r in &self.models {
            let hit = if r.requests == 0 {
                "-".to_string()
            } else {
                format!("{:.1}", r.hits as f64 * 100.0 / r.requests as f64)
            };
            let _ = writeln!(
                o,
                "  {:<w$}  {:<10} {:>9} {:>8} {:>8} {:>7} {:>6} {:>7} {:>6}",
                r.model,
                r.model_type,
                fmt_bytes(r.size_bytes),
                r.requests,
                hit,
                r.misses,
                r.loads,
                r.unloads,
                r.rejected
            );
        }
        o
    }
}
