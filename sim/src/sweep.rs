//! Sweeps: many memory limits x several policies over one trace, side by side, with each online
//! policy's gap to the best offline baseline, a CSV, an SVG chart, and the smallest limit that
//! meets a target (e.g. 503 rate <= 0.1% and p99 added latency <= 2 s).

use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use modelpool::MemoryLimit;
use serde::Serialize;

use crate::config::{PolicyChoice, SimConfig};
use crate::replay::run;
use crate::report::{Report, fmt_bytes, fmt_secs};
use crate::trace::Trace;

/// What a deployment must achieve.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Target {
    /// Highest acceptable share of requests that see a 503.
    pub max_503_rate: f64,
    /// Highest acceptable p99 added latency, seconds.
    pub max_p99_secs: f64,
}

impl Default for Target {
    /// 503 rate <= 0.1% and p99 added latency <= 2 s.
    fn default() -> Self {
        Target { max_503_rate: 0.001, max_p99_secs: 2.0 }
    }
}

impl Target {
    /// Whether a report meets the target.
    pub fn met_by(&self, r: &Report) -> bool {
        r.rate_503 <= self.max_503_rate && r.added_latency.p99 <= self.max_p99_secs
    }
}

/// One replay of a sweep.
#[derive(Debug, Clone, Serialize)]
pub struct Cell {
    /// Memory limit, bytes.
    pub limit: u64,
    /// Policy.
    pub policy: PolicyChoice,
    /// The replay's report.
    pub report: Report,
    /// Object miss ratio minus the best offline policy's at this limit (online policies only).
    pub gap_object: Option<f64>,
    /// Load-cost miss ratio minus the best offline policy's at this limit (online only).
    pub gap_cost: Option<f64>,
    /// Whether the target is met.
    pub meets_target: bool,
}

/// A whole sweep: cells in (limit, policy) order.
#[derive(Debug, Clone, Serialize)]
pub struct Sweep {
    /// Limits, ascending.
    pub limits: Vec<u64>,
    /// Policies, in the order given.
    pub policies: Vec<PolicyChoice>,
    /// The target used for the recommendation.
    pub target: Target,
    /// One cell per (limit, policy).
    pub cells: Vec<Cell>,
    /// Smallest limit from which on an online policy meets the target (see
    /// [`Sweep::smallest_meeting`]), and that policy.
    pub recommended: Option<(u64, PolicyChoice)>,
}

/// Parse a list of limits: `8GB,16GB,32GB` or `8GB..64GB:8` (8 evenly spaced limits, ends
/// included). Fractions of system memory are refused: a simulation must not depend on the host.
pub fn parse_limits(s: &str) -> Result<Vec<u64>, String> {
    let one = |p: &str| -> Result<u64, String> {
        match p.trim().parse::<MemoryLimit>() {
            Ok(MemoryLimit::Bytes(b)) => Ok(b),
            Ok(MemoryLimit::Fraction(_)) => {
                Err(format!("'{p}': the simulator needs absolute limits (e.g. 16GB), not fractions"))
            }
            Err(e) => Err(e.to_string()),
        }
    };
    let mut out = Vec::new();
    for part in s.split(',').filter(|p| !p.trim().is_empty()) {
        if let Some((range, n)) = part.split_once(':') {
            let (a, b) =
                range.split_once("..").ok_or_else(|| format!("'{part}': expected FROM..TO:COUNT"))?;
            let (a, b) = (one(a)?, one(b)?);
            let n: usize = n
                .trim()
                .parse()
                .ok()
                .filter(|&n| (2..=1000).contains(&n))
                .ok_or_else(|| format!("'{part}': COUNT must be an integer in 2..=1000"))?;
            if b <= a {
                return Err(format!("'{part}': TO must be larger than FROM"));
            }
            for i in 0..n {
                out.push(a + ((b - a) as f64 * i as f64 / (n - 1) as f64).round() as u64);
            }
        } else {
            out.push(one(part)?);
        }
    }
    if out.is_empty() {
        return Err("no memory limits given".into());
    }
    out.sort_unstable();
    out.dedup();
    Ok(out)
}

/// Limits worth sweeping for a trace: from the largest model to the sum of the `max_models`
/// largest ones (beyond that nothing is ever evicted for memory), `n` points.
pub fn auto_limits(trace: &Trace, max_models: usize, n: usize, size_of: impl Fn(usize) -> u64) -> Vec<u64> {
    let mut sizes: Vec<u64> = (0..trace.models.len()).map(size_of).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let lo = sizes.first().copied().unwrap_or(1).max(1);
    let hi = sizes.iter().take(max_models).sum::<u64>().max(lo + 1);
    let n = n.max(2);
    let mut v: Vec<u64> = (0..n)
        .map(|i| {
            let x = lo as f64 + (hi - lo) as f64 * i as f64 / (n - 1) as f64;
            // Round to 0.1 GB for readable tables.
            ((x / 1e8).ceil() * 1e8) as u64
        })
        .collect();
    v.dedup();
    v
}

