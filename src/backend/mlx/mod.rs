//! The MLX backend (feature `mlx`): real inference through `mlx-rs`.
//!
//! Served model kinds, chosen from the spec's path and type:
//! - `text-gen` from a `.gguf` file (or a directory holding exactly one): a Llama-family decoder
//!   ([`llama`]) with its byte-level BPE tokenizer and ChatML template read from the GGUF
//!   metadata ([`text`]); streaming generation with greedy or seeded temperature/top-p sampling.
//! - `embeddings` from a Hugging Face BERT directory (`config.json`, `model.safetensors`,
//!   `tokenizer.json`): mean-pooled, L2-normalised sentence embeddings ([`bert`]).
//! - `vision`: not served (no vision-language weights ship in any registry package we can
//!   reach); loading one fails with a clear error.
//!
//! Threading: MLX arrays are `Send` but not `Sync`, and MLX keeps its default stream per thread.
//! Each loaded model therefore lives on its own OS thread, which owns every array of that model;
//! the async [`ModelHandle`] talks to it over channels (tokio mpsc for commands and streamed
//! events, oneshot for replies). A model serves one request at a time, in arrival order.
//!
//! Memory: a load reports MLX's active-memory delta around it (loads and unloads are serialised
//! process-wide so deltas do not mix), checked against the sum of the model's array sizes; when
//! the two disagree by more than 10% (other models' inference allocating at the same time) the
//! array sum is reported and the disagreement logged. Unload drops every array, returns MLX's
//! buffer cache to the system, and reports the active-memory delta.

mod bert;
mod llama;
mod sampling;
mod sys;
mod text;

use std::panic::AssertUnwindSafe;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::{
    Backend, BackendError, Embeddings, FinishReason, GenerateEvent, GenerateRequest, GenerateStream,
    ModelHandle, Prompt, Usage, check_type,
};
use crate::types::{ModelSpec, ModelType};

/// Internal result: errors are messages, turned into [`BackendError`] at the trait boundary.
type Res<T> = Result<T, String>;

/// Adds context to any displayable error.
trait Ctx<T> {
    fn ctx(self, what: &str) -> Res<T>;
}

impl<T, E: std::fmt::Display> Ctx<T> for Result<T, E> {
    fn ctx(self, what: &str) -> Res<T> {
        self.map_err(|e| format!("{what}: {e}"))
    }
}

/// Options of the MLX backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MlxOptions {
    /// Dequantize quantized GGUF weights to f32 once at load and use dense matmuls (`true`), or
    /// keep them quantized and use MLX's quantized matmul (`false`). On x86 CPUs MLX's quantized
    /// matmul is scalar and single-threaded, so `true` is much faster there at about 5.5x the
    /// memory; on Apple silicon (Metal) `false` is the better trade. Default: `false` on macOS,
    /// `true` elsewhere.
    pub dequantize: bool,
    /// Capacity of each generation's event channel (pieces buffered ahead of a slow reader).
    pub stream_buffer: usize,
}

impl Default for MlxOptions {
    fn default() -> Self {
        MlxOptions { dequantize: !cfg!(target_os = "macos"), stream_buffer: 32 }
    }
}

/// Real inference through mlx-rs. Cheap to share behind an `Arc<dyn Backend>`.
#[derive(Debug, Clone, Default)]
pub struct MlxBackend {
    options: MlxOptions,
}

impl MlxBackend {
    /// A backend with `options`. Loads nothing until [`Backend::load`].
    pub fn new(options: MlxOptions) -> Self {
        MlxBackend { options }
    }

    /// The options this backend was built with.
    pub fn options(&self) -> &MlxOptions {
        &self.options
    }
}

/// Serialises loads and unloads so their active-memory deltas measure one model each.
static MEMORY_MEASURE: Mutex<()> = Mutex::new(());

/// What a spec's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Kind {
    Gguf(PathBuf),
    Bert(PathBuf),
}

fn single_gguf(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_file()
                && p.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        })
        .collect();
    (found.len() == 1).then(|| found.remove(0))
}

