//! What a replay is configured with: the policy choice (the engine's online policies and the
//! offline baselines) and [`SimConfig`], its timing model and limits.

use std::collections::BTreeMap;

use modelpool::log::LogMode;
use modelpool::{PolicyKind, TimingModel};
use serde::{Deserialize, Serialize};

/// One model's measured timings, each replacing the global one when given (see
/// [`SimConfig::model_timing`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelTiming {
    /// Seconds a load of this model takes, all included (instead of latency + bytes /
    /// bandwidth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load_secs: Option<f64>,
    /// Service seconds per prompt token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prefill_secs_per_token: Option<f64>,
    /// Service seconds per generated token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decode_secs_per_token: Option<f64>,
}

impl ModelTiming {
    /// Check every given field is a finite number >= 0; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        for (v, name) in [
            (self.load_secs, "load time"),
            (self.prefill_secs_per_token, "prefill time per token"),
            (self.decode_secs_per_token, "decode time per token"),
        ] {
            if let Some(v) = v
                && !(v.is_finite() && v >= 0.0)
            {
                return Err(format!("{name} must be a finite number >= 0 (got {v})"));
            }
        }
        Ok(())
    }
}

/// A timing model as `modelpool-sim drive --calibrate-out` writes it: the global
/// [`TimingModel`] (its fields at the top level, so a plain timing model file reads as one with
/// no per-model entries) and the models measured well enough to have their own.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// The timings of every model not in `models`.
    #[serde(flatten)]
    pub timing: TimingModel,
    /// Per-model timings, by model id.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub models: BTreeMap<String, ModelTiming>,
}

impl Calibration {
    /// Check the global and every per-model timing; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        self.timing.validate()?;
        validate_model_timings(&self.models)
    }
}

/// Check every model's own timings; the message names the model and the field.
fn validate_model_timings(models: &BTreeMap<String, ModelTiming>) -> Result<(), String> {
    for (id, t) in models {
        t.validate().map_err(|e| format!("timing of model '{id}': {e}"))?;
    }
    Ok(())
}

/// Which eviction policy a replay uses: the engine's online ones or the simulator's offline
/// baselines.
///
/// The online choices are the engine's [`PolicyKind`]s, so a policy added to the engine is a
/// simulator choice at once (the replay's dispatch match names each kind, for static dispatch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PolicyChoice {
    /// One of the engine's policies, exactly as the server runs it.
    Online(PolicyKind),
    /// Offline: farthest next use first.
    Belady,
    /// Offline: size-and-cost-aware Belady.
    BeladyCost,
}

const N_CHOICES: usize = PolicyKind::ALL.len() + 2;

impl PolicyChoice {
    /// LRU, the engine's default.
    pub const LRU: PolicyChoice = PolicyChoice::Online(PolicyKind::Lru);
    /// Greedy-Dual-Size-Frequency.
    pub const GDSF: PolicyChoice = PolicyChoice::Online(PolicyKind::Gdsf);
    /// Least frequently used.
    pub const LFU: PolicyChoice = PolicyChoice::Online(PolicyKind::Lfu);

    /// Every policy: the engine's in its order, then the offline baselines.
    pub const ALL: [PolicyChoice; N_CHOICES] = {
        let mut all = [PolicyChoice::Belady; N_CHOICES];
        let mut i = 0;
        while i < PolicyKind::ALL.len() {
            all[i] = PolicyChoice::Online(PolicyKind::ALL[i]);
            i += 1;
        }
        all[N_CHOICES - 1] = PolicyChoice::BeladyCost;
        all
    };

    /// CLI and report name: the engine's name for an online policy, `belady`, `belady-cost`.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyChoice::Online(k) => k.as_str(),
            PolicyChoice::Belady => "belady",
            PolicyChoice::BeladyCost => "belady-cost",
        }
    }

    /// Whether the policy sees the future (a baseline, not deployable).
    pub fn is_offline(self) -> bool {
        !matches!(self, PolicyChoice::Online(_))
    }
}

impl serde::Serialize for PolicyChoice {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

impl std::fmt::Display for PolicyChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for PolicyChoice {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim().to_ascii_lowercase();
        PolicyChoice::ALL.into_iter().find(|p| p.as_str() == s).ok_or_else(|| {
            let names: Vec<&str> = PolicyChoice::ALL.iter().map(|p| p.as_str()).collect();
            format!("unknown policy '{s}' (expected {})", names.join(", "))
        })
    }
}

