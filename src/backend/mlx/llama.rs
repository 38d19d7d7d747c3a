//! A Llama-family decoder in mlx-rs, loaded from a GGUF file: RMSNorm, RoPE, grouped-query
//! attention, SwiGLU MLP, tied or separate output embeddings, and a KV cache.
//!
//! Weights come from `mlx_rs::io::GgufFile`, which turns Q4_0/Q4_1/Q8_0 tensors into MLX
//! affine quantized triples (`<name>.weight` packed uint32, `.scales`, `.biases`, group 32).
//! By default they are dequantized once at load to f32 (scales and biases cast to f32 first,
//! which is bit-exact with the f32 reference) because MLX's quantized matmul is scalar on x86
//! CPUs; [`WeightFormat::Quantized`] keeps them packed.
//!
//! q/k rows in GGUF are in llama.cpp's interleaved RoPE order. Attention scores are invariant
//! under the same permutation of q and k within a head, so instead of un-permuting the rows we
//! apply the interleaved ("traditional") RoPE, which is what that row order means.

use mlx_rs::fast::{self, ScaledDotProductAttentionMask};
use mlx_rs::io::GgufFile;
use mlx_rs::ops::indexing::{TryIndexMutOp, TryIndexOp};
use mlx_rs::ops::{self};
use mlx_rs::{Array, Dtype};

use anyhow::{Context, anyhow};

use super::Res;

/// How linear weights are held after load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum WeightFormat {
    /// Dequantized to f32 once at load; dense matmuls.
    F32,
    /// Kept as MLX affine quantized weights; `quantized_matmul`.
    Quantized,
}

/// Hyper-parameters read from the GGUF metadata.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct LlamaConfig {
    pub n_layers: usize,
    pub hidden: i32,
    pub n_heads: i32,
    pub n_kv_heads: i32,
    pub head_dim: i32,
    pub rope_dims: i32,
    pub rope_base: f32,
    pub eps: f32,
    pub context: usize,
    pub vocab: usize,
}