fn detect_kind(spec: &ModelSpec) -> Result<Kind, BackendError> {
    let fail = |m: String| Err(BackendError::Load(m));
    let Some(path) = spec.path.as_ref() else {
        return fail(format!(
            "model '{}' has no path: the MLX backend loads weights from a .gguf file or a model directory",
            spec.id
        ));
    };
    if spec.model_type == ModelType::Vision {
        return fail(format!(
            "model '{}' is a vision model: the MLX backend serves text-gen (GGUF Llama) and embeddings (BERT) only; no vision-language weights are available",
            spec.id
        ));
    }
    let kind = if path.is_file() {
        if path.extension().and_then(|e| e.to_str()) != Some("gguf") {
            return fail(format!("{} is not a .gguf file", path.display()));
        }
        Kind::Gguf(path.clone())
    } else if path.is_dir() {
        if path.join("config.json").is_file() {
            Kind::Bert(path.clone())
        } else if let Some(g) = single_gguf(path) {
            Kind::Gguf(g)
        } else {
            return fail(format!("{} holds neither config.json nor exactly one .gguf file", path.display()));
        }
    } else {
        return fail(format!("{} does not exist", path.display()));
    };
    match (&kind, spec.model_type) {
        (Kind::Gguf(_), ModelType::TextGen) | (Kind::Bert(_), ModelType::Embeddings) => Ok(kind),
        (Kind::Gguf(p), t) => fail(format!(
            "model '{}' is declared {t} but {} is a GGUF decoder (text-gen)",
            spec.id,
            p.display()
        )),
        (Kind::Bert(p), t) => fail(format!(
            "model '{}' is declared {t} but {} is a Hugging Face encoder directory (embeddings)",
            spec.id,
            p.display()
        )),
    }
}

/// A model on its worker thread.
enum Loaded {
    Llama { model: llama::Llama, tok: text::GgufTokenizer },
    Bert(bert::Bert),
}

impl Loaded {
    fn load(kind: &Kind, opts: &MlxOptions) -> Res<Loaded> {
        match kind {
            Kind::Gguf(p) => {
                let f = mlx_rs::io::GgufFile::load(p).ctx(&p.display().to_string())?;
                let tok = text::GgufTokenizer::from_gguf(&f)?;
                let format =
                    if opts.dequantize { llama::WeightFormat::F32 } else { llama::WeightFormat::Quantized };
                let model = llama::Llama::load(&f, format)?;
                Ok(Loaded::Llama { model, tok })
            }
            Kind::Bert(p) => Ok(Loaded::Bert(bert::Bert::load(p)?)),
        }
    }

    fn array_bytes(&self) -> u64 {
        let arrays = match self {
            Loaded::Llama { model, .. } => model.arrays(),
            Loaded::Bert(b) => b.arrays(),
        };
        arrays.iter().map(|a| a.nbytes() as u64).sum()
    }
}

enum Command {
    Generate {
        req: GenerateRequest,
        started: oneshot::Sender<Result<(), BackendError>>,
        events: mpsc::Sender<Result<GenerateEvent, BackendError>>,
    },
    Embed {
        inputs: Vec<String>,
        reply: oneshot::Sender<Result<Embeddings, BackendError>>,
    },
    Probe {
        prompt: Prompt,
        steps: usize,
        logit_ids: Vec<u32>,
        reply: oneshot::Sender<Result<Probe, BackendError>>,
    },
    Unload {
        reply: oneshot::Sender<u64>,
    },
}

/// What [`MlxModel::probe`] observed: for checking the decoder against reference outputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Probe {
    /// The prompt's token ids (after chat rendering).
    pub input_ids: Vec<u32>,
    /// Logits of the first generated position at the requested ids, in their order.
    pub first_logits: Vec<f64>,
    /// Greedy ids for `steps` steps; generation does not stop at end-of-sequence ids.
    pub greedy_ids: Vec<u32>,
    /// Text of `greedy_ids` up to the first end-of-sequence id, special tokens skipped.
    pub greedy_text: String,
    /// Where the time went.
    pub timings: ProbeTimings,
}

/// Time spent in a [`MlxModel::probe`], seconds. Decode totals cover steps after the first.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProbeTimings {
    /// Prompt processing: building and evaluating the prompt's forward pass and reading the
    /// first logits.
    pub prefill: f64,
    /// Building the decode steps' lazy graphs in Rust (calls into mlx-rs, no compute).
    pub decode_graph: f64,
    /// Evaluating the decode steps in MLX and copying logits to the host.
    pub decode_eval: f64,
    /// Host work per decode step: argmax over the logits.
    pub decode_host: f64,
}

