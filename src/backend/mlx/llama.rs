//! The decoder in mlx-rs, one implementation with per-family configuration ([`LlamaConfig`]'s
//! switches, the way mlx-lm's `llama.py` serves Llama 3.x, SmolLM2 and Mistral and its
//! `qwen2.py`, `qwen3.py`, `gemma2.py`, `gemma3_text.py` and `phi3.py` vary the same layers):
//! RMSNorm (Gemma's `1 + w`), RoPE (Llama 3, linear and Phi-3 `longrope` scaling; partial
//! rotary; Gemma 3's local base), grouped-query attention with optional q/k norms, biases,
//! Gemma 2's soft-capping and per-layer sliding windows, SwiGLU or GeGLU MLP, Gemma's
//! scaled embeddings and sandwich norms, Phi-3's fused projections, tied or separate output
//! embeddings, a KV cache.
//!
//! Weights come from one of two sources ([`Source`]):
//! - a GGUF file through `mlx_rs::io::GgufFile`, which turns Q4_0/Q4_1/Q8_0 tensors into MLX
//!   affine quantized triples (`<name>.weight` packed uint32, `.scales`, `.biases`, group 32).
//!   GGUF's q/k rows are in llama.cpp's interleaved RoPE order; attention scores are invariant
//!   under the same permutation of q and k within a head, so instead of un-permuting the rows
//!   we apply the interleaved ("traditional") RoPE, which is what that row order means.
//! - a Hugging Face / MLX safetensors directory (single file or shards; f32, bf16, f16; MLX
//!   affine-quantized triples with `group_size` / `bits` from `config.json`, per-module
//!   overrides included), tensor names as transformers and mlx-lm write them.
//!
//! By default quantized weights are dequantized once at load to f32 (scales and biases cast to
//! f32 first, which is bit-exact with the f32 reference) because MLX's quantized matmul is
//! scalar on x86 CPUs; [`WeightFormat::Quantized`] keeps them packed. Every float tensor is
//! held as f32 (x86 has no fast bf16/f16 math).

use std::collections::HashMap;
use std::path::Path;

use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::io::GgufFile;
use mlx_rs::ops::indexing::{TryIndexMutOp, TryIndexOp};
use mlx_rs::ops::{self};
use mlx_rs::{Array, Dtype};

use anyhow::{Context, anyhow};

use super::{Res, attend, swiglu};
use crate::catalog::MlxQuantization;

/// How linear weights are held after load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WeightFormat {
    /// Dequantized to f32 once at load; dense matmuls.
    F32,
    /// Kept as MLX affine quantized weights; `quantized_matmul`.
    Quantized,
}

/// The `model_type`s of Hugging Face / MLX directories this decoder serves.
pub(super) const SUPPORTED_MODEL_TYPES: [&str; 7] =
    ["llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3"];

/// The feed-forward activation of the gated MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Activation {
    /// SwiGLU: `silu(gate) * up` (Llama, Mistral, Qwen, Phi-3).
    Silu,
    /// GeGLU with the tanh approximation of GELU, as mlx's `nn.gelu_approx` (Gemma 2 / 3).
    GeluApprox,
}

/// Where the output projection comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Head {
    /// The input embedding is the output layer.
    Tied,
    /// `lm_head` (GGUF: `output`) must exist.
    Separate,
    /// `lm_head` when the weights have one, else tied (mlx-lm's Gemma 3 `sanitize`; GGUF).
    IfPresent,
}

/// Rotary embedding of one kind of layer: `fast::rope` with a base, or with explicit periods.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct RopeSpec {
    pub base: f32,
    /// `rope_scaling` `linear`: positions are multiplied by this.
    pub scale: f32,
    /// `rope_scaling` `llama3` or `longrope`/`su`: the per-pair periods passed to `fast::rope`
    /// instead of a base.
    pub freqs: Option<Vec<f32>>,
    /// `longrope`/`su` (mlx-lm's `SuScaledRoPE`): the rotated features of q and k are
    /// multiplied by this before the rotation; 1 otherwise.
    pub mscale: f32,
}

impl RopeSpec {
    fn plain(base: f32) -> Self {
        RopeSpec { base, scale: 1.0, freqs: None, mscale: 1.0 }
    }
}

/// Hyper-parameters, from GGUF metadata or `config.json`: one decoder, with per-family switches
/// (the way mlx-lm's `llama.py`, `qwen2.py`, `qwen3.py`, `gemma2.py`, `gemma3_text.py` and
/// `phi3.py` differ from one another).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LlamaConfig {
    pub n_layers: usize,
    pub hidden: i32,
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub head_dim: i32,
    /// Features rotated per head (`partial_rotary_factor` x head_dim for Phi-3; else head_dim).
    pub rope_dims: i32,
    /// Interleaved ("traditional") RoPE: GGUF's row order, or `rope_traditional` in an MLX config.
    pub rope_traditional: bool,
    /// RoPE of full-attention layers (and of every layer without `local_rope`).
    pub rope: RopeSpec,
    /// RoPE of sliding-window layers when it differs (Gemma 3's `rope_local_base_freq`).
    pub local_rope: Option<RopeSpec>,
    /// Qwen2-VL's multimodal RoPE: the `mrope_section` sizes (frequency pairs rotated by the
    /// temporal, height and width position, in that order; pairs past their sum take the
    /// temporal one, as mlx-vlm's chunked selector does). Positions then come in three axes
    /// ([`Llama::forward_embeds_at`]); the rotation is the half-split one at `rope.base`.
    pub mrope: Option<[usize; 3]>,
    /// Per layer: the sliding window (the keys a query sees: itself and the `w - 1` before it),
    /// or `None` for full causal attention.
    pub windows: Vec<Option<usize>>,
    /// RMSNorm of q and k per head before RoPE (Qwen3, Gemma 3).
    pub qk_norm: bool,
    /// Gemma's RMSNorm `x / rms(x) * (1 + w)`: 1 is added to every norm weight at load.
    pub norm_plus_one: bool,
    /// Gemma 2/3: norms on the attention output and the MLP output before each residual add
    /// (`post_attention_layernorm`, `post_feedforward_layernorm`), the MLP's input norm being
    /// `pre_feedforward_layernorm`.
    pub sandwich_norms: bool,
    /// Gemma: the embeddings are multiplied by this (sqrt(hidden), rounded to bf16 for Gemma 3
    /// as mlx-lm does).
    pub embed_scale: Option<f32>,
    pub activation: Activation,
    /// Attention scores' scale: head_dim^-1/2, or Gemma's query_pre_attn_scalar^-1/2.
    pub attn_scale: f32,
    /// Gemma 2: `tanh(scores / c) * c` on the attention scores.
    pub attn_softcap: Option<f32>,
    /// Gemma 2: `tanh(logits / c) * c` on the output logits.
    pub final_softcap: Option<f32>,
    /// Phi-3: q/k/v in one `qkv_proj`, gate/up in one `gate_up_proj`.
    pub fused: bool,
    pub head: Head,
    pub eps: f32,
    /// Longest sequence served: the model's context (`max_position_embeddings`).
    pub context: usize,
    pub vocab: usize,
}

const GGUF_GROUP_SIZE: i32 = 32;

fn meta_f64(f: &GgufFile, key: &str) -> Res<Option<f64>> {
    match f.get_metadata_array(key).with_context(|| key.to_string())? {
        None => Ok(None),
        Some(a) => {
            let v = a.to_vec_cast::<f32>().with_context(|| key.to_string())?;
            Ok(v.first().map(|x| *x as f64))
        }
    }
}

fn meta_req(f: &GgufFile, key: &str) -> Res<f64> {
    meta_f64(f, key)?.with_context(|| format!("GGUF metadata has no {key}"))
}

fn check_heads(hidden: i32, n_heads: i32, n_kv_heads: i32) -> Res<()> {
    if n_heads <= 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0 || hidden <= 0 {
        return Err(anyhow!(
            "inconsistent attention shape: hidden {hidden}, heads {n_heads}, kv heads {n_kv_heads}"
        ));
    }
    Ok(())
}

/// mlx-lm's `Llama3RoPE` periods: `base^(2i/dims)`, stretched by `factor` for long
/// wavelengths and smoothly interpolated in between.
fn llama3_freqs(dims: i32, base: f32, s: &serde_json::Value) -> Res<Vec<f32>> {
    let num = |k: &str, d: f64| s.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
    let factor = s
        .get("factor")
        .and_then(|v| v.as_f64())
        .context("config.json: rope_scaling (llama3) has no \"factor\"")?;
    let low = num("low_freq_factor", 1.0);
    let high = num("high_freq_factor", 4.0);
    let old = num("original_max_position_embeddings", 8192.0);
    let (low_wl, high_wl) = (old / low, old / high);
    Ok((0..dims / 2)
        .map(|i| {
            let f = (base as f64).powf((2 * i) as f64 / dims as f64);
            let wl = 2.0 * std::f64::consts::PI * f;
            let f2 = if wl > low_wl { f * factor } else { f };
            if wl > high_wl && wl < low_wl {
                let smooth = (old / wl - low) / (high - low);
                (f2 / ((1.0 - smooth) / factor + smooth)) as f32
            } else {
                f2 as f32
            }
        })
        .collect())
}

/// mlx-lm's `SuScaledRoPE` (Phi-3 `longrope` / `su`): periods `long_factor[i] * base^(2i/dims)`
/// (computed in f32, as MLX does; mlx-lm uses the long factors at every length) and the scale
/// `sqrt(1 + ln(max / original) / ln(original))` on the rotated features when the context was
/// extended.
fn su_rope(dims: i32, base: f32, s: &serde_json::Value, c: &serde_json::Value) -> Res<RopeSpec> {
    let long: Vec<f32> = s
        .get("long_factor")
        .and_then(|v| v.as_array())
        .context("config.json: rope_scaling (longrope) has no \"long_factor\" list")?
        .iter()
        .map(|v| v.as_f64().map(|x| x as f32))
        .collect::<Option<_>>()
        .context("config.json: rope_scaling long_factor holds a non-number")?;
    if long.len() != (dims / 2) as usize {
        return Err(anyhow!(
            "config.json: rope_scaling long_factor has {} entries, the {dims} rotated features need {}",
            long.len(),
            dims / 2
        ));
    }
    let freqs = long.iter().enumerate().map(|(i, f)| f * base.powf((2 * i) as f32 / dims as f32)).collect();
    let max = c.get("max_position_embeddings").and_then(|v| v.as_f64()).unwrap_or(131072.0);
    let original = c.get("original_max_position_embeddings").and_then(|v| v.as_f64()).unwrap_or(4096.0);
    let factor = max / original;
    let mscale = if factor <= 1.0 { 1.0 } else { (1.0 + factor.ln() / original.ln()).sqrt() as f32 };
    Ok(RopeSpec { base, scale: 1.0, freqs: Some(freqs), mscale })
}

/// The RoPE a config's `rope_scaling` describes for `dims` rotated features (none: plain).
fn rope_of(c: &serde_json::Value, dims: i32, base: f32) -> Res<RopeSpec> {
    let Some(s) = c.get("rope_scaling").filter(|s| !s.is_null()) else {
        return Ok(RopeSpec::plain(base));
    };
    let kind = s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
    Ok(match kind {
        "default" => RopeSpec::plain(base),
        "llama3" => RopeSpec { freqs: Some(llama3_freqs(dims, base, s)?), ..RopeSpec::plain(base) },
        "linear" => {
            let f = s
                .get("factor")
                .and_then(|v| v.as_f64())
                .context("config.json: rope_scaling (linear) has no \"factor\"")?;
            RopeSpec { scale: (1.0 / f) as f32, ..RopeSpec::plain(base) }
        }
        "longrope" | "su" => su_rope(dims, base, s, c)?,
        other => {
            return Err(anyhow!(
                "config.json: rope_scaling type '{other}' is not supported (default, linear, llama3, longrope, su)"
            ));
        }
    })
}

