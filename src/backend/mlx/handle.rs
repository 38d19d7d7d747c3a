//! The async side of the MLX backend: [`MlxBackend`] (detects what a spec's files are and starts
//! a model's worker thread) and [`MlxModel`] (the handle the pool holds). No MLX type lives here.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use tokio::sync::{mpsc, oneshot};

use super::MlxOptions;
use super::worker::{self, Command, Probe, ProbeInput};
use crate::backend::{
    Backend, BackendError, Embeddings, GenerateRequest, GenerateStream, ModelHandle, Prompt, check_type,
};
use crate::types::{ModelSpec, ModelType, ServingStatus};

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

/// What a spec's files are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Kind {
    /// A GGUF decoder file.
    Gguf(PathBuf),
    /// A Hugging Face BERT encoder directory.
    Bert(PathBuf),
    /// A Hugging Face / MLX safetensors decoder directory (`config.json` of a text-gen
    /// architecture; the worker checks the `model_type`).
    HfDecoder(PathBuf),
    /// A Hugging Face / mlx-vlm vision-language directory (`config.json` with a
    /// `vision_config`; the worker checks the `model_type`).
    HfVision(PathBuf),
}

fn detect_kind(spec: &ModelSpec) -> Result<Kind, BackendError> {
    let fail = |m: String| Err(BackendError::Load(m));
    let Some(path) = spec.path.as_ref() else {
        return fail(format!(
            "model '{}' has no path: the MLX backend loads weights from a .gguf file or a model directory",
            spec.id
        ));
    };
    let kind = if path.is_file() {
        if !crate::catalog::is_gguf(path) {
            return fail(format!("{} is not a .gguf file", path.display()));
        }
        Kind::Gguf(path.clone())
    } else if path.is_dir() {
        let config = path.join("config.json");
        if config.is_file() {
            let parsed: Option<serde_json::Value> =
                std::fs::read_to_string(&config).ok().and_then(|t| serde_json::from_str(&t).ok());
            match parsed.as_ref().map(crate::catalog::model_type_of_config) {
                Some(ModelType::Embeddings) => Kind::Bert(path.clone()),
                Some(ModelType::TextGen) => Kind::HfDecoder(path.clone()),
                Some(ModelType::Vision) => Kind::HfVision(path.clone()),
                None => return fail(format!("{} is not valid JSON", config.display())),
            }
        } else if let Some(g) = crate::catalog::single_gguf(path) {
            Kind::Gguf(g)
        } else {
            return fail(format!("{} holds neither config.json nor exactly one .gguf file", path.display()));
        }
    } else {
        return fail(format!("{} does not exist", path.display()));
    };
    match (&kind, spec.model_type) {
        (Kind::Gguf(_) | Kind::HfDecoder(_), ModelType::TextGen)
        | (Kind::Bert(_), ModelType::Embeddings)
        | (Kind::HfVision(_), ModelType::Vision) => Ok(kind),
        (Kind::HfVision(p), t) => fail(format!(
            "model '{}' is declared {t} but {} is a vision-language directory (vision)",
            spec.id,
            p.display()
        )),
        (Kind::HfDecoder(p), t) => fail(format!(
            "model '{}' is declared {t} but {} is a Hugging Face decoder directory (text-gen)",
            spec.id,
            p.display()
        )),
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
        let (ready_tx, ready_rx) = oneshot::channel::<Result<(u64, u64), BackendError>>();
        let (tx, rx) = mpsc::channel::<Command>(self.options.queue_depth.max(1));
        let id = spec.id.to_string();
        let opts = self.options.clone();
        let thread_id = id.clone();
        let counters = Arc::new(Counters::default());
        let counter = counters.clone();
        std::thread::Builder::new()
            .name(format!("mlx-{id}"))
            .spawn(move || worker::run(thread_id, kind, opts, ready_tx, rx, counter))
            .map_err(|e| BackendError::Load(format!("cannot start worker thread: {e}")))?;
        let (bytes, kv_per_token) =
            ready_rx.await.map_err(|_| BackendError::Load("model worker stopped during load".into()))??;
        Ok(Arc::new(MlxModel {
            id: id.clone(),
            model_type: spec.model_type,
            bytes,
            kv_per_token,
            tx: Mutex::new(Some(tx)),
            stream_buffer: self.options.stream_buffer.max(1),
            max_parallel: match spec.model_type {
                ModelType::Embeddings => worker::EMBED_BATCH_INPUTS as u64,
                _ => self.options.max_batch.max(1) as u64,
            },
            counters,
        }))
    }
}