fn active_memory() -> u64 {
    mlx_rs::memory::active_memory().unwrap_or(0) as u64
}

/// Measured size of a fresh load: the active-memory delta if it agrees with the arrays' sum
/// within 10%, else the arrays' sum.
fn reconcile(id: &str, delta: u64, arrays: u64) -> u64 {
    let diff = delta.abs_diff(arrays) as f64;
    if diff <= 0.10 * arrays.max(1) as f64 {
        delta
    } else {
        tracing::warn!(
            model = id,
            active_delta = delta,
            array_bytes = arrays,
            "MLX active-memory delta disagrees with the model's array sizes; reporting the array sizes"
        );
        arrays
    }
}

#[async_trait]
impl Backend for MlxBackend {
    fn name(&self) -> &'static str {
        "mlx"
    }

    async fn load(&self, spec: &ModelSpec) -> Result<Arc<dyn ModelHandle>, BackendError> {
        Ok(self.load_model(spec).await?)
    }
}

impl MlxBackend {
    /// Like [`Backend::load`], with the concrete handle type (for [`MlxModel::probe`]).
    pub async fn load_model(&self, spec: &ModelSpec) -> Result<Arc<MlxModel>, BackendError> {
        let kind = detect_kind(spec)?;
        let (ready_tx, ready_rx) = oneshot::channel::<Result<u64, String>>();
        let (tx, rx) = mpsc::unbounded_channel::<Command>();
        let id = spec.id.to_string();
        let opts = self.options.clone();
        let thread_id = id.clone();
        let generated = Arc::new(AtomicU64::new(0));
        let counter = generated.clone();
        std::thread::Builder::new()
            .name(format!("mlx-{id}"))
            .spawn(move || worker(thread_id, kind, opts, ready_tx, rx, counter))
            .map_err(|e| BackendError::Load(format!("cannot start worker thread: {e}")))?;
        let bytes = ready_rx
            .await
            .map_err(|_| BackendError::Load("model worker stopped during load".into()))?
            .map_err(BackendError::Load)?;
        Ok(Arc::new(MlxModel {
            model_type: spec.model_type,
            bytes,
            tx: Mutex::new(Some(tx)),
            stream_buffer: self.options.stream_buffer.max(1),
            generated,
        }))
    }
}

fn worker(
    id: String,
    kind: Kind,
    opts: MlxOptions,
    ready: oneshot::Sender<Result<u64, String>>,
    mut rx: mpsc::UnboundedReceiver<Command>,
    generated: Arc<AtomicU64>,
) {
    let started = Instant::now();
    let loaded = {
        let _guard = MEMORY_MEASURE.lock().unwrap_or_else(|p| p.into_inner());
        let before = active_memory();
        let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| Loaded::load(&kind, &opts)))
            .unwrap_or_else(|_| Err("panic while loading".to_string()));
        let after = active_memory();
        // Temporaries (quantized originals, GGUF buffers) went to MLX's cache: give them back.
        let _ = mlx_rs::memory::clear_cache();
        loaded.map(|m| {
            let bytes = reconcile(&id, after.saturating_sub(before), m.array_bytes());
            (m, bytes)
        })
    };
    let (model, bytes) = match loaded {
        Ok(x) => x,
        Err(e) => {
            tracing::warn!(model = %id, error = %e, "MLX load failed");
            let _ = ready.send(Err(e));
            return;
        }
    };
    tracing::info!(
        model = %id,
        bytes,
        secs = started.elapsed().as_secs_f64(),
        "MLX model loaded"
    );
    if ready.send(Ok(bytes)).is_err() {
        return; // the load was abandoned; dropping the model frees it
    }
    let mut model = Some(model);
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            Command::Generate { req, started, events } => {
                if let Some(Loaded::Llama { model, tok }) = &model {
                    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        generate(model, tok, &req, started, &events, &generated)
                    }));
                    if r.is_err() {
                        let _ = events
                            .blocking_send(Err(BackendError::Inference("panic during generation".into())));
                    }
                }
            }
            Command::Embed { inputs, reply } => {
                if let Some(Loaded::Bert(b)) = &model {
                    let r = std::panic::catch_unwind(AssertUnwindSafe(|| b.embed(&inputs)))
                        .unwrap_or_else(|_| Err("panic during embedding".into()));
                    let _ = reply.send(
                        r.map(|(vectors, prompt_tokens)| Embeddings { vectors, prompt_tokens })
                            .map_err(BackendError::Inference),
                    );
                }
            }
            Command::Probe { prompt, steps, logit_ids, reply } => {
                if let Some(Loaded::Llama { model, tok }) = &model {
                    let r = std::panic::catch_unwind(AssertUnwindSafe(|| {
                        probe(model, tok, &prompt, steps, &logit_ids)
                    }))
                    .unwrap_or_else(|_| Err("panic during probe".into()));
                    let _ = reply.send(r.map_err(BackendError::Inference));
                }
            }
            Command::Unload { reply } => {
                let _guard = MEMORY_MEASURE.lock().unwrap_or_else(|p| p.into_inner());
                let before = active_memory();
                drop(model.take());
                let _ = mlx_rs::memory::clear_cache();
                let freed = before.saturating_sub(active_memory());
                tracing::info!(model = %id, freed, "MLX model unloaded");
                let _ = reply.send(freed);
                return;
            }
        }
    }
    // Every handle is gone without an unload: drop the model with the thread.
}