/// Which layers have a sliding window, and its size. `layer_types` (transformers, mlx-lm's
/// `llama.py`) when the config has it; otherwise the family's rule as transformers states it:
/// Gemma 2 every even layer, Gemma 3 all but every `sliding_window_pattern`-th (mlx-lm), Mistral
/// and Phi-3 every layer when `sliding_window` is set, Qwen 2/3 layers from `max_window_layers`
/// on when `use_sliding_window` is true.
fn windows_of(c: &serde_json::Value, model_type: &str, n_layers: usize) -> Res<Vec<Option<usize>>> {
    let window = c.get("sliding_window").and_then(|v| v.as_u64()).filter(|&w| w > 0).map(|w| w as usize);
    if let Some(types) = c.get("layer_types").filter(|t| !t.is_null()) {
        let types = types.as_array().context("config.json: layer_types is not a list")?;
        if types.len() != n_layers {
            return Err(anyhow!(
                "config.json: layer_types has {} entries for {n_layers} layers",
                types.len()
            ));
        }
        return types
            .iter()
            .map(|t| match t.as_str() {
                Some("full_attention") => Ok(None),
                Some("sliding_attention") => window
                    .map(Some)
                    .context("config.json: layer_types has sliding_attention but no sliding_window"),
                other => Err(anyhow!("config.json: layer type {other:?} is not supported")),
            })
            .collect();
    }
    let Some(w) = window else { return Ok(vec![None; n_layers]) };
    let sliding = |i: usize| match model_type {
        "gemma2" => i.is_multiple_of(2),
        "gemma3_text" => {
            let pattern = c.get("sliding_window_pattern").and_then(|v| v.as_u64()).unwrap_or(6) as usize;
            !(i + 1).is_multiple_of(pattern.max(1))
        }
        "mistral" | "phi3" => true,
        "qwen2" | "qwen3" => {
            c.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true)
                && i as u64 >= c.get("max_window_layers").and_then(|v| v.as_u64()).unwrap_or(28)
        }
        _ => false,
    };
    Ok((0..n_layers).map(|i| sliding(i).then_some(w)).collect())
}

/// `x` rounded to the nearest bfloat16 (ties to even), as `mx.array(x, mx.bfloat16)`.
fn round_to_bf16(x: f32) -> f32 {
    let b = x.to_bits();
    f32::from_bits((b + 0x7fff + ((b >> 16) & 1)) & 0xffff_0000)
}

impl LlamaConfig {
    pub fn from_gguf(f: &GgufFile) -> Res<Self> {
        let arch = f
            .get_metadata_string("general.architecture")
            .context("general.architecture")?
            .unwrap_or_default();
        if arch != "llama" {
            return Err(anyhow!(
                "unsupported GGUF architecture '{arch}' (this backend runs llama-family decoders)"
            ));
        }
        let k = |s: &str| format!("llama.{s}");
        let hidden = meta_req(f, &k("embedding_length"))? as i32;
        let n_heads = meta_req(f, &k("attention.head_count"))? as i32;
        let n_kv_heads = meta_f64(f, &k("attention.head_count_kv"))?.map_or(n_heads, |v| v as i32);
        check_heads(hidden, n_heads, n_kv_heads)?;
        if hidden % n_heads != 0 {
            return Err(anyhow!("hidden {hidden} is not a multiple of {n_heads} heads"));
        }
        let head_dim = hidden / n_heads;
        let n_layers = meta_req(f, &k("block_count"))? as usize;
        Ok(LlamaConfig {
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dims: meta_f64(f, &k("rope.dimension_count"))?.map_or(head_dim, |v| v as i32),
            rope_traditional: true,
            rope: RopeSpec::plain(meta_f64(f, &k("rope.freq_base"))?.unwrap_or(10000.0) as f32),
            local_rope: None,
            mrope: None,
            windows: vec![None; n_layers],
            qk_norm: false,
            norm_plus_one: false,
            sandwich_norms: false,
            embed_scale: None,
            activation: Activation::Silu,
            attn_scale: 1.0 / (head_dim as f32).sqrt(),
            attn_softcap: None,
            final_softcap: None,
            fused: false,
            head: Head::IfPresent,
            eps: meta_f64(f, &k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f32,
            context: meta_f64(f, &k("context_length"))?.unwrap_or(2048.0) as usize,
            vocab: 0,
        })
    }

    /// From a Hugging Face `config.json` (the field names transformers and mlx-lm use). An
    /// unknown `model_type` is an error naming it and the supported list; so is a missing
    /// required field or an unsupported `rope_scaling` type.
    pub fn from_hf(c: &serde_json::Value) -> Res<Self> {
        let model_type = c.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        if !SUPPORTED_MODEL_TYPES.contains(&model_type) {
            return Err(anyhow!(
                "config.json: unsupported model_type '{model_type}' (supported: {})",
                SUPPORTED_MODEL_TYPES.join(", ")
            ));
        }
        let gemma = matches!(model_type, "gemma2" | "gemma3_text");
        let int = |k: &str| c.get(k).and_then(|v| v.as_i64());
        let req = |k: &str| int(k).with_context(|| format!("config.json: no integer \"{k}\""));
        let float = |k: &str, d: f64| c.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
        let hidden = req("hidden_size")? as i32;
        let n_heads = req("num_attention_heads")? as i32;
        let n_kv_heads = int("num_key_value_heads").map_or(n_heads, |v| v as i32);
        check_heads(hidden, n_heads, n_kv_heads)?;
        let n_layers = req("num_hidden_layers")? as usize;
        // Phi-3 derives the head size (mlx-lm ignores any head_dim); Gemma requires it.
        let head_dim = match model_type {
            "phi3" => hidden / n_heads,
            _ if gemma => req("head_dim")? as i32,
            _ => int("head_dim").map_or(hidden / n_heads.max(1), |v| v as i32),
        };
        let rope_dims = match model_type {
            "phi3" => (head_dim as f64 * float("partial_rotary_factor", 1.0)) as i32,
            _ => head_dim,
        };
        let default_base = if model_type == "gemma3_text" { 1_000_000.0 } else { 10000.0 };
        let rope = rope_of(c, rope_dims, float("rope_theta", default_base) as f32)?;
        let local_rope = (model_type == "gemma3_text")
            .then(|| RopeSpec::plain(float("rope_local_base_freq", 10000.0) as f32));
        let query_scalar = match model_type {
            "gemma2" => Some(float("query_pre_attn_scalar", 144.0)),
            "gemma3_text" => Some(float("query_pre_attn_scalar", 256.0)),
            _ => None,
        };
        let softcap =
            |k: &str, d: f64| (model_type == "gemma2").then(|| float(k, d) as f32).filter(|&v| v > 0.0);
        let tie = c.get("tie_word_embeddings").and_then(|v| v.as_bool());
        let head = match model_type {
            "gemma2" => Head::Tied,
            "gemma3_text" => Head::IfPresent,
            "qwen3" | "phi3" if tie != Some(true) => Head::Separate,
            _ if tie == Some(false) => Head::Separate,
            _ => Head::Tied,
        };
        Ok(LlamaConfig {
            n_layers,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dims,
            rope_traditional: c.get("rope_traditional").and_then(|v| v.as_bool()).unwrap_or(false),
            rope,
            local_rope,
            mrope: None,
            windows: windows_of(c, model_type, n_layers)?,
            qk_norm: matches!(model_type, "qwen3" | "gemma3_text"),
            norm_plus_one: gemma,
            sandwich_norms: gemma,
            embed_scale: match model_type {
                "gemma2" => Some((hidden as f32).sqrt()),
                "gemma3_text" => Some(round_to_bf16((hidden as f64).sqrt() as f32)),
                _ => None,
            },
            activation: if gemma { Activation::GeluApprox } else { Activation::Silu },
            attn_scale: query_scalar.map_or(1.0 / (head_dim as f32).sqrt(), |q| q.powf(-0.5) as f32),
            attn_softcap: softcap("attn_logit_softcapping", 50.0),
            final_softcap: softcap("final_logit_softcapping", 30.0),
            fused: model_type == "phi3",
            head,
            eps: float("rms_norm_eps", 1e-6) as f32,
            context: int("max_position_embeddings").unwrap_or(4096) as usize,
            vocab: 0,
        })
    }
}

/// A linear layer without bias, `y = x W^T`, dense or quantized.
pub(super) enum Linear {
    /// `w` is `[out, in]`; `wt` its transposed view (no copy), kept so that a forward pass does
    /// not build a transpose node per call.
    Dense {
        w: Array,
        wt: Array,
    },
    Quant {
        w: Array,
        scales: Array,
        biases: Array,
        group: i32,
        bits: i32,
    },
}

impl Linear {
    fn dense(w: Array) -> Res<Linear> {
        let wt = w.transpose().context("transpose")?;
        Ok(Linear::Dense { w, wt })
    }

    /// `x W^T` over the last axis of `x`.
    pub(super) fn forward(&self, x: &Array) -> Res<Array> {
        match self {
            Linear::Dense { wt, .. } => x.matmul(wt).context("matmul"),
            Linear::Quant { w, scales, biases, group, bits } => {
                ops::quantized_matmul(x, w, scales, biases, true, *group, *bits).context("quantized_matmul")
            }
        }
    }

    /// Rows `ids` of the weight as f32 (an embedding lookup).
    fn rows(&self, ids: &Array) -> Res<Array> {
        match self {
            Linear::Dense { w, .. } => w.take_axis(ids, 0).context("embedding lookup"),
            Linear::Quant { w, scales, biases, group, bits } => {
                let w = w.take_axis(ids, 0).context("embedding lookup")?;
                let s = scales.take_axis(ids, 0).context("embedding lookup")?;
                let b = biases.take_axis(ids, 0).context("embedding lookup")?;
                ops::dequantize(&w, &s, &b, *group, *bits).context("dequantize rows")
            }
        }
    }

    /// Rows of the weight: the size of the output.
    pub(super) fn out_features(&self) -> i32 {
        match self {
            Linear::Dense { w, .. } => w.shape()[0],
            Linear::Quant { w, .. } => w.shape()[0],
        }
    }

    /// The size of the input (for a quantized weight: packed columns times 32 / bits).
    pub(super) fn in_features(&self) -> i32 {
        match self {
            Linear::Dense { w, .. } => w.shape()[1],
            Linear::Quant { w, bits, .. } => w.shape()[1] * 32 / *bits,
        }
    }

    /// The arrays it holds (for byte counts and evaluation).
    pub(super) fn arrays(&self) -> Vec<&Array> {
        match self {
            Linear::Dense { w, .. } => vec![w],
            Linear::Quant { w, scales, biases, .. } => vec![w, scales, biases],
        }
    }

