//! Seeded synthetic traces: Zipf popularity over a catalogue of realistic models, bursty
//! arrivals (Poisson, Gamma renewal or on/off), a diurnal rate, and token counts per request.
//!
//! Every random draw comes from `ChaCha8Rng` through the samplers below (written here, not taken
//! from a distribution crate), so a seed gives the same trace across versions of the dependencies.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use modelpool::{ModelSpec, ModelType, NameEstimator, SizeEstimator};
use rand_chacha::ChaCha8Rng;
use rand_core::{Rng, SeedableRng};

use modelpool::Nanos;

use crate::trace::{ModelDef, NS, Op, OpKind, Service, Trace};

/// A catalogue entry: name, type, and an explicit size where the name carries none.
struct Entry {
    name: &'static str,
    model_type: ModelType,
    size: Option<u64>,
}

const fn text(name: &'static str) -> Entry {
    Entry { name, model_type: ModelType::TextGen, size: None }
}

const fn vision(name: &'static str) -> Entry {
    Entry { name, model_type: ModelType::Vision, size: None }
}

const fn embed(name: &'static str, bytes: u64) -> Entry {
    Entry { name, model_type: ModelType::Embeddings, size: Some(bytes) }
}

/// Models people serve from one box, small to large. Sizes come from [`NameEstimator`] (name
/// hints: parameters x quantization) except for embedding models, whose names carry no size.
const CATALOGUE: &[Entry] = &[
    text("qwen2.5-0.5b-instruct-4bit"),
    text("llama-3.2-1b-instruct-4bit"),
    embed("all-minilm-l6-v2", 91_000_000),
    text("llama-3-8b-4bit"),
    text("qwen2.5-7b-instruct-4bit"),
    text("llama-3.2-3b-instruct-4bit"),
    text("mistral-7b-instruct-v0.3-4bit"),
    vision("qwen2-vl-7b-instruct-4bit"),
    text("phi-3.5-mini-3.8b-instruct-4bit"),
    embed("bge-m3", 1_140_000_000),
    text("gemma-2-9b-it-4bit"),
    text("qwen2.5-14b-instruct-4bit"),
    text("llama-3.1-8b-instruct-8bit"),
    text("mixtral-8x7b-instruct-4bit"),
    vision("pixtral-12b-4bit"),
    text("qwen2.5-32b-instruct-4bit"),
    text("smollm2-1.7b-instruct-bf16"),
    embed("nomic-embed-text-v1.5", 550_000_000),
    text("mistral-small-24b-instruct-4bit"),
    text("llama-3.3-70b-instruct-4bit"),
    vision("llava-1.6-mistral-7b-4bit"),
    text("deepseek-r1-distill-qwen-1.5b-8bit"),
    text("qwen2.5-coder-7b-instruct-4bit"),
    text("llama-3-8b"),
    // Appended (issue 15): more text models, so a multi-tenant trace has 20+ of them.
    text("qwen2.5-1.5b-instruct-4bit"),
    text("qwen2.5-3b-instruct-4bit"),
    text("gemma-2-2b-it-4bit"),
    text("qwen2.5-coder-14b-instruct-4bit"),
    text("deepseek-r1-distill-llama-8b-4bit"),
    text("qwen2.5-72b-instruct-4bit"),
];

/// How arrivals are spaced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Arrivals {
    /// Exponential gaps.
    Poisson,
    /// Gamma-distributed gaps with this shape (< 1 is burstier than Poisson; CV = 1/sqrt(shape)).
    Gamma(f64),
    /// Exponentially distributed ON and OFF periods (mean seconds); requests only while ON, at a
    /// rate raised so the long-run mean stays `rate`.
    OnOff {
        /// Mean ON period, seconds.
        on: f64,
        /// Mean OFF period, seconds.
        off: f64,
    },
}