/// Run every (limit, policy) pair on `jobs` threads. `tick` is called after each replay.
/// The result does not depend on `jobs`.
pub fn sweep(
    trace: &Trace,
    base: &SimConfig,
    limits: &[u64],
    policies: &[PolicyChoice],
    target: Target,
    jobs: usize,
    tick: &(dyn Fn() + Sync),
) -> Result<Sweep, String> {
    base.validate()?;
    if policies.is_empty() {
        return Err("no policies given".into());
    }
    let mut limits = limits.to_vec();
    limits.sort_unstable();
    limits.dedup();
    let tasks: Vec<(u64, PolicyChoice)> =
        limits.iter().flat_map(|&l| policies.iter().map(move |&p| (l, p))).collect();
    let results: Mutex<Vec<Option<Result<Report, String>>>> = Mutex::new(vec![None; tasks.len()]);
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..jobs.clamp(1, tasks.len().max(1)) {
            s.spawn(|| {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&(limit, policy)) = tasks.get(i) else {
                        return;
                    };
                    let cfg = SimConfig { limit, policy, ..base.clone() };
                    let r = run(trace, &cfg).map(|o| o.report);
                    results.lock().expect("no panics while holding")[i] = Some(r);
                    tick();
                }
            });
        }
    });
    let reports: Vec<Report> = results
        .into_inner()
        .expect("no panics while holding")
        .into_iter()
        .map(|r| r.expect("every task ran"))
        .collect::<Result<_, _>>()?;
    let mut cells: Vec<Cell> = tasks
        .iter()
        .zip(reports)
        .map(|(&(limit, policy), report)| Cell {
            limit,
            policy,
            meets_target: target.met_by(&report),
            report,
            gap_object: None,
            gap_cost: None,
        })
        .collect();
    for chunk in cells.chunks_mut(policies.len()) {
        let best = |f: fn(&Report) -> f64| {
            chunk.iter().filter(|c| c.policy.is_offline()).map(|c| f(&c.report)).min_by(f64::total_cmp)
        };
        let (bo, bc) = (best(|r| r.miss_ratio.object), best(|r| r.miss_ratio.cost));
        for c in chunk.iter_mut().filter(|c| !c.policy.is_offline()) {
            c.gap_object = bo.map(|b| crate::report::r6(c.report.miss_ratio.object - b));
            c.gap_cost = bc.map(|b| crate::report::r6(c.report.miss_ratio.cost - b));
        }
    }
    let mut s = Sweep { limits, policies: policies.to_vec(), target, cells, recommended: None };
    // The smallest stable limit over online policies; ties go to the lower object miss ratio.
    s.recommended = s
        .policies
        .iter()
        .filter(|p| !p.is_offline())
        .filter_map(|&p| {
            let l = s.smallest_meeting(p)?;
            let miss = s.cells.iter().find(|c| c.policy == p && c.limit == l)?.report.miss_ratio.object;
            Some((l, miss, p))
        })
        .min_by(|a, b| a.0.cmp(&b.0).then(a.1.total_cmp(&b.1)))
        .map(|(l, _, p)| (l, p));
    Ok(s)
}

impl Sweep {
    /// Smallest limit at which `policy` meets the target.
    /// Smallest limit from which on `policy` meets the target at every larger limit of the
    /// sweep too (a limit that meets it by luck between two that fail is not recommended).
    pub fn smallest_meeting(&self, policy: PolicyChoice) -> Option<u64> {
        let mut best = None;
        for c in self.cells.iter().rev().filter(|c| c.policy == policy) {
            if !c.meets_target {
                break;
            }
            best = Some(c.limit);
        }
        best
    }