    /// Stacks several linears with the same input size into one (rows concatenated), so that
    /// q/k/v and gate/up each run as one matmul. Quantized parts fuse only when they share
    /// group size and bits (mixed recipes give v more bits than q/k); otherwise `None`, and
    /// the caller runs them separately ([`Stacked`]).
    fn fuse(parts: &[Linear]) -> Res<Option<Linear>> {
        let dense: Vec<&Array> = parts
            .iter()
            .filter_map(|p| match p {
                Linear::Dense { w, .. } => Some(w),
                _ => None,
            })
            .collect();
        if dense.len() == parts.len() {
            return Ok(Some(Linear::dense(ops::concatenate(&dense, 0).context("fuse weights")?)?));
        }
        let mut ws = Vec::new();
        let mut ss = Vec::new();
        let mut bs = Vec::new();
        let mut params = None;
        for p in parts {
            match p {
                Linear::Quant { w, scales, biases, group, bits }
                    if params.is_none_or(|q| q == (*group, *bits)) =>
                {
                    params = Some((*group, *bits));
                    ws.push(w);
                    ss.push(scales);
                    bs.push(biases);
                }
                _ => return Ok(None),
            }
        }
        let (group, bits) = params.unwrap_or((GGUF_GROUP_SIZE, 4));
        Ok(Some(Linear::Quant {
            w: ops::concatenate(&ws, 0).context("fuse weights")?,
            scales: ops::concatenate(&ss, 0).context("fuse scales")?,
            biases: ops::concatenate(&bs, 0).context("fuse biases")?,
            group,
            bits,
        }))
    }
}

/// Several linears over the same input whose outputs are concatenated along the last axis:
/// one fused matmul when their formats allow, else one per part.
enum Stacked {
    Fused(Linear),
    Parts(Vec<Linear>),
}

impl Stacked {
    fn new(parts: Vec<Linear>) -> Res<Stacked> {
        Ok(match Linear::fuse(&parts)? {
            Some(l) => Stacked::Fused(l),
            None => Stacked::Parts(parts),
        })
    }

    fn forward(&self, x: &Array) -> Res<Array> {
        match self {
            Stacked::Fused(l) => l.forward(x),
            Stacked::Parts(ps) => {
                let outs = ps.iter().map(|p| p.forward(x)).collect::<Res<Vec<_>>>()?;
                ops::concatenate(&outs, -1).context("concatenate outputs")
            }
        }
    }

    fn arrays(&self) -> Vec<&Array> {
        match self {
            Stacked::Fused(l) => l.arrays(),
            Stacked::Parts(ps) => ps.iter().flat_map(Linear::arrays).collect(),
        }
    }
}

struct Layer {
    attn_norm: Array,
    qkv: Stacked,
    /// q/k/v biases concatenated (Qwen2), added after the qkv matmul.
    qkv_bias: Option<Array>,
    /// Per-head RMSNorm weights of q and k (Qwen3, Gemma 3).
    q_norm: Option<Array>,
    k_norm: Option<Array>,
    o: Linear,
    /// Gemma 2/3: the norm of the attention output before its residual add.
    post_attn_norm: Option<Array>,
    ffn_norm: Array,
    gate_up: Stacked,
    down: Linear,
    /// Gemma 2/3: the norm of the MLP output before its residual add.
    post_ffn_norm: Option<Array>,
    ffn: i32,
    /// The sliding window of this layer, if any (`LlamaConfig::windows`).
    window: Option<i32>,
    /// This layer's RoPE (an index into `Llama::ropes`).
    rope: usize,
}

/// A [`RopeSpec`] ready to use: the periods and the q/k feature scale as arrays.
struct Rope {
    base: Option<f32>,
    scale: f32,
    freqs: Option<Array>,
    /// The per-feature multiplier of q and k before the rotation (`RopeSpec::mscale` on the
    /// rotated features, 1 on the rest), when it is not 1.
    mscale: Option<Array>,
}

impl Rope {
    fn new(spec: &RopeSpec, dims: i32, head_dim: i32) -> Rope {
        let freqs = spec.freqs.as_ref().map(|f| Array::from_slice(f, &[f.len() as i32]));
        let mscale = (spec.mscale != 1.0).then(|| {
            let v: Vec<f32> = (0..head_dim).map(|i| if i < dims { spec.mscale } else { 1.0 }).collect();
            Array::from_slice(&v, &[head_dim])
        });
        Rope { base: if freqs.is_some() { None } else { Some(spec.base) }, scale: spec.scale, freqs, mscale }
    }
}

/// Where [`Llama::rope`] puts its input's positions.
enum Positions<'a> {
    /// Consecutive positions from this one along the sequence axis (one sequence).
    From(i32),
    /// One position per row of the batch axis (`[B]` int32): a decode step of B sequences.
    Rows(&'a Array),
    /// M-RoPE: the cosines and sines of every rotated feature ([`Mrope::angles`]).
    Angles(&'a (Array, Array)),
}

/// A sequence's M-RoPE positions (mlx-vlm's `get_rope_index`): per axis (temporal, height,
/// width) one position per prompt token, and the shift of every later position (`delta`:
/// a token after the prompt at cache position `p` is at `p + delta` on all three axes).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct MropePositions {
    pub axes: [Vec<i32>; 3],
    pub delta: i32,
}

/// M-RoPE ready to use: the inverse frequencies and which axis each frequency pair reads.
struct Mrope {
    inv_freq: Array,
    /// Per frequency pair, the position axis (0 temporal, 1 height, 2 width).
    axis: Vec<usize>,
}

impl Mrope {
    fn new(sections: [usize; 3], base: f32, head_dim: i32) -> Res<Mrope> {
        let half = (head_dim / 2) as usize;
        let mut axis = vec![0; half];
        let mut at = sections[0];
        for (a, &n) in sections.iter().enumerate().skip(1) {
            for slot in axis.iter_mut().skip(at).take(n) {
                *slot = a;
            }
            at += n;
        }
        // mlx-vlm's compute_inv_freq: 1 / base ** (arange(0, d, 2) / d), in f32.
        let exps = Array::from_iter((0..half).map(|i| (2 * i) as f32), &[half as i32])
            .divide(Array::from_f32(head_dim as f32))?;
        let inv_freq = Array::from_f32(base).power(&exps)?.reciprocal()?;
        Ok(Mrope { inv_freq, axis })
    }

    /// `(cos, sin)` of shape `[rows, 1, t, head_dim]` for positions `axes[a][r * t + j]`
    /// (row `r`, token `j`).
    fn angles(&self, axes: [&[i32]; 3], rows: i32, t: i32) -> Res<(Array, Array)> {
        let n = (rows * t) as usize;
        let half = self.axis.len();
        anyhow::ensure!(axes.iter().all(|a| a.len() == n), "M-RoPE positions for {n} tokens");
        let pos: Vec<f32> = (0..n).flat_map(|j| self.axis.iter().map(move |&a| axes[a][j] as f32)).collect();
        let freqs = Array::from_slice(&pos, &[rows, 1, t, half as i32]).multiply(&self.inv_freq)?;
        let emb = ops::concatenate(&[&freqs, &freqs], -1)?;
        Ok((emb.cos()?, emb.sin()?))
    }

    fn apply(&self, x: &Array, (cos, sin): &(Array, Array)) -> Res<Array> {
        rotate_half(x, cos, sin)
    }
}

/// The half-split rotary rotation `x * cos + rotate_half(x) * sin` over the last axis, where
/// `rotate_half` of `[x1, x2]` is `[-x2, x1]` (transformers' and mlx-vlm's).
pub(super) fn rotate_half(x: &Array, cos: &Array, sin: &Array) -> Res<Array> {
    let h = x.shape()[x.ndim() - 1] / 2;
    let parts = ops::split_at_indices(x, &[h], -1)?;
    let rotated = ops::concatenate(&[&parts[1].negative()?, &parts[0]], -1)?;
    Ok(x.multiply(cos)?.add(rotated.multiply(sin)?)?)
}

/// The loaded decoder. Holds only MLX arrays; lives on its model's worker thread.
pub(super) struct Llama {
    pub cfg: LlamaConfig,
    embed: Linear,
    output: Option<Linear>,
    layers: Vec<Layer>,
    norm: Array,
    /// RoPE of full-attention layers, then (if different) of sliding-window layers.
    ropes: Vec<Rope>,
    /// M-RoPE (Qwen2-VL), in place of `ropes`.
    mrope: Option<Mrope>,
}

/// The parts of a decoder, named per source.
#[derive(Debug, Clone, Copy)]
enum Part {
    Embed,
    Output,
    Norm,
    AttnNorm,
    Q,
    K,
    V,
    /// Phi-3's fused q/k/v projection.
    Qkv,
    O,
    QNorm,
    KNorm,
    /// The MLP's input norm in Llama-style layers (`post_attention_layernorm`).
    FfnNorm,
    /// Gemma: the attention output's norm (also named `post_attention_layernorm`).
    PostAttnNorm,
    /// Gemma: the MLP's input norm.
    PreFfnNorm,
    /// Gemma: the MLP output's norm.
    PostFfnNorm,
    Gate,
    Up,
    /// Phi-3's fused gate/up projection.
    GateUp,
    Down,
}

/// Where a decoder's tensors come from.
pub(super) enum Source<'a> {
    /// An opened GGUF file (tensor names like `blk.0.attn_q`).
    Gguf(&'a GgufFile),
    /// The tensors of a safetensors directory, taken out as they are loaded (names like
    /// `model.layers.0.self_attn.q_proj`), and its config's quantization.
    Hf { tensors: HashMap<String, Array>, quant: MlxQuantization },
}

impl Source<'_> {
    /// Loads every shard of `dir` (lazily: data is read when evaluated) with mlx-rs.
    pub fn hf(dir: &Path, config: &serde_json::Value) -> Res<Source<'static>> {
        let quant = MlxQuantization::from_config(config).map_err(|e| anyhow!("{}/{e}", dir.display()))?;
        let mut tensors = HashMap::new();
        for file in crate::catalog::safetensors_files(dir).map_err(|e| anyhow!(e))? {
            // The header check gives a clear error for a truncated file before MLX reads it.
            crate::catalog::safetensors_header(&file).map_err(|e| anyhow!(e))?;
            let part = Array::load_safetensors(&file).with_context(|| file.display().to_string())?;
            tensors.extend(part);
        }
        Ok(Source::Hf { tensors, quant })
    }

    /// The module path of `part` (in layer `layer`), without `.weight`.
    fn name(&self, layer: usize, part: Part) -> String {
        let gguf = matches!(self, Source::Gguf(_));
        let global = |g: &str, h: &str| if gguf { g.to_string() } else { h.to_string() };
        let local = |g: &str, h: &str| {
            if gguf { format!("blk.{layer}.{g}") } else { format!("model.layers.{layer}.{h}") }
        };
        match part {
            Part::Embed => global("token_embd", "model.embed_tokens"),
            Part::Output => global("output", "lm_head"),
            Part::Norm => global("output_norm", "model.norm"),
            Part::AttnNorm => local("attn_norm", "input_layernorm"),
            Part::Q => local("attn_q", "self_attn.q_proj"),
            Part::K => local("attn_k", "self_attn.k_proj"),
            Part::V => local("attn_v", "self_attn.v_proj"),
            Part::O => local("attn_output", "self_attn.o_proj"),
            Part::QNorm => local("attn_q_norm", "self_attn.q_norm"),
            Part::KNorm => local("attn_k_norm", "self_attn.k_norm"),
            Part::FfnNorm => local("ffn_norm", "post_attention_layernorm"),
            Part::PostAttnNorm => local("post_attention_norm", "post_attention_layernorm"),
            Part::PreFfnNorm => local("ffn_norm", "pre_feedforward_layernorm"),
            Part::PostFfnNorm => local("post_ffw_norm", "post_feedforward_layernorm"),
            Part::Qkv => local("attn_qkv", "self_attn.qkv_proj"),
            Part::GateUp => local("ffn_gate_up", "mlp.gate_up_proj"),
            Part::Gate => local("ffn_gate", "mlp.gate_proj"),
            Part::Up => local("ffn_up", "mlp.up_proj"),
            Part::Down => local("ffn_down", "mlp.down_proj"),
        }
    }

    fn take(&mut self, name: &str) -> Res<Option<Array>> {
        match self {
            Source::Gguf(f) => f.get_array(name).with_context(|| name.to_string()),
            Source::Hf { tensors, .. } => Ok(tensors.remove(name)),
        }
    }

    fn what(&self) -> &'static str {
        if matches!(self, Source::Gguf(_)) { "GGUF" } else { "safetensors" }
    }

    /// Group size and bits of the quantized `module` with these packed shapes, checked against
    /// the source's description (GGUF: group 32, bits from the shapes; MLX: config.json).
    fn quant_params(&self, module: &str, ws: &[i32], ss: &[i32]) -> Res<(i32, i32)> {
        if ws.len() != 2 || ss.len() != 2 || ss[1] == 0 {
            return Err(anyhow!("{module}: unexpected quantized shapes {ws:?} / {ss:?}"));
        }
        match self {
            Source::Gguf(_) => {
                if ws[1] % ss[1] != 0 {
                    return Err(anyhow!("{module}: unexpected quantized shapes {ws:?} / {ss:?}"));
                }
                let bits = ws[1] / ss[1];
                if ![2, 3, 4, 5, 6, 8].contains(&bits) {
                    return Err(anyhow!("{module}: unsupported bit width {bits}"));
                }
                Ok((GGUF_GROUP_SIZE, bits))
            }
            Source::Hf { quant, .. } => {
                let p = quant.for_module(module).with_context(|| {
                    format!("{module} is quantized (it has scales) but config.json's quantization does not cover it")
                })?;
                let (g, b) = (p.group_size as i32, p.bits as i32);
                let inputs = ss[1] * g;
                if ws[1] * 32 != inputs * b || ws[0] != ss[0] {
                    return Err(anyhow!(
                        "config.json quantization (bits {b}, group_size {g}) does not match the tensors of {module}: weight {ws:?} (uint32) implies {} inputs at {b} bits, scales {ss:?} imply {inputs}",
                        ws[1] * 32 / b.max(1)
                    ));
                }
                Ok((g, b))
            }
        }
    }
}