/// What a model's worker counts, read by its handle.
#[derive(Debug, Default)]
pub(super) struct Counters {
    /// Tokens sampled.
    pub tokens: AtomicU64,
    /// Most sequences decoded in one step.
    pub peak_batch: AtomicU64,
    /// Bytes the decoder's KV caches hold now: the shared cache's cells (live or free) and the
    /// prefill caches of sequences still reading their prompt.
    pub kv_bytes: AtomicU64,
    /// Sequences being prefilled or decoded now.
    pub active: AtomicU64,
}

/// The async handle of a model living on its worker thread (what [`MlxBackend::load_model`]
/// returns; [`Backend::load`] returns it as `Arc<dyn ModelHandle>`). Holds no MLX types.
pub struct MlxModel {
    id: String,
    model_type: ModelType,
    bytes: u64,
    kv_per_token: u64,
    /// The worker's bounded command queue; `None` after unload.
    tx: Mutex<Option<mpsc::Sender<Command>>>,
    stream_buffer: usize,
    /// [`ServingStatus::max_parallel`].
    max_parallel: u64,
    /// Tokens sampled by [`ModelHandle::generate`] calls so far.
    counters: Arc<Counters>,
}

impl MlxModel {
    /// Tokens generated by this model so far, over all requests (including tokens sampled
    /// ahead of a reader that then went away).
    pub fn generated_tokens(&self) -> u64 {
        self.counters.tokens.load(Ordering::Relaxed)
    }

    /// The most requests this model has served in one step: generations decoded together
    /// (continuous batching) or embedding requests gathered into one call (1 when requests never
    /// overlapped, 0 before the first).
    pub fn peak_batch(&self) -> u64 {
        self.counters.peak_batch.load(Ordering::Relaxed)
    }

    /// Bytes this decoder's KV caches hold, as of its worker's last scheduler iteration: every
    /// cell of the shared cache (live or free; freed cells are given back by compaction, and
    /// all of them once no sequence is left) and the caches of prompts being prefilled. 0 for
    /// an encoder.
    pub fn kv_bytes(&self) -> u64 {
        self.counters.kv_bytes.load(Ordering::Relaxed)
    }

    /// Generations in the decoder's active set (prefilling or decoding) as of its worker's last
    /// scheduler iteration.
    pub fn active_sequences(&self) -> u64 {
        self.counters.active.load(Ordering::Relaxed)
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
        self.probe_input(ProbeInput::Prompt(prompt), steps, logit_ids).await
    }

    /// Like [`MlxModel::probe`], on token ids as given (no template, no tokenizer).
    pub async fn probe_ids(
        &self,
        ids: Vec<u32>,
        steps: usize,
        logit_ids: Vec<u32>,
    ) -> Result<Probe, BackendError> {
        self.probe_input(ProbeInput::Ids(ids), steps, logit_ids).await
    }

    async fn probe_input(
        &self,
        input: ProbeInput,
        steps: usize,
        logit_ids: Vec<u32>,
    ) -> Result<Probe, BackendError> {
        check_type(self.model_type, &[ModelType::TextGen, ModelType::Vision], "probing")?;
        let (reply, rx) = oneshot::channel();
        self.send(Command::Probe { input, steps: steps.max(1), logit_ids, reply })?;
        rx.await.map_err(|_| BackendError::Gone)?
    }

    /// Queue `cmd` behind the running one; refuses at once when the queue is full.
    fn send(&self, cmd: Command) -> Result<(), BackendError> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        match guard.as_ref().ok_or(BackendError::Gone)?.try_send(cmd) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(_)) => Err(BackendError::Overloaded(format!(
                "model '{}' has {} requests queued; retry shortly",
                self.id,
                guard.as_ref().map_or(0, |t| t.max_capacity())
            ))),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(BackendError::Gone),
        }
    }
}

#[async_trait]
impl ModelHandle for MlxModel {
    fn measured_bytes(&self) -> u64 {
        self.bytes
    }

    fn kv_bytes_per_token(&self) -> Option<u64> {
        Some(self.kv_per_token)
    }

    fn serving(&self) -> Option<ServingStatus> {
        let guard = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        let waiting = guard.as_ref().map_or(0, |tx| tx.max_capacity() - tx.capacity());
        drop(guard);
        Some(ServingStatus {
            running: self.active_sequences(),
            waiting: waiting as u64,
            max_parallel: self.max_parallel,
            peak_batch: self.peak_batch(),
            kv_cache_bytes: self.kv_bytes(),
        })
    }