impl fmt::Display for Arrivals {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Arrivals::Poisson => write!(f, "poisson"),
            Arrivals::Gamma(k) => write!(f, "gamma:{k}"),
            Arrivals::OnOff { on, off } => write!(f, "onoff:{on}:{off}"),
        }
    }
}

impl FromStr for Arrivals {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let num = |p: &str| -> Result<f64, String> {
            match p.parse::<f64>() {
                Ok(v) if v.is_finite() && v > 0.0 => Ok(v),
                _ => Err(format!("'{p}' in '{s}' is not a positive number")),
            }
        };
        match parts.as_slice() {
            ["poisson"] => Ok(Arrivals::Poisson),
            ["gamma", k] => Ok(Arrivals::Gamma(num(k)?)),
            ["onoff", on, off] => Ok(Arrivals::OnOff { on: num(on)?, off: num(off)? }),
            _ => Err(format!(
                "unknown arrival process '{s}' (expected poisson, gamma:SHAPE or onoff:ON_SECS:OFF_SECS)"
            )),
        }
    }
}

/// Generator parameters. [`GenConfig::default`] documents the defaults.
#[derive(Debug, Clone, PartialEq)]
pub struct GenConfig {
    /// Seed of the ChaCha8 stream.
    pub seed: u64,
    /// Requests to generate.
    pub requests: u64,
    /// Distinct models (beyond the catalogue's 30, fine-tuned variants `-ftNN` are added).
    pub models: usize,
    /// Zipf exponent of model popularity (0 = uniform).
    pub zipf: f64,
    /// Mean arrival rate, requests per second.
    pub rate: f64,
    /// Arrival process.
    pub arrivals: Arrivals,
    /// Diurnal amplitude in [0, 1): rate(t) = rate x (1 + amp x sin(2 pi t / period)).
    pub diurnal: f64,
    /// Diurnal period, seconds.
    pub period: f64,
    /// Probability that a request goes to the same model as the one before (sessions).
    pub sticky: f64,
    /// Models preloaded and pinned at time 0.
    pub pin: Vec<String>,
    /// Structured mode (with `jobs`): mean requests per user session (> 1; 0 = off). Sessions
    /// start at the arrival process's times (Poisson or Gamma, diurnal rate), each on one
    /// Zipf-chosen model, and go on with exponential think times (`think` seconds mean), so many
    /// sessions overlap, each sticking to its model.
    pub sessions: f64,
    /// Structured mode: mean think time between a session's requests, seconds.
    pub think: f64,
    /// Structured mode: periodic jobs, each bound to a seeded model, firing every period
    /// (log-uniform in 300..3600 s, jitter 1%) a burst of 1 to 4 requests 2 s apart.
    pub jobs: usize,
    /// Structured mode: each model gets its own seeded diurnal phase (tenants in other time
    /// zones), instead of one phase for the pool.
    pub phase: bool,
}

impl Default for GenConfig {
    fn default() -> Self {
        GenConfig {
            seed: 1,
            requests: 5000,
            models: 12,
            zipf: 1.0,
            rate: 2.0,
            arrivals: Arrivals::Poisson,
            diurnal: 0.0,
            period: 86_400.0,
            sticky: 0.0,
            pin: Vec::new(),
            sessions: 0.0,
            think: 30.0,
            jobs: 0,
            phase: false,
        }
    }
}

/// A parameter that makes no sense.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid generator setting `{field}`: {message}")]
pub struct GenError {
    /// The setting.
    pub field: &'static str,
    /// Why.
    pub message: String,
}

/// Uniform, Zipf, exponential, Gamma and log-normal draws from one ChaCha8 stream.
pub struct Sampler {
    rng: ChaCha8Rng,
}