/// Reads `<module>.weight` (+ `.scales`/`.biases` when quantized) in the requested format.
pub(super) fn load_linear(src: &mut Source, module: &str, format: WeightFormat) -> Res<Option<Linear>> {
    let Some(w) = src.take(&format!("{module}.weight"))? else {
        return Ok(None);
    };
    let scales = src.take(&format!("{module}.scales"))?;
    let biases = src.take(&format!("{module}.biases"))?;
    let lin = match (scales, biases) {
        (Some(scales), Some(biases)) => {
            let (group, bits) = src.quant_params(module, w.shape(), scales.shape())?;
            // f32 scales and biases: exact dequantization, and f32 activations in qmm.
            let scales = scales.as_dtype(Dtype::Float32).with_context(|| module.to_string())?;
            let biases = biases.as_dtype(Dtype::Float32).with_context(|| module.to_string())?;
            match format {
                WeightFormat::F32 => Linear::dense(
                    ops::dequantize(&w, &scales, &biases, group, bits).with_context(|| module.to_string())?,
                )?,
                WeightFormat::Quantized => Linear::Quant { w, scales, biases, group, bits },
            }
        }
        (None, None) => {
            if w.dtype() == Dtype::Uint32 {
                return Err(anyhow!("{module}.weight is packed (uint32) but has no .scales/.biases"));
            }
            Linear::dense(w.as_dtype(Dtype::Float32).with_context(|| module.to_string())?)?
        }
        _ => {
            return Err(anyhow!("{module}: scales without biases (unsupported quantization)"));
        }
    };
    Ok(Some(lin))
}

fn require(lin: Option<Linear>, name: &str, what: &str) -> Res<Linear> {
    lin.with_context(|| format!("{what} has no tensor {name}.weight"))
}

pub(super) fn load_f32(src: &mut Source, name: &str) -> Res<Option<Array>> {
    src.take(name)?.map(|a| a.as_dtype(Dtype::Float32).with_context(|| name.to_string())).transpose()
}

/// An RMSNorm weight as f32; with `plus_one` (Gemma) the `1 + w` the norm multiplies by.
fn load_norm(src: &mut Source, module: &str, plus_one: bool) -> Res<Array> {
    let what = src.what();
    let w = load_f32(src, &format!("{module}.weight"))?
        .with_context(|| format!("{what} has no tensor {module}.weight"))?;
    if plus_one { w.add(Array::from_f32(1.0)).with_context(|| module.to_string()) } else { Ok(w) }
}

impl Llama {
    /// Builds the model from `src` with hyper-parameters `cfg`. Every weight is evaluated
    /// before returning, one layer at a time (so the quantized originals can be freed as we go).
    pub fn load(src: &mut Source, mut cfg: LlamaConfig, format: WeightFormat) -> Res<Llama> {
        let what = src.what();
        let name = |src: &Source, p: Part| src.name(0, p);
        let embed_name = name(src, Part::Embed);
        let embed = require(load_linear(src, &embed_name, format)?, &embed_name, what)?;
        cfg.vocab = embed.out_features() as usize;
        let out_name = name(src, Part::Output);
        let output = match cfg.head {
            Head::Tied => None,
            Head::Separate => Some(
                require(load_linear(src, &out_name, format)?, &out_name, what)
                    .map_err(|e| anyhow!("{e} (config.json: tie_word_embeddings is false)"))?,
            ),
            Head::IfPresent => load_linear(src, &out_name, format)?,
        };
        let plus_one = cfg.norm_plus_one;
        let norm_name = name(src, Part::Norm);
        let norm = load_norm(src, &norm_name, plus_one)?;
        eval_all(embed.arrays().into_iter().chain([&norm]))?;
        if let Some(o) = &output {
            eval_all(o.arrays())?;
        }
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let get = |src: &mut Source, p: Part| -> Res<Linear> {
                let n = src.name(i, p);
                require(load_linear(src, &n, format)?, &n, what)
            };
            let norm = |src: &mut Source, p: Part| -> Res<Array> {
                let n = src.name(i, p);
                load_norm(src, &n, plus_one)
            };
            let (expect_q, expect_kv) = (nh * hd, nkv * hd);
            let qkv = if cfg.fused {
                let qkv = get(src, Part::Qkv)?;
                if qkv.out_features() != expect_q + 2 * expect_kv {
                    return Err(anyhow!(
                        "layer {i}: qkv_proj has {} outputs, the config needs {expect_q} + 2 x {expect_kv}",
                        qkv.out_features()
                    ));
                }
                Stacked::Fused(qkv)
            } else {
                let q = get(src, Part::Q)?;
                let k = get(src, Part::K)?;
                let v = get(src, Part::V)?;
                if q.out_features() != expect_q
                    || k.out_features() != expect_kv
                    || v.out_features() != expect_kv
                {
                    return Err(anyhow!(
                        "layer {i}: q/k/v sizes {}/{}/{} do not match the config ({expect_q}/{expect_kv})",
                        q.out_features(),
                        k.out_features(),
                        v.out_features()
                    ));
                }
                Stacked::new(vec![q, k, v])?
            };
            let mut biases = Vec::new();
            if !cfg.fused {
                for p in [Part::Q, Part::K, Part::V] {
                    let n = format!("{}.bias", src.name(i, p));
                    biases.extend(load_f32(src, &n)?);
                }
            }
            let qkv_bias = match biases.len() {
                0 => None,
                3 => Some(ops::concatenate(&biases, 0).context("fuse q/k/v biases")?),
                _ => return Err(anyhow!("layer {i}: some of q/k/v have a bias and some do not")),
            };
            let (q_norm, k_norm) = if cfg.qk_norm {
                (Some(norm(src, Part::QNorm)?), Some(norm(src, Part::KNorm)?))
            } else {
                (None, None)
            };
            let (gate_up, ffn) = if cfg.fused {
                let gu = get(src, Part::GateUp)?;
                let n = gu.out_features();
                if n % 2 != 0 {
                    return Err(anyhow!("layer {i}: gate_up_proj has an odd number of outputs ({n})"));
                }
                (Stacked::Fused(gu), n / 2)
            } else {
                let gate = get(src, Part::Gate)?;
                let ffn = gate.out_features();
                (Stacked::new(vec![gate, get(src, Part::Up)?])?, ffn)
            };
            let sandwich = cfg.sandwich_norms;
            let window = cfg.windows.get(i).copied().flatten().map(|w| w as i32);
            let layer = Layer {
                attn_norm: norm(src, Part::AttnNorm)?,
                qkv,
                qkv_bias,
                q_norm,
                k_norm,
                o: get(src, Part::O)?,
                post_attn_norm: if sandwich { Some(norm(src, Part::PostAttnNorm)?) } else { None },
                ffn_norm: norm(src, if sandwich { Part::PreFfnNorm } else { Part::FfnNorm })?,
                gate_up,
                down: get(src, Part::Down)?,
                post_ffn_norm: if sandwich { Some(norm(src, Part::PostFfnNorm)?) } else { None },
                ffn,
                window,
                rope: usize::from(window.is_some() && cfg.local_rope.is_some()),
            };
            eval_all(layer_arrays(&layer))?;
            layers.push(layer);
        }
        let mut ropes = vec![Rope::new(&cfg.rope, cfg.rope_dims, hd)];
        ropes.extend(cfg.local_rope.iter().map(|r| Rope::new(r, cfg.rope_dims, hd)));
        let mrope = cfg.mrope.map(|s| Mrope::new(s, cfg.rope.base, hd)).transpose()?;
        if let Some(m) = &mrope {
            eval_all([&m.inv_freq])?;
        }
        Ok(Llama { cfg, embed, output, layers, norm, ropes, mrope })
    }

    /// Bytes one position of one sequence takes in the KV cache: f32 keys and values for every
    /// layer and KV head ([`KvCache`], [`SharedKv`] cells).
    pub fn kv_bytes_per_position(&self) -> u64 {
        let c = &self.cfg;
        c.n_layers as u64 * c.n_kv_heads.max(0) as u64 * c.head_dim.max(0) as u64 * 2 * 4
    }

    /// Every array the model holds (for the byte count).
    pub fn arrays(&self) -> Vec<&Array> {
        let mut v = self.embed.arrays();
        if let Some(o) = &self.output {
            v.extend(o.arrays());
        }
        v.push(&self.norm);
        for l in &self.layers {
            v.extend(layer_arrays(l));
        }
        v
    }

    /// RoPE of layer `l` on q and k heads `[B, heads, t, hd]`: at positions `p..p + t` for
    /// [`Positions::From`]`(p)`, or row `r` at position `offsets[r]` for [`Positions::Rows`].
    fn rope(&self, l: &Layer, x: &Array, at: Positions) -> Res<Array> {
        if let (Positions::Angles(a), Some(m)) = (&at, &self.mrope) {
            return m.apply(x, a).context("m-rope");
        }
        let r = &self.ropes[l.rope];
        let scaled;
        let x = match &r.mscale {
            Some(m) => {
                scaled = x.multiply(m).context("rope mscale")?;
                &scaled
            }
            None => x,
        };
        let (dims, trad, freqs) = (self.cfg.rope_dims, self.cfg.rope_traditional, r.freqs.as_ref());
        match at {
            Positions::From(p) => fast::rope(x, dims, trad, r.base, r.scale, p, freqs),
            Positions::Rows(offsets) => fast::rope_dynamic(x, dims, trad, r.base, r.scale, offsets, freqs),
            Positions::Angles(_) => return Err(anyhow!("M-RoPE positions for a model without M-RoPE")),
        }
        .context("rope")
    }

    /// The token embeddings of `ids` (times Gemma's scale), shape `[n, hidden]`.
    pub(super) fn embed(&self, ids: &[u32]) -> Res<Array> {
        let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let x = self.embed.rows(&Array::from_slice(&ids, &[ids.len() as i32]))?;
        match self.cfg.embed_scale {
            Some(s) => x.multiply(Array::from_f32(s)).context("embedding scale"),
            None => Ok(x),
        }
    }

    /// Final norm, output layer and Gemma 2's soft-capping, on `[.., hidden]`.
    fn logits(&self, x: &Array) -> Res<Array> {
        let x = fast::rms_norm(x, Some(&self.norm), self.cfg.eps).context("rms_norm")?;
        let head = self.output.as_ref().unwrap_or(&self.embed);
        let logits = head.forward(&x)?;
        match self.cfg.final_softcap {
            Some(c) => softcap(&logits, c),
            None => Ok(logits),
        }
    }

    /// Runs `ids` (one sequence) at positions `cache.len()..`, appends their keys and values to
    /// `cache`, and returns the logits of the last position, shape `[vocab]`, not yet evaluated.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache) -> Res<Array> {
        self.forward_embeds(&self.embed(ids)?, cache)
    }

    /// As [`Llama::forward`], from input embeddings `[t, hidden]` instead of token ids (a
    /// vision-language prompt: token embeddings with image features merged in).
    pub fn forward_embeds(&self, embeds: &Array, cache: &mut KvCache) -> Res<Array> {
        self.forward_embeds_at(embeds, cache, None)
    }

    /// As [`Llama::forward_embeds`], with the M-RoPE positions of these `t` tokens (each axis
    /// `t` long; an M-RoPE model only). Without them the tokens are at `cache.len() +
    /// cache.rope_delta ..` on every axis (a model without M-RoPE: `cache.len() ..`).
    pub fn forward_embeds_at(
        &self,
        embeds: &Array,
        cache: &mut KvCache,
        at: Option<[&[i32]; 3]>,
    ) -> Res<Array> {
        let t = embeds.shape()[0];
        let offset = cache.len as i32;
        let cfg = &self.cfg;
        let angles = match (&self.mrope, at) {
            (Some(m), Some(axes)) => {
                anyhow::ensure!(
                    axes.iter().all(|a| a.len() == t as usize),
                    "M-RoPE positions for {t} tokens"
                );
                Some(m.angles(axes, 1, t)?)
            }
            (Some(m), None) => {
                let p: Vec<i32> = (0..t).map(|j| offset + cache.rope_delta + j).collect();
                Some(m.angles([&p, &p, &p], 1, t)?)
            }
            (None, Some(_)) => return Err(anyhow!("M-RoPE positions for a model without M-RoPE")),
            (None, None) => None,
        };
        let mut x = embeds.reshape(&[1, t, cfg.hidden]).context("reshape")?;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        cache.reserve(offset + t, cfg)?;
        let mut masks = Masks::default();
        for (li, l) in self.layers.iter().enumerate() {
            let h = fast::rms_norm(&x, Some(&l.attn_norm), cfg.eps).context("rms_norm")?;
            let mut qkv = l.qkv.forward(&h)?;
            if let Some(b) = &l.qkv_bias {
                qkv = qkv.add(b).context("qkv bias")?;
            }
            let heads = qkv.reshape(&[1, t, nh + 2 * nkv, hd]).context("reshape")?;
            let heads = self.qk_norm(l, heads)?;
            // All heads at once: [1, t, nh + 2 nkv, hd] -> [1, heads, t, hd]. RoPE runs once
            // over the q and k heads together (each `fast::rope` call costs about 10 us of
            // graph building, several times a plain op).
            let heads = heads.transpose_axes(&[0, 2, 1, 3]).context("transpose")?;
            let mut parts = ops::split_at_indices(&heads, &[nh + nkv], 1).context("split v")?;
            let v = pop(&mut parts)?;
            let at = angles.as_ref().map_or(Positions::From(offset), Positions::Angles);
            let qk = self.rope(l, &pop(&mut parts)?, at)?;
            let mut parts = ops::split_at_indices(&qk, &[nh], 1).context("split q/k")?;
            let k = pop(&mut parts)?;
            let q = pop(&mut parts)?;
            let (keys, values) = cache.update(li, &k, &v, offset, t)?;
            let attn = self
                .attend(l, (&q, &keys, &values), offset, t, &mut masks)?
                .transpose_axes(&[0, 2, 1, 3])
                .context("transpose")?
                .reshape(&[1, t, nh * hd])
                .context("reshape")?;
            x = self.mlp(l, self.attn_residual(l, x, &attn)?)?;
        }
        cache.len += t as usize;
        let last = x.try_index((.., t - 1, ..)).context("last position")?;
        self.logits(&last)?.reshape(&[cfg.vocab as i32]).context("reshape logits")
    }
}