/// The admission queue's default timeout, seconds (the server's default too; see docs/sim.md
/// for the replays that chose it).
pub const DEFAULT_QUEUE_TIMEOUT_SECS: f64 = 60.0;

/// Everything a replay needs besides the trace. [`SimConfig::default`] documents the defaults.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SimConfig {
    /// Memory limit, bytes.
    pub limit: u64,
    /// Maximum models loaded or loading at once.
    pub max_models: usize,
    /// Eviction policy.
    pub policy: PolicyChoice,
    /// Fixed part of a load, seconds.
    pub load_latency_secs: f64,
    /// Load bandwidth, bytes per second (`inf` for instant transfers).
    pub load_bandwidth: f64,
    /// Time to unload a model, seconds (victims unload before the load that needs them starts).
    pub unload_secs: f64,
    /// Service seconds per input (prompt) token.
    pub prefill_secs_per_token: f64,
    /// Service seconds per output (generated) token.
    pub decode_secs_per_token: f64,
    /// Let the estimator see model names only (sizes in the trace become the measured truth, so
    /// estimation error shows up as over/under-reservation).
    pub estimate_from_names: bool,
    /// For models without a size in the trace: measured size = estimate x this factor.
    pub measured_factor: f64,
    /// Retries of a request refused with a retry hint (0: a 503 drops the request).
    pub retries: u32,
    /// Probability that a load fails (injected with the seeded RNG).
    pub load_failure_rate: f64,
    /// Seed of the replay's RNG.
    pub seed: u64,
    /// Keep-alive: unpinned models idle this long (seconds after their last request ended) are
    /// evicted. Checked every `ttl / 4` (between 1 and 60 s of virtual time), as the server does.
    pub idle_ttl_secs: Option<f64>,
    /// How long a request may wait in the engine's admission queue for memory or a model slot
    /// held by in-flight work, seconds; `0` refuses at once (the behaviour without a queue).
    pub queue_timeout_secs: f64,
    /// Requests waiting at once; one more is refused with `queue_full`.
    pub max_queue: usize,
    /// Count each request's KV cache in the ledger, as the server does: (input + output tokens)
    /// x the model's KV bytes per token, by the engine's rule
    /// (`modelpool::estimate::kv_bytes_per_token`: `2 x sqrt(parameters)` bytes, parameters from
    /// the name or half the model's size; 0 for embeddings models). Requests given as a duration
    /// hold none. Off in instant mode (a plain cache).
    pub kv_cache: bool,
    /// Predictive preload: after each arrival, while nothing waits, load the absent model the
    /// policy expects to be requested soonest, if within this many seconds
    /// (`modelpool::PoolState::predictive_preload`); `None`: off. Only the `predictive` policy
    /// predicts; with any other the setting does nothing.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub preload_horizon_secs: Option<f64>,
    /// Per-model timings that replace the global ones for that model (by model id), as
    /// `modelpool-sim drive --calibrate-out` measures them on a real backend, where an
    /// embeddings model and a text generator (or a 4-bit and an f32 one) serve at different
    /// rates. A model not named here, or a field left out, follows the global timings.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub model_timing: BTreeMap<String, ModelTiming>,
    /// Decision log mode (`Off` is fastest; `Decisions` keeps every non-hit event).
    #[serde(skip)]
    pub log: LogMode,
}

impl Default for SimConfig {
    /// 24 GB, 4 models (the server's default), LRU, loads of 0.5 s + bytes at 3.2 GB/s (plain
    /// safetensors reads on an H100 box), instant unloads, 0.2 ms per prompt token and 20 ms per
    /// generated token, no retries, no failures, seed 1, no log, KV cache counted.
    fn default() -> Self {
        SimConfig {
            limit: 24_000_000_000,
            max_models: 4,
            policy: PolicyChoice::LRU,
            load_latency_secs: 0.5,
            load_bandwidth: 3.2e9,
            unload_secs: 0.0,
            prefill_secs_per_token: 0.000_2,
            decode_secs_per_token: 0.02,
            estimate_from_names: false,
            measured_factor: 1.0,
            retries: 0,
            load_failure_rate: 0.0,
            seed: 1,
            idle_ttl_secs: None,
            queue_timeout_secs: DEFAULT_QUEUE_TIMEOUT_SECS,
            max_queue: 1024,
            kv_cache: true,
            preload_horizon_secs: None,
            model_timing: BTreeMap::new(),
            log: LogMode::Off,
        }
    }
}

