//! Idefics3 / SmolVLM: a SigLIP-style vision tower, a pixel-shuffle connector and a Llama
//! decoder (served by [`llama::Llama`]), following mlx-vlm 0.7.10's `idefics3` model and the
//! transformers 5.24 PIL image processor it runs.
//!
//! Preprocessing ([`Processor`]), per image: resize so the longest edge is `size.longest_edge`
//! (the other edge rounded up to even), then to multiples of the tile size
//! `max_image_size.longest_edge`, split into `rows x cols` tiles plus a global view (the whole
//! image resized to one tile) when it is bigger than one tile; every resize is Pillow's
//! (LANCZOS by default, [`resample`]); pixels rescaled (`x * rescale_factor` in f64, then f32)
//! and normalised (`(x - mean) / std` in f32). Each tile becomes `image_seq_len` image tokens,
//! laid out in the prompt as the reference processor lays them out ([`Idefics3::expand`]).
//!
//! Vision tower ([`Tower`]): patches (a convolution with stride = kernel, done as one matmul),
//! learned position embeddings, pre-norm encoder layers (LayerNorm, multi-head attention with
//! biases, LayerNorm, fc1 -> GELU (tanh approximation, mlx's `precise`) -> fc2), and a final
//! LayerNorm. Departure from transformers that we follow from mlx-vlm: the final LayerNorm's
//! epsilon is 1e-5 (mlx's default), not the config's `layer_norm_eps`.
//!
//! Connector: pixel shuffle by `scale_factor` (each `s x s` block of patch features becomes one
//! feature `s^2` times wider) and a linear projection (no bias) to the text model's width.
//!
//! Weights: mlx-vlm's names (`vision_model.*`, `connector.*`, `language_model.*`, patch
//! kernel `[out, kh, kw, in]`) or Hugging Face's (`model.vision_model.*`, `model.connector.*`,
//! `model.text_model.*`, `lm_head.*`, kernel `[out, in, kh, kw]`), f32/bf16/f16 or
//! MLX-quantized linear layers ([`rename_hf_vlm`] maps both onto one set of names).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, anyhow};
use mlx_rs::Array;
use mlx_rs::fast;
use mlx_rs::ops;

use super::Res;
use super::llama::{self, Linear, Source, WeightFormat};
use super::resample::{self, Filter};
use crate::backend::Image;

/// Longest edge the reference processor lets any image reach (`MAX_IMAGE_SIZE`).
const MAX_IMAGE_SIZE: u32 = 4096;

/// The image processor's settings (`preprocessor_config.json`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Processor {
    /// `do_resize` with `size.longest_edge`.
    pub longest_edge: Option<u32>,
    /// `max_image_size.longest_edge`: the tile's side.
    pub tile: u32,
    pub splitting: bool,
    pub filter: Filter,
    /// `do_rescale` with `rescale_factor`.
    pub rescale: Option<f64>,
    /// `do_normalize` with `image_mean`, `image_std`.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

/// One image, preprocessed: `n` tiles of `3 x tile x tile` f32 values (channels first), the
/// split tiles in row-major order then the global view; `rows = cols = 0` when not split.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Tiles {
    pub pixels: Vec<f32>,
    pub n: usize,
    pub rows: usize,
    pub cols: usize,
}

/// transformers' `_resize_output_size_rescale_to_max_len` (min_len 1): the longest edge becomes
/// `max_len`, the other keeps the aspect ratio (truncated, then rounded up to even).
fn rescale_to_max_len(h: u32, w: u32, max_len: u32) -> (u32, u32) {
    let aspect = w as f64 / h as f64;
    let (mut h, mut w) = (h, w);
    if w >= h {
        w = max_len;
        h = (w as f64 / aspect) as u32;
        if h % 2 != 0 {
            h += 1;
        }
    } else {
        h = max_len;
        w = (h as f64 * aspect) as u32;
        if w % 2 != 0 {
            w += 1;
        }
    }
    (h.max(1), w.max(1))
}

/// transformers' `_resize_output_size_scale_below_upper_bound`.
fn scale_below(h: u32, w: u32, max_len: u32) -> (u32, u32) {
    let aspect = w as f64 / h as f64;
    let (mut h, mut w) = (h, w);
    if w >= h && w > max_len {
        w = max_len;
        h = (w as f64 / aspect) as u32;
    } else if h > w && h > max_len {
        h = max_len;
        w = (h as f64 * aspect) as u32;
    }
    (h.max(1), w.max(1))
}

/// transformers' `resize_for_vision_encoder`: both edges up to multiples of `tile`.
fn multiples_of(h: u32, w: u32, tile: u32) -> (u32, u32) {
    let aspect = w as f64 / h as f64;
    let t = tile as f64;
    let up = |v: f64| ((v / t).ceil() * t) as u32;
    if w >= h {
        let w2 = up(w as f64);
        let h2 = up(((w2 as f64) / aspect).trunc());
        (h2, w2)
    } else {
        let h2 = up(h as f64);
        let w2 = up(((h2 as f64) * aspect).trunc());
        (h2, w2)
    }
}

