//! The MLX backend (feature `mlx`): real inference through `mlx-rs`.
//!
//! Served model kinds, chosen from the spec's path and type:
//! - `text-gen` from a `.gguf` file (or a directory holding exactly one), or from a Hugging Face
//!   / mlx-community safetensors directory (`llama`, `mistral`, `qwen2`, `qwen3`, `gemma2`,
//!   `gemma3_text`, `phi3`): one decoder with per-family configuration ([`llama`]), its
//!   tokenizer and Jinja chat template from the GGUF metadata or the directory ([`text`],
//!   [`chat`]); streaming generation with greedy or seeded temperature/top-p sampling.
//! - `embeddings` from a Hugging Face BERT directory (`config.json`, `model.safetensors`,
//!   `tokenizer.json`): mean-pooled, L2-normalised sentence embeddings ([`bert`]).
//! - `vision` from an Idefics3 / SmolVLM directory ([`idefics3`]: vision tower, connector, the
//!   Llama decoder) or a Qwen2-VL / Qwen2.5-VL one ([`qwen2_vl`]: patch-grid vision tower,
//!   merger, the Qwen2 decoder with M-RoPE), behind one type ([`vision`]); images preprocessed
//!   as the reference processor does, with Pillow-exact resampling ([`resample`]); other
//!   vision-language families are refused at load.
//!
//! Threading (the file names follow it): MLX arrays are `Send` but not `Sync`, and MLX keeps its
//! default stream per thread. Each loaded model therefore lives on its own OS thread
//! ([`worker`]), which loads, owns and drops every array of that model; the async handle
//! ([`handle`]: [`MlxBackend`], [`MlxModel`]) holds no MLX type and talks to it over channels: a
//! bounded command queue ([`MlxOptions::queue_depth`]; a full queue refuses with
//! `Overloaded`), a bounded event channel per generation, oneshot replies. A model serves one
//! request at a time, in arrival order. A command the model cannot serve (a generation sent to
//! an embeddings model) is answered with `Unsupported`, never dropped.
//!
//! Memory: a model's measured size is the sum of its arrays' sizes, exact and independent of
//! other models; MLX's active-memory delta around a load or unload is only a debug cross-check
//! (it mixes in whatever other workers allocate meanwhile), so no process-wide lock serialises
//! loads. Unload drops every array, returns MLX's buffer cache to the system and reports the
//! bytes dropped.

mod attend;
mod batch;
mod bert;
mod chat;
mod handle;
mod idefics3;
mod llama;
mod qwen2_vl;
mod resample;
mod sampling;
mod swiglu;
mod sys;
mod text;
mod vision;
mod worker;

use std::time::Instant;

use anyhow::Context;

pub use handle::{MlxBackend, MlxModel};
pub use worker::{Probe, ProbeTimings};

use super::BackendError;

/// Internal result: an error with its context chain, turned into a [`BackendError`] message
/// (`"what: cause"`, the chain joined by `{:#}`) at the trait boundary.
type Res<T> = anyhow::Result<T>;

/// The message of an internal error for a [`BackendError`]: every context, outermost first.
fn message(e: &anyhow::Error) -> String {
    format!("{e:#}")
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
    /// Commands a model's worker queues behind the one it is running; one more is refused with
    /// `Overloaded` (HTTP 429) instead of waiting without bound.
    pub queue_depth: usize,
    /// Generations a decoder runs at once (continuous batching: one decode step for all of them,
    /// see `batch.rs`); more wait in the command queue. 1 serves one at a time.
    pub max_batch: usize,
}

impl Default for MlxOptions {
    fn default() -> Self {
        MlxOptions {
            dequantize: !cfg!(target_os = "macos"),
            stream_buffer: 32,
            queue_depth: 64,
            max_batch: 8,
        }
    }
}

/// Measures MLX's f32 matrix multiply on this machine: GFLOP/s of an `n x n x n` sgemm (best
/// of three after a warm-up). A diagnostic for checking that the fast BLAS (OpenBLAS on Linux)
/// is the one MLX calls; the mlx-cpu wheel's bundled reference BLAS is about 30x slower.
pub fn sgemm_gflops(n: usize) -> Result<f64, BackendError> {
    let n = n.max(1) as i32;
    let run = || -> Res<f64> {
        let a = mlx_rs::random::normal::<f32>(&[n, n], None, None, None).context("random")?;
        let b = mlx_rs::random::normal::<f32>(&[n, n], None, None, None).context("random")?;
        llama::eval_all([&a, &b])?;
        let mut best = f64::INFINITY;
        for _ in 0..4 {
            let t = Instant::now();
            let c = a.matmul(&b).context("matmul")?;
            c.eval().context("eval")?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(2.0 * (n as f64).powi(3) / best / 1e9)
    };
    run().map_err(|e| BackendError::Inference(message(&e)))
}
