//! Continuous batching for a decoder, on its worker thread: the requests in flight on one model
//! decode together, one token each per step.
//!
//! The scheduler keeps an active set of at most `max_batch` sequences, each with its own KV
//! cache, sampler (temperature, top-p, seed), stop strings and token budget. One iteration:
//! 1. take every command waiting (without blocking while anything is active): a generation joins
//!    the set (its prompt rendered and checked first, so a bad prompt is refused at once); a
//!    probe runs at once; an unload ends the loop;
//! 2. sample the next token of every sequence whose logits are ready, emit its text, and retire
//!    the sequences that finished (stop, length, error) or whose client went away;
//! 3. run one decode step for every sequence still going, all together
//!    ([`llama::Llama::forward_shared`]: the linear layers as one `[B, hidden]` product, where
//!    the weights' bytes are read once for the whole batch, and RoPE, the cache write and
//!    attention once for the batch too, over the shared KV cache with a per-row mask);
//! 4. run one chunk of at most [`PREFILL_CHUNK`] prompt tokens of the oldest sequence still
//!    reading its prompt (into its own cache), so a long prompt delays the others' next token
//!    by one chunk at most; once its prompt is in, its keys and values move to the shared cache
//!    ([`llama::SharedKv::adopt`]).
//!
//! Each decoding sequence owns cells of one [`llama::SharedKv`]: one per position, given back
//! when it leaves (and the memory with them, by compaction), so the cache holds about the sum
//! of the live sequences' lengths, which is what the pool's ledger counts for them.
//!
//! A reader slower than the decode fills its bounded event channel; its sequence then pauses (no
//! sampling, no decode) until the channel has room, and never stalls the others. A sequence
//! whose receiver is gone (the client disconnected) leaves at once and frees its KV cache.
//! Requests beyond `max_batch` wait in the worker's bounded command queue.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;

use anyhow::anyhow;
use mlx_rs::Array;
use mlx_rs::ops::indexing::TryIndexOp;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use super::handle::Counters;
use super::worker::{Command, Prepared, prepare, probe, unsupported};
use super::{llama, message, sampling, text, vision};
use crate::backend::{BackendError, FinishReason, GenerateEvent, GenerateRequest, Usage};

/// Prompt tokens processed per scheduler iteration for one sequence.
pub(super) const PREFILL_CHUNK: usize = 128;

type Events = mpsc::Sender<Result<GenerateEvent, BackendError>>;

/// One generation in the active set.
struct Seq {
    events: Events,
    /// The prompt's keys and values while it is prefilled; empty once adopted.
    cache: llama::KvCache,
    /// Its cells in the shared cache, in position order, once the prompt is in.
    cells: Vec<i32>,
    sampler: sampling::Sampler,
    decoder: text::StreamDecoder,
    stops: text::StopMatcher,
    usage: Usage,
    max_tokens: u32,
    /// Prompt ids; `prefilled` of them are in the cache.
    prompt: Vec<u32>,
    /// A vision prompt's input embeddings (`[prompt.len(), hidden]`), prefilled instead of the
    /// ids' embeddings; dropped once the prompt is in.
    embeds: Option<Array>,
    /// A Qwen2-VL prompt's M-RoPE positions, for its prefill chunks; dropped once it is in.
    positions: Option<llama::MropePositions>,
    /// What its decode steps add to their rotary positions (`MropePositions::delta`; else 0).
    rope_delta: i32,
    prefilled: usize,
    /// Logits of the next position, once the prompt is in: sampled at the next iteration.
    logits: Option<Array>,
    /// The token sampled last, to feed to the next decode step.
    next: Option<u32>,
    /// Events the channel had no room for yet, in order.
    backlog: VecDeque<Result<GenerateEvent, BackendError>>,
    /// Finished: leaves once its backlog is delivered.
    done: bool,
}

impl Seq {
    /// Deliver what waits; `false` when the client is gone.
    fn flush(&mut self) -> bool {
        while let Some(ev) = self.backlog.pop_front() {
            match self.events.try_send(ev) {
                Ok(()) => {}
                Err(TrySendError::Full(ev)) => {
                    self.backlog.push_front(ev);
                    return true;
                }
                Err(TrySendError::Closed(_)) => return false,
            }
        }
        !self.events.is_closed()
    }

