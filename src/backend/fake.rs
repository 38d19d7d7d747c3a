//! A deterministic in-process backend for tests, the simulator's smoke runs and the server's
//! default mode. It allocates nothing real: "loading" sleeps for a configured time (tokio time,
//! so paused-clock tests are instant) and reports a configured size.
//!
//! For chaos tests it can inject faults at random from a seeded ChaCha stream ([`FaultPlan`]):
//! load failures, panics while loading and unloading, slow unloads, and measured sizes off the
//! estimate; [`FakeBackend::faults`] counts what it injected.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{Rng, SeedableRng};

use super::{
    Backend, BackendError, CancellationToken, Embeddings, FinishReason, GenerateEvent, GenerateRequest,
    GenerateStream, ModelHandle, Prompt, Usage, check_type,
};
use crate::estimate::{NameEstimator, SizeEstimator};
use crate::timing::TimingModel;
use crate::types::{ModelSpec, ModelType};

/// Per-model behaviour of the fake backend.
#[derive(Debug, Clone, Default)]
pub struct FakeModelConfig {
    /// Bytes the loaded model reports; `None` uses the spec's size hint, else the name estimate.
    pub measured_bytes: Option<u64>,
    /// Time a load takes; `None` uses the backend default.
    pub load_time: Option<Duration>,
    /// Number of upcoming loads that fail (decremented per failed load); `u32::MAX` fails always.
    pub fail_loads: u32,
    /// KV bytes per token the loaded model reports; `None` uses the backend's figure.
    pub kv_bytes_per_token: Option<u64>,
}

/// Faults to inject, each with a probability per load or unload (0 never, 1 always), drawn from
/// a ChaCha8 stream seeded with `seed`: the same sequence of calls gets the same faults.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FaultPlan {
    /// Seed of the fault stream.
    pub seed: u64,
    /// A load fails with an error (after its load time).
    pub load_failure: f64,
    /// A load panics (after its load time); the pool turns it into a load failure.
    pub load_panic: f64,
    /// An unload panics (the model is gone; the pool counts its memory as returned).
    pub unload_panic: f64,
    /// An unload takes `slow_unload_time` first.
    pub slow_unload: f64,
    /// How long a slow unload takes.
    pub slow_unload_time: Duration,
    /// A loaded model measures off its configured size (by up to `size_skew`).
    pub skewed_size: f64,
    /// How far off a skewed size is, as a share: 0.3 is up to 30% above or below, uniformly.
    pub size_skew: f64,
}

/// Faults injected so far, by kind.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[allow(missing_docs)] // one counter per [`FaultPlan`] probability
pub struct FaultCounts {
    pub load_failures: u64,
    pub load_panics: u64,
    pub unload_panics: u64,
    pub slow_unloads: u64,
    pub skewed_sizes: u64,
}

impl FaultCounts {
    /// Every fault injected.
    pub fn total(&self) -> u64 {
        self.load_failures + self.load_panics + self.unload_panics + self.slow_unloads + self.skewed_sizes
    }
}

#[derive(Debug)]
struct Faults {
    plan: FaultPlan,
    rng: Mutex<ChaCha8Rng>,
    counts: Mutex<FaultCounts>,
}

impl Faults {
    /// A uniform draw in [0, 1).
    fn draw(&self) -> f64 {
        let x = self.rng.lock().unwrap_or_else(|e| e.into_inner()).next_u64();
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Whether a fault of probability `p` happens now; counts it with `count` if so.
    fn roll(&self, p: f64, count: impl FnOnce(&mut FaultCounts) -> &mut u64) -> bool {
        if p <= 0.0 || self.draw() >= p {
            return false;
        }
        *count(&mut self.counts.lock().unwrap_or_else(|e| e.into_inner())) += 1;
        true
    }
}

/// Deterministic fake backend. Cheap to clone the configuration into; counts loads and unloads.
#[derive(Debug)]
pub struct FakeBackend {
    default_load_time: Duration,
    token_delay: Duration,
    embedding_dim: usize,
    natural_tokens: u32,
    kv_bytes_per_token: Option<u64>,
    timing: Option<TimingModel>,
    models: Mutex<HashMap<String, FakeModelConfig>>,
    loads: AtomicU64,
    unloads: Arc<AtomicU64>,
    faults: Option<Arc<Faults>>,
}

impl Default for FakeBackend {
    fn default() -> Self {
        FakeBackend::new()
    }
}

impl FakeBackend {
    /// A backend whose loads are instant and whose models report their estimated size.
    pub fn new() -> Self {
        FakeBackend {
            default_load_time: Duration::ZERO,
            token_delay: Duration::ZERO,
            embedding_dim: 384,
            natural_tokens: 8,
            kv_bytes_per_token: None,
            timing: None,
            models: Mutex::new(HashMap::new()),
            loads: AtomicU64::new(0),
            unloads: Arc::new(AtomicU64::new(0)),
            faults: None,
        }
    }