impl Sampler {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Sampler { rng: ChaCha8Rng::seed_from_u64(seed) }
    }

    /// Uniform in (0, 1), never 0 or 1.
    #[inline]
    pub fn uniform(&mut self) -> f64 {
        ((self.rng.next_u64() >> 11) as f64 + 0.5) * (1.0 / (1u64 << 53) as f64)
    }

    /// Uniform integer in `0..n` (n > 0), by rejection (no modulo bias).
    pub fn below(&mut self, n: u64) -> u64 {
        let zone = u64::MAX - (u64::MAX % n);
        loop {
            let v = self.rng.next_u64();
            if v < zone {
                return v % n;
            }
        }
    }

    /// Exponential with mean 1.
    pub fn exp(&mut self) -> f64 {
        -self.uniform().ln()
    }

    /// Standard normal (Box-Muller, one value per call).
    pub fn normal(&mut self) -> f64 {
        let (u1, u2) = (self.uniform(), self.uniform());
        (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
    }

    /// Gamma with shape `k` and scale 1 (Marsaglia-Tsang; boosted for k < 1).
    pub fn gamma(&mut self, k: f64) -> f64 {
        if k < 1.0 {
            let u = self.uniform();
            return self.gamma(k + 1.0) * u.powf(1.0 / k);
        }
        let d = k - 1.0 / 3.0;
        let c = 1.0 / (9.0 * d).sqrt();
        loop {
            let x = self.normal();
            let v = 1.0 + c * x;
            if v <= 0.0 {
                continue;
            }
            let v = v * v * v;
            let u = self.uniform();
            if u.ln() < 0.5 * x * x + d - d * v + d * v.ln() {
                return d * v;
            }
        }
    }

    /// Log-normal with the given median and sigma, rounded and clamped to `[lo, hi]`.
    pub fn lognormal(&mut self, median: f64, sigma: f64, lo: u32, hi: u32) -> u32 {
        let v = median * (sigma * self.normal()).exp();
        (v.round() as u64).clamp(u64::from(lo), u64::from(hi)) as u32
    }

    /// Index drawn from a cumulative weight table (last element = total).
    pub fn pick(&mut self, cdf: &[f64]) -> usize {
        let total = *cdf.last().expect("non-empty table");
        let x = self.uniform() * total;
        cdf.partition_point(|&c| c <= x).min(cdf.len() - 1)
    }
}

/// The model list for `n` models: the catalogue in order, then fine-tuned variants.
pub fn catalogue(n: usize) -> Vec<ModelDef> {
    let est = NameEstimator;
    (0..n)
        .map(|i| {
            let e = &CATALOGUE[i % CATALOGUE.len()];
            let id: Arc<str> = if i < CATALOGUE.len() {
                Arc::from(e.name)
            } else {
                Arc::from(format!("{}-ft{:02}", e.name, i / CATALOGUE.len()))
            };
            let size = e
                .size
                .unwrap_or_else(|| est.estimate(&ModelSpec::new(id.clone()).with_type(e.model_type)).bytes);
            ModelDef { id, model_type: e.model_type, size: Some(size), kv_bytes_per_token: None }
        })
        .collect()
}