    fn emit(&mut self, ev: Result<GenerateEvent, BackendError>) {
        self.backlog.push_back(ev);
    }

    fn fail(&mut self, e: anyhow::Error) {
        self.emit(Err(BackendError::Inference(message(&e))));
        self.done = true;
    }

    fn finish(&mut self, reason: FinishReason) {
        if reason == FinishReason::Length {
            let rest = self.stops.flush();
            if !rest.is_empty() {
                self.emit(Ok(GenerateEvent::Delta(rest)));
            }
        }
        self.emit(Ok(GenerateEvent::Done { finish_reason: reason, usage: self.usage }));
        self.done = true;
    }

    /// Paused: its reader has not taken what was produced.
    fn paused(&self) -> bool {
        !self.backlog.is_empty()
    }

    /// Positions in its cache (the prefill cache, or its cells once adopted).
    fn len(&self) -> usize {
        if self.cells.is_empty() { self.cache.len() } else { self.cells.len() }
    }
}

/// Checks a generation's prompt and builds its sequence; answers `started` either way.
fn admit(
    model: &llama::Llama,
    tok: &text::TextTokenizer,
    vision: Option<&vision::Vision>,
    req: GenerateRequest,
    started: oneshot::Sender<Result<(), BackendError>>,
    events: Events,
) -> Option<Seq> {
    let prepared = prepare(model, tok, vision, &req.prompt).and_then(|p| {
        if p.ids.is_empty() {
            return Err(BackendError::InvalidRequest("the prompt is empty".into()));
        }
        if p.ids.len() >= model.cfg.context {
            return Err(BackendError::InvalidRequest(format!(
                "the prompt has {} tokens; the context holds {}",
                p.ids.len(),
                model.cfg.context
            )));
        }
        Ok(p)
    });
    let Prepared { ids, embeds, positions } = match prepared {
        Ok(p) => p,
        Err(e) => {
            let _ = started.send(Err(e));
            return None;
        }
    };
    if started.send(Ok(())).is_err() {
        return None;
    }
    let mut seq = Seq {
        events,
        cache: llama::KvCache::new(model.cfg.n_layers),
        cells: Vec::new(),
        sampler: sampling::Sampler::new(req.temperature, req.top_p, req.seed),
        decoder: text::StreamDecoder::new(),
        stops: text::StopMatcher::new(&req.stop),
        usage: Usage { prompt_tokens: ids.len() as u32, completion_tokens: 0 },
        max_tokens: req.max_tokens,
        prompt: ids,
        embeds,
        rope_delta: positions.as_ref().map_or(0, |p| p.delta),
        positions,
        prefilled: 0,
        logits: None,
        next: None,
        backlog: VecDeque::new(),
        done: false,
    };
    if req.max_tokens == 0 {
        seq.finish(FinishReason::Length);
    }
    Some(seq)
}

/// Sample `seq`'s next token from its ready logits and emit its text; marks it done when it
/// stops or reaches its budget, else leaves the token to feed.
fn sample(
    seq: &mut Seq,
    model: &llama::Llama,
    tok: &text::TextTokenizer,
    logits: &Array,
    counters: &Counters,
) {
    let host = match logits.to_vec_exact::<f32>() {
        Ok(v) => v,
        Err(e) => return seq.fail(anyhow!(e).context("reading logits")),
    };
    let id = seq.sampler.sample(&host);
    seq.usage.completion_tokens += 1;
    counters.tokens.fetch_add(1, Ordering::Relaxed);
    if tok.stop_ids.contains(&id) {
        return seq.finish(FinishReason::Stop);
    }
    let piece = match seq.decoder.push(&tok.tokenizer, id) {
        Ok(p) => p,
        Err(e) => return seq.fail(e),
    };
    match seq.stops.push(&piece) {
        text::StopCheck::Emit(s) => {
            if !s.is_empty() {
                seq.emit(Ok(GenerateEvent::Delta(s)));
            }
        }
        text::StopCheck::Stop(s) => {
            if !s.is_empty() {
                seq.emit(Ok(GenerateEvent::Delta(s)));
            }
            return seq.finish(FinishReason::Stop);
        }
    }
    if seq.usage.completion_tokens >= seq.max_tokens || seq.len() + 1 >= model.cfg.context {
        return seq.finish(FinishReason::Length);
    }
    seq.next = Some(id);
}