fn json_u32(v: Option<&serde_json::Value>) -> Option<u32> {
    v.and_then(|x| x.as_u64()).map(|x| x as u32)
}

/// Three per-channel numbers (`image_mean`, `image_std`): a list of 3, one number for all, or
/// `default` when absent.
pub(super) fn triple(v: Option<&serde_json::Value>, default: f32, what: &str) -> Res<[f32; 3]> {
    match v {
        None => Ok([default; 3]),
        Some(serde_json::Value::Number(n)) => Ok([n.as_f64().unwrap_or(default as f64) as f32; 3]),
        Some(serde_json::Value::Array(a)) if a.len() == 3 => {
            let mut out = [0f32; 3];
            for (o, x) in out.iter_mut().zip(a) {
                *o = x.as_f64().with_context(|| format!("{what}: not a number"))? as f32;
            }
            Ok(out)
        }
        Some(other) => Err(anyhow!("{what}: expected 3 numbers, got {other}")),
    }
}

/// Per-channel mean and standard deviation of the normalisation.
pub(super) type MeanStd = ([f32; 3], [f32; 3]);

/// The rescale and normalisation settings of `preprocessor_config.json` (`pp`), as both served
/// image processors read them: `do_rescale` with `rescale_factor` (default 1/255), and
/// `do_normalize` with `image_mean` / `image_std` (default 0.5 each); each flag defaults to on.
/// Errors name the field at fault (a zero in `image_std` too).
pub(super) fn rescale_normalize(pp: &serde_json::Value) -> Res<(Option<f64>, Option<MeanStd>)> {
    let flag = |k: &str| pp.get(k).and_then(|v| v.as_bool()).unwrap_or(true);
    let factor = pp.get("rescale_factor").and_then(|v| v.as_f64()).unwrap_or(1.0 / 255.0);
    let mean = triple(pp.get("image_mean"), 0.5, "image_mean")?;
    let std = triple(pp.get("image_std"), 0.5, "image_std")?;
    if std.contains(&0.0) {
        return Err(anyhow!("preprocessor_config.json: image_std has a 0"));
    }
    Ok((flag("do_rescale").then_some(factor), flag("do_normalize").then_some((mean, std))))
}

impl Processor {
    /// From `preprocessor_config.json` (`pp`), with transformers' Idefics3 defaults for what it
    /// leaves out. Errors name the field at fault.
    pub fn from_config(pp: &serde_json::Value) -> Res<Processor> {
        let flag = |k: &str| pp.get(k).and_then(|v| v.as_bool()).unwrap_or(true);
        let edge = |k: &str, d: u32| -> Res<u32> {
            match pp.get(k) {
                None => Ok(d),
                Some(v) => json_u32(v.get("longest_edge")).filter(|&e| e > 0).with_context(|| {
                    format!("preprocessor_config.json: {k} needs a positive \"longest_edge\"")
                }),
            }
        };
        let tile = edge("max_image_size", 364)?;
        let longest = edge("size", 4 * 364)?;
        let resample = pp.get("resample").and_then(|v| v.as_i64()).unwrap_or(1);
        let filter = Filter::from_pil(resample).with_context(|| {
            format!("preprocessor_config.json: resample {resample} is not supported (1 LANCZOS, 2 BILINEAR, 3 BICUBIC)")
        })?;
        let (rescale, normalize) = rescale_normalize(pp)?;
        Ok(Processor {
            longest_edge: flag("do_resize").then_some(longest),
            tile,
            splitting: flag("do_image_splitting"),
            filter,
            rescale,
            normalize,
        })
    }

    /// The tiles of `img` (see the module documentation).
    pub fn preprocess(&self, img: &Image) -> Tiles {
        let t = self.tile;
        let mut img = img.clone();
        if let Some(edge) = self.longest_edge {
            let (h, w) = rescale_to_max_len(img.height(), img.width(), edge);
            let (h, w) = scale_below(h, w, MAX_IMAGE_SIZE);
            img = resample::resize(&img, w, h, self.filter);
        }
        let (frames, rows, cols) = if self.splitting {
            let (h, w) = multiples_of(img.height(), img.width(), t);
            img = resample::resize(&img, w, h, self.filter);
            if h > t || w > t {
                let (rows, cols) = ((h - t) / t + 1, (w - t) / t + 1);
                let mut frames = Vec::with_capacity((rows * cols + 1) as usize);
                for r in 0..rows {
                    for c in 0..cols {
                        frames.push(resample::crop(&img, c * t, r * t, t, t));
                    }
                }
                frames.push(resample::resize(&img, t, t, self.filter));
                (frames, rows as usize, cols as usize)
            } else {
                (vec![img], 0, 0)
            }
        } else {
            (vec![resample::resize(&img, t, t, self.filter)], 0, 0)
        };
        let per = (t * t) as usize;
        let mut pixels = Vec::with_capacity(frames.len() * 3 * per);
        for f in &frames {
            for ch in 0..3 {
                pixels.extend(f.rgb().chunks_exact(3).map(|p| self.value(p[ch], ch)));
            }
        }
        Tiles { pixels, n: frames.len(), rows, cols }
    }