fn render_prompt(tok: &text::GgufTokenizer, prompt: &Prompt) -> Result<Vec<u32>, BackendError> {
    let (text, is_chat) = match prompt {
        Prompt::Text(t) => (t.clone(), false),
        Prompt::Chat(m) => {
            if m.is_empty() {
                return Err(BackendError::InvalidRequest("no chat messages".into()));
            }
            (tok.chat.render(m), true)
        }
    };
    tok.encode(&text, is_chat).map_err(BackendError::InvalidRequest)
}

fn probe(
    model: &llama::Llama,
    tok: &text::GgufTokenizer,
    prompt: &Prompt,
    steps: usize,
    logit_ids: &[u32],
) -> Res<Probe> {
    let input_ids = render_prompt(tok, prompt).map_err(|e| e.to_string())?;
    if input_ids.is_empty() {
        return Err("empty prompt".into());
    }
    let mut cache = llama::KvCache::new(model.cfg.n_layers);
    let mut timings = ProbeTimings::default();
    let t = Instant::now();
    let mut logits = model.forward(&input_ids, &mut cache)?;
    let mut host = logits.to_vec_exact::<f32>().ctx("reading logits")?;
    timings.prefill = t.elapsed().as_secs_f64();
    let first_logits =
        logit_ids.iter().map(|&i| host.get(i as usize).copied().unwrap_or(f32::NAN) as f64).collect();
    let mut greedy_ids = Vec::with_capacity(steps);
    for step in 0..steps {
        if step > 0 {
            let t = Instant::now();
            host = logits.to_vec_exact::<f32>().ctx("reading logits")?;
            timings.decode_eval += t.elapsed().as_secs_f64();
        }
        let t = Instant::now();
        let id = sampling::argmax(&host);
        timings.decode_host += t.elapsed().as_secs_f64();
        greedy_ids.push(id);
        if step + 1 < steps {
            let t = Instant::now();
            logits = model.forward(&[id], &mut cache)?;
            timings.decode_graph += t.elapsed().as_secs_f64();
        }
    }
    let end = greedy_ids.iter().position(|i| tok.stop_ids.contains(i)).unwrap_or(greedy_ids.len());
    let greedy_text = tok.tokenizer.decode(&greedy_ids[..end], true).ctx("detokenizing")?;
    Ok(Probe { input_ids, first_logits, greedy_ids, greedy_text, timings })
}