/// `tanh(x / c) * c` (Gemma 2's soft-capping).
fn softcap(x: &Array, c: f32) -> Res<Array> {
    let c = Array::from_f32(c);
    ops::tanh(x.divide(&c).context("softcap")?).context("softcap")?.multiply(&c).context("softcap")
}

/// The attention masks of one forward pass, built once per distinct window (a chunk's mask is
/// the same for every layer with that window).
#[derive(Default)]
struct Masks(Vec<(Option<i32>, Array)>);

impl Masks {
    /// [`window_mask`] for these arguments; `start` must be the one `window` implies.
    fn get(&mut self, offset: i32, t: i32, start: i32, window: Option<i32>) -> &Array {
        let i = match self.0.iter().position(|(w, _)| *w == window) {
            Some(i) => i,
            None => {
                self.0.push((window, window_mask(offset, t, start, window)));
                self.0.len() - 1
            }
        };
        &self.0[i].1
    }
}

/// The attention mask of `t` queries at positions `offset..offset + t` over the keys at
/// positions `start..offset + t`: causal, and with a window `w` also `key > query - w`
/// (each query sees itself and the `w - 1` positions before it, mlx-lm's
/// `create_causal_mask(window_size=w)`). `[t, keys]` booleans, true where attended.
fn window_mask(offset: i32, t: i32, start: i32, window: Option<i32>) -> Array {
    let n = offset + t - start;
    let mut m = Vec::with_capacity((t * n) as usize);
    for i in 0..t {
        let q = offset + i;
        for j in 0..n {
            let k = start + j;
            m.push(k <= q && window.is_none_or(|w| k > q - w));
        }
    }
    Array::from_slice(&m, &[t, n])
}

impl Llama {
    /// Attention of `q` (`[1, nh, t, hd]`, positions `offset..offset + t`) over all cached
    /// `keys`/`values` (`[1, nkv, offset + t, hd]`): causal, and for a sliding-window layer only
    /// over the last `window` positions up to each query (the keys before the first one any
    /// query sees are sliced off; a multi-token chunk gets a windowed causal mask). Gemma 2's
    /// soft-capped scores take the explicit path (`scores -> tanh -> mask -> softmax`, as
    /// mlx-lm's gemma2.py); every other layer runs `fast::scaled_dot_product_attention`.
    fn attend(
        &self,
        l: &Layer,
        (q, keys, values): (&Array, &Array, &Array),
        offset: i32,
        t: i32,
        masks: &mut Masks,
    ) -> Res<Array> {
        let end = offset + t;
        let start = l.window.map_or(0, |w| (offset + 1 - w).max(0));
        let (sliced_k, sliced_v);
        let (keys, values) = if start > 0 {
            sliced_k = keys.try_index((.., .., start..end, ..)).context("window keys")?;
            sliced_v = values.try_index((.., .., start..end, ..)).context("window values")?;
            (&sliced_k, &sliced_v)
        } else {
            (keys, values)
        };
        // Plain causal suffices when no query is more than `w - 1` past the first key kept.
        let windowed = l.window.is_some_and(|w| end - start > w);
        let scale = self.cfg.attn_scale;
        let Some(cap) = self.cfg.attn_softcap else {
            let mask = if t == 1 {
                None
            } else if windowed {
                Some(ScaledDotProductAttentionMask::Array(masks.get(offset, t, start, l.window)))
            } else {
                Some(ScaledDotProductAttentionMask::Causal)
            };
            return fast::scaled_dot_product_attention(q, keys, values, scale, mask, None)
                .context("attention");
        };
        let mask = (t > 1).then(|| masks.get(offset, t, start, l.window).clone());
        self.softcapped(q, keys, values, cap, mask.as_ref())
    }

    /// mlx-lm's gemma2 Attention, explicitly: q (`[B, nh, t, hd]`) times the scale, grouped
    /// heads over `keys`/`values` (`[B, nkv, n, hd]`), scores soft-capped at `cap`, then the
    /// boolean `mask` (broadcastable to `[B, t, n]`; none: every key) as the dtype's minimum, a
    /// precise softmax, and the values. Returns `[B, nh, t, hd]`.
    fn softcapped(
        &self,
        q: &Array,
        keys: &Array,
        values: &Array,
        cap: f32,
        mask: Option<&Array>,
    ) -> Res<Array> {
        let (nh, nkv, hd) = (self.cfg.n_heads, self.cfg.n_kv_heads, self.cfg.head_dim);
        let (b, t) = (q.shape()[0], q.shape()[2]);
        let q = q
            .multiply(Array::from_f32(self.cfg.attn_scale))
            .context("scale q")?
            .reshape(&[b, nkv, nh / nkv, t, hd])
            .context("reshape")?;
        let k = ops::expand_dims(keys, 2).context("expand")?;
        let v = ops::expand_dims(values, 2).context("expand")?;
        let scores = q.matmul(k.swap_axes(-1, -2).context("swap")?).context("scores")?;
        let mut scores = softcap(&scores, cap)?;
        if let Some(mask) = mask {
            // [.., t, n] -> [.., 1, t, n]: the same mask for every head of a group.
            let mask = ops::expand_dims(mask, -3).context("expand mask")?;
            scores = ops::select(&mask, &scores, Array::from_f32(f32::MIN)).context("mask")?;
        }
        let probs = ops::softmax_axis(&scores, -1, true).context("softmax")?;
        probs.matmul(&v).context("attention")?.reshape(&[b, nh, t, hd]).context("reshape")
    }

    /// The attention output (Gemma: normed) added to the residual stream.
    fn attn_residual(&self, l: &Layer, x: Array, attn: &Array) -> Res<Array> {
        let out = l.o.forward(attn)?;
        let out = match &l.post_attn_norm {
            Some(n) => fast::rms_norm(&out, Some(n), self.cfg.eps).context("post-attention norm")?,
            None => out,
        };
        x.add(out).context("residual")
    }

    /// Per-head RMSNorm of q and k (Qwen3), on `[.., .., heads, hd]` with q, k, v heads in order.
    fn qk_norm(&self, l: &Layer, heads: Array) -> Res<Array> {
        let (Some(qn), Some(kn)) = (&l.q_norm, &l.k_norm) else { return Ok(heads) };
        let (nh, nkv) = (self.cfg.n_heads, self.cfg.n_kv_heads);
        let mut p = ops::split_at_indices(&heads, &[nh, nh + nkv], 2).context("split q/k/v")?;
        let v = pop(&mut p)?;
        let k = fast::rms_norm(pop(&mut p)?, Some(kn), self.cfg.eps).context("k norm")?;
        let q = fast::rms_norm(pop(&mut p)?, Some(qn), self.cfg.eps).context("q norm")?;
        ops::concatenate(&[q, k, v], 2).context("join q/k/v")
    }