/// Generate a trace. Same config, same trace, bit for bit.
pub fn generate(cfg: &GenConfig) -> Result<Trace, GenError> {
    let bad = |field, message: String| GenError { field, message };
    if cfg.models == 0 || cfg.models > 100_000 {
        return Err(bad("models", "must be between 1 and 100000".into()));
    }
    if !(cfg.zipf.is_finite() && cfg.zipf >= 0.0) {
        return Err(bad("zipf", "must be a finite number >= 0".into()));
    }
    if !(cfg.rate.is_finite() && cfg.rate > 0.0) {
        return Err(bad("rate", "must be a positive number".into()));
    }
    if !(0.0..1.0).contains(&cfg.diurnal) {
        return Err(bad("diurnal", "amplitude must be in [0, 1)".into()));
    }
    if !(cfg.period.is_finite() && cfg.period > 0.0) {
        return Err(bad("period", "must be a positive number of seconds".into()));
    }
    if !(0.0..1.0).contains(&cfg.sticky) {
        return Err(bad("sticky", "must be in [0, 1)".into()));
    }
    let models = catalogue(cfg.models);
    let mut s = Sampler::new(cfg.seed);
    // Popularity ranks are a seeded shuffle, so size and popularity are independent.
    let mut rank: Vec<usize> = (0..models.len()).collect();
    for i in (1..rank.len()).rev() {
        let j = s.below(i as u64 + 1) as usize;
        rank.swap(i, j);
    }
    let mut cdf = Vec::with_capacity(models.len());
    let mut acc = 0.0;
    for &r in &rank {
        acc += 1.0 / ((r + 1) as f64).powf(cfg.zipf);
        cdf.push(acc);
    }
    let mut ops = Vec::with_capacity(cfg.requests as usize + cfg.pin.len());
    for p in &cfg.pin {
        let m = models
            .iter()
            .position(|m| &*m.id == p.as_str())
            .ok_or_else(|| bad("pin", format!("'{p}' is not among the generated models")))?;
        ops.push(Op { at: 0, arg: 0, model: m as u32, kind: OpKind::Preload });
    }
    if cfg.sessions > 0.0 || cfg.jobs > 0 || cfg.phase {
        if !(cfg.sessions == 0.0 || (cfg.sessions.is_finite() && cfg.sessions >= 1.0)) {
            return Err(bad("sessions", "mean session length must be 0 (off) or >= 1".into()));
        }
        if !(cfg.think.is_finite() && cfg.think > 0.0) {
            return Err(bad("think", "must be a positive number of seconds".into()));
        }
        if matches!(cfg.arrivals, Arrivals::OnOff { .. }) || cfg.sticky > 0.0 {
            return Err(bad(
                "arrivals",
                "sessions, jobs and per-model phases take poisson or gamma arrivals and no --sticky".into(),
            ));
        }
        structured(cfg, &models, &cdf, &mut s, &mut ops);
        return Ok(Trace { models, ops });
    }
    let mut t = 0.0f64;
    let mut on_until = match cfg.arrivals {
        Arrivals::OnOff { on, .. } => on * s.exp(),
        _ => f64::INFINITY,
    };
    let mut last_model = usize::MAX;
    for _ in 0..cfg.requests {
        let rate = cfg.rate * (1.0 + cfg.diurnal * (std::f64::consts::TAU * t / cfg.period).sin());
        let gap = match cfg.arrivals {
            Arrivals::Poisson => s.exp() / rate,
            Arrivals::Gamma(k) => s.gamma(k) / (k * rate),
            Arrivals::OnOff { on, off } => s.exp() / (rate * (on + off) / on),
        };
        t += gap;
        if let Arrivals::OnOff { on, off } = cfg.arrivals {
            // Requests falling past the ON period move past the OFF period that follows.
            while t > on_until {
                let off_len = off * s.exp();
                t += off_len;
                on_until += off_len + on * s.exp();
            }
        }
        let m = if last_model != usize::MAX && cfg.sticky > 0.0 && s.uniform() < cfg.sticky {
            last_model
        } else {
            s.pick(&cdf)
        };
        last_model = m;
        let service = tokens(&mut s, models[m].model_type);
        ops.push(Op::request(micros(t), m as u32, service));
    }
    Ok(Trace { models, ops })
}

/// Token counts of one request for a model of this type.
fn tokens(s: &mut Sampler, ty: ModelType) -> Service {
    match ty {
        ModelType::TextGen => Service::Tokens {
            input: s.lognormal(300.0, 1.0, 1, 32_768),
            output: s.lognormal(150.0, 0.8, 1, 4096),
        },
        ModelType::Vision => Service::Tokens {
            input: 576 + s.lognormal(120.0, 0.8, 1, 8192),
            output: s.lognormal(120.0, 0.8, 1, 2048),
        },
        ModelType::Embeddings => Service::Tokens { input: s.lognormal(60.0, 1.0, 1, 8192), output: 0 },
    }
}