/// Runs one generation on the worker thread, streaming events into `events`. Returns early,
/// without sending more, as soon as the receiver is gone (the client dropped the stream).
fn generate(
    model: &llama::Llama,
    tok: &text::GgufTokenizer,
    req: &GenerateRequest,
    started: oneshot::Sender<Result<(), BackendError>>,
    events: &mpsc::Sender<Result<GenerateEvent, BackendError>>,
    generated: &AtomicU64,
) {
    let prepared = (|| -> Result<Vec<u32>, BackendError> {
        let ids = render_prompt(tok, &req.prompt)?;
        if ids.is_empty() {
            return Err(BackendError::InvalidRequest("the prompt is empty".into()));
        }
        if ids.len() >= model.cfg.context {
            return Err(BackendError::InvalidRequest(format!(
                "the prompt has {} tokens; the context holds {}",
                ids.len(),
                model.cfg.context
            )));
        }
        Ok(ids)
    })();
    let ids = match prepared {
        Ok(ids) => {
            if started.send(Ok(())).is_err() {
                return;
            }
            ids
        }
        Err(e) => {
            let _ = started.send(Err(e));
            return;
        }
    };
    let send = |ev: Result<GenerateEvent, BackendError>| events.blocking_send(ev).is_ok();
    let mut usage = Usage { prompt_tokens: ids.len() as u32, completion_tokens: 0 };
    if req.max_tokens == 0 {
        send(Ok(GenerateEvent::Done { finish_reason: FinishReason::Length, usage }));
        return;
    }
    let mut sampler = sampling::Sampler::new(req.temperature, req.top_p, req.seed);
    let mut decoder = text::StreamDecoder::new();
    let mut stops = text::StopMatcher::new(&req.stop);
    let mut cache = llama::KvCache::new(model.cfg.n_layers);
    let fail = |e: String| {
        let _ = events.blocking_send(Err(BackendError::Inference(e)));
    };
    let mut logits = match model.forward(&ids, &mut cache) {
        Ok(l) => l,
        Err(e) => return fail(e),
    };
    let finish_reason = loop {
        if events.is_closed() {
            return;
        }
        let host = match logits.to_vec_exact::<f32>() {
            Ok(v) => v,
            Err(e) => return fail(format!("reading logits: {e}")),
        };
        let id = sampler.sample(&host);
        usage.completion_tokens += 1;
        generated.fetch_add(1, Ordering::Relaxed);
        if tok.stop_ids.contains(&id) {
            break FinishReason::Stop;
        }
        let piece = match decoder.push(&tok.tokenizer, id) {
            Ok(p) => p,
            Err(e) => return fail(e),
        };
        match stops.push(&piece) {
            text::StopCheck::Emit(s) => {
                if !s.is_empty() && !send(Ok(GenerateEvent::Delta(s))) {
                    return;
                }
            }
            text::StopCheck::Stop(s) => {
                if !s.is_empty() && !send(Ok(GenerateEvent::Delta(s))) {
                    return;
                }
                break FinishReason::Stop;
            }
        }
        if usage.completion_tokens >= req.max_tokens || cache.len() + 1 >= model.cfg.context {
            break FinishReason::Length;
        }
        logits = match model.forward(&[id], &mut cache) {
            Ok(l) => l,
            Err(e) => return fail(e),
        };
    };
    if finish_reason == FinishReason::Length {
        let rest = stops.flush();
        if !rest.is_empty() && !send(Ok(GenerateEvent::Delta(rest))) {
            return;
        }
    }
    send(Ok(GenerateEvent::Done { finish_reason, usage }));
}

/// The async handle of a model living on its worker thread (what [`MlxBackend::load_model`]
/// returns; [`Backend::load`] returns it as `Arc<dyn ModelHandle>`). Holds no MLX types.
pub struct MlxModel {
    model_type: ModelType,
    bytes: u64,
    /// `None` after unload.
    tx: Mutex<Option<mpsc::UnboundedSender<Command>>>,
    stream_buffer: usize,
    /// Tokens sampled by [`ModelHandle::generate`] calls so far.
    generated: Arc<AtomicU64>,
}

impl MlxModel {
    /// Tokens generated by this model so far, over all requests (including tokens sampled
    /// ahead of a reader that then went away).
    pub fn generated_tokens(&self) -> u64 {
        self.generated.load(Ordering::Relaxed)
    }