/// Serve `rx` with continuous batching until an unload arrives (returned, for the worker to
/// carry out) or every sender is gone (`None`).
pub(super) fn serve(
    model: &llama::Llama,
    tok: &text::TextTokenizer,
    vision: Option<&vision::Vision>,
    rx: &mut mpsc::Receiver<Command>,
    counters: &Counters,
    max_batch: usize,
) -> Option<oneshot::Sender<u64>> {
    let max_batch = max_batch.max(1);
    let mut active: Vec<Seq> = Vec::new();
    let mut kv = llama::SharedKv::new(&model.cfg);
    loop {
        // 1. Commands: block only when nothing is in flight.
        loop {
            if active.len() >= max_batch {
                break; // the rest wait in the bounded command queue
            }
            let cmd = if active.is_empty() {
                rx.blocking_recv()?
            } else {
                match rx.try_recv() {
                    Ok(c) => c,
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => {
                        if active.is_empty() {
                            return None;
                        }
                        break;
                    }
                }
            };
            match cmd {
                Command::Generate { req, started, events } => {
                    active.extend(admit(model, tok, vision, req, started, events));
                }
                Command::Embed { reply, .. } => {
                    let _ = reply.send(Err(unsupported("embedding", "a text-gen decoder")));
                }
                Command::Probe { input, steps, logit_ids, reply } => {
                    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        probe(model, tok, vision, &input, steps, &logit_ids)
                    }))
                    .unwrap_or_else(|_| Err(anyhow!("panic during probe")));
                    let _ = reply.send(r.map_err(|e| BackendError::Inference(message(&e))));
                }
                Command::Unload { reply } => {
                    for s in &mut active {
                        let _ = s.events.try_send(Err(BackendError::Gone));
                    }
                    return Some(reply);
                }
            }
        }
        let progressed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            step(model, tok, &mut active, &mut kv, counters)
        }));
        match progressed {
            Ok(true) => {}
            Ok(false) => std::thread::sleep(std::time::Duration::from_millis(1)),
            Err(_) => {
                for s in &mut active {
                    let _ = s.events.try_send(Err(BackendError::Inference("panic during generation".into())));
                }
                active.clear();
                kv = llama::SharedKv::new(&model.cfg);
            }
        }
    }
}