    /// The side-by-side table, the gap note and the recommendation.
    pub fn to_text(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "  {:>9}  {:<11} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9} {:>9}  target",
            "limit", "policy", "obj-miss", "byte", "cost", "503-rate", "p99-added", "mean-mem", "gap-obj",
        );
        for c in &self.cells {
            let r = &c.report;
            let _ = writeln!(
                o,
                "  {:>9}  {:<11} {:>8.4} {:>8.4} {:>8.4} {:>7.3}% {:>9} {:>9} {:>9}  {}",
                fmt_bytes(c.limit),
                c.policy.as_str(),
                r.miss_ratio.object,
                r.miss_ratio.byte,
                r.miss_ratio.cost,
                r.rate_503 * 100.0,
                fmt_secs(r.added_latency.p99),
                fmt_bytes(r.memory.mean_bytes),
                c.gap_object.map_or("-".into(), |g| format!("{g:+.4}")),
                if c.meets_target { "yes" } else { "no" }
            );
        }
        let _ = writeln!(o);
        let _ = writeln!(
            o,
            "gap-obj: object miss ratio minus the best offline baseline's (belady, belady-cost) at the same limit"
        );
        let _ = writeln!(
            o,
            "target: 503 rate <= {}% and p99 added latency <= {}",
            self.target.max_503_rate * 100.0,
            fmt_secs(self.target.max_p99_secs)
        );
        for &p in &self.policies {
            let _ = writeln!(
                o,
                "  {:<11} smallest limit meeting it: {}",
                p.as_str(),
                self.smallest_meeting(p).map_or("none in the sweep".into(), fmt_bytes)
            );
        }
        match self.recommended {
            Some((l, p)) => {
                let _ = writeln!(
                    o,
                    "recommendation: --memory-limit {} --policy {p}",
                    fmt_bytes(l).replace(' ', "")
                );
            }
            None => {
                let _ = writeln!(
                    o,
                    "recommendation: no limit in the sweep meets the target with an online policy; sweep higher"
                );
            }
        }
        o
    }

    /// One CSV row per cell.
    pub fn to_csv(&self) -> String {
        let mut o = String::from(
            "limit_bytes,policy,offline,requests,hits,cold_loads,evictions,object_miss_ratio,byte_miss_ratio,cost_miss_ratio,rate_503,rejections,p50_added_secs,p99_added_secs,p999_added_secs,peak_bytes,mean_bytes,gap_object,gap_cost,meets_target\n",
        );
        for c in &self.cells {
            let r = &c.report;
            let opt = |g: Option<f64>| g.map_or(String::new(), |g| g.to_string());
            let _ = writeln!(
                o,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                c.limit,
                c.policy,
                c.policy.is_offline(),
                r.requests,
                r.hits,
                r.cold_loads,
                r.evictions_total,
                r.miss_ratio.object,
                r.miss_ratio.byte,
                r.miss_ratio.cost,
                r.rate_503,
                r.rejections.values().sum::<u64>(),
                r.added_latency.p50,
                r.added_latency.p99,
                r.added_latency.p999,
                r.memory.peak_bytes,
                r.memory.mean_bytes,
                opt(c.gap_object),
                opt(c.gap_cost),
                c.meets_target
            );
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_parse_lists_and_ranges() {
        assert_eq!(parse_limits("16GB,8GB").unwrap(), vec![8_000_000_000, 16_000_000_000]);
        assert_eq!(parse_limits("8GB..16GB:3").unwrap(), vec![8_000_000_000, 12_000_000_000, 16_000_000_000]);
        assert!(parse_limits("50%").unwrap_err().contains("absolute"));
        assert!(parse_limits("8GB..4GB:3").is_err());
        assert!(parse_limits("8GB..16GB:1").is_err());
        assert!(parse_limits("").is_err());
    }
}

/// One replay of a queue-timeout sweep ([`queue_sweep`]).
#[derive(Debug, Clone, Serialize)]
pub struct QueueRow {
    /// The queue timeout replayed, seconds (0: no queue).
    pub timeout_secs: f64,
    /// Its report.
    pub report: Report,
}

/// Replay `trace` under `base` once per queue timeout (seconds, in the order given), to choose
/// one: 503s, added latency, queue waits and loads side by side ([`queue_table`]).
pub fn queue_sweep(trace: &Trace, base: &SimConfig, timeouts: &[f64]) -> Result<Vec<QueueRow>, String> {
    if timeouts.is_empty() {
        return Err("no queue timeouts given".into());
    }
    timeouts
        .iter()
        .map(|&t| {
            let cfg = SimConfig { queue_timeout_secs: t, ..base.clone() };
            run(trace, &cfg).map(|o| QueueRow { timeout_secs: t, report: o.report })
        })
        .collect()
}

/// The rows of a [`queue_sweep`] as a text table.
pub fn queue_table(rows: &[QueueRow]) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "{:>8} {:>9} {:>7} {:>9} {:>6} {:>9} {:>9} {:>10} {:>10} {:>7}",
        "timeout", "503 rate", "503s", "timeouts", "full", "p50", "p99", "wait p99", "wait max", "loads"
    );
    for r in rows {
        let p = &r.report;
        let _ = writeln!(
            o,
            "{:>8} {:>8.2}% {:>7} {:>9} {:>6} {:>9} {:>9} {:>10} {:>10} {:>7}",
            if r.timeout_secs == 0.0 { "off".to_string() } else { fmt_secs(r.timeout_secs) },
            p.rate_503 * 100.0,
            p.rejections.values().sum::<u64>(),
            p.queue.timeouts,
            p.queue.full,
            fmt_secs(p.added_latency.p50),
            fmt_secs(p.added_latency.p99),
            fmt_secs(p.queue.wait_p99),
            fmt_secs(p.queue.wait_max),
            p.loads
        );
    }
    o
}