impl SimConfig {
    /// A configuration with instant loads, unloads and service: no concurrency effects, so the
    /// pool behaves like a plain cache (what libCacheSim-style simulators model).
    pub fn instant(limit: u64, max_models: usize, policy: PolicyChoice) -> Self {
        SimConfig { limit, max_models, policy, ..SimConfig::default() }.with_instant_timing()
    }

    /// This configuration with instant loads, unloads and service (latency, transfer, unload,
    /// prefill and decode times all zero); limits, policy, retries, failures, seed, TTL,
    /// estimation and log are kept.
    pub fn with_instant_timing(self) -> Self {
        SimConfig {
            load_latency_secs: 0.0,
            load_bandwidth: f64::INFINITY,
            unload_secs: 0.0,
            prefill_secs_per_token: 0.0,
            decode_secs_per_token: 0.0,
            kv_cache: false,
            model_timing: BTreeMap::new(),
            ..self
        }
    }

    /// Check the settings; the message names the bad one.
    pub fn validate(&self) -> Result<(), String> {
        let nonneg = |v: f64, name: &str| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(format!("{name} must be a finite number >= 0 (got {v})"))
            }
        };
        if self.limit == 0 {
            return Err("memory limit must be greater than zero".into());
        }
        if self.max_models == 0 {
            return Err("max models must be at least 1".into());
        }
        nonneg(self.load_latency_secs, "load latency")?;
        nonneg(self.unload_secs, "unload time")?;
        nonneg(self.prefill_secs_per_token, "prefill time per token")?;
        nonneg(self.decode_secs_per_token, "decode time per token")?;
        if self.load_bandwidth.is_nan() || self.load_bandwidth <= 0.0 {
            return Err("load bandwidth must be > 0 bytes/s (or inf)".into());
        }
        if !(self.measured_factor.is_finite() && self.measured_factor > 0.0) {
            return Err("measured factor must be > 0".into());
        }
        if let Some(t) = self.idle_ttl_secs {
            nonneg(t, "idle ttl")?;
            if t == 0.0 {
                return Err("idle ttl must be greater than zero".into());
            }
        }
        nonneg(self.queue_timeout_secs, "queue timeout")?;
        if let Some(h) = self.preload_horizon_secs {
            nonneg(h, "preload horizon")?;
        }
        if !(0.0..=1.0).contains(&self.load_failure_rate) {
            return Err("load failure rate must be in [0, 1]".into());
        }
        validate_model_timings(&self.model_timing)
    }

    /// The engine's [`TimingModel`] of these settings: the one definition of load, service and
    /// unload times that the fake backend follows too.
    pub fn timing(&self) -> TimingModel {
        TimingModel {
            load_latency_secs: self.load_latency_secs,
            load_bandwidth: (!self.load_bandwidth.is_infinite()).then_some(self.load_bandwidth),
            unload_secs: self.unload_secs,
            prefill_secs_per_token: self.prefill_secs_per_token,
            decode_secs_per_token: self.decode_secs_per_token,
        }
    }

    /// These settings with the timings of `t` (a server's, read from its admin API).
    pub fn with_timing(self, t: &TimingModel) -> Self {
        SimConfig {
            load_latency_secs: t.load_latency_secs,
            load_bandwidth: t.load_bandwidth.unwrap_or(f64::INFINITY),
            unload_secs: t.unload_secs,
            prefill_secs_per_token: t.prefill_secs_per_token,
            decode_secs_per_token: t.decode_secs_per_token,
            ..self
        }
    }

    /// These settings with a calibration's timings: its global timing model and its per-model
    /// timings (replacing any given before).
    pub fn with_calibration(self, c: &Calibration) -> Self {
        SimConfig { model_timing: c.models.clone(), ..self.with_timing(&c.timing) }
    }

    /// Modelled seconds to load `bytes` ([`TimingModel::load_secs`]).
    pub fn load_secs(&self, bytes: u64) -> f64 {
        self.timing().load_secs(bytes)
    }
}
