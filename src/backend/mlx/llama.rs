//! The decoder in mlx-rs, one implementation with per-family configuration (the way mlx-lm's
//! `llama.py` serves Llama 3.x, SmolLM2 and Mistral, and `qwen2.py` / `qwen3.py` add attention
//! biases and q/k norms to the same layers): RMSNorm, RoPE (with Llama 3 frequency scaling),
//! grouped-query attention, SwiGLU MLP, tied or separate output embeddings, a KV cache.
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

use super::Res;
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
pub(super) const SUPPORTED_MODEL_TYPES: [&str; 4] = ["llama", "mistral", "qwen2", "qwen3"];

/// Hyper-parameters, from GGUF metadata or `config.json`.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LlamaConfig {
    pub n_layers: usize,
    pub hidden: i32,
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub head_dim: i32,
    pub rope_dims: i32,
    pub rope_base: f32,
    /// Interleaved ("traditional") RoPE: GGUF's row order, or `rope_traditional` in an MLX config.
    pub rope_traditional: bool,
    /// `rope_scaling` `linear`: positions are multiplied by this.
    pub rope_scale: f32,
    /// `rope_scaling` `llama3`: the per-pair periods passed to `fast::rope` instead of a base.
    pub rope_freqs: Option<Vec<f32>>,
    /// RMSNorm of q and k per head before RoPE (Qwen3).
    pub qk_norm: bool,
    /// Use the input embedding as the output layer.
    pub tied: bool,
    pub eps: f32,
    /// Longest sequence served: the model's context, or its sliding window when it has one
    /// (sliding-window attention is not implemented, so prompts past the window are refused).
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
        Ok(LlamaConfig {
            n_layers: meta_req(f, &k("block_count"))? as usize,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dims: meta_f64(f, &k("rope.dimension_count"))?.map_or(head_dim, |v| v as i32),
            rope_base: meta_f64(f, &k("rope.freq_base"))?.unwrap_or(10000.0) as f32,
            rope_traditional: true,
            rope_scale: 1.0,
            rope_freqs: None,
            qk_norm: false,
            tied: true,
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
        let int = |k: &str| c.get(k).and_then(|v| v.as_i64());
        let req = |k: &str| int(k).with_context(|| format!("config.json: no integer \"{k}\""));
        let float = |k: &str, d: f64| c.get(k).and_then(|v| v.as_f64()).unwrap_or(d);
        let hidden = req("hidden_size")? as i32;
        let n_heads = req("num_attention_heads")? as i32;
        let n_kv_heads = int("num_key_value_heads").map_or(n_heads, |v| v as i32);
        check_heads(hidden, n_heads, n_kv_heads)?;
        let head_dim = int("head_dim").map_or(hidden / n_heads.max(1), |v| v as i32);
        let rope_base = float("rope_theta", 10000.0) as f32;
        let (mut rope_scale, mut rope_freqs) = (1.0, None);
        if let Some(s) = c.get("rope_scaling").filter(|s| !s.is_null()) {
            let kind =
                s.get("rope_type").or_else(|| s.get("type")).and_then(|v| v.as_str()).unwrap_or("default");
            match kind {
                "default" => {}
                "llama3" => rope_freqs = Some(llama3_freqs(head_dim, rope_base, s)?),
                "linear" => {
                    let f = s
                        .get("factor")
                        .and_then(|v| v.as_f64())
                        .context("config.json: rope_scaling (linear) has no \"factor\"")?;
                    rope_scale = (1.0 / f) as f32;
                }
                other => {
                    return Err(anyhow!(
                        "config.json: rope_scaling type '{other}' is not supported (default, linear, llama3)"
                    ));
                }
            }
        }
        let mut context = int("max_position_embeddings").unwrap_or(4096) as usize;
        let sliding = match model_type {
            "mistral" => int("sliding_window"),
            _ if c.get("use_sliding_window").and_then(|v| v.as_bool()) == Some(true) => int("sliding_window"),
            _ => None,
        };
        if let Some(w) = sliding.filter(|&w| w > 0) {
            context = context.min(w as usize);
        }
        Ok(LlamaConfig {
            n_layers: req("num_hidden_layers")? as usize,
            hidden,
            n_heads,
            n_kv_heads,
            head_dim,
            rope_dims: head_dim,
            rope_base,
            rope_traditional: c.get("rope_traditional").and_then(|v| v.as_bool()).unwrap_or(false),
            rope_scale,
            rope_freqs,
            qk_norm: model_type == "qwen3",
            tied: c.get("tie_word_embeddings").and_then(|v| v.as_bool()).unwrap_or(model_type != "qwen3"),
            eps: float("rms_norm_eps", 1e-6) as f32,
            context,
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

    fn forward(&self, x: &Array) -> Res<Array> {
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

    fn out_features(&self) -> i32 {
        match self {
            Linear::Dense { w, .. } => w.shape()[0],
            Linear::Quant { w, .. } => w.shape()[0],
        }
    }

    fn arrays(&self) -> Vec<&Array> {
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
    /// Per-head RMSNorm weights of q and k (Qwen3).
    q_norm: Option<Array>,
    k_norm: Option<Array>,
    o: Linear,
    ffn_norm: Array,
    gate_up: Stacked,
    down: Linear,
    ffn: i32,
}

/// The loaded decoder. Holds only MLX arrays; lives on its model's worker thread.
pub(super) struct Llama {
    pub cfg: LlamaConfig,
    embed: Linear,
    output: Option<Linear>,
    layers: Vec<Layer>,
    norm: Array,
    /// RoPE periods (`cfg.rope_freqs`) as an array.
    freqs: Option<Array>,
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
    O,
    QNorm,
    KNorm,
    FfnNorm,
    Gate,
    Up,
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
fn load_linear(src: &mut Source, module: &str, format: WeightFormat) -> Res<Option<Linear>> {
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

fn load_f32(src: &mut Source, name: &str) -> Res<Option<Array>> {
    src.take(name)?.map(|a| a.as_dtype(Dtype::Float32).with_context(|| name.to_string())).transpose()
}

fn load_norm(src: &mut Source, module: &str) -> Res<Array> {
    let what = src.what();
    load_f32(src, &format!("{module}.weight"))?
        .with_context(|| format!("{what} has no tensor {module}.weight"))
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
        // GGUF: an output tensor when the file has one. HF: `lm_head` unless tied.
        let gguf = matches!(src, Source::Gguf(_));
        let output = if gguf || !cfg.tied { load_linear(src, &out_name, format)? } else { None };
        if !gguf && !cfg.tied && output.is_none() {
            return Err(anyhow!(
                "{what} has no tensor {out_name}.weight (config.json: tie_word_embeddings is false)"
            ));
        }
        let norm_name = name(src, Part::Norm);
        let norm = load_norm(src, &norm_name)?;
        eval_all(embed.arrays().into_iter().chain([&norm]))?;
        if let Some(o) = &output {
            eval_all(o.arrays())?;
        }
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let get = |src: &mut Source, p: Part| -> Res<Linear> {
                let n = src.name(i, p);
                require(load_linear(src, &n, format)?, &n, what)
            };
            let q = get(src, Part::Q)?;
            let k = get(src, Part::K)?;
            let v = get(src, Part::V)?;
            let expect_q = cfg.n_heads * cfg.head_dim;
            let expect_kv = cfg.n_kv_heads * cfg.head_dim;
            if q.out_features() != expect_q || k.out_features() != expect_kv || v.out_features() != expect_kv
            {
                return Err(anyhow!(
                    "layer {i}: q/k/v sizes {}/{}/{} do not match the config ({expect_q}/{expect_kv})",
                    q.out_features(),
                    k.out_features(),
                    v.out_features()
                ));
            }
            let mut biases = Vec::new();
            for p in [Part::Q, Part::K, Part::V] {
                let n = format!("{}.bias", src.name(i, p));
                biases.extend(load_f32(src, &n)?);
            }
            let qkv_bias = match biases.len() {
                0 => None,
                3 => Some(ops::concatenate(&biases, 0).context("fuse q/k/v biases")?),
                _ => return Err(anyhow!("layer {i}: some of q/k/v have a bias and some do not")),
            };
            let (q_norm, k_norm) = if cfg.qk_norm {
                let (qn, kn) = (src.name(i, Part::QNorm), src.name(i, Part::KNorm));
                (Some(load_norm(src, &qn)?), Some(load_norm(src, &kn)?))
            } else {
                (None, None)
            };
            let gate = get(src, Part::Gate)?;
            let ffn = gate.out_features();
            let up = get(src, Part::Up)?;
            let attn_norm_name = src.name(i, Part::AttnNorm);
            let ffn_norm_name = src.name(i, Part::FfnNorm);
            let layer = Layer {
                attn_norm: load_norm(src, &attn_norm_name)?,
                qkv: Stacked::new(vec![q, k, v])?,
                qkv_bias,
                q_norm,
                k_norm,
                o: get(src, Part::O)?,
                ffn_norm: load_norm(src, &ffn_norm_name)?,
                gate_up: Stacked::new(vec![gate, up])?,
                down: get(src, Part::Down)?,
                ffn,
            };
            eval_all(layer_arrays(&layer))?;
            layers.push(layer);
        }
        let freqs = cfg.rope_freqs.as_ref().map(|f| Array::from_slice(f, &[f.len() as i32]));
        Ok(Llama { cfg, embed, output, layers, norm, freqs })
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

    fn rope(&self, x: &Array, offset: i32) -> Res<Array> {
        let cfg = &self.cfg;
        let base = if self.freqs.is_some() { None } else { Some(cfg.rope_base) };
        fast::rope(x, cfg.rope_dims, cfg.rope_traditional, base, cfg.rope_scale, offset, self.freqs.as_ref())
            .context("rope")
    }

    /// Runs `ids` (one sequence) at positions `cache.len()..`, appends their keys and values to
    /// `cache`, and returns the logits of the last position, shape `[vocab]`, not yet evaluated.
    pub fn forward(&self, ids: &[u32], cache: &mut KvCache) -> Res<Array> {
        let t = ids.len() as i32;
        let offset = cache.len as i32;
        let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let ids = Array::from_slice(&ids, &[t]);
        let cfg = &self.cfg;
        let mut x = self.embed.rows(&ids)?.reshape(&[1, t, cfg.hidden]).context("reshape")?;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        cache.reserve(offset + t, cfg)?;
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
            let qk = self.rope(&pop(&mut parts)?, offset)?;
            let mut parts = ops::split_at_indices(&qk, &[nh], 1).context("split q/k")?;
            let k = pop(&mut parts)?;
            let q = pop(&mut parts)?;
            let (keys, values) = cache.update(li, &k, &v, offset, t)?;
            let mask = (t > 1).then_some(ScaledDotProductAttentionMask::Causal);
            let attn = fast::scaled_dot_product_attention(&q, &keys, &values, scale, mask, None)
                .context("attention")?
                .transpose_axes(&[0, 2, 1, 3])
                .context("transpose")?
                .reshape(&[1, t, nh * hd])
                .context("reshape")?;
            x = self.mlp(l, x.add(l.o.forward(&attn)?).context("residual")?)?;
        }
        cache.len += t as usize;
        let last = x.try_index((.., t - 1, ..)).context("last position")?;
        let last = fast::rms_norm(&last, Some(&self.norm), cfg.eps).context("rms_norm")?;
        let head = self.output.as_ref().unwrap_or(&self.embed);
        head.forward(&last)?.reshape(&[cfg.vocab as i32]).context("reshape logits")
    }
}

impl Llama {
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

    /// The feed-forward block with its residual: `x + down(silu(gate(n(x))) * up(n(x)))`.
    fn mlp(&self, l: &Layer, x: Array) -> Res<Array> {
        let h = fast::rms_norm(&x, Some(&l.ffn_norm), self.cfg.eps).context("rms_norm")?;
        let mut gu = ops::split_at_indices(l.gate_up.forward(&h)?, &[l.ffn], -1).context("split gate/up")?;
        let (u, g) = (pop(&mut gu)?, pop(&mut gu)?);
        // silu(g) * u with plain ops: mlx-rs's nn::silu goes through `compile` on every call,
        // which costs more to build than the three ops it fuses.
        let act = g
            .multiply(ops::sigmoid(&g).context("sigmoid")?)
            .context("silu")?
            .multiply(&u)
            .context("swiglu")?;
        x.add(l.down.forward(&act)?).context("residual")
    }

    /// One decode step for several sequences at once: `ids[i]` is the next token of the sequence
    /// whose cache is `caches[i]` (at position `caches[i].len()`). The linear layers, where the
    /// weights' bytes are read, run once as `[B, hidden]` products; RoPE, the cache writes and
    /// attention run per sequence (each at its own position and length). Appends each token's
    /// keys and values to its cache and returns the logits, shape `[B, vocab]`, not evaluated.
    pub fn forward_batch(&self, ids: &[u32], caches: &mut [&mut KvCache]) -> Res<Array> {
        anyhow::ensure!(!ids.is_empty() && ids.len() == caches.len(), "one cache per token");
        let b = ids.len() as i32;
        let cfg = &self.cfg;
        let ids: Vec<i32> = ids.iter().map(|&i| i as i32).collect();
        let ids = Array::from_slice(&ids, &[b]);
        let mut x = self.embed.rows(&ids)?.reshape(&[b, 1, cfg.hidden]).context("reshape")?;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim);
        let scale = 1.0 / (hd as f32).sqrt();
        let offsets: Vec<i32> = caches.iter().map(|c| c.len as i32).collect();
        for (c, &o) in caches.iter_mut().zip(&offsets) {
            c.reserve(o + 1, cfg)?;
        }
        for (li, l) in self.layers.iter().enumerate() {
            let h = fast::rms_norm(&x, Some(&l.attn_norm), cfg.eps).context("rms_norm")?;
            let mut qkv = l.qkv.forward(&h)?;
            if let Some(bias) = &l.qkv_bias {
                qkv = qkv.add(bias).context("qkv bias")?;
            }
            let heads = qkv.reshape(&[b, 1, nh + 2 * nkv, hd]).context("reshape")?;
            let heads = self.qk_norm(l, heads)?;
            // [B, 1, heads, hd] -> [B, heads, 1, hd], then one sequence at a time.
            let heads = heads.transpose_axes(&[0, 2, 1, 3]).context("transpose")?;
            let mut outs = Vec::with_capacity(caches.len());
            for (i, cache) in caches.iter_mut().enumerate() {
                let i = i as i32;
                let one = heads.try_index((i..i + 1, .., .., ..)).context("sequence")?;
                let mut parts = ops::split_at_indices(&one, &[nh + nkv], 1).context("split v")?;
                let v = pop(&mut parts)?;
                let qk = self.rope(&pop(&mut parts)?, offsets[i as usize])?;
                let mut parts = ops::split_at_indices(&qk, &[nh], 1).context("split q/k")?;
                let k = pop(&mut parts)?;
                let q = pop(&mut parts)?;
                let (keys, values) = cache.update(li, &k, &v, offsets[i as usize], 1)?;
                outs.push(
                    fast::scaled_dot_product_attention(&q, &keys, &values, scale, None, None)
                        .context("attention")?,
                );
            }
            let attn = ops::concatenate(&outs, 0)
                .context("join sequences")?
                .transpose_axes(&[0, 2, 1, 3])
                .context("transpose")?
                .reshape(&[b, 1, nh * hd])
                .context("reshape")?;
            x = self.mlp(l, x.add(l.o.forward(&attn)?).context("residual")?)?;
        }
        for c in caches.iter_mut() {
            c.len += 1;
        }
        let last = x.reshape(&[b, cfg.hidden]).context("reshape")?;
        let last = fast::rms_norm(&last, Some(&self.norm), cfg.eps).context("rms_norm")?;
        let head = self.output.as_ref().unwrap_or(&self.embed);
        head.forward(&last)?.reshape(&[b, cfg.vocab as i32]).context("reshape logits")
    }
}

fn pop(v: &mut Vec<Array>) -> Res<Array> {
    v.pop().context("split returned too few parts")
}

fn layer_arrays(l: &Layer) -> Vec<&Array> {
    let mut v = vec![&l.attn_norm, &l.ffn_norm];
    v.extend(l.qkv_bias.iter().chain(&l.q_norm).chain(&l.k_norm));
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
}

impl KvCache {
    const STEP: i32 = 256;

    pub fn new(n_layers: usize) -> Self {
        KvCache { keys: vec![None; n_layers], values: vec![None; n_layers], capacity: 0, len: 0 }
    }

    /// Positions cached so far.
    pub fn len(&self) -> usize {
        self.len
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