    async fn generate(&self, req: GenerateRequest) -> Result<GenerateStream, BackendError> {
        check_type(self.model_type, &[ModelType::TextGen, ModelType::Vision], "generation")?;
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
        // Waits for room rather than refusing: an unload must reach the worker (the pool unloads
        // only models with no request left, so the queue is normally empty by then).
        tx.send(Command::Unload { reply }).await.map_err(|_| BackendError::Gone)?;
        rx.await.map_err(|_| BackendError::Gone)
    }
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
    }

    #[test]
    fn a_directory_with_a_vision_config_is_a_vision_model() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().to_path_buf();
        std::fs::write(d.join("config.json"), r#"{"model_type":"idefics3","vision_config":{}}"#).unwrap();
        let spec = ModelSpec::new("v").with_type(ModelType::Vision).with_path(&d);
        assert_eq!(detect_kind(&spec).unwrap(), Kind::HfVision(d.clone()));
        let spec = ModelSpec::new("v").with_path(&d);
        assert!(
            matches!(detect_kind(&spec), Err(BackendError::Load(m)) if m.contains("vision-language directory"))
        );
    }

    #[test]
    fn hf_directories_are_decoders_or_encoders_by_config() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().to_path_buf();
        std::fs::write(d.join("config.json"), r#"{"model_type":"llama"}"#).unwrap();
        let spec = ModelSpec::new("l").with_path(&d);
        assert_eq!(detect_kind(&spec).unwrap(), Kind::HfDecoder(d.clone()));
        let spec = ModelSpec::new("l").with_type(ModelType::Embeddings).with_path(&d);
        assert!(matches!(detect_kind(&spec), Err(BackendError::Load(m)) if m.contains("decoder directory")));
        std::fs::write(d.join("config.json"), r#"{"model_type":"bert"}"#).unwrap();
        let spec = ModelSpec::new("b").with_type(ModelType::Embeddings).with_path(&d);
        assert_eq!(detect_kind(&spec).unwrap(), Kind::Bert(d.clone()));
        let spec = ModelSpec::new("b").with_path(&d);
        assert!(matches!(detect_kind(&spec), Err(BackendError::Load(m)) if m.contains("declared text-gen")));
    }

    /// The real MiniLM model fetched by `scripts/setup.sh` (as tests/mlx.rs uses it).
    fn minilm() -> ModelSpec {
        let dir = std::env::var_os("MODELPOOL_MODELS_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models"));
        ModelSpec::new("all-minilm-l6-v2")
            .with_type(ModelType::Embeddings)
            .with_path(dir.join("all-minilm-l6-v2"))
    }

    /// A command the model cannot serve is answered (`Unsupported`), never dropped: the caller
    /// would otherwise see the worker as gone (a 503 `model_unloaded`).
    #[tokio::test]
    async fn a_command_the_model_cannot_serve_is_answered() {
        let m = MlxBackend::default().load_model(&minilm()).await.unwrap();
        let (started, started_rx) = oneshot::channel();
        let (events, _events_rx) = mpsc::channel(1);
        let req = GenerateRequest {
            prompt: Prompt::Text("hi".into()),
            max_tokens: 1,
            temperature: 0.0,
            top_p: 1.0,
            seed: None,
            stop: Vec::new(),
        };
        m.send(Command::Generate { req, started, events }).unwrap();
        let r = started_rx.await.expect("the worker answers");
        assert!(matches!(&r, Err(BackendError::Unsupported(msg)) if msg.contains("embeddings")), "{r:?}");
        let (reply, rx) = oneshot::channel();
        m.send(Command::Probe {
            input: ProbeInput::Prompt(Prompt::Text("hi".into())),
            steps: 1,
            logit_ids: vec![],
            reply,
        })
        .unwrap();
        assert!(matches!(rx.await.unwrap(), Err(BackendError::Unsupported(_))));
        assert!(m.unload().await.unwrap() > 80_000_000);
    }

    /// The per-model queue is bounded: beyond `queue_depth` waiting commands, a request is
    /// refused at once with `Overloaded` instead of queueing without bound.
    #[tokio::test]
    async fn a_full_queue_refuses_with_overloaded() {
        let opts = MlxOptions { queue_depth: 1, ..MlxOptions::default() };
        let m = MlxBackend::new(opts).load_model(&minilm()).await.unwrap();
        let long: Vec<String> =
            (0..64).map(|i| format!("sentence number {i} to embed, long enough to take time")).collect();
        let mut replies = Vec::new();
        let mut refused = 0;
        for _ in 0..32 {
            let (reply, rx) = oneshot::channel();
            match m.send(Command::Embed { inputs: long.clone(), reply }) {
                Ok(()) => replies.push(rx),
                Err(BackendError::Overloaded(msg)) => {
                    assert!(msg.contains("all-minilm-l6-v2") && msg.contains("queued"), "{msg}");
                    refused += 1;
                }
                Err(e) => panic!("{e:?}"),
            }
        }
        assert!(refused > 0, "32 commands at once into a queue of 1");
        assert!(!replies.is_empty(), "the first command is always accepted");
        for rx in replies {
            assert_eq!(rx.await.unwrap().unwrap().vectors.len(), 64);
        }
        m.unload().await.unwrap();
    }
}