/// Steps 2-4 of the module docs. Returns whether anything was computed or delivered (when
/// every sequence is paused on its reader, the caller sleeps a moment instead of spinning).
fn step(
    model: &llama::Llama,
    tok: &text::TextTokenizer,
    active: &mut Vec<Seq>,
    kv: &mut llama::SharedKv,
    counters: &Counters,
) -> bool {
    let mut progressed = false;
    // Deliver, drop the gone, retire the finished; their cells go back.
    let before = active.len();
    active.retain_mut(|s| {
        let had = s.backlog.len();
        let alive = s.flush();
        progressed |= s.backlog.len() != had;
        let stays = alive && !(s.done && s.backlog.is_empty());
        if !stays {
            kv.release(&s.cells);
        }
        stays
    });
    if active.len() < before {
        let mut cells: Vec<&mut Vec<i32>> =
            active.iter_mut().map(|s| &mut s.cells).filter(|c| !c.is_empty()).collect();
        if let Err(e) = kv.compact(&mut cells) {
            let msg = message(&e);
            for s in active.iter_mut() {
                s.fail(anyhow!("{msg}"));
            }
        }
    }
    // 2. Sample every ready sequence whose reader keeps up.
    let ready: Vec<usize> =
        (0..active.len()).filter(|&i| active[i].logits.is_some() && !active[i].paused()).collect();
    if !ready.is_empty() {
        let arrays: Vec<&Array> = ready.iter().filter_map(|&i| active[i].logits.as_ref()).collect();
        if let Err(e) = llama::eval_all(arrays) {
            let msg = message(&e);
            for &i in &ready {
                active[i].logits = None;
                active[i].fail(anyhow!("{msg}"));
            }
        }
        for &i in &ready {
            if let Some(l) = active[i].logits.take() {
                sample(&mut active[i], model, tok, &l, counters);
                progressed = true;
            }
        }
    }
    // 3. One decode step for every sequence with a token to feed, over the shared cache.
    let feeding: Vec<usize> = (0..active.len()).filter(|&i| active[i].next.is_some()).collect();
    if !feeding.is_empty() {
        progressed = true;
        let ids: Vec<u32> = feeding.iter().filter_map(|&i| active[i].next.take()).collect();
        counters.peak_batch.fetch_max(ids.len() as u64, Ordering::Relaxed);
        match decode_together(model, active, kv, &feeding, &ids) {
            Ok(logits) => {
                for (&i, l) in feeding.iter().zip(logits) {
                    active[i].logits = Some(l);
                }
            }
            Err(e) => {
                let msg = message(&e);
                for &i in &feeding {
                    active[i].fail(anyhow!("{msg}"));
                }
            }
        }
    }
    // 4. One prefill chunk of the oldest sequence still reading its prompt; a finished prompt
    // moves to the shared cache.
    if let Some(s) = active.iter_mut().find(|s| !s.done && s.prefilled < s.prompt.len()) {
        progressed = true;
        let end = (s.prefilled + PREFILL_CHUNK).min(s.prompt.len());
        let chunk = s.prompt[s.prefilled..end].to_vec();
        let (start, stop) = (s.prefilled, end);
        let at = s.positions.as_ref().map(|p| {
            let [t, h, w] = &p.axes;
            [&t[start..stop], &h[start..stop], &w[start..stop]]
        });
        s.cache.rope_delta = s.rope_delta;
        let out = match &s.embeds {
            Some(e) => e
                .try_index(start as i32..stop as i32)
                .map_err(anyhow::Error::from)
                .and_then(|rows| model.forward_embeds_at(&rows, &mut s.cache, at)),
            None => model.forward(&chunk, &mut s.cache),
        };
        match out {
            Ok(l) => {
                s.prefilled = end;
                if end == s.prompt.len() {
                    s.embeds = None;
                    s.positions = None;
                }
                if end == s.prompt.len() {
                    match kv.adopt(&s.cache) {
                        Ok(cells) => {
                            s.cells = cells;
                            s.cache = llama::KvCache::new(model.cfg.n_layers);
                            s.logits = Some(l);
                        }
                        Err(e) => s.fail(e),
                    }
                } else if let Err(e) = llama::eval_all([&l]) {
                    // Evaluate now so the next chunk builds on a materialized cache.
                    s.fail(e);
                }
            }
            Err(e) => s.fail(e),
        }
    }
    let prefill: usize = active.iter().map(|s| s.cache.capacity()).sum();
    let per_cell = model.kv_bytes_per_position();
    counters.kv_bytes.store(((kv.capacity() + prefill) as u64) * per_cell, Ordering::Relaxed);
    counters.active.store(active.len() as u64, Ordering::Relaxed);
    progressed
}

/// One batched decode step for the sequences at `idx` (ascending), fed `ids`: a new cell each
/// in the shared cache, then their logits, one `[vocab]` array each.
fn decode_together(
    model: &llama::Llama,
    active: &mut [Seq],
    kv: &mut llama::SharedKv,
    idx: &[usize],
    ids: &[u32],
) -> super::Res<Vec<Array>> {
    for (&i, cell) in idx.iter().zip(kv.alloc(idx.len())?) {
        active[i].cells.push(cell);
    }
    let rows: Vec<&[i32]> = idx.iter().map(|&i| active[i].cells.as_slice()).collect();
    let deltas: Vec<i32> = idx.iter().map(|&i| active[i].rope_delta).collect();
    let logits = model.forward_shared(ids, kv, &rows, &deltas)?;
    (0..idx.len() as i32)
        .map(|r| logits.try_index((r, ..)).map_err(|e| anyhow!(e).context("row of the batch's logits")))
        .collect()
}