    /// One channel value as the reference computes it: rescale in f64 then f32; normalise in
    /// f32.
    fn value(&self, v: u8, ch: usize) -> f32 {
        let x = match self.rescale {
            Some(f) => (v as f64 * f) as f32,
            None => v as f32,
        };
        match self.normalize {
            Some((mean, std)) => (x - mean[ch]) / std[ch],
            None => x,
        }
    }
}

/// The text model's configuration from an Idefics3 `config.json`'s `text_config`, read the way
/// mlx-vlm's `idefics3` language model reads it: a Llama decoder whose head size is
/// `hidden_size / num_attention_heads` (any `head_dim` ignored), plain RoPE at `rope_theta`
/// (1e6 when absent; no scaling), and `lm_head` when the checkpoint has one.
pub(super) fn text_config(config: &serde_json::Value) -> Res<llama::LlamaConfig> {
    let mt = config.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    if mt != "idefics3" {
        return Err(anyhow!(
            "config.json: vision-language model_type '{mt}' is not served (served: idefics3, i.e. SmolVLM and Idefics3)"
        ));
    }
    let mut tc = config.get("text_config").cloned().context("config.json: no text_config")?;
    let obj = tc.as_object_mut().context("config.json: text_config is not an object")?;
    obj.insert("model_type".into(), "llama".into());
    for k in ["head_dim", "rope_scaling", "rope_parameters"] {
        obj.remove(k);
    }
    if !obj.contains_key("rope_theta") {
        obj.insert("rope_theta".into(), 1_000_000.0.into());
    }
    let mut cfg = llama::LlamaConfig::from_hf(&tc).context("config.json text_config")?;
    cfg.head = llama::Head::IfPresent;
    Ok(cfg)
}

/// Maps the tensor names of an Idefics3 checkpoint, mlx-vlm's or Hugging Face's, onto the ones
/// this module and [`llama::Llama`] read: `vision_model.*`, `connector.*` for the vision side,
/// `model.*` and `lm_head.*` for the text model.
pub(super) fn rename_hf_vlm(tensors: HashMap<String, Array>) -> HashMap<String, Array> {
    tensors
        .into_iter()
        .map(|(k, v)| {
            let k = k.strip_prefix("model.").map_or(k.clone(), str::to_string);
            let k = match k.strip_prefix("text_model.").or_else(|| k.strip_prefix("language_model.")) {
                Some(rest) => {
                    let rest = rest.strip_prefix("model.").unwrap_or(rest);
                    if rest.starts_with("lm_head.") { rest.to_string() } else { format!("model.{rest}") }
                }
                None => k,
            };
            (k, v)
        })
        .collect()
}

/// A linear layer with an optional bias.
pub(super) struct Affine {
    lin: Linear,
    bias: Option<Array>,
}

impl Affine {
    /// `module.weight` (required, dense or quantized) and `module.bias` (optional).
    pub(super) fn load(src: &mut Source, module: &str, format: WeightFormat) -> Res<Affine> {
        let lin = llama::load_linear(src, module, format)?
            .with_context(|| format!("safetensors has no tensor {module}.weight"))?;
        let bias = llama::load_f32(src, &format!("{module}.bias"))?;
        Ok(Affine { lin, bias })
    }

    pub(super) fn forward(&self, x: &Array) -> Res<Array> {
        let y = self.lin.forward(x)?;
        match &self.bias {
            Some(b) => y.add(b).context("bias"),
            None => Ok(y),
        }
    }

    pub(super) fn arrays(&self) -> Vec<&Array> {
        let mut v = self.lin.arrays();
        v.extend(self.bias.iter());
        v
    }

    pub(super) fn in_features(&self) -> i32 {
        self.lin.in_features()
    }

    pub(super) fn out_features(&self) -> i32 {
        self.lin.out_features()
    }
}

/// A LayerNorm with weight and bias.
pub(super) struct Norm {
    w: Array,
    b: Array,
    eps: f32,
}

impl Norm {
    /// `module.weight` and `module.bias`, both required.
    pub(super) fn load(src: &mut Source, module: &str, eps: f32) -> Res<Norm> {
        let get = |src: &mut Source, p: &str| {
            llama::load_f32(src, &format!("{module}.{p}"))?
                .with_context(|| format!("safetensors has no tensor {module}.{p}"))
        };
        Ok(Norm { w: get(src, "weight")?, b: get(src, "bias")?, eps })
    }

