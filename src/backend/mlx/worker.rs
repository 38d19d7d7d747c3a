//! The worker thread of one loaded model: it loads the model, owns every MLX array of it, serves
//! commands one at a time in arrival order, and drops the model when told to unload (or when
//! every handle is gone).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, anyhow};
use tokio::sync::{mpsc, oneshot};

use super::handle::Kind;
use super::{MlxOptions, Res, bert, llama, message, sampling, text, vision};
use crate::backend::{BackendError, Embeddings, GenerateEvent, GenerateRequest, Prompt};
use crate::catalog::read_config;

/// A model on its worker thread.
enum Loaded {
    /// Boxed, as is `Bert`: the variants differ in size by hundreds of bytes.
    Llama {
        model: Box<llama::Llama>,
        tok: Box<text::TextTokenizer>,
        /// The vision side of a vision-language model (its decoder is `model`).
        vision: Option<Box<vision::Vision>>,
    },
    Bert(Box<bert::Bert>),
}

impl Loaded {
    fn load(kind: &Kind, opts: &MlxOptions) -> Res<Loaded> {
        let format = if opts.dequantize { llama::WeightFormat::F32 } else { llama::WeightFormat::Quantized };
        match kind {
            Kind::Gguf(p) => {
                let f = mlx_rs::io::GgufFile::load(p).with_context(|| p.display().to_string())?;
                let tok = text::TextTokenizer::from_gguf(&f)?;
                let cfg = llama::LlamaConfig::from_gguf(&f)?;
                let model = llama::Llama::load(&mut llama::Source::Gguf(&f), cfg, format)?;
                Ok(Loaded::Llama { model: Box::new(model), tok: Box::new(tok), vision: None })
            }
            Kind::HfDecoder(dir) => {
                // Cheap checks first (config, tokenizer, headers), then the weights.
                let config = read_config(dir).map_err(|e| anyhow!(e))?;
                let cfg = llama::LlamaConfig::from_hf(&config).with_context(|| dir.display().to_string())?;
                let tok = text::TextTokenizer::from_hf_dir(dir, &config)?;
                let mut src = llama::Source::hf(dir, &config)?;
                let model =
                    llama::Llama::load(&mut src, cfg, format).with_context(|| dir.display().to_string())?;
                Ok(Loaded::Llama { model: Box::new(model), tok: Box::new(tok), vision: None })
            }
            Kind::HfVision(dir) => {
                let config = read_config(dir).map_err(|e| anyhow!(e))?;
                let (model, tok, vision) = vision::load_dir(dir, &config, format)?;
                Ok(Loaded::Llama {
                    model: Box::new(model),
                    tok: Box::new(tok),
                    vision: Some(Box::new(vision)),
                })
            }
            Kind::Bert(p) => Ok(Loaded::Bert(Box::new(bert::Bert::load(p)?))),
        }
    }

    fn array_bytes(&self) -> u64 {
        let arrays = match self {
            Loaded::Llama { model, vision, .. } => {
                let mut v = model.arrays();
                v.extend(vision.iter().flat_map(|x| x.arrays()));
                v
            }
            Loaded::Bert(b) => b.arrays(),
        };
        arrays.iter().map(|a| a.nbytes() as u64).sum()
    }

    /// KV cache bytes per token of context: the cache holds f32 keys and values for every
    /// layer and KV head (see `llama::KvCache`); an encoder keeps none.
    fn kv_bytes_per_token(&self) -> u64 {
        match self {
            Loaded::Llama { model, .. } => model.kv_bytes_per_position(),
            Loaded::Bert(_) => 0,
        }
    }
}

/// What the async handle asks of the worker. Every command with a reply gets one, even when the
/// model cannot serve it.
pub(super) enum Command {
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
        input: ProbeInput,
        steps: usize,
        logit_ids: Vec<u32>,
        reply: oneshot::Sender<Result<Probe, BackendError>>,
    },
    Unload {
        reply: oneshot::Sender<u64>,
    },
}