    /// Builder: a generation stops on its own after `n` tokens (default 8) unless `max_tokens`
    /// stops it first.
    pub fn with_natural_tokens(mut self, n: u32) -> Self {
        self.natural_tokens = n;
        self
    }

    /// Builder: inject the faults of `plan`.
    pub fn with_faults(mut self, plan: FaultPlan) -> Self {
        let rng = ChaCha8Rng::seed_from_u64(plan.seed);
        self.faults = Some(Arc::new(Faults { plan, rng: Mutex::new(rng), counts: Mutex::default() }));
        self
    }

    /// The faults injected so far (all zero without a [`FaultPlan`]).
    pub fn faults(&self) -> FaultCounts {
        self.faults.as_ref().map(|f| *f.counts.lock().unwrap_or_else(|e| e.into_inner())).unwrap_or_default()
    }

    /// Builder: every load takes `d` unless the model's own config says otherwise.
    pub fn with_load_time(mut self, d: Duration) -> Self {
        self.default_load_time = d;
        self
    }

    /// Builder: generation waits `d` between tokens (tokio time).
    pub fn with_token_delay(mut self, d: Duration) -> Self {
        self.token_delay = d;
        self
    }

    /// Builder: loaded models report `bytes` of KV cache per token (unless their own config says
    /// otherwise; without either they report the spec's figure, or nothing and the pool keeps
    /// its estimate rule's).
    pub fn with_kv_per_token(mut self, bytes: u64) -> Self {
        self.kv_bytes_per_token = Some(bytes);
        self
    }

    /// Builder: follow the simulator's timing model ([`TimingModel`], the one definition both
    /// use). A load of a model measuring `b` bytes takes `timing.load_nanos(b)` (unless its own
    /// [`FakeModelConfig::load_time`] says otherwise); a generation of `p` prompt tokens ends its
    /// token `i` at `timing.token_deadline(p, i)` after it started, sleeping to those absolute
    /// deadlines (no drift, whatever the token count); an embeddings call takes `p x prefill`;
    /// an unload takes `timing.unload_nanos()`. Replaces [`Self::with_load_time`] and
    /// [`Self::with_token_delay`] while set.
    pub fn with_timing(mut self, timing: TimingModel) -> Self {
        self.timing = Some(timing);
        self
    }

    /// Set (replace) the behaviour of one model.
    pub fn configure(&self, model: &str, config: FakeModelConfig) {
        self.models.lock().unwrap().insert(model.to_string(), config);
    }

    /// Make the next `n` loads of `model` fail (`u32::MAX`: all of them).
    pub fn fail_next_loads(&self, model: &str, n: u32) {
        self.models.lock().unwrap().entry(model.to_string()).or_default().fail_loads = n;
    }

    /// Loads attempted so far (successful or not).
    pub fn load_count(&self) -> u64 {
        self.loads.load(Ordering::SeqCst)
    }