    pub(super) fn forward(&self, x: &Array) -> Res<Array> {
        fast::layer_norm(x, Some(&self.w), Some(&self.b), self.eps).context("layer_norm")
    }

    pub(super) fn arrays(&self) -> Vec<&Array> {
        vec![&self.w, &self.b]
    }
}

/// `dir/file` parsed as JSON, `None` when there is no such file; errors name the path.
pub(super) fn read_json_file(dir: &Path, file: &str) -> Res<Option<serde_json::Value>> {
    let p = dir.join(file);
    if !p.is_file() {
        return Ok(None);
    }
    let t = std::fs::read_to_string(&p).with_context(|| p.display().to_string())?;
    Ok(Some(serde_json::from_str(&t).with_context(|| p.display().to_string())?))
}

struct EncoderLayer {
    ln1: Norm,
    q: Affine,
    k: Affine,
    v: Affine,
    o: Affine,
    ln2: Norm,
    fc1: Affine,
    fc2: Affine,
}

/// The vision config (`vision_config`).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct VisionConfig {
    pub hidden: i32,
    pub heads: i32,
    pub layers: usize,
    pub patch: i32,
    pub image_size: i32,
    pub channels: i32,
    pub eps: f32,
}

impl VisionConfig {
    pub fn from_json(v: &serde_json::Value) -> Res<VisionConfig> {
        let int = |k: &str, d: Option<i64>| {
            v.get(k)
                .and_then(|x| x.as_i64())
                .or(d)
                .filter(|&x| x > 0)
                .with_context(|| format!("config.json: vision_config needs a positive \"{k}\""))
        };
        let c = VisionConfig {
            hidden: int("hidden_size", None)? as i32,
            heads: int("num_attention_heads", None)? as i32,
            layers: int("num_hidden_layers", Some(12))? as usize,
            patch: int("patch_size", None)? as i32,
            image_size: int("image_size", Some(224))? as i32,
            channels: int("num_channels", Some(3))? as i32,
            eps: v.get("layer_norm_eps").and_then(|x| x.as_f64()).unwrap_or(1e-6) as f32,
        };
        if c.hidden % c.heads != 0 {
            return Err(anyhow!(
                "config.json: vision hidden_size {} is not a multiple of its {} heads",
                c.hidden,
                c.heads
            ));
        }
        if c.image_size % c.patch != 0 {
            return Err(anyhow!(
                "config.json: vision image_size {} is not a multiple of patch_size {}",
                c.image_size,
                c.patch
            ));
        }
        if c.channels != 3 {
            return Err(anyhow!("config.json: vision num_channels {} (only RGB, 3, is served)", c.channels));
        }
        Ok(c)
    }

    fn per_side(&self) -> i32 {
        self.image_size / self.patch
    }
}

/// The vision tower: patch embedding, position embedding, encoder, final norm.
struct Tower {
    cfg: VisionConfig,
    /// The patch kernel as `[patch * patch * channels, hidden]` for `patches x kernel`, rows in
    /// (ky, kx, channel) order.
    kernel: Array,
    kernel_bias: Array,
    /// The first `per_side^2` rows of the position table, at the positions mlx-vlm gives a
    /// full tile.
    positions: Array,
    layers: Vec<EncoderLayer>,
    post: Norm,
}

/// mlx's `mx.arange(start, stop, step)` for float32: the element count from f64 arithmetic,
/// then values accumulated in f32 (`start`, `start + step`, ...).
fn arange_f32(start: f64, stop: f64, step: f64) -> Vec<f32> {
    let n = ((stop - start) / step).ceil().max(0.0) as usize;
    let (s0, s1) = (start as f32, (start + step) as f32);
    let delta = s1 - s0;
    let mut out = Vec::with_capacity(n);
    let mut v = s0;
    for _ in 0..n {
        out.push(v);
        v += delta;
    }
    out
}

/// The position ids mlx-vlm's `VisionEmbeddings` gives a tile all of whose patches are real:
/// fractional coordinates bucketed against `arange(1/n, 1, 1/n)`.
fn full_tile_positions(n: i32) -> Vec<i32> {
    let boundaries = arange_f32(1.0 / n as f64, 1.0, 1.0 / n as f64);
    let bucket = |i: i32| {
        let f = ((i as f32) / (n as f32)).clamp(0.0, 1.0 - 1e-6);
        boundaries.iter().filter(|&&b| f >= b).count() as i32
    };
    let mut ids = Vec::with_capacity((n * n) as usize);
    for h in 0..n {
        for w in 0..n {
            ids.push(bucket(h) * n + bucket(w));
        }
    }
    ids
}

fn gelu_tanh(x: &Array) -> Res<Array> {
    let f = |v: f32| Array::from_f32(v);
    let cube = x.multiply(x)?.multiply(x)?;
    let inner = x.add(cube.multiply(f(0.044715))?)?;
    let t = ops::tanh(inner.multiply(f((2.0 / std::f32::consts::PI).sqrt()))?)?;
    Ok(x.multiply(f(0.5))?.multiply(t.add(f(1.0))?)?)
}