    /// The feed-forward block with its residual: `x + post(down(act(gate(n(x))) * up(n(x))))`,
    /// `post` being Gemma's post-feed-forward norm (else nothing).
    fn mlp(&self, l: &Layer, x: Array) -> Res<Array> {
        let h = fast::rms_norm(&x, Some(&l.ffn_norm), self.cfg.eps).context("rms_norm")?;
        let gate_up = l.gate_up.forward(&h)?;
        if self.cfg.activation == Activation::Silu && host_swiglu() && gate_up.dtype() == Dtype::Float32 {
            return self.mlp_out(l, x, self.swiglu_host(&gate_up, l.ffn)?);
        }
        let mut gu = ops::split_at_indices(gate_up, &[l.ffn], -1).context("split gate/up")?;
        let (u, g) = (pop(&mut gu)?, pop(&mut gu)?);
        // With plain ops: mlx-rs's nn::silu / gelu go through `compile` on every call, which
        // costs more to build than the few ops they fuse.
        let act = match self.cfg.activation {
            Activation::Silu => g.multiply(ops::sigmoid(&g).context("sigmoid")?).context("silu")?,
            Activation::GeluApprox => {
                // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), mlx's nn.gelu_approx.
                let f = |v: f32| Array::from_f32(v);
                let cube = g.multiply(&g).context("gelu")?.multiply(&g).context("gelu")?;
                let inner = g.add(cube.multiply(f(0.044715)).context("gelu")?).context("gelu")?;
                let t = ops::tanh(inner.multiply(f((2.0 / std::f32::consts::PI).sqrt())).context("gelu")?)
                    .context("gelu")?;
                g.multiply(f(0.5))
                    .context("gelu")?
                    .multiply(t.add(f(1.0)).context("gelu")?)
                    .context("gelu")?
            }
        };
        self.mlp_out(l, x, act.multiply(&u).context("gated mlp")?)
    }

    /// The feed-forward block from its gated activation `act` on: `x + post(down(act))`.
    fn mlp_out(&self, l: &Layer, x: Array, act: Array) -> Res<Array> {
        let out = l.down.forward(&act)?;
        let out = match &l.post_ffn_norm {
            Some(n) => fast::rms_norm(&out, Some(n), self.cfg.eps).context("post-feed-forward norm")?,
            None => out,
        };
        x.add(out).context("residual")
    }

    /// `silu(gate) * up` of a gate/up product (`[.., 2 ffn]`, f32) on the host
    /// ([`swiglu::silu_mul`]): the graph so far is evaluated; `[.., ffn]`.
    fn swiglu_host(&self, gate_up: &Array, ffn: i32) -> Res<Array> {
        let gate_up = gate_up.contiguous().context("contiguous gate/up")?;
        eval_all([&gate_up])?;
        let mut out = vec![0f32; gate_up.size() / 2];
        swiglu::silu_mul(gate_up.try_as_slice::<f32>().context("gate/up")?, ffn as usize, &mut out)?;
        let mut shape = gate_up.shape().to_vec();
        *shape.last_mut().context("a gate/up product without dimensions")? = ffn;
        Ok(Array::from_slice(&out, &shape))
    }

    /// One decode step for several sequences at once, over the shared cache `kv`: `ids[r]` is
    /// the next token of the sequence whose cells, in position order, are `rows[r]`, the last
    /// of them the (already allocated) cell this token's keys and values go to, so its
    /// position is `rows[r].len() - 1`. Everything runs once for the whole batch: the linear
    /// layers as `[B, hidden]` products (where the weights' bytes are read), RoPE at per-row
    /// positions, one scatter per layer writing the B new keys and values to their cells, and
    /// the attention of each row over its own cells (within its layer's window) on the host
    /// ([`attend::decode`], reading the cells in place; through MLX, or for a non-f32 cache, a
    /// gather of them into a `[B, nkv, L, hd]` batch padded to the longest row `L` and one
    /// attention with a mask hiding the padding). `deltas[r]` shifts row `r`'s
    /// rotary position (M-RoPE's `MropePositions::delta` of a prompt with images; 0 otherwise).
    /// Returns the logits `[B, vocab]`, not evaluated.
    pub fn forward_shared(
        &self,
        ids: &[u32],
        kv: &mut SharedKv,
        rows: &[&[i32]],
        deltas: &[i32],
    ) -> Res<Array> {
        anyhow::ensure!(!ids.is_empty() && ids.len() == rows.len(), "one row of cells per token");
        anyhow::ensure!(deltas.len() == rows.len(), "one rotary shift per row");
        let b = ids.len() as i32;
        let cfg = &self.cfg;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let mut positions = Vec::with_capacity(rows.len());
        let mut cells = Vec::with_capacity(rows.len());
        for r in rows {
            let &last = r.last().context("a row without its new cell")?;
            anyhow::ensure!(kv.is_live(last), "cell {last} is not allocated");
            positions.push(r.len() as i32 - 1);
            cells.push(last);
        }
        for (p, d) in positions.iter_mut().zip(deltas) {
            *p += d;
        }
        let angles = match &self.mrope {
            Some(m) => Some(m.angles([&positions, &positions, &positions], b, 1)?),
            None => None,
        };
        let offsets = Array::from_slice(&positions, &[b]);
        let cells = Array::from_slice(&cells, &[b]);
        let mut gathers: Vec<(Option<i32>, Gather)> = Vec::new();
        let mut x = self.embed(ids)?.reshape(&[b, 1, cfg.hidden]).context("reshape")?;
        for (li, l) in self.layers.iter().enumerate() {
            let h = fast::rms_norm(&x, Some(&l.attn_norm), cfg.eps).context("rms_norm")?;
            let mut qkv = l.qkv.forward(&h)?;
            if let Some(bias) = &l.qkv_bias {
                qkv = qkv.add(bias).context("qkv bias")?;
            }
            let heads = qkv.reshape(&[b, 1, nh + 2 * nkv, hd]).context("reshape")?;
            let heads = self.qk_norm(l, heads)?;
            // [B, 1, heads, hd] -> [B, heads, 1, hd]: RoPE rotates each row at its position.
            let heads = heads.transpose_axes(&[0, 2, 1, 3]).context("transpose")?;
            let mut parts = ops::split_at_indices(&heads, &[nh + nkv], 1).context("split v")?;
            let v = pop(&mut parts)?;
            let at = angles.as_ref().map_or(Positions::Rows(&offsets), Positions::Angles);
            let qk = self.rope(l, &pop(&mut parts)?, at)?;
            let mut parts = ops::split_at_indices(&qk, &[nh], 1).context("split q/k")?;
            let k = pop(&mut parts)?;
            let q = pop(&mut parts)?;
            kv.write(li, &cells, &k, &v)?;
            let attn =
                if host_attention() && q.dtype() == Dtype::Float32 && kv.keys[li].dtype() == Dtype::Float32 {
                    self.attend_cells(&q, kv, li, rows, l.window)?
                } else {
                    let g = match gathers.iter().position(|(w, _)| *w == l.window) {
                        Some(i) => &gathers[i].1,
                        None => {
                            gathers.push((l.window, Gather::new(rows, l.window)));
                            &gathers.last().expect("pushed").1
                        }
                    };
                    let (keys, values) = kv.gather(li, g)?;
                    // q [B, nh, 1, hd] over each row's keys [B, nkv, L, hd].
                    self.attend_masked(&q, &keys, &values, &g.mask)?
                        .transpose_axes(&[0, 2, 1, 3])
                        .context("transpose")?
                        .reshape(&[b, 1, nh * hd])
                        .context("reshape")?
                };
            x = self.mlp(l, self.attn_residual(l, x, &attn)?)?;
        }
        let last = x.reshape(&[b, cfg.hidden]).context("reshape")?;
        self.logits(&last)?.reshape(&[b, cfg.vocab as i32]).context("reshape logits")
    }

    /// [`attend::decode`] of one query per row `q` (`[B, nh, 1, hd]`) over layer `li`'s cells
    /// of `kv` (each row's own, the last `window` of them when given), `[B, 1, nh * hd]`: the
    /// graph so far is evaluated, the cells are read in place (f32 only).
    fn attend_cells(
        &self,
        q: &Array,
        kv: &SharedKv,
        li: usize,
        rows: &[&[i32]],
        window: Option<i32>,
    ) -> Res<Array> {
        let cfg = &self.cfg;
        let (b, nh, hd) = (rows.len() as i32, cfg.n_heads, cfg.head_dim);
        let q = q.reshape(&[b, nh, hd]).context("reshape")?.contiguous().context("contiguous q")?;
        let (keys, values) = (&kv.keys[li], &kv.values[li]);
        eval_all([&q, keys, values])?;
        let heads = attend::Heads {
            heads: nh as usize,
            kv_heads: cfg.n_kv_heads as usize,
            head_dim: hd as usize,
            scale: cfg.attn_scale,
            softcap: cfg.attn_softcap,
        };
        let mut out = vec![0f32; q.size()];
        attend::decode(
            heads,
            q.try_as_slice::<f32>().context("queries")?,
            keys.try_as_slice::<f32>().context("keys")?,
            values.try_as_slice::<f32>().context("values")?,
            rows,
            window,
            &mut out,
        )?;
        Ok(Array::from_slice(&out, &[b, 1, nh * hd]))
    }

    /// Attention of one query per row `q` (`[B, nh, 1, hd]`) over `keys`/`values` (`[B, nkv, L,
    /// hd]`) where `mask` (`[B, 1, 1, L]` booleans) is true; the same two paths as
    /// [`Self::attend`] (Gemma 2's soft-capped scores explicitly, else
    /// `fast::scaled_dot_product_attention`).
    fn attend_masked(&self, q: &Array, keys: &Array, values: &Array, mask: &Array) -> Res<Array> {
        match self.cfg.attn_softcap {
            Some(cap) => self.softcapped(q, keys, values, cap, Some(mask)),
            None => {
                let mask = ScaledDotProductAttentionMask::Array(mask);
                fast::scaled_dot_product_attention(q, keys, values, self.cfg.attn_scale, Some(mask), None)
                    .context("attention")
            }
        }
    }
}

/// Which cells each row of a shared decode step attends to, for one window: `idx` (`[B * L]`)
/// lists row `r`'s cells (its sequence's, in position order, the last one the query's own,
/// only the last `w` with a window `w`) padded to the longest row's `L` with cell 0, and
/// `mask` (`[B, 1, 1, L]`) is true on the real ones.
struct Gather {
    idx: Array,
    mask: Array,
    rows: i32,
    len: i32,
}

impl Gather {
    fn new(rows: &[&[i32]], window: Option<i32>) -> Gather {
        let seen = |cells: &[i32]| {
            let first = window.map_or(0, |w| (cells.len() as i32 - w).max(0)) as usize;
            cells.len() - first
        };
        let len = rows.iter().map(|c| seen(c)).max().unwrap_or(0).max(1);
        let mut idx = Vec::with_capacity(rows.len() * len);
        let mut mask = Vec::with_capacity(rows.len() * len);
        for cells in rows {
            let n = seen(cells);
            idx.extend_from_slice(&cells[cells.len() - n..]);
            idx.resize(idx.len() + len - n, 0);
            mask.extend((0..len).map(|j| j < n));
        }
        let (b, l) = (rows.len() as i32, len as i32);
        Gather {
            idx: Array::from_slice(&idx, &[b * l]),
            mask: Array::from_slice(&mask, &[b, 1, 1, l]),
            rows: b,
            len: l,
        }
    }
}

/// Whether decode steps attend on the host ([`attend::decode`]); `MODELPOOL_ATTENTION=mlx`
/// sends them through MLX's gather and masked attention instead, for comparisons (read once
/// per process).
fn host_attention() -> bool {
    static HOST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HOST.get_or_init(|| std::env::var("MODELPOOL_ATTENTION").map_or(true, |v| v != "mlx"))
}

/// Whether SwiGLU's gate runs on the host ([`swiglu::silu_mul`]); `MODELPOOL_SWIGLU=mlx` keeps
/// MLX's `sigmoid` and products, for comparisons (read once per process).
fn host_swiglu() -> bool {
    static HOST: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *HOST.get_or_init(|| std::env::var("MODELPOOL_SWIGLU").map_or(true, |v| v != "mlx"))
}