/// Seconds to nanoseconds at microsecond resolution (keeps the CSV short).
fn micros(t: f64) -> Nanos {
    ((t * 1e6).round() as u64).saturating_mul(NS / 1_000_000)
}

/// Structured arrivals (sessions, periodic jobs, per-model diurnal phase): every arrival is
/// drawn over a horizon of twice the nominal duration, sorted by time (ties by model), cut to
/// `cfg.requests`, then given token counts in time order.
fn structured(cfg: &GenConfig, models: &[ModelDef], cdf: &[f64], s: &mut Sampler, ops: &mut Vec<Op>) {
    use std::f64::consts::TAU;
    let n = models.len();
    let phase: Vec<f64> = (0..n).map(|_| if cfg.phase { TAU * s.uniform() } else { 0.0 }).collect();
    // Jobs: model, period, first firing, burst size.
    let jobs: Vec<(usize, f64, f64, u64)> = (0..cfg.jobs)
        .map(|_| {
            let m = s.below(n as u64) as usize;
            let period = 300.0 * (12f64.ln() * s.uniform()).exp();
            (m, period, period * s.uniform(), 1 + s.below(4))
        })
        .collect();
    let horizon_reqs = cfg.requests as f64;
    let job_rate: f64 = jobs.iter().map(|j| j.3 as f64 / j.1).sum();
    let session_len = cfg.sessions.max(1.0);
    // Session starts at a rate that leaves the jobs their share of `rate` (at least 10% sessions).
    let start_rate = (cfg.rate - job_rate).max(0.1 * cfg.rate) / session_len;
    let horizon = 2.0 * horizon_reqs / cfg.rate;
    let mut arr: Vec<(f64, u32)> = Vec::with_capacity(2 * cfg.requests as usize);
    for &(m, period, first, burst) in &jobs {
        let mut t = first;
        while t < horizon {
            for b in 0..burst {
                arr.push((t + 2.0 * b as f64, m as u32));
            }
            t += period * (1.0 + 0.01 * (2.0 * s.uniform() - 1.0));
        }
    }
    let peak = 1.0 + cfg.diurnal;
    let mut t = 0.0f64;
    while t < horizon {
        t += match cfg.arrivals {
            Arrivals::Gamma(k) => s.gamma(k) / (k * start_rate * peak),
            _ => s.exp() / (start_rate * peak),
        };
        let m = s.pick(cdf);
        // Thinning: the session starts with the model's diurnal rate relative to the peak.
        let rate = 1.0 + cfg.diurnal * (TAU * t / cfg.period + phase[m]).sin();
        if s.uniform() * peak >= rate {
            continue;
        }
        // Geometric length with mean `session_len`, think times exponential.
        let p_more = 1.0 - 1.0 / session_len;
        let mut at = t;
        loop {
            arr.push((at, m as u32));
            if s.uniform() >= p_more {
                break;
            }
            at += cfg.think * s.exp();
        }
    }
    arr.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    arr.truncate(cfg.requests as usize);
    for (t, m) in arr {
        let service = tokens(s, models[m as usize].model_type);
        ops.push(Op::request(micros(t), m, service));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_trace_other_seed_differs() {
        let cfg = GenConfig {
            requests: 500,
            arrivals: Arrivals::Gamma(0.5),
            diurnal: 0.5,
            period: 60.0,
            sticky: 0.3,
            ..GenConfig::default()
        };
        let a = generate(&cfg).unwrap();
        assert_eq!(a, generate(&cfg).unwrap());
        let b = generate(&GenConfig { seed: 2, ..cfg }).unwrap();
        assert_ne!(a.ops, b.ops);
        assert_eq!(a.requests(), 500);
        assert!(a.ops.windows(2).all(|w| w[0].at <= w[1].at));
    }

    #[test]
    fn structured_mode_is_seeded_sorted_and_has_sessions_and_jobs() {
        let cfg = GenConfig {
            requests: 5000,
            models: 30,
            rate: 1.0,
            sessions: 20.0,
            think: 5.0,
            jobs: 4,
            phase: true,
            diurnal: 0.5,
            period: 3600.0,
            ..GenConfig::default()
        };
        let a = generate(&cfg).unwrap();
        assert_eq!(a, generate(&cfg).unwrap());
        assert_ne!(a.ops, generate(&GenConfig { seed: 2, ..cfg.clone() }).unwrap().ops);
        assert_eq!(a.requests(), 5000);
        assert!(a.ops.windows(2).all(|w| w[0].at <= w[1].at));
        // Sessions: most of a model's gaps are think times (seconds), far below the mean gap
        // between requests of a model at a steady rate (30 models at 1 req/s: ~30 s or more).
        let mut last = vec![None; 30];
        let (mut short, mut all) = (0, 0);
        for o in &a.ops {
            if let Some(t) = last[o.model as usize] {
                all += 1;
                if o.at - t < 15 * NS {
                    short += 1;
                }
            }
            last[o.model as usize] = Some(o.at);
        }
        assert!(short * 10 > all * 7, "{short} of {all} gaps under 15 s");
        let e = generate(&GenConfig { sticky: 0.3, ..cfg }).unwrap_err();
        assert_eq!(e.field, "arrivals");
    }

    #[test]
    fn zipf_head_dominates() {
        let t =
            generate(&GenConfig { requests: 20_000, models: 20, zipf: 1.2, ..GenConfig::default() }).unwrap();
        let mut counts = vec![0u64; 20];
        for o in &t.ops {
            counts[o.model as usize] += 1;
        }
        counts.sort_unstable_by(|a, b| b.cmp(a));
        // Zipf(1.2) over 20: the top model takes ~35%, the last ~1%.
        assert!(counts[0] > 5000 && counts[0] < 9000, "{counts:?}");
        assert!(counts[19] < 600, "{counts:?}");
    }

    #[test]
    fn gamma_sampler_has_the_right_mean_and_variance() {
        let mut s = Sampler::new(7);
        for k in [0.3, 1.0, 4.0] {
            let n = 200_000;
            let xs: Vec<f64> = (0..n).map(|_| s.gamma(k)).collect();
            let mean = xs.iter().sum::<f64>() / n as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
            assert!((mean - k).abs() < 0.03 * k.max(1.0), "k={k} mean={mean}");
            assert!((var - k).abs() < 0.08 * k.max(1.0), "k={k} var={var}");
        }
    }

    #[test]
    fn catalogue_sizes_are_realistic() {
        let c = catalogue(31);
        let size = |n: &str| c.iter().find(|m| &*m.id == n).unwrap().size.unwrap();
        assert_eq!(size("llama-3-8b"), 5_000_000_000);
        assert!(size("qwen2.5-0.5b-instruct-4bit") < 500_000_000);
        assert!(size("llama-3.3-70b-instruct-4bit") > 30_000_000_000);
        assert!(size("mixtral-8x7b-instruct-4bit") > 20_000_000_000);
        assert_eq!(&*c[29].id, "qwen2.5-72b-instruct-4bit");
        assert_eq!(&*c[30].id, "qwen2.5-0.5b-instruct-4bit-ft01");
        let text = CATALOGUE.iter().filter(|e| e.model_type == ModelType::TextGen).count();
        assert!(text >= 20, "{text} text models");
    }

    #[test]
    fn bad_settings_are_named() {
        let e = generate(&GenConfig { rate: 0.0, ..GenConfig::default() }).unwrap_err();
        assert_eq!(e.field, "rate");
        assert!("gamma:x".parse::<Arrivals>().is_err());
        assert_eq!("onoff:5:10".parse::<Arrivals>(), Ok(Arrivals::OnOff { on: 5.0, off: 10.0 }));
    }
}