impl Tower {
    fn load(src: &mut Source, cfg: VisionConfig, format: WeightFormat) -> Res<Tower> {
        let p = cfg.patch;
        let c = cfg.channels;
        let name = "vision_model.embeddings.patch_embedding";
        let w = llama::load_f32(src, &format!("{name}.weight"))?
            .with_context(|| format!("safetensors has no tensor {name}.weight"))?;
        let s = w.shape().to_vec();
        // mlx-vlm's check: [out, kh, kw, in] has kh == kw <= out; otherwise PyTorch's
        // [out, in, kh, kw].
        let ohwi = if s.len() == 4 && s[0] == cfg.hidden && s[1] == p && s[2] == p && s[3] == c {
            w
        } else if s.len() == 4 && s[0] == cfg.hidden && s[1] == c && s[2] == p && s[3] == p {
            w.transpose_axes(&[0, 2, 3, 1]).context("patch kernel layout")?
        } else {
            return Err(anyhow!(
                "{name}.weight has shape {s:?}; the config needs [{}, {p}, {p}, {c}]",
                cfg.hidden
            ));
        };
        let kernel = ohwi.reshape(&[cfg.hidden, p * p * c])?.transpose()?;
        let kernel_bias = llama::load_f32(src, &format!("{name}.bias"))?
            .with_context(|| format!("safetensors has no tensor {name}.bias"))?;
        let pname = "vision_model.embeddings.position_embedding.weight";
        let table =
            llama::load_f32(src, pname)?.with_context(|| format!("safetensors has no tensor {pname}"))?;
        let n = cfg.per_side();
        if table.shape() != [n * n, cfg.hidden] {
            return Err(anyhow!(
                "{pname} has shape {:?}; the config needs [{}, {}]",
                table.shape(),
                n * n,
                cfg.hidden
            ));
        }
        let ids = full_tile_positions(n);
        let positions = table.take_axis(Array::from_slice(&ids, &[ids.len() as i32]), 0)?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let m = |s: &str| format!("vision_model.encoder.layers.{i}.{s}");
            let layer = EncoderLayer {
                ln1: Norm::load(src, &m("layer_norm1"), cfg.eps)?,
                q: Affine::load(src, &m("self_attn.q_proj"), format)?,
                k: Affine::load(src, &m("self_attn.k_proj"), format)?,
                v: Affine::load(src, &m("self_attn.v_proj"), format)?,
                o: Affine::load(src, &m("self_attn.out_proj"), format)?,
                ln2: Norm::load(src, &m("layer_norm2"), cfg.eps)?,
                fc1: Affine::load(src, &m("mlp.fc1"), format)?,
                fc2: Affine::load(src, &m("mlp.fc2"), format)?,
            };
            layers.push(layer);
        }
        // mlx-vlm builds the final norm with mlx's default epsilon, not the config's.
        let post = Norm::load(src, "vision_model.post_layernorm", 1e-5)?;
        let tower = Tower { cfg, kernel, kernel_bias, positions, layers, post };
        llama::eval_all(tower.arrays())?;
        Ok(tower)
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = vec![&self.kernel, &self.kernel_bias, &self.positions, &self.post.w, &self.post.b];
        for l in &self.layers {
            v.extend([&l.ln1.w, &l.ln1.b, &l.ln2.w, &l.ln2.b]);
            for a in [&l.q, &l.k, &l.v, &l.o, &l.fc1, &l.fc2] {
                v.extend(a.arrays());
            }
        }
        v
    }

    /// `tiles` (`n x 3 x S x S`, channels first) to patch rows `[n, per_side^2, P*P*3]`, each in
    /// (ky, kx, channel) order, patches row-major.
    fn patchify(&self, pixels: &[f32], n: usize) -> Vec<f32> {
        let (p, side) = (self.cfg.patch as usize, self.cfg.image_size as usize);
        let per = side / p;
        let plane = side * side;
        let mut out = Vec::with_capacity(pixels.len());
        for t in 0..n {
            let tile = &pixels[t * 3 * plane..(t + 1) * 3 * plane];
            for py in 0..per {
                for px in 0..per {
                    for ky in 0..p {
                        for kx in 0..p {
                            let at = (py * p + ky) * side + px * p + kx;
                            out.extend((0..3).map(|ch| tile[ch * plane + at]));
                        }
                    }
                }
            }
        }
        out
    }

    /// The tower's output `[n, per_side^2, hidden]` for `n` preprocessed tiles.
    fn forward(&self, pixels: &[f32], n: usize) -> Res<Array> {
        let c = &self.cfg;
        let np = c.per_side() * c.per_side();
        let k = c.patch * c.patch * c.channels;
        let patches = Array::from_slice(&self.patchify(pixels, n), &[n as i32, np, k]);
        let mut x = patches.matmul(&self.kernel)?.add(&self.kernel_bias)?.add(&self.positions)?;
        let (nh, hd) = (c.heads, c.hidden / c.heads);
        let scale = (hd as f32).powf(-0.5);
        let heads = |a: Array| -> Res<Array> {
            Ok(a.reshape(&[n as i32, np, nh, hd])?.transpose_axes(&[0, 2, 1, 3])?)
        };
        for l in &self.layers {
            let h = l.ln1.forward(&x)?;
            let (q, kk, v) = (heads(l.q.forward(&h)?)?, heads(l.k.forward(&h)?)?, heads(l.v.forward(&h)?)?);
            let a = fast::scaled_dot_product_attention(&q, &kk, &v, scale, None, None)
                .context("vision attention")?
                .transpose_axes(&[0, 2, 1, 3])?
                .reshape(&[n as i32, np, c.hidden])?;
            x = x.add(l.o.forward(&a)?)?;
            let h = l.ln2.forward(&x)?;
            x = x.add(l.fc2.forward(&gelu_tanh(&l.fc1.forward(&h)?)?)?)?;
        }
        self.post.forward(&x)
    }
}