    /// Runs `prompt` greedily for `steps` steps (not stopping at end-of-sequence) and reports
    /// the prompt's ids, the first step's logits at `logit_ids`, and the greedy ids and text.
    /// Text-gen models only; queued behind other requests like any call.
    pub async fn probe(
        &self,
        prompt: Prompt,
        steps: usize,
        logit_ids: Vec<u32>,
    ) -> Result<Probe, BackendError> {
        check_type(self.model_type, &[ModelType::TextGen], "probing")?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Probe { prompt, steps: steps.max(1), logit_ids, reply })?;
        rx.await.map_err(|_| BackendError::Gone)?
    }

    fn send(&self, cmd: Command) -> Result<(), BackendError> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().ok_or(BackendError::Gone)?.send(cmd).map_err(|_| BackendError::Gone)
    }
}

#[async_trait]
impl ModelHandle for MlxModel {
    fn measured_bytes(&self) -> u64 {
        self.bytes
    }

    async fn generate(&self, req: GenerateRequest) -> Result<GenerateStream, BackendError> {
        check_type(self.model_type, &[ModelType::TextGen], "generation")?;
        let valid = req.temperature >= 0.0 && req.top_p > 0.0 && req.top_p <= 1.0;
        if !valid {
            return Err(BackendError::InvalidRequest(format!(
                "temperature must be >= 0 and top_p in (0, 1]; got {} and {}",
                req.temperature, req.top_p
            )));
        }
        let (started_tx, started_rx) = oneshot::channel();
        let (events_tx, events_rx) = mpsc::channel(self.stream_buffer);
        self.send(Command::Generate { req, started: started_tx, events: events_tx })?;
        started_rx.await.map_err(|_| BackendError::Gone)??;
        Ok(Box::pin(tokio_stream::wrappers::ReceiverStream::new(events_rx)))
    }

    async fn embed(&self, inputs: Vec<String>) -> Result<Embeddings, BackendError> {
        check_type(self.model_type, &[ModelType::Embeddings], "embedding")?;
        if inputs.is_empty() {
            return Err(BackendError::InvalidRequest("no inputs to embed".into()));
        }
        let (reply, rx) = oneshot::channel();
        self.send(Command::Embed { inputs, reply })?;
        rx.await.map_err(|_| BackendError::Gone)?
    }

    async fn unload(&self) -> Result<u64, BackendError> {
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner()).take().ok_or(BackendError::Gone)?;
        let (reply, rx) = oneshot::channel();
        tx.send(Command::Unload { reply }).map_err(|_| BackendError::Gone)?;
        rx.await.map_err(|_| BackendError::Gone)
    }
}

/// Measures MLX's f32 matrix multiply on this machine: GFLOP/s of an `n x n x n` sgemm (best
/// of three after a warm-up). A diagnostic for checking that the fast BLAS (OpenBLAS on Linux)
/// is the one MLX calls; the mlx-cpu wheel's bundled reference BLAS is about 30x slower.
pub fn sgemm_gflops(n: usize) -> Result<f64, BackendError> {
    let n = n.max(1) as i32;
    let run = || -> Res<f64> {
        let a = mlx_rs::random::normal::<f32>(&[n, n], None, None, None).ctx("random")?;
        let b = mlx_rs::random::normal::<f32>(&[n, n], None, None, None).ctx("random")?;
        llama::eval_all([&a, &b])?;
        let mut best = f64::INFINITY;
        for _ in 0..4 {
            let t = Instant::now();
            let c = a.matmul(&b).ctx("matmul")?;
            c.eval().ctx("eval")?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(2.0 * (n as f64).powi(3) / best / 1e9)
    };
    run().map_err(BackendError::Inference)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kind_detection_checks_paths_and_types() {
        let spec = ModelSpec::new("x");
        assert!(matches!(detect_kind(&spec), Err(BackendError::Load(m)) if m.contains("no path")));
        let spec = ModelSpec::new("x").with_path("/nonexistent/model.gguf");
        assert!(matches!(detect_kind(&spec), Err(BackendError::Load(m)) if m.contains("does not exist")));
        let spec = ModelSpec::new("v").with_type(ModelType::Vision).with_path("/tmp");
        assert!(matches!(detect_kind(&spec), Err(BackendError::Load(m)) if m.contains("vision")));
    }

    #[test]
    fn reconcile_prefers_delta_when_close() {
        assert_eq!(reconcile("m", 1_000, 1_050), 1_000);
        assert_eq!(reconcile("m", 10, 1_000), 1_000);
    }
}