fn pop(v: &mut Vec<Array>) -> Res<Array> {
    v.pop().context("split returned too few parts")
}

fn layer_arrays(l: &Layer) -> Vec<&Array> {
    let mut v = vec![&l.attn_norm, &l.ffn_norm];
    v.extend(l.qkv_bias.iter().chain(&l.q_norm).chain(&l.k_norm));
    v.extend(l.post_attn_norm.iter().chain(&l.post_ffn_norm));
    v.extend(l.qkv.arrays());
    v.extend(l.o.arrays());
    v.extend(l.gate_up.arrays());
    v.extend(l.down.arrays());
    v
}

pub(super) fn eval_all<'a>(arrays: impl IntoIterator<Item = &'a Array>) -> Res<()> {
    mlx_rs::transforms::eval(arrays).context("eval")
}

/// Keys and values of past positions, per layer, in buffers that grow in steps of
/// [`KvCache::STEP`] positions and are written in place with slice updates.
pub(super) struct KvCache {
    keys: Vec<Option<Array>>,
    values: Vec<Option<Array>>,
    capacity: i32,
    len: usize,
    /// M-RoPE: what the rotary position of a token without explicit positions adds to its
    /// cache position (the prompt's `MropePositions::delta`; 0 otherwise).
    pub rope_delta: i32,
}

impl KvCache {
    const STEP: i32 = 256;

    pub fn new(n_layers: usize) -> Self {
        KvCache {
            keys: vec![None; n_layers],
            values: vec![None; n_layers],
            capacity: 0,
            len: 0,
            rope_delta: 0,
        }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Positions the buffers have room for (allocated memory).
    pub fn capacity(&self) -> usize {
        self.capacity as usize
    }

    fn reserve(&mut self, needed: i32, cfg: &LlamaConfig) -> Res<()> {
        if needed <= self.capacity {
            return Ok(());
        }
        let new_cap = (needed + Self::STEP - 1) / Self::STEP * Self::STEP;
        let extra = new_cap - self.capacity;
        let zeros = Array::zeros::<f32>(&[1, cfg.n_kv_heads, extra, cfg.head_dim]).context("kv")?;
        for slot in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *slot = Some(match slot.take() {
                None => zeros.clone(),
                Some(old) => {
                    let old = old.try_index((.., .., 0..self.len as i32, ..)).context("kv")?;
                    let pad_len = new_cap - self.len as i32;
                    let pad =
                        Array::zeros::<f32>(&[1, cfg.n_kv_heads, pad_len, cfg.head_dim]).context("kv")?;
                    ops::concatenate(&[old, pad], 2).context("grow kv")?
                }
            });
        }
        self.capacity = new_cap;
        Ok(())
    }

    fn update(&mut self, layer: usize, k: &Array, v: &Array, offset: i32, t: i32) -> Res<(Array, Array)> {
        let end = offset + t;
        let mut out = Vec::with_capacity(2);
        for (buf, new) in [(&mut self.keys[layer], k), (&mut self.values[layer], v)] {
            let b = buf.as_mut().context("kv cache not reserved")?;
            b.try_index_mut((.., .., offset..end, ..), new).context("kv write")?;
            out.push(b.try_index((.., .., 0..end, ..)).context("kv read")?);
        }
        let v = out.pop().expect("two");
        let k = out.pop().expect("two");
        Ok((k, v))
    }
}

/// The keys and values of every sequence a decoder decodes together, in one buffer of `cap`
/// cells per layer for keys and one for values (`[cap, nkv, hd]`, cell-major, so that a
/// cell's values are contiguous for the gathers); a cell holds one position of one sequence, and each sequence keeps the list of its cells in position order.
/// Cells are handed out lowest first and taken back when a sequence leaves, so the buffers
/// hold about the sum of the live sequences' lengths (no padding to the longest, unlike a
/// `[B, nkv, longest, hd]` layout), growing by [`SharedKv::STEP`] cells; [`SharedKv::compact`]
/// gives memory back once much of it is free. Decode attention reads each row's own cells in
/// place ([`attend::decode`]; through MLX, a gather of them padded with a mask).
pub(super) struct SharedKv {
    keys: Vec<Array>,
    values: Vec<Array>,
    cap: i32,
    live: Vec<bool>,
    /// Free cells, lowest first.
    free: std::collections::BinaryHeap<std::cmp::Reverse<i32>>,
    used: usize,
    high: i32,
    n_kv_heads: i32,
    head_dim: i32,
}

impl SharedKv {
    /// Cells added at a time when the free ones run out.
    pub const STEP: i32 = 256;

    pub fn new(cfg: &LlamaConfig) -> Self {
        Self::empty(cfg.n_layers, cfg.n_kv_heads, cfg.head_dim)
    }

    /// No cells; each layer's buffers are placeholders until the first [`SharedKv::grow`].
    fn empty(n_layers: usize, n_kv_heads: i32, head_dim: i32) -> Self {
        SharedKv {
            keys: vec![Array::from_f32(0.0); n_layers],
            values: vec![Array::from_f32(0.0); n_layers],
            cap: 0,
            live: Vec::new(),
            free: Default::default(),
            used: 0,
            high: 0,
            n_kv_heads,
            head_dim,
        }
    }

    /// Cells the buffers hold (allocated memory, live or free).
    pub fn capacity(&self) -> usize {
        self.cap as usize
    }

    /// Cells in use by sequences.
    #[cfg(test)]
    pub fn used(&self) -> usize {
        self.used
    }

    /// One more than the highest live cell.
    #[cfg(test)]
    pub fn high_water(&self) -> i32 {
        self.high
    }

    fn is_live(&self, cell: i32) -> bool {
        self.live.get(cell as usize).copied().unwrap_or(false)
    }