/// A loaded Idefics3 vision side: processor, tower, connector, and the prompt's image tokens.
pub(super) struct Idefics3 {
    pub processor: Processor,
    tower: Tower,
    scale: i32,
    proj: Linear,
    /// The id of `<image>`, the token each image feature replaces.
    pub image_token_id: u32,
    /// Image tokens per tile.
    pub seq_len: usize,
}

/// The strings the reference processor writes around image tokens.
pub(super) const IMAGE_TOKEN: &str = "<image>";
const FAKE_TOKEN: &str = "<fake_token_around_image>";
const GLOBAL_TOKEN: &str = "<global-img>";

impl Idefics3 {
    /// Loads the vision tower and connector from `src` (already renamed by
    /// [`rename_hf_vlm`]), with `config` the checkpoint's `config.json` and `dir` its directory
    /// (for `preprocessor_config.json` and `processor_config.json`).
    pub fn load(
        dir: &Path,
        config: &serde_json::Value,
        src: &mut Source,
        format: WeightFormat,
    ) -> Res<Idefics3> {
        let read = |f: &str| read_json_file(dir, f);
        let pp = read("preprocessor_config.json")?.with_context(|| {
            format!("{}/preprocessor_config.json is missing (the image processor)", dir.display())
        })?;
        let processor = Processor::from_config(&pp)?;
        let vcfg =
            VisionConfig::from_json(config.get("vision_config").context("config.json: no vision_config")?)?;
        if processor.tile as i32 != vcfg.image_size {
            return Err(anyhow!(
                "preprocessor_config.json: max_image_size.longest_edge {} differs from the vision tower's image_size {}",
                processor.tile,
                vcfg.image_size
            ));
        }
        let scale = config.get("scale_factor").and_then(|v| v.as_i64()).unwrap_or(2) as i32;
        let side = vcfg.per_side();
        if scale <= 0 || side % scale != 0 {
            return Err(anyhow!(
                "config.json: scale_factor {scale} does not divide the {side} patches per side"
            ));
        }
        let seq_len = ((side / scale) * (side / scale)) as usize;
        if let Some(n) = read("processor_config.json")?.and_then(|p| p.get("image_seq_len")?.as_u64())
            && n as usize != seq_len
        {
            return Err(anyhow!(
                "processor_config.json: image_seq_len {n} differs from the {seq_len} features per tile the vision config gives"
            ));
        }
        let image_token_id = config
            .get("image_token_id")
            .or_else(|| config.get("image_token_index"))
            .and_then(|v| v.as_u64())
            .context("config.json: no image_token_id")? as u32;
        let hidden = vcfg.hidden;
        let tower = Tower::load(src, vcfg, format)?;
        let name = "connector.modality_projection.proj";
        let proj = llama::load_linear(src, name, format)?
            .with_context(|| format!("safetensors has no tensor {name}.weight"))?;
        if proj.in_features() != hidden * scale * scale {
            return Err(anyhow!(
                "{name} takes {} features; the vision tower gives {hidden} x {scale}^2",
                proj.in_features()
            ));
        }
        llama::eval_all(proj.arrays())?;
        Ok(Idefics3 { processor, tower, scale, proj, image_token_id, seq_len })
    }