const GROUP_SIZE: i32 = 32;

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
        if n_heads <= 0 || hidden % n_heads != 0 || n_kv_heads <= 0 || n_heads % n_kv_heads != 0 {
            return Err(anyhow!(
                "inconsistent attention shape: hidden {hidden}, heads {n_heads}, kv heads {n_kv_heads}"
            ));
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
            eps: meta_f64(f, &k("attention.layer_norm_rms_epsilon"))?.unwrap_or(1e-5) as f32,
            context: meta_f64(f, &k("context_length"))?.unwrap_or(2048.0) as usize,
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
            Linear::Quant { w, scales, biases, bits } => {
                ops::quantized_matmul(x, w, scales, biases, true, GROUP_SIZE, *bits)
                    .context("quantized_matmul")
            }
        }
    }

    /// Rows `ids` of the weight as f32 (an embedding lookup).
    fn rows(&self, ids: &Array) -> Res<Array> {
        match self {
            Linear::Dense { w, .. } => w.take_axis(ids, 0).context("embedding lookup"),
            Linear::Quant { w, scales, biases, bits } => {
                let w = w.take_axis(ids, 0).context("embedding lookup")?;
                let s = scales.take_axis(ids, 0).context("embedding lookup")?;
                let b = biases.take_axis(ids, 0).context("embedding lookup")?;
                ops::dequantize(&w, &s, &b, GROUP_SIZE, *bits).context("dequantize rows")
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
    /// q/k/v and gate/up each run as one matmul.
    fn fuse(parts: Vec<Linear>) -> Res<Linear> {
        let dense: Vec<&Array> = parts
            .iter()
            .filter_map(|p| match p {
                Linear::Dense { w, .. } => Some(w),
                _ => None,
            })
            .collect();
        if dense.len() == parts.len() {
            return Linear::dense(ops::concatenate(&dense, 0).context("fuse weights")?);
        }
        let mut ws = Vec::new();
        let mut ss = Vec::new();
        let mut bs = Vec::new();
        let mut bits_all = None;
        for p in &parts {
            match p {
                Linear::Quant { w, scales, biases, bits } if bits_all.is_none_or(|b| b == *bits) => {
                    bits_all = Some(*bits);
                    ws.push(w);
                    ss.push(scales);
                    bs.push(biases);
                }
                _ => return Err(anyhow!("cannot fuse linears of different formats")),
            }
        }
        Ok(Linear::Quant {
            w: ops::concatenate(&ws, 0).context("fuse weights")?,
            scales: ops::concatenate(&ss, 0).context("fuse scales")?,
            biases: ops::concatenate(&bs, 0).context("fuse biases")?,
            bits: bits_all.unwrap_or(4),
        })
    }
}

struct Layer {
    attn_norm: Array,
    qkv: Linear,
    o: Linear,
    ffn_norm: Array,
    gate_up: Linear,
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
}

/// Reads `<base>.weight` (+ `.scales`/`.biases` when quantized) in the requested format.
fn load_linear(f: &GgufFile, base: &str, format: WeightFormat) -> Res<Option<Linear>> {
    let Some(w) = f.get_array(&format!("{base}.weight")).with_context(|| base.to_string())? else {
        return Ok(None);
    };
    let scales = f.get_array(&format!("{base}.scales")).with_context(|| base.to_string())?;
    let biases = f.get_array(&format!("{base}.biases")).with_context(|| base.to_string())?;
    let lin = match (scales, biases) {
        (Some(scales), Some(biases)) => {
            let (ws, ss) = (w.shape(), scales.shape());
            if ws.len() != 2 || ss.len() != 2 || ss[1] == 0 || ws[1] % ss[1] != 0 {
                return Err(anyhow!("{base}: unexpected quantized shapes {ws:?} / {ss:?}"));
            }
            let bits = ws[1] / ss[1];
            if ![2, 3, 4, 5, 6, 8].contains(&bits) {
                return Err(anyhow!("{base}: unsupported bit width {bits}"));
            }
            // f32 scales and biases: exact dequantization, and f32 activations in qmm.
            let scales = scales.as_dtype(Dtype::Float32).with_context(|| base.to_string())?;
            let biases = biases.as_dtype(Dtype::Float32).with_context(|| base.to_string())?;
            match format {
                WeightFormat::F32 => Linear::dense(
                    ops::dequantize(&w, &scales, &biases, GROUP_SIZE, bits)
                        .with_context(|| base.to_string())?,
                )?,
                WeightFormat::Quantized => Linear::Quant { w, scales, biases, bits },
            }
        }
        (None, None) => Linear::dense(w.as_dtype(Dtype::Float32).with_context(|| base.to_string())?)?,
        _ => {
            return Err(anyhow!("{base}: scales without biases (unsupported quantization)"));
        }
    };
    Ok(Some(lin))
}

fn require(lin: Option<Linear>, name: &str) -> Res<Linear> {
    lin.with_context(|| format!("GGUF has no tensor {name}.weight"))
}

fn load_norm(f: &GgufFile, name: &str) -> Res<Array> {
    f.get_array(&format!("{name}.weight"))
        .with_context(|| name.to_string())?
        .with_context(|| format!("GGUF has no tensor {name}.weight"))?
        .as_dtype(Dtype::Float32)
        .with_context(|| name.to_string())
}

impl Llama {
    /// Builds the model from an opened GGUF file. Every weight is evaluated before returning,
    /// one layer at a time (so the quantized originals can be freed as we go).
    pub fn load(f: &GgufFile, format: WeightFormat) -> Res<Llama> {
        let mut cfg = LlamaConfig::from_gguf(f)?;
        let embed = require(load_linear(f, "token_embd", format)?, "token_embd")?;
        cfg.vocab = embed.out_features() as usize;
        let output = load_linear(f, "output", format)?;
        let norm = load_norm(f, "output_norm")?;
        eval_all(embed.arrays().into_iter().chain([&norm]))?;
        if let Some(o) = &output {
            eval_all(o.arrays())?;
        }
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let p = |s: &str| format!("blk.{i}.{s}");
            let get = |s: &str| -> Res<Linear> { require(load_linear(f, &p(s), format)?, &p(s)) };
            let q = get("attn_q")?;
            let k = get("attn_k")?;
            let v = get("attn_v")?;
            let expect_q = cfg.n_heads * cfg.head_dim;
            let expect_kv = cfg.n_kv_heads * cfg.head_dim;
            if q.out_features() != expect_q || k.out_features() != expect_kv || v.out_features() != expect_kv
            {
                return Err(anyhow!(
                    "blk.{i}: q/k/v sizes {}/{}/{} do not match the metadata ({expect_q}/{expect_kv})",
                    q.out_features(),
                    k.out_features(),
                    v.out_features()
                ));
            }
            let gate = get("ffn_gate")?;
            let ffn = gate.out_features();
            let layer = Layer {
                attn_norm: load_norm(f, &p("attn_norm"))?,
                qkv: Linear::fuse(vec![q, k, v])?,
                o: get("attn_output")?,
                ffn_norm: load_norm(f, &p("ffn_norm"))?,
                gate_up: Linear::fuse(vec![gate, get("ffn_up")?])?,
                down: get("ffn_down")?,
                ffn,
            };
            eval_all(layer_arrays(&layer))?;
            layers.push(layer);
        }
        Ok(Llama { cfg, embed, output, layers, norm })
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
            // All heads at once: [1, t, nh + 2 nkv, hd] -> [1, heads, t, hd]. RoPE runs once
            // over the q and k heads together (each `fast::rope` call costs about 10 us of
            // graph building, several times a plain op).
            let heads = l
                .qkv
                .forward(&h)?
                .reshape(&[1, t, nh + 2 * nkv, hd])
                .context("reshape")?
                .transpose_axes(&[0, 2, 1, 3])
                .context("transpose")?;
            let mut parts = ops::split_at_indices(&heads, &[nh + nkv], 1).context("split v")?;
            let v = pop(&mut parts)?;
            let qk = fast::rope(pop(&mut parts)?, cfg.rope_dims, true, cfg.rope_base, 1.0, offset, None)
                .context("rope")?;
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
            x = x.add(l.o.forward(&attn)?).context("residual")?;
            let h = fast::rms_norm(&x, Some(&l.ffn_norm), cfg.eps).context("rms_norm")?;
            let mut gu =
                ops::split_at_indices(l.gate_up.forward(&h)?, &[l.ffn], -1).context("split gate/up")?;
            let (u, g) = (pop(&mut gu)?, pop(&mut gu)?);
            // silu(g) * u with plain ops: mlx-rs's nn::silu goes through `compile` on every
            // call, which costs more to build than the three ops it fuses.
            let act = g
                .multiply(ops::sigmoid(&g).context("sigmoid")?)
                .context("silu")?
                .multiply(&u)
                .context("swiglu")?;
            x = x.add(l.down.forward(&act)?).context("residual")?;
        }
        cache.len += t as usize;
        let last = x.try_index((.., t - 1, ..)).context("last position")?;
        let last = fast::rms_norm(&last, Some(&self.norm), cfg.eps).context("rms_norm")?;
        let head = self.output.as_ref().unwrap_or(&self.embed);
        head.forward(&last)?.reshape(&[cfg.vocab as i32]).context("reshape logits")
    }
}

fn pop(v: &mut Vec<Array>) -> Res<Array> {
    v.pop().context("split returned too few parts")
}

fn layer_arrays(l: &Layer) -> Vec<&Array> {
    let mut v = vec![&l.attn_norm, &l.ffn_norm];
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