    /// Grows the buffers to hold at least `cap` cells (zeros), keeping what they hold.
    fn grow(&mut self, cap: i32) -> Res<()> {
        if cap <= self.cap {
            return Ok(());
        }
        let cap = (cap + Self::STEP - 1) / Self::STEP * Self::STEP;
        let extra = cap - self.cap;
        let zeros = Array::zeros::<f32>(&[extra, self.n_kv_heads, self.head_dim]).context("kv")?;
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            *buf = if self.cap == 0 {
                zeros.clone()
            } else {
                ops::concatenate(&[&*buf, &zeros], 0).context("grow kv")?
            };
        }
        self.free.extend((self.cap..cap).map(std::cmp::Reverse));
        self.live.resize(cap as usize, false);
        self.cap = cap;
        Ok(())
    }

    /// `n` free cells, lowest first (growing the buffers if needed), marked live.
    pub fn alloc(&mut self, n: usize) -> Res<Vec<i32>> {
        if self.free.len() < n {
            self.grow(self.cap + (n - self.free.len()) as i32)?;
        }
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            let std::cmp::Reverse(c) = self.free.pop().context("free cells counted")?;
            self.live[c as usize] = true;
            self.high = self.high.max(c + 1);
            out.push(c);
        }
        self.used += n;
        Ok(out)
    }

    /// Takes back a leaving sequence's cells (their contents are left as they are: no row
    /// attends to a cell it does not own).
    pub fn release(&mut self, cells: &[i32]) {
        for &c in cells {
            if let Some(l) = self.live.get_mut(c as usize).filter(|l| **l) {
                *l = false;
                self.free.push(std::cmp::Reverse(c));
                self.used -= 1;
            }
        }
        while self.high > 0 && !self.live[self.high as usize - 1] {
            self.high -= 1;
        }
        if self.used == 0 {
            // Nothing live: give all the memory back.
            *self = Self::empty(self.keys.len(), self.n_kv_heads, self.head_dim);
        }
    }

    /// Copies `solo`'s positions (a sequence's prefill) into newly allocated cells and returns
    /// them in position order; `solo` can then be dropped.
    pub fn adopt(&mut self, solo: &KvCache) -> Res<Vec<i32>> {
        let n = solo.len as i32;
        let cells = self.alloc(solo.len)?;
        if n == 0 {
            return Ok(cells);
        }
        let contiguous = cells.windows(2).all(|w| w[1] == w[0] + 1);
        let idx = Array::from_slice(&cells, &[n]);
        for (li, (k, v)) in solo.keys.iter().zip(&solo.values).enumerate() {
            let (k, v) = (k.as_ref().context("prefill cache")?, v.as_ref().context("prefill cache")?);
            for (buf, src) in [(&mut self.keys[li], k), (&mut self.values[li], v)] {
                // [1, nkv, n, hd] -> [n, nkv, hd], the cells' layout.
                let src = src
                    .try_index((0, .., 0..n, ..))
                    .context("kv read")?
                    .transpose_axes(&[1, 0, 2])
                    .context("transpose")?;
                if contiguous {
                    buf.try_index_mut(cells[0]..cells[0] + n, &src).context("kv adopt")?;
                } else {
                    let upd = src.reshape(&[n, 1, self.n_kv_heads, self.head_dim]).context("reshape")?;
                    *buf = ops::indexing::scatter_single(&*buf, &idx, &upd, 0).context("kv adopt")?;
                }
            }
        }
        Ok(cells)
    }

    /// Writes layer `layer`'s new keys and values (`[B, nkv, 1, hd]`) to `cells` (`[B]`).
    fn write(&mut self, layer: usize, cells: &Array, k: &Array, v: &Array) -> Res<()> {
        let b = cells.shape()[0];
        for (buf, new) in [(&mut self.keys[layer], k), (&mut self.values[layer], v)] {
            let upd = new.reshape(&[b, 1, self.n_kv_heads, self.head_dim]).context("reshape")?;
            *buf = ops::indexing::scatter_single(&*buf, cells, &upd, 0).context("kv write")?;
        }
        Ok(())
    }

    /// Layer `layer`'s keys and values at `g`'s cells, `[B, nkv, L, hd]` each.
    fn gather(&self, layer: usize, g: &Gather) -> Res<(Array, Array)> {
        let (nkv, hd) = (self.n_kv_heads, self.head_dim);
        let one = |buf: &Array| -> Res<Array> {
            buf.take_axis(&g.idx, 0)
                .context("kv gather")?
                .reshape(&[g.rows, g.len, nkv, hd])
                .context("reshape")?
                .transpose_axes(&[0, 2, 1, 3])
                .context("transpose")
        };
        Ok((one(&self.keys[layer])?, one(&self.values[layer])?))
    }

    /// When at least two [`SharedKv::STEP`]s of cells are free, moves the live cells to the
    /// front (each sequence's in position order) and shrinks the buffers to what they need
    /// plus one step, rewriting `seqs` (every live sequence's cells) to the new places.
    pub fn compact(&mut self, seqs: &mut [&mut Vec<i32>]) -> Res<bool> {
        if self.cap - (self.used as i32) < 2 * Self::STEP || self.used == 0 {
            return Ok(false);
        }
        let order: Vec<i32> = seqs.iter().flat_map(|s| s.iter().copied()).collect();
        anyhow::ensure!(order.len() == self.used, "compact needs every live sequence's cells");
        let n = order.len() as i32;
        let cap = (n + Self::STEP + Self::STEP - 1) / Self::STEP * Self::STEP;
        let idx = Array::from_slice(&order, &[n]);
        let pad = Array::zeros::<f32>(&[cap - n, self.n_kv_heads, self.head_dim]).context("kv")?;
        for buf in self.keys.iter_mut().chain(self.values.iter_mut()) {
            let kept = buf.take_axis(&idx, 0).context("compact kv")?;
            *buf = ops::concatenate(&[&kept, &pad], 0).context("compact kv")?;
        }
        eval_all(self.keys.iter().chain(&self.values))?;
        let mut next = 0;
        for s in seqs.iter_mut() {
            for c in s.iter_mut() {
                *c = next;
                next += 1;
            }
        }
        self.cap = cap;
        self.live = (0..cap).map(|c| c < n).collect();
        self.free = (n..cap).map(std::cmp::Reverse).collect();
        self.high = n;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Cells are handed out lowest first and reused; the mask lets each row see only its own
    /// sequence's cells, within the window.
    #[test]
    fn shared_cells_and_masks() {
        let mut kv = SharedKv::empty(2, 1, 2);
        assert_eq!(kv.alloc(3).unwrap(), [0, 1, 2]);
        assert_eq!(kv.alloc(2).unwrap(), [3, 4]);
        assert_eq!((kv.capacity(), kv.used(), kv.high_water()), (256, 5, 5));
        kv.release(&[1, 4]);
        assert_eq!((kv.used(), kv.high_water()), (3, 4));
        assert_eq!(kv.alloc(2).unwrap(), [1, 4], "freed cells come back lowest first");
        let rows: [&[i32]; 2] = [&[0, 2, 5], &[1, 3]];
        let g = Gather::new(&rows, None);
        assert_eq!((g.rows, g.len), (2, 3));
        assert_eq!(g.idx.as_slice::<i32>(), [0, 2, 5, 1, 3, 0], "padded with cell 0");
        assert_eq!(g.mask.shape(), [2, 1, 1, 3]);
        assert_eq!(g.mask.as_slice::<bool>(), [true, true, true, true, true, false]);
        // Window 2: the query at position 2 sees positions 1 and 2 (cells 2 and 5).
        let g = Gather::new(&rows, Some(2));
        assert_eq!(g.idx.as_slice::<i32>(), [2, 5, 1, 3]);
        assert_eq!(g.mask.as_slice::<bool>(), [true; 4]);
        kv.release(&[0, 1, 2, 3, 4]);
        assert_eq!((kv.capacity(), kv.used(), kv.high_water()), (0, 0, 0), "all memory back");
    }

    /// The host attention over the cells equals MLX's attention over the same cells gathered
    /// into a padded batch with a mask (the other path, `MODELPOOL_ATTENTION=mlx`): grouped
    /// heads, rows of different lengths over interleaved cells, with and without a window.
    #[test]
    fn host_attention_equals_the_gathered_mlx_attention() {
        let (nh, nkv, hd) = (4, 2, 8);
        let mut kv = SharedKv::empty(1, nkv, hd);
        let mut a = kv.alloc(3).unwrap();
        let b = kv.alloc(4).unwrap();
        a.extend(kv.alloc(2).unwrap());
        let cells: Vec<i32> = a.iter().chain(&b).copied().collect();
        let n = cells.len() as i32;
        let val = |i: i32, m: i32| ((i * m % 23) as f32 - 11.0) / 7.0;
        let k: Vec<f32> = (0..n * nkv * hd).map(|i| val(i, 37)).collect();
        let v: Vec<f32> = (0..n * nkv * hd).map(|i| val(i, 53)).collect();
        let shape = [n, nkv, 1, hd];
        let idx = Array::from_slice(&cells, &[n]);
        kv.write(0, &idx, &Array::from_slice(&k, &shape), &Array::from_slice(&v, &shape)).unwrap();
        let rows: [&[i32]; 2] = [&a, &b];
        let q: Vec<f32> = (0..2 * nh * hd).map(|i| val(i, 29)).collect();
        let qa = Array::from_slice(&q, &[2, nh, 1, hd]);
        let scale = 0.35;
        for window in [None, Some(3)] {
            let g = Gather::new(&rows, window);
            let (keys, values) = kv.gather(0, &g).unwrap();
            let mask = ScaledDotProductAttentionMask::Array(&g.mask);
            let want = fast::scaled_dot_product_attention(&qa, &keys, &values, scale, Some(mask), None)
                .unwrap()
                .to_vec_exact::<f32>()
                .unwrap();
            eval_all([&kv.keys[0], &kv.values[0]]).unwrap();
            let heads = attend::Heads {
                heads: nh as usize,
                kv_heads: nkv as usize,
                head_dim: hd as usize,
                scale,
                softcap: None,
            };
            let mut got = vec![0f32; q.len()];
            let (ks, vs) = (kv.keys[0].as_slice::<f32>(), kv.values[0].as_slice::<f32>());
            attend::decode(heads, &q, ks, vs, &rows, window, &mut got).unwrap();
            let err = got.iter().zip(&want).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
            assert!(err < 1e-5, "window {window:?}: max difference {err}");
        }
    }

    /// Written keys and values stay with their sequence through a compaction, which gives the
    /// free cells' memory back.
    #[test]
    fn shared_cache_compaction_keeps_each_sequence() {
        let mut kv = SharedKv::empty(1, 1, 2);
        let mut a = kv.alloc(2).unwrap();
        let big = kv.alloc(600).unwrap();
        let mut b = kv.alloc(1).unwrap();
        assert_eq!(kv.capacity(), 768);
        // One step writing a's second and b's first cell: key = [10 c, 1], value = [-c, 2].
        let cells = [a[1], b[0]];
        let k: Vec<f32> = cells.iter().flat_map(|&c| [10.0 * c as f32, 1.0]).collect();
        let v: Vec<f32> = cells.iter().flat_map(|&c| [-(c as f32), 2.0]).collect();
        let idx = Array::from_slice(&cells, &[2]);
        let (k, v) = (Array::from_slice(&k, &[2, 1, 1, 2]), Array::from_slice(&v, &[2, 1, 1, 2]));
        kv.write(0, &idx, &k, &v).unwrap();
        let (old_a, old_b) = (a[1], b[0]);
        kv.release(&big);
        assert!(kv.compact(&mut [&mut a, &mut b]).unwrap());
        assert_eq!((a.clone(), b.clone()), (vec![0, 1], vec![2]));
        assert_eq!(
            (kv.capacity(), kv.used(), kv.high_water()),
            (512, 3, 3),
            "what is live, rounded up, plus a step"
        );
        // Each row's cells gathered back: a's second and b's first hold what was written.
        let (keys, vals) = kv.gather(0, &Gather::new(&[&a, &b], None)).unwrap();
        assert_eq!(keys.shape(), [2, 1, 2, 2]);
        let (keys, vals) = (keys.flatten(None, None).unwrap(), vals.flatten(None, None).unwrap());
        let (keys, vals) = (keys.as_slice::<f32>(), vals.as_slice::<f32>());
        assert_eq!(&keys[2..4], [10.0 * old_a as f32, 1.0]);
        assert_eq!(&vals[4..6], [-(old_b as f32), 2.0]);
        assert!(!kv.compact(&mut [&mut a, &mut b]).unwrap(), "nothing left to give back");
    }

    #[test]
    fn sliding_layers_follow_layer_types_else_the_family_rule() {
        let w = |c: serde_json::Value, t: &str, n| windows_of(&c, t, n).unwrap();
        let types = json!({"sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]});
        assert_eq!(w(types, "mistral", 2), [Some(8), None]);
        assert_eq!(w(json!({"sliding_window": 16}), "gemma2", 3), [Some(16), None, Some(16)]);
        let g3 = json!({"sliding_window": 8, "sliding_window_pattern": 3});
        assert_eq!(w(g3, "gemma3_text", 4), [Some(8), Some(8), None, Some(8)]);
        assert_eq!(w(json!({"sliding_window": 4096}), "mistral", 2), [Some(4096), Some(4096)]);
        assert_eq!(w(json!({"sliding_window": null}), "mistral", 2), [None, None]);
        let qwen = json!({"sliding_window": 64, "use_sliding_window": true, "max_window_layers": 1});
        assert_eq!(w(qwen, "qwen2", 2), [None, Some(64)]);
        let unused = json!({"sliding_window": 64, "use_sliding_window": false});
        assert_eq!(w(unused, "qwen2", 2), [None, None]);
        assert_eq!(w(json!({"sliding_window": 64}), "llama", 1), [None]);
        let bad = json!({"layer_types": ["sliding_attention"]});
        assert!(windows_of(&bad, "llama", 1).unwrap_err().to_string().contains("no sliding_window"));
        let short = json!({"sliding_window": 8, "layer_types": ["full_attention"]});
        assert!(windows_of(&short, "llama", 2).unwrap_err().to_string().contains("1 entries for 2 layers"));
    }

    #[test]
    fn window_mask_is_causal_and_windowed_at_an_offset() {
        // Queries at positions 5..8 over keys 3..8 with window 3: each sees itself and 2 before.
        let m = window_mask(5, 3, 3, Some(3)).as_dtype(Dtype::Int32).unwrap().to_vec_exact::<i32>().unwrap();
        #[rustfmt::skip]
        assert_eq!(m, [
            1, 1, 1, 0, 0,
            0, 1, 1, 1, 0,
            0, 0, 1, 1, 1,
        ]);
        let causal =
            window_mask(0, 3, 0, None).as_dtype(Dtype::Int32).unwrap().to_vec_exact::<i32>().unwrap();
        assert_eq!(causal, [1, 0, 0, 1, 1, 0, 1, 1, 1]);
    }

    #[test]
    fn family_switches_from_config() {
        let base =
            json!({"hidden_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 16});
        let with = |extra: serde_json::Value| {
            let mut c = base.clone();
            c.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
            LlamaConfig::from_hf(&c).unwrap()
        };
        let g3 = with(json!({"model_type": "gemma3_text", "query_pre_attn_scalar": 24}));
        // sqrt(48) = 6.9282 in bf16, as mlx-lm's gemma3_text multiplies.
        assert_eq!(g3.embed_scale, Some(6.9375));
        assert!((g3.attn_scale - 24f32.powf(-0.5)).abs() < 1e-7);
        assert_eq!(
            (g3.head, g3.qk_norm, g3.norm_plus_one, g3.attn_softcap),
            (Head::IfPresent, true, true, None)
        );
        let g2 = with(json!({"model_type": "gemma2"}));
        assert_eq!((g2.attn_softcap, g2.final_softcap, g2.head), (Some(50.0), Some(30.0), Head::Tied));
        assert_eq!(g2.embed_scale, Some(48f32.sqrt()));
        let rope =
            json!({"type": "longrope", "long_factor": [1.0, 2.0, 3.0], "short_factor": [1.0, 1.0, 1.0]});
        let phi = with(json!({"model_type": "phi3", "partial_rotary_factor": 0.5, "rope_scaling": rope,
            "max_position_embeddings": 4096, "original_max_position_embeddings": 64}));
        assert_eq!((phi.head_dim, phi.rope_dims, phi.fused, phi.head), (12, 6, true, Head::Separate));
        let err = LlamaConfig::from_hf(&{
            let mut c = base.clone();
            c["model_type"] = "phi3".into();
            c["rope_scaling"] = json!({"type": "longrope", "long_factor": [1.0]});
            c
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("long_factor has 1 entries, the 12 rotated features need 6"),
            "{err}"
        );
        let yarn = json!({"model_type": "llama", "rope_scaling": {"rope_type": "yarn", "factor": 4.0}});
        let err = LlamaConfig::from_hf(&{
            let mut c = base.clone();
            c.as_object_mut().unwrap().extend(yarn.as_object().unwrap().clone());
            c
        })
        .unwrap_err();
        assert!(err.to_string().contains("rope_scaling type 'yarn' is not supported"), "{err}");
        assert_eq!(round_to_bf16(1.0), 1.0);
        // 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: to the even one.
        assert_eq!(round_to_bf16(f32::from_bits(0x3f80_8000)), 1.0, "a tie rounds to even");
        assert_eq!(round_to_bf16(f32::from_bits(0x3f81_8000)).to_bits(), 0x3f82_0000, "a tie rounds to even");
    }
}