    /// Every array the vision side holds.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut v = self.tower.arrays();
        v.extend(self.proj.arrays());
        v
    }

    /// The width of the features the connector gives (the text model's hidden size).
    pub fn out_features(&self) -> i32 {
        self.proj.out_features()
    }

    /// The prompt text of one image laid out as `rows x cols` tiles (0 x 0: one view).
    pub fn image_prompt(&self, rows: usize, cols: usize) -> String {
        let image = IMAGE_TOKEN.repeat(self.seq_len);
        let mut s = String::new();
        if rows == 0 && cols == 0 {
            return format!("{FAKE_TOKEN}{GLOBAL_TOKEN}{image}{FAKE_TOKEN}");
        }
        for r in 0..rows {
            for c in 0..cols {
                s.push_str(&format!("{FAKE_TOKEN}<row_{}_col_{}>{image}", r + 1, c + 1));
            }
            s.push('\n');
        }
        s.push_str(&format!("\n{FAKE_TOKEN}{GLOBAL_TOKEN}{image}{FAKE_TOKEN}"));
        s
    }

    /// `prompt` (rendered by the chat template, one [`IMAGE_TOKEN`] per image) with each image
    /// token replaced by its image's tile layout. Errors when the counts differ (for example
    /// when a message's own text contains the image token).
    pub fn expand(&self, prompt: &str, tiles: &[Tiles]) -> Res<String> {
        let parts: Vec<&str> = prompt.split(IMAGE_TOKEN).collect();
        if parts.len() != tiles.len() + 1 {
            return Err(anyhow!(
                "the prompt has {} {IMAGE_TOKEN} tokens for {} images (is {IMAGE_TOKEN} written in a text part?)",
                parts.len() - 1,
                tiles.len()
            ));
        }
        let mut s = parts[0].to_string();
        for (t, rest) in tiles.iter().zip(&parts[1..]) {
            s.push_str(&self.image_prompt(t.rows, t.cols));
            s.push_str(rest);
        }
        Ok(s)
    }

    /// The vision tower's output `[tiles, per_side^2, vision hidden]` (before the connector).
    pub fn vision_features(&self, tiles: &Tiles) -> Res<Array> {
        self.tower.forward(&tiles.pixels, tiles.n)
    }

    /// The connector on `[n, per_side^2, hidden]`: pixel shuffle, then the projection; returns
    /// `[n * seq_len, text hidden]`.
    pub fn connect(&self, x: &Array) -> Res<Array> {
        let s = x.shape();
        let (b, seq, d) = (s[0], s[1], s[2]);
        let side = (seq as f64).sqrt() as i32;
        let f = self.scale;
        let x = x
            .reshape(&[b, side, side / f, d * f])?
            .transpose_axes(&[0, 2, 1, 3])?
            .reshape(&[b, side / f, side / f, d * f * f])?
            .transpose_axes(&[0, 2, 1, 3])?
            .reshape(&[b * (seq / (f * f)), d * f * f])?;
        self.proj.forward(&x)
    }

    /// The features of every image, in order: `[sum of tiles x seq_len, text hidden]`.
    pub fn features(&self, tiles: &[Tiles]) -> Res<Array> {
        let parts =
            tiles.iter().map(|t| self.connect(&self.vision_features(t)?)).collect::<Res<Vec<Array>>>()?;
        Ok(ops::concatenate(&parts, 0)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_rules_follow_the_reference_arithmetic() {
        // Longest edge to 64: 1000x30 (w x h) -> 64 x 1.92 -> 1 -> even 2.
        assert_eq!(rescale_to_max_len(30, 1000, 64), (2, 64));
        assert_eq!(rescale_to_max_len(1000, 30, 64), (64, 2));
        assert_eq!(rescale_to_max_len(40, 50, 64), (52, 64));
        assert_eq!(multiples_of(2, 64, 32), (32, 64));
        assert_eq!(multiples_of(52, 64, 32), (64, 64));
        assert_eq!(scale_below(100, 5000, 4096), (81, 4096));
    }

    /// mlx-vlm's bucketing is not the identity for every grid (n = 6 gives 0,1,2,3,4,4: the
    /// f32 boundaries accumulate rounding); the expected buckets were printed by mlx 0.32.4
    /// (`mx.arange(1/n, 1, 1/n)` against `mx.arange(n) / n`) for n = 1..64.
    #[test]
    fn full_tile_positions_bucket_as_mlx_does() {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/vlm/mlx_buckets.txt"
        ))
        .unwrap();
        let mut checked = 0;
        for line in text.lines() {
            let (n, buckets) = line.split_once(' ').unwrap();
            let n: i32 = n.parse().unwrap();
            let want: Vec<i32> = buckets.split(',').map(|b| b.parse().unwrap()).collect();
            let got = full_tile_positions(n);
            let rows: Vec<i32> = (0..n).map(|h| got[(h * n) as usize] / n).collect();
            let cols: Vec<i32> = (0..n).map(|w| got[w as usize]).collect();
            assert_eq!(rows, want, "rows, n = {n}");
            assert_eq!(cols, want, "cols, n = {n}");
            checked += 1;
        }
        assert_eq!(checked, 64);
    }

    /// The fixtures of `scripts/make-vlm-fixtures.py`: a tiny random Idefics3 checkpoint
    /// checked stage by stage against mlx-vlm 0.7.10 (tests/fixtures/vlm/idefics3).
    mod against_mlx_vlm {
        use mlx_rs::ops::indexing::TryIndexOp;

        use super::super::*;
        use crate::backend::Prompt;
        use crate::backend::mlx::vision::fixtures::{
            case as load_case, cases as load_cases, host, max_diff, root,
        };
        use crate::backend::mlx::{vision, worker};

        #[test]
        fn every_stage_matches_mlx_vlm_for_every_image_size() {
            let dir = root().join("idefics3/model");
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
            let (model, tok, wrapped) = vision::load_dir(&dir, &config, WeightFormat::F32).unwrap();
            let vision::Vision::Idefics3(vision) = &wrapped else { panic!("idefics3 loads as Idefics3") };
            let cases = load_cases("idefics3");
            let mut checked = 0;
            for case in cases["cases"].as_array().unwrap() {
                let name = case["name"].as_str().unwrap();
                let (r, images, msg) = load_case("idefics3", case);
                assert_eq!(
                    tok.chat.render_parts(std::slice::from_ref(&msg), true).unwrap(),
                    case["prompt"].as_str().unwrap(),
                    "{name}: rendered prompt"
                );

                // Preprocessing: tile layout and pixel values.
                let tiles: Vec<Tiles> = images.iter().map(|i| vision.processor.preprocess(i)).collect();
                let layout: Vec<(u64, u64)> = tiles.iter().map(|t| (t.rows as u64, t.cols as u64)).collect();
                let want_layout: Vec<(u64, u64)> = case["rows"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .zip(case["cols"].as_array().unwrap())
                    .map(|(r, c)| (r.as_u64().unwrap(), c.as_u64().unwrap()))
                    .collect();
                assert_eq!(layout, want_layout, "{name}: tile layout");
                if !images.is_empty() {
                    let px: Vec<f32> = tiles.iter().flat_map(|t| t.pixels.iter().copied()).collect();
                    let got = Array::from_slice(&px, &[px.len() as i32]);
                    let d = max_diff("pixel_values", &got, &r["pixel_values"]);
                    assert!(d <= 1e-6, "{name}: pixel values differ by {d}");
                    let n: usize = tiles.iter().map(|t| t.n).sum();
                    assert_eq!(n as u64, case["tiles"].as_u64().unwrap(), "{name}: tiles");
                    let vis: Vec<Array> = tiles.iter().map(|t| vision.vision_features(t).unwrap()).collect();
                    let vis = ops::concatenate(&vis, 0).unwrap();
                    let d = max_diff("vision_embeddings", &vis, &r["vision_embeddings"]);
                    assert!(d <= 1e-4, "{name}: vision embeddings differ by {d}");
                    let d = max_diff(
                        "connector_output",
                        &vision.features(&tiles).unwrap(),
                        &r["connector_output"],
                    );
                    assert!(d <= 1e-4, "{name}: connector output differs by {d}");
                }

                // The whole prompt path the server runs: ids, merged embeddings, logits, greedy.
                let p = worker::prepare(&model, &tok, Some(&wrapped), &Prompt::Chat(vec![msg])).unwrap();
                let want_ids: Vec<u32> = host(&r["input_ids"]).iter().map(|&v| v as u32).collect();
                assert_eq!(p.ids, want_ids, "{name}: input ids");
                let n_img = p.ids.iter().filter(|&&i| i == vision.image_token_id).count() as u64;
                assert_eq!(n_img, case["n_image_tokens"].as_u64().unwrap(), "{name}: image tokens");
                let embeds = p.embeds.clone().unwrap_or_else(|| model.embed(&p.ids).unwrap());
                let d = max_diff("inputs_embeds", &embeds, &r["inputs_embeds"]);
                assert!(d <= 1e-4, "{name}: merged input embeddings differ by {d}");
                let mut cache = llama::KvCache::new(model.cfg.n_layers);
                let mut logits = model.forward_embeds(&embeds, &mut cache).unwrap();
                let t = p.ids.len() as i32;
                let last_ref = r["logits"].reshape(&[t, -1]).unwrap().try_index(t - 1).unwrap();
                let d = max_diff("logits", &logits, &last_ref);
                assert!(d <= 1e-4, "{name}: last-position logits differ by {d}");
                let want_greedy: Vec<u32> = host(&r["greedy_ids"]).iter().map(|&v| v as u32).collect();
                let margins = host(&r["top2_margin"]);
                for (step, (&want, &margin)) in want_greedy.iter().zip(&margins).enumerate() {
                    if margin < 1e-3 {
                        break; // ambiguous argmax: later steps may legitimately differ
                    }
                    let id = crate::backend::mlx::sampling::argmax(&host(&logits));
                    assert_eq!(id, want, "{name}: greedy step {step}");
                    logits = model.forward(&[id], &mut cache).unwrap();
                }
                checked += 1;
            }
            assert_eq!(checked, 9);
        }
    }
}