    /// Unloads completed so far.
    pub fn unload_count(&self) -> u64 {
        self.unloads.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl Backend for FakeBackend {
    fn name(&self) -> &'static str {
        "fake"
    }

    fn timing(&self) -> Option<TimingModel> {
        self.timing
    }

    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn ModelHandle>, BackendError> {
        self.load_cancellable(spec, CancellationToken::new()).await
    }

    /// Stops at once when `cancel` fires during the modelled load time (a fake load holds
    /// nothing until it returns), with [`BackendError::Cancelled`].
    async fn load_cancellable(
        &self,
        spec: &ModelSpec,
        cancel: CancellationToken,
    ) -> Result<Arc<dyn ModelHandle>, BackendError> {
        self.loads.fetch_add(1, Ordering::SeqCst);
        let (load_time, fail, measured, kv) = {
            let mut models = self.models.lock().unwrap();
            let cfg = models.entry(spec.id.to_string()).or_default();
            let fail = cfg.fail_loads > 0;
            if fail && cfg.fail_loads != u32::MAX {
                cfg.fail_loads -= 1;
            }
            let measured =
                cfg.measured_bytes.or(spec.size_hint).unwrap_or_else(|| NameEstimator.estimate(spec).bytes);
            let kv = cfg.kv_bytes_per_token.or(self.kv_bytes_per_token).or(spec.kv_bytes_per_token);
            let default_time = match &self.timing {
                Some(t) => Duration::from_nanos(t.load_nanos(measured)),
                None => self.default_load_time,
            };
            (cfg.load_time.unwrap_or(default_time), fail, measured, kv)
        };
        if !load_time.is_zero() {
            tokio::select! {
                _ = tokio::time::sleep(load_time) => {}
                _ = cancel.cancelled() => return Err(BackendError::Cancelled),
            }
        }
        if fail {
            return Err(BackendError::Load(format!("injected failure loading '{}'", spec.id)));
        }
        let mut measured = measured;
        if let Some(f) = &self.faults {
            if f.roll(f.plan.load_failure, |c| &mut c.load_failures) {
                return Err(BackendError::Load(format!("injected random failure loading '{}'", spec.id)));
            }
            if f.roll(f.plan.load_panic, |c| &mut c.load_panics) {
                panic!("injected panic loading '{}'", spec.id);
            }
            if f.roll(f.plan.skewed_size, |c| &mut c.skewed_sizes) {
                let factor = 1.0 + f.plan.size_skew * (f.draw() * 2.0 - 1.0);
                measured = ((measured as f64) * factor).round().max(1.0) as u64;
            }
        }
        Ok(Arc::new(FakeModel {
            id: spec.id.to_string(),
            model_type: spec.model_type,
            bytes: measured,
            kv,
            token_delay: self.token_delay,
            timing: self.timing,
            embedding_dim: self.embedding_dim,
            loaded: AtomicBool::new(true),
            unloads: self.unloads.clone(),
            natural_tokens: self.natural_tokens,
            faults: self.faults.clone(),
        }))
    }
}

struct FakeModel {
    id: String,
    model_type: ModelType,
    bytes: u64,
    kv: Option<u64>,
    token_delay: Duration,
    timing: Option<TimingModel>,
    embedding_dim: usize,
    loaded: AtomicBool,
    unloads: Arc<AtomicU64>,
    natural_tokens: u32,
    faults: Option<Arc<Faults>>,
}

/// FNV-1a, so fake outputs are identical on every platform and version.
fn fnv1a(data: &[u8], seed: u64) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in data {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Prompt tokens the fake backend counts for each image of a chat request to a vision model
/// (on top of the words of the text), so tests see images arrive in `usage.prompt_tokens`.
/// Other model types count no image tokens.
pub const FAKE_IMAGE_TOKENS: u32 = 100;

const WORDS: [&str; 16] = [
    "alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet", "kilo",
    "lima", "mike", "november", "oscar", "papa",
];

fn prompt_text(p: &Prompt) -> String {
    match p {
        Prompt::Text(t) => t.clone(),
        Prompt::Chat(msgs) => msgs.iter().map(|m| format!("{}: {}\n", m.role, m.content)).collect(),
    }
}

impl FakeModel {
    fn check_loaded(&self) -> Result<(), BackendError> {
        if self.loaded.load(Ordering::SeqCst) { Ok(()) } else { Err(BackendError::Gone) }
    }
}

#[async_trait]
impl ModelHandle for FakeModel {
    fn measured_bytes(&self) -> u64 {
        self.bytes
    }

    fn kv_bytes_per_token(&self) -> Option<u64> {
        self.kv
    }

    async fn generate(&self, req: GenerateRequest) -> Result<GenerateStream, BackendError> {
        check_type(self.model_type, &[ModelType::TextGen, ModelType::Vision], "generation")?;
        self.check_loaded()?;
        let text = prompt_text(&req.prompt);
        let images = match &req.prompt {
            Prompt::Chat(msgs) if self.model_type == ModelType::Vision => {
                msgs.iter().map(|m| m.images().count() as u32).sum::<u32>()
            }
            _ => 0,
        };
        let prompt_tokens = text.split_whitespace().count().max(1) as u32 + FAKE_IMAGE_TOKENS * images;
        let seed = fnv1a(self.id.as_bytes(), req.seed.unwrap_or(0));
        let mut h = fnv1a(text.as_bytes(), seed);
        // The fake "model" emits words chosen by a hash chain; it stops on its own after
        // `natural_tokens` words (8 unless configured).
        let natural_len = self.natural_tokens;
        let n = req.max_tokens.min(natural_len);
        let mut pieces = Vec::with_capacity(n as usize);
        for i in 0..n {
            h = fnv1a(&h.to_le_bytes(), u64::from(i));
            pieces.push(format!(" {}", WORDS[(h % WORDS.len() as u64) as usize]));
        }
        // Honour stop strings on the joined text, as a real backend must.
        let mut out = String::new();
        let mut emitted = Vec::new();
        let mut stopped = false;
        for p in pieces {
            if req.stop.is_empty() {
                emitted.push(p);
                continue;
            }
            let candidate = format!("{out}{p}");
            if let Some(pos) = req.stop.iter().filter_map(|s| candidate.find(s.as_str())).min() {
                let tail = &candidate[out.len()..pos.max(out.len())];
                if !tail.is_empty() {
                    emitted.push(tail.to_string());
                }
                stopped = true;
                break;
            }
            out = candidate;
            emitted.push(p);
        }
        let completion_tokens = emitted.len() as u32;
        let finish_reason =
            if stopped || req.max_tokens >= natural_len { FinishReason::Stop } else { FinishReason::Length };
        let delay = self.token_delay;
        let timing = self.timing;
        let start = tokio::time::Instant::now();
        let usage = Usage { prompt_tokens, completion_tokens };
        let stream = futures::stream::unfold(
            (emitted.into_iter(), 0u64, false),
            move |(mut it, i, done)| async move {
                if done {
                    return None;
                }
                match it.next() {
                    Some(piece) => {
                        if let Some(t) = timing {
                            tokio::time::sleep_until(start + t.token_deadline(u64::from(prompt_tokens), i))
                                .await;
                        } else if !delay.is_zero() {
                            tokio::time::sleep(delay).await;
                        }
                        Some((Ok(GenerateEvent::Delta(piece)), (it, i + 1, false)))
                    }
                    None => Some((Ok(GenerateEvent::Done { finish_reason, usage }), (it, i, true))),
                }
            },
        );
        Ok(Box::pin(stream))
    }

    async fn embed(&self, inputs: Vec<String>) -> Result<Embeddings, BackendError> {
        check_type(self.model_type, &[ModelType::Embeddings], "embedding")?;
        self.check_loaded()?;
        let mut prompt_tokens = 0u32;
        let vectors = inputs
            .iter()
            .map(|s| {
                prompt_tokens += s.split_whitespace().count().max(1) as u32;
                let mut h = fnv1a(s.as_bytes(), 7);
                let mut v: Vec<f32> = (0..self.embedding_dim)
                    .map(|i| {
                        h = fnv1a(&h.to_le_bytes(), i as u64);
                        ((h >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) as f32
                    })
                    .collect();
                let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(f32::MIN_POSITIVE);
                v.iter_mut().for_each(|x| *x /= norm);
                v
            })
            .collect();
        if let Some(t) = &self.timing {
            tokio::time::sleep(Duration::from_nanos(t.service_nanos(u64::from(prompt_tokens), 0))).await;
        }
        Ok(Embeddings { vectors, prompt_tokens })
    }

    async fn unload(&self) -> Result<u64, BackendError> {
        if let Some(t) = self.timing.filter(|t| t.unload_nanos() > 0) {
            tokio::time::sleep(Duration::from_nanos(t.unload_nanos())).await;
        }
        if let Some(f) = &self.faults {
            if f.roll(f.plan.slow_unload, |c| &mut c.slow_unloads) {
                tokio::time::sleep(f.plan.slow_unload_time).await;
            }
            if f.roll(f.plan.unload_panic, |c| &mut c.unload_panics) {
                self.loaded.store(false, Ordering::SeqCst);
                panic!("injected panic unloading '{}'", self.id);
            }
        }
        if self.loaded.swap(false, Ordering::SeqCst) {
            self.unloads.fetch_add(1, Ordering::SeqCst);
            Ok(self.bytes)
        } else {
            Err(BackendError::Gone)
        }
    }
}