/// What a probe runs: a prompt (rendered and tokenized as for generation) or token ids as given.
#[derive(Debug, Clone)]
pub(super) enum ProbeInput {
    Prompt(Prompt),
    Ids(Vec<u32>),
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

/// Whether MLX's active-memory delta around a load agrees with the model's array sizes within
/// 10%. It need not: other workers allocate at the same time. A debug cross-check only.
fn delta_agrees(delta: u64, arrays: u64) -> bool {
    delta.abs_diff(arrays) as f64 <= 0.10 * arrays.max(1) as f64
}

/// The refusal of a command the loaded model does not serve (`kind`: what it is).
pub(super) fn unsupported(what: &str, kind: &str) -> BackendError {
    BackendError::Unsupported(format!("{what} is not served by this model ({kind})"))
}

/// The worker's body: load, report `Ok((measured bytes, KV bytes per token))` or the load error
/// on `ready`, then
/// serve `rx` until an unload (or until every sender is gone).
pub(super) fn run(
    id: String,
    kind: Kind,
    opts: MlxOptions,
    ready: oneshot::Sender<Result<(u64, u64), BackendError>>,
    mut rx: mpsc::Receiver<Command>,
    counters: Arc<super::handle::Counters>,
) {
    let started = Instant::now();
    let before = active_memory();
    let loaded = std::panic::catch_unwind(AssertUnwindSafe(|| Loaded::load(&kind, &opts)))
        .unwrap_or_else(|_| Err(anyhow!("panic while loading")));
    let after = active_memory();
    // Temporaries (quantized originals, GGUF buffers) went to MLX's cache: give them back.
    let _ = mlx_rs::memory::clear_cache();
    let model = match loaded {
        Ok(m) => m,
        Err(e) => {
            let e = message(&e);
            tracing::warn!(model = %id, error = %e, "MLX load failed");
            let _ = ready.send(Err(BackendError::Load(e)));
            return;
        }
    };
    let bytes = model.array_bytes();
    let delta = after.saturating_sub(before);
    if !delta_agrees(delta, bytes) {
        tracing::debug!(model = %id, active_delta = delta, array_bytes = bytes, "active-memory delta differs from the arrays (concurrent allocations)");
    }
    tracing::info!(model = %id, bytes, secs = started.elapsed().as_secs_f64(), "MLX model loaded");
    if ready.send(Ok((bytes, model.kv_bytes_per_token()))).is_err() {
        return; // the load was abandoned; dropping the model frees it
    }
    let unload = match &model {
        Loaded::Llama { model, tok, vision } => {
            super::batch::serve(model, tok, vision.as_deref(), &mut rx, &counters, opts.max_batch)
        }
        Loaded::Bert(b) => serve_in_order(b, &mut rx, &counters),
    };
    if let Some(reply) = unload {
        let freed = model.array_bytes();
        let before = active_memory();
        drop(model);
        let _ = mlx_rs::memory::clear_cache();
        let delta = before.saturating_sub(active_memory());
        tracing::info!(model = %id, freed, active_delta = delta, "MLX model unloaded");
        let _ = reply.send(freed);
    }
    // Otherwise every handle is gone without an unload: the model drops with the thread.
}

/// Serve commands one at a time in arrival order (encoders: each embedding call is already one
/// batch) until an unload arrives (returned) or every sender is gone (`None`).
fn serve_in_order(
    b: &bert::Bert,
    rx: &mut mpsc::Receiver<Command>,
    counters: &super::handle::Counters,
) -> Option<oneshot::Sender<u64>> {
    let unsupported = |what: &str| unsupported(what, "an embeddings encoder");
    // A command taken from the queue while gathering embeddings, served next.
    let mut next: Option<Command> = None;
    loop {
        let cmd = match next.take() {
            Some(c) => c,
            None => rx.blocking_recv()?,
        };
        match cmd {
            Command::Generate { started, .. } => {
                let _ = started.send(Err(unsupported("generation")));
            }
            Command::Embed { inputs, reply } => {
                // Embedding requests waiting behind this one join its forward passes (one padded
                // batch per similar-length group), up to EMBED_BATCH_INPUTS inputs in all.
                let mut group = vec![(inputs, reply)];
                let mut total = group[0].0.len();
                while total < EMBED_BATCH_INPUTS {
                    match rx.try_recv() {
                        Ok(Command::Embed { inputs, reply }) => {
                            total += inputs.len();
                            group.push((inputs, reply));
                        }
                        Ok(other) => {
                            next = Some(other);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                counters.peak_batch.fetch_max(group.len() as u64, std::sync::atomic::Ordering::Relaxed);
                counters.active.store(group.len() as u64, std::sync::atomic::Ordering::Relaxed);
                embed_group(b, group);
                counters.active.store(0, std::sync::atomic::Ordering::Relaxed);
            }
            Command::Probe { reply, .. } => {
                let _ = reply.send(Err(unsupported("probing")));
            }
            Command::Unload { reply } => return Some(reply),
        }
    }
}

/// Most inputs one gathered embedding group holds (several requests' inputs together).
pub(super) const EMBED_BATCH_INPUTS: usize = 256;

type EmbedReply = oneshot::Sender<Result<Embeddings, BackendError>>;

/// Embed several requests' inputs in one call and answer each with its own vectors and tokens.
fn embed_group(b: &bert::Bert, group: Vec<(Vec<String>, EmbedReply)>) {
    let all: Vec<String> = group.iter().flat_map(|(inputs, _)| inputs.iter().cloned()).collect();
    let r = std::panic::catch_unwind(AssertUnwindSafe(|| b.embed(&all)))
        .unwrap_or_else(|_| Err(anyhow!("panic during embedding")));
    match r {
        Ok((vectors, tokens)) => {
            let (mut vectors, mut tokens) = (vectors.into_iter(), tokens.into_iter());
            for (inputs, reply) in group {
                let n = inputs.len();
                let mine: Vec<Vec<f32>> = vectors.by_ref().take(n).collect();
                let prompt_tokens = tokens.by_ref().take(n).sum();
                let _ = reply.send(Ok(Embeddings { vectors: mine, prompt_tokens }));
            }
        }
        Err(e) => {
            let msg = message(&e);
            for (_, reply) in group {
                let _ = reply.send(Err(BackendError::Inference(msg.clone())));
            }
        }
    }
}

/// A prompt ready to prefill: its token ids and, for a prompt with images, the input
/// embeddings (`[ids.len(), hidden]`, evaluated) with the image features merged in, and the
/// M-RoPE positions of a model that has them (Qwen2-VL).
pub(super) struct Prepared {
    pub ids: Vec<u32>,
    pub embeds: Option<mlx_rs::Array>,
    pub positions: Option<llama::MropePositions>,
}

/// Renders and tokenizes `prompt`; a vision model's chat (content as parts, images expanded
/// into their tiles' tokens) also runs the images through the vision tower here.
pub(super) fn prepare(
    model: &llama::Llama,
    tok: &text::TextTokenizer,
    vision: Option<&vision::Vision>,
    prompt: &Prompt,
) -> Result<Prepared, BackendError> {
    let invalid = |e: anyhow::Error| BackendError::InvalidRequest(message(&e));
    let (text, is_chat, pending) = match prompt {
        Prompt::Text(t) => (t.clone(), false, None),
        Prompt::Chat(m) => {
            if m.is_empty() {
                return Err(BackendError::InvalidRequest("no chat messages".into()));
            }
            let images: Vec<&crate::backend::Image> = m.iter().flat_map(|x| x.images()).collect();
            match vision {
                None if !images.is_empty() => {
                    return Err(BackendError::InvalidRequest(
                        "this model takes no images (it is not a vision-language model)".into(),
                    ));
                }
                None => (tok.chat.render(m, true).map_err(invalid)?, true, None),
                Some(v) => {
                    let rendered = tok.chat.render_parts(m, true).map_err(invalid)?;
                    let (text, pending) = v.prompt(&rendered, &images).map_err(invalid)?;
                    (text, true, Some(pending))
                }
            }
        }
    };
    let ids = tok.encode(&text, is_chat).map_err(invalid)?;
    if ids.len() >= model.cfg.context {
        return Err(BackendError::InvalidRequest(format!(
            "the prompt has {} tokens (image tokens included); the context holds {}",
            ids.len(),
            model.cfg.context
        )));
    }
    let (embeds, positions) = match (vision, &pending) {
        (Some(v), Some(p)) => {
            // Positions first: a prompt whose image tokens do not line up is the client's
            // error (for example the image token written in a text part).
            let run = || -> Res<(Option<mlx_rs::Array>, Option<llama::MropePositions>)> {
                let (e, pos) = v.embed(model, &ids, p)?;
                if let Some(e) = &e {
                    e.eval().context("vision encoding")?;
                }
                Ok((e, pos))
            };
            run().map_err(|e| BackendError::Inference(message(&e)))?
        }
        _ => (None, None),
    };
    Ok(Prepared { ids, embeds, positions })
}

/// Prefills a vision prompt's embeddings into `cache` in one pass, at its M-RoPE positions
/// when it has them (the later tokens then follow at the positions' shift); the last logits.
pub(super) fn prefill_embeds(
    model: &llama::Llama,
    embeds: &mlx_rs::Array,
    positions: Option<&llama::MropePositions>,
    cache: &mut llama::KvCache,
) -> Res<mlx_rs::Array> {
    match positions {
        Some(p) => {
            cache.rope_delta = p.delta;
            let [t, h, w] = &p.axes;
            model.forward_embeds_at(embeds, cache, Some([t, h, w]))
        }
        None => model.forward_embeds(embeds, cache),
    }
}

pub(super) fn probe(
    model: &llama::Llama,
    tok: &text::TextTokenizer,
    vision: Option<&vision::Vision>,
    input: &ProbeInput,
    steps: usize,
    logit_ids: &[u32],
) -> Res<Probe> {
    let (input_ids, embeds, positions) = match input {
        ProbeInput::Prompt(p) => {
            let p = prepare(model, tok, vision, p).map_err(|e| anyhow!(e))?;
            (p.ids, p.embeds, p.positions)
        }
        ProbeInput::Ids(ids) => (ids.clone(), None, None),
    };
    if input_ids.is_empty() {
        return Err(anyhow!("empty prompt"));
    }
    let mut cache = llama::KvCache::new(model.cfg.n_layers);
    let mut timings = ProbeTimings::default();
    let t = Instant::now();
    let mut logits = match &embeds {
        Some(e) => prefill_embeds(model, e, positions.as_ref(), &mut cache)?,
        None => model.forward(&input_ids, &mut cache)?,
    };
    let mut host = logits.to_vec_exact::<f32>().context("reading logits")?;
    timings.prefill = t.elapsed().as_secs_f64();
    let first_logits =
        logit_ids.iter().map(|&i| host.get(i as usize).copied().unwrap_or(f32::NAN) as f64).collect();
    let mut greedy_ids = Vec::with_capacity(steps);
    for step in 0..steps {
        if step > 0 {
            let t = Instant::now();
            host = logits.to_vec_exact::<f32>().context("reading logits")?;
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
    let greedy_text = tok
        .tokenizer
        .decode(&greedy_ids[..end], true)
        .map_err(anyhow::Error::from_boxed)
        .context("detokenizing")?;
    Ok(Probe { input_ids, first_logits, greedy_ids, greedy_text, timings })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_memory_delta_is_checked_against_the_arrays() {
        assert!(delta_agrees(1_000, 1_050));
        assert!(!delta_agrees(10, 1_000));
    }
}
