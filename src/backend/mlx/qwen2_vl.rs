//! Qwen2-VL and Qwen2.5-VL: a dynamic-resolution vision tower over a patch grid, a patch
//! merger, and the Qwen2 decoder ([`llama::Llama`]) with multimodal RoPE (M-RoPE), following
//! mlx-vlm 0.7.10's `qwen2_vl` / `qwen2_5_vl` models and the image processor it runs for them.
//!
//! Preprocessing ([`Processor`], mlx-vlm's numpy `Qwen3VLImageProcessor`, which it uses in
//! place of transformers' `Qwen2VLImageProcessor`): `smart_resize` to multiples of `patch *
//! merge` within `min_pixels`..`max_pixels` (Python's round-half-even, then the floor/ceil
//! rescale), Pillow's BICUBIC ([`resample`]; `resample` in the config is not read), rescale and
//! normalise in f32, the frame repeated `temporal_patch_size` times, and the patches flattened
//! in the processor's order: merge blocks row-major, the `merge x merge` patches of a block
//! row-major, each patch `(channel, time, y, x)`. An image of `h x w` patches becomes `h * w /
//! merge^2` `<|image_pad|>` tokens ([`QwenVl::expand`]).
//!
//! Vision tower ([`Tower`]): the patch convolution (a 3-D kernel with stride = kernel) as one
//! matmul; 2-D rotary embedding in the attention (half the rotated frequencies from the patch's
//! row, half from its column); blocks of norm, attention (one `qkv` with bias, per image, or
//! per window in Qwen2.5-VL), norm, MLP; the merger (norm, `merge^2` neighbouring patches
//! concatenated, Linear, GELU (erf), Linear). Qwen2-VL: LayerNorm (eps 1e-6) and an fc1 ->
//! QuickGELU (`x * sigmoid(1.702 x)`, mlx's `gelu_fast_approx`) -> fc2 MLP. Qwen2.5-VL:
//! RMSNorm (eps 1e-6), a SwiGLU MLP with biases, and windowed attention: the merge blocks are
//! regrouped into windows of `window_size / merge / patch` blocks per side, every block but
//! those in `fullatt_block_indexes` attends within its window, and the merger's output is put
//! back in patch order.
//!
//! Text model: the decoder of the top-level `config.json` keys (mlx-vlm's `ModelConfig` copies
//! them into `text_config`), Qwen2 with q/k/v biases, head size `hidden_size /
//! num_attention_heads`, and M-RoPE on `rope_scaling.mrope_section` ([24, 20, 20] when
//! absent); prompt positions from [`QwenVl::positions`] (mlx-vlm's `get_rope_index`).
//!
//! Weights: mlx-vlm's names (`vision_tower.*`, `language_model.model.*`,
//! `language_model.lm_head.*`; patch kernel `[out, t, kh, kw, in]`) or Hugging Face's
//! (`visual.*`, `model.*`, `lm_head.*`, or transformers 5's `model.visual.*`,
//! `model.language_model.*`; kernel `[out, in, t, kh, kw]`), f32/bf16/f16 or MLX-quantized
//! linear layers ([`rename`] maps them onto one set of names).

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, anyhow};
use mlx_rs::ops::indexing::TryIndexOp;
use mlx_rs::{Array, fast, ops};

use super::Res;
use super::idefics3::{Affine, Norm, read_json_file, rescale_normalize};
use super::llama::{self, Source, WeightFormat};
use super::resample::{self, Filter};
use crate::backend::Image;

/// Which of the two families a directory is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Family {
    Qwen2Vl,
    Qwen25Vl,
}

impl Family {
    /// The family of a `config.json` `model_type`, if it is one of these.
    pub fn of(model_type: &str) -> Option<Family> {
        match model_type {
            "qwen2_vl" => Some(Family::Qwen2Vl),
            "qwen2_5_vl" => Some(Family::Qwen25Vl),
            _ => None,
        }
    }
}

/// The image processor's settings (`preprocessor_config.json`, as mlx-vlm reads them).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Processor {
    pub patch: u32,
    pub temporal: u32,
    pub merge: u32,
    pub min_pixels: u64,
    pub max_pixels: u64,
    /// `do_rescale` with `rescale_factor` (as f32, the processor's arithmetic).
    pub rescale: Option<f32>,
    /// `do_normalize` with `image_mean`, `image_std`.
    pub normalize: Option<([f32; 3], [f32; 3])>,
}

/// One image, preprocessed: `h * w` patches (one frame: `grid_t` is 1), each `3 * temporal *
/// patch^2` values, in the processor's order (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Grid {
    pub pixels: Vec<f32>,
    pub h: usize,
    pub w: usize,
}

/// Python's `round` (half to even) of a non-negative f64.
fn round_half_even(x: f64) -> f64 {
    let r = x.round();
    if (x - x.trunc() - 0.5).abs() == 0.0 && r % 2.0 != 0.0 { r - 1.0 } else { r }
}

/// mlx-vlm's `_smart_resize_image` (transformers' `smart_resize` without its minimum-size
/// check): `(height, width)` multiples of `factor`, about `min`..`max` pixels, keeping the
/// aspect ratio. Errors when the aspect ratio is over 200 (as the reference).
pub(super) fn smart_resize(h: u32, w: u32, factor: u32, min: u64, max: u64) -> Res<(u32, u32)> {
    let (hf, wf, f) = (h as f64, w as f64, factor as f64);
    if hf.max(wf) / hf.min(wf) > 200.0 {
        return Err(anyhow!(
            "the image is {w}x{h}: its aspect ratio is over 200, which the image processor refuses"
        ));
    }
    let mut hb = round_half_even(hf / f) * f;
    let mut wb = round_half_even(wf / f) * f;
    if hb * wb > max as f64 {
        let beta = (hf * wf / max as f64).sqrt();
        hb = f.max((hf / beta / f).floor() * f);
        wb = f.max((wf / beta / f).floor() * f);
    } else if hb * wb < min as f64 {
        let beta = (min as f64 / (hf * wf)).sqrt();
        hb = (hf * beta / f).ceil() * f;
        wb = (wf * beta / f).ceil() * f;
    }
    if hb < f || wb < f {
        return Err(anyhow!("the image is {w}x{h}: it resizes to no patch (min_pixels {min})"));
    }
    Ok((hb as u32, wb as u32))
}

/// The most image tokens one image can take with these settings (see the catalogue's bound,
/// `crate::catalog::image_tokens_of_dir`, which this must not exceed).
#[cfg(test)]
fn tokens_of(p: &Processor, w: u32, h: u32) -> Res<u64> {
    let f = p.patch * p.merge;
    let (rh, rw) = smart_resize(h, w, f, p.min_pixels, p.max_pixels)?;
    Ok(((rh / f) * (rw / f)) as u64)
}

impl Processor {
    /// From `preprocessor_config.json` (`pp`) with mlx-vlm's defaults for what it leaves out
    /// (patch 14, temporal 2, merge 2, min 56 * 56, max 14 * 14 * 4 * 1280 pixels, mean and std
    /// 0.5); `size.shortest_edge` / `size.longest_edge` stand for `min_pixels` / `max_pixels`
    /// when those are absent. Errors name the field at fault.
    pub fn from_config(pp: &serde_json::Value) -> Res<Processor> {
        let int = |k: &str, d: u64| -> Res<u64> {
            match pp.get(k) {
                None | Some(serde_json::Value::Null) => Ok(d),
                Some(v) => v
                    .as_u64()
                    .filter(|&x| x > 0)
                    .with_context(|| format!("preprocessor_config.json: {k} is not a positive integer")),
            }
        };
        let size = pp.get("size");
        let min_d = size.and_then(|s| s.get("shortest_edge")?.as_u64()).unwrap_or(56 * 56);
        let max_d = size.and_then(|s| s.get("longest_edge")?.as_u64()).unwrap_or(14 * 14 * 4 * 1280);
        let (rescale, normalize) = rescale_normalize(pp)?;
        let p = Processor {
            patch: int("patch_size", 14)? as u32,
            temporal: int("temporal_patch_size", 2)? as u32,
            merge: int("merge_size", 2)? as u32,
            min_pixels: int("min_pixels", min_d)?,
            max_pixels: int("max_pixels", max_d)?,
            // The processor's arithmetic is f32.
            rescale: rescale.map(|f| f as f32),
            normalize,
        };
        if p.min_pixels > p.max_pixels {
            return Err(anyhow!(
                "preprocessor_config.json: min_pixels {} is above max_pixels {}",
                p.min_pixels,
                p.max_pixels
            ));
        }
        Ok(p)
    }

    /// Values per patch: `3 * temporal * patch^2`.
    pub fn patch_len(&self) -> usize {
        (3 * self.temporal * self.patch * self.patch) as usize
    }

    /// The patch grid of `img` (see the module documentation). Errors on an image the
    /// reference refuses (aspect ratio over 200).
    pub fn preprocess(&self, img: &Image) -> Res<Grid> {
        let (p, m, t) = (self.patch as usize, self.merge as usize, self.temporal as usize);
        let (rh, rw) = smart_resize(
            img.height(),
            img.width(),
            self.patch * self.merge,
            self.min_pixels,
            self.max_pixels,
        )?;
        let img = resample::resize(img, rw, rh, Filter::Bicubic);
        let (rw, rh) = (rw as usize, rh as usize);
        let rgb = img.rgb();
        let value = |v: u8, ch: usize| {
            let x = match self.rescale {
                Some(f) => v as f32 * f,
                None => v as f32,
            };
            match self.normalize {
                Some((mean, std)) => (x - mean[ch]) / std[ch],
                None => x,
            }
        };
        let (gh, gw) = (rh / p, rw / p);
        let mut pixels = Vec::with_capacity(gh * gw * self.patch_len());
        for bh in 0..gh / m {
            for bw in 0..gw / m {
                for mh in 0..m {
                    for mw in 0..m {
                        let (row, col) = (bh * m + mh, bw * m + mw);
                        for ch in 0..3 {
                            for _ in 0..t {
                                for y in 0..p {
                                    let at = ((row * p + y) * rw + col * p) * 3 + ch;
                                    pixels.extend((0..p).map(|x| value(rgb[at + 3 * x], ch)));
                                }
                            }
                        }
                    }
                }
            }
        }
        Ok(Grid { pixels, h: gh, w: gw })
    }
}

/// The vision config (`vision_config`), with mlx-vlm's defaults.
#[derive(Debug, Clone, PartialEq)]
struct VisionConfig {
    /// The blocks' width (`embed_dim` in Qwen2-VL, `hidden_size` in Qwen2.5-VL).
    width: i32,
    heads: i32,
    depth: usize,
    patch: i32,
    temporal: i32,
    merge: i32,
    /// The merger's output width (`hidden_size` in Qwen2-VL, `out_hidden_size` in Qwen2.5-VL).
    out: i32,
    /// Qwen2.5-VL: merge blocks per window side, and the blocks with full attention.
    window: Option<(usize, Vec<usize>)>,
}

impl VisionConfig {
    fn from_json(family: Family, v: &serde_json::Value) -> Res<VisionConfig> {
        let int = |k: &str, d: i64| -> Res<i64> {
            match v.get(k) {
                None => Ok(d),
                Some(x) => x
                    .as_i64()
                    .filter(|&x| x > 0)
                    .with_context(|| format!("config.json: vision_config \"{k}\" is not a positive integer")),
            }
        };
        let (width, out) = match family {
            Family::Qwen2Vl => (int("embed_dim", 1280)?, int("hidden_size", 1536)?),
            Family::Qwen25Vl => (int("hidden_size", 1280)?, int("out_hidden_size", 1536)?),
        };
        let patch = int("patch_size", 14)?;
        let merge = int("spatial_merge_size", 2)?;
        let window = match family {
            Family::Qwen2Vl => None,
            Family::Qwen25Vl => {
                let size = int("window_size", 112)?;
                let per_side = size / merge / patch;
                if per_side < 1 {
                    return Err(anyhow!(
                        "config.json: vision_config window_size {size} is smaller than one merge block ({merge} x {patch} pixels)"
                    ));
                }
                let full = match v.get("fullatt_block_indexes") {
                    None => vec![7, 15, 23, 31],
                    Some(list) => list
                        .as_array()
                        .and_then(|a| a.iter().map(|x| x.as_u64().map(|i| i as usize)).collect())
                        .context(
                            "config.json: vision_config fullatt_block_indexes is not a list of integers",
                        )?,
                };
                Some((per_side as usize, full))
            }
        };
        let c = VisionConfig {
            width: width as i32,
            heads: int("num_heads", 16)? as i32,
            depth: int("depth", 32)? as usize,
            patch: patch as i32,
            temporal: int("temporal_patch_size", 2)? as i32,
            merge: merge as i32,
            out: out as i32,
            window,
        };
        if c.width % c.heads != 0 || (c.width / c.heads) % 4 != 0 {
            return Err(anyhow!(
                "config.json: vision width {} over {} heads does not give a head size that is a multiple of 4",
                c.width,
                c.heads
            ));
        }
        if v.get("in_channels").and_then(|x| x.as_i64()).is_some_and(|c| c != 3) {
            return Err(anyhow!("config.json: vision in_channels must be 3 (RGB)"));
        }
        Ok(c)
    }

    fn head_dim(&self) -> i32 {
        self.width / self.heads
    }
}

/// A norm of the vision side: LayerNorm (Qwen2-VL) or RMSNorm (Qwen2.5-VL), eps 1e-6.
enum VNorm {
    Layer(Norm),
    Rms(Array),
}

impl VNorm {
    fn load(src: &mut Source, module: &str, family: Family) -> Res<VNorm> {
        Ok(match family {
            Family::Qwen2Vl => VNorm::Layer(Norm::load(src, module, 1e-6)?),
            Family::Qwen25Vl => VNorm::Rms(
                llama::load_f32(src, &format!("{module}.weight"))?
                    .with_context(|| format!("safetensors has no tensor {module}.weight"))?,
            ),
        })
    }

    fn forward(&self, x: &Array) -> Res<Array> {
        match self {
            VNorm::Layer(n) => n.forward(x),
            VNorm::Rms(w) => fast::rms_norm(x, Some(w), 1e-6).context("rms_norm"),
        }
    }

    fn arrays(&self) -> Vec<&Array> {
        match self {
            VNorm::Layer(n) => n.arrays(),
            VNorm::Rms(w) => vec![w],
        }
    }
}

/// The MLP of a vision block.
enum Mlp {
    /// Qwen2-VL: fc1 -> QuickGELU -> fc2.
    Quick(Affine, Affine),
    /// Qwen2.5-VL: down(silu(gate) * up).
    SwiGlu { gate: Affine, up: Affine, down: Affine },
}

impl Mlp {
    fn forward(&self, x: &Array) -> Res<Array> {
        match self {
            Mlp::Quick(fc1, fc2) => {
                let h = fc1.forward(x)?;
                let g = h.multiply(ops::sigmoid(h.multiply(Array::from_f32(1.702))?)?)?;
                fc2.forward(&g)
            }
            Mlp::SwiGlu { gate, up, down } => {
                let g = gate.forward(x)?;
                let act = g.multiply(ops::sigmoid(&g)?)?;
                down.forward(&act.multiply(up.forward(x)?)?)
            }
        }
    }

    fn arrays(&self) -> Vec<&Array> {
        match self {
            Mlp::Quick(a, b) => [a, b].iter().flat_map(|x| x.arrays()).collect(),
            Mlp::SwiGlu { gate, up, down } => [gate, up, down].iter().flat_map(|x| x.arrays()).collect(),
        }
    }
}

struct Block {
    norm1: VNorm,
    qkv: Affine,
    proj: Affine,
    norm2: VNorm,
    mlp: Mlp,
}

/// The vision tower and merger.
struct Tower {
    cfg: VisionConfig,
    /// The patch kernel as `[3 * temporal * patch^2, width]`, rows in (channel, time, y, x)
    /// order (the processor's patch order).
    kernel: Array,
    /// The rotary inverse frequencies of one spatial axis: `head_dim / 4` values.
    inv_freq: Array,
    blocks: Vec<Block>,
    ln_q: VNorm,
    mlp0: Affine,
    mlp2: Affine,
}

impl Tower {
    fn load(src: &mut Source, cfg: VisionConfig, family: Family, format: WeightFormat) -> Res<Tower> {
        let (d, t, p) = (cfg.width, cfg.temporal, cfg.patch);
        let name = "vision_tower.patch_embed.proj.weight";
        let w = llama::load_f32(src, name)?.with_context(|| format!("safetensors has no tensor {name}"))?;
        let s = w.shape().to_vec();
        // mlx-vlm's layout [out, t, kh, kw, in], or PyTorch's [out, in, t, kh, kw].
        let oc = if s == [d, t, p, p, 3] {
            w.transpose_axes(&[0, 4, 1, 2, 3]).context("patch kernel layout")?
        } else if s == [d, 3, t, p, p] {
            w
        } else {
            return Err(anyhow!("{name} has shape {s:?}; the config needs [{d}, {t}, {p}, {p}, 3]"));
        };
        let kernel = oc.reshape(&[d, 3 * t * p * p])?.transpose()?;
        // mlx-vlm's VisionRotaryEmbedding(head_dim / 2): 1 / 10000 ** (arange(0, dim, 2) / dim).
        let dim = cfg.head_dim() / 2;
        let exps = Array::from_iter((0..dim / 2).map(|i| (2 * i) as f32), &[dim / 2])
            .divide(Array::from_f32(dim as f32))?;
        let inv_freq = Array::from_f32(10000.0).power(&exps)?.reciprocal()?;
        let mut blocks = Vec::with_capacity(cfg.depth);
        for i in 0..cfg.depth {
            let m = |s: &str| format!("vision_tower.blocks.{i}.{s}");
            let a = |src: &mut Source, s: &str| Affine::load(src, &m(s), format);
            let mlp = match family {
                Family::Qwen2Vl => Mlp::Quick(a(src, "mlp.fc1")?, a(src, "mlp.fc2")?),
                Family::Qwen25Vl => Mlp::SwiGlu {
                    gate: a(src, "mlp.gate_proj")?,
                    up: a(src, "mlp.up_proj")?,
                    down: a(src, "mlp.down_proj")?,
                },
            };
            blocks.push(Block {
                norm1: VNorm::load(src, &m("norm1"), family)?,
                qkv: a(src, "attn.qkv")?,
                proj: a(src, "attn.proj")?,
                norm2: VNorm::load(src, &m("norm2"), family)?,
                mlp,
            });
        }
        for (i, b) in blocks.iter().enumerate() {
            if b.qkv.in_features() != d || b.qkv.out_features() != 3 * d || b.proj.out_features() != d {
                return Err(anyhow!(
                    "vision_tower.blocks.{i}: qkv is {} -> {}, proj gives {}; the config's width {d} needs {d} -> {} and {d}",
                    b.qkv.in_features(),
                    b.qkv.out_features(),
                    b.proj.out_features(),
                    3 * d
                ));
            }
        }
        let ln_q = VNorm::load(src, "vision_tower.merger.ln_q", family)?;
        let mlp0 = Affine::load(src, "vision_tower.merger.mlp.0", format)?;
        let mlp2 = Affine::load(src, "vision_tower.merger.mlp.2", format)?;
        let merged = d * cfg.merge * cfg.merge;
        if mlp0.in_features() != merged || mlp2.out_features() != cfg.out {
            return Err(anyhow!(
                "vision_tower.merger takes {} features and gives {}; the config needs {merged} and {}",
                mlp0.in_features(),
                mlp2.out_features(),
                cfg.out
            ));
        }
        let tower = Tower { cfg, kernel, inv_freq, blocks, ln_q, mlp0, mlp2 };
        llama::eval_all(tower.arrays())?;
        Ok(tower)
    }

    fn arrays(&self) -> Vec<&Array> {
        let mut v = vec![&self.kernel, &self.inv_freq];
        for b in &self.blocks {
            v.extend(b.norm1.arrays());
            v.extend(b.norm2.arrays());
            v.extend(b.qkv.arrays());
            v.extend(b.proj.arrays());
            v.extend(b.mlp.arrays());
        }
        v.extend(self.ln_q.arrays());
        v.extend(self.mlp0.arrays());
        v.extend(self.mlp2.arrays());
        v
    }

    /// Per patch of every grid (in the processor's order), its (row, column) in its image.
    fn patch_positions(&self, grids: &[Grid]) -> Vec<(i32, i32)> {
        let m = self.cfg.merge as usize;
        let mut out = Vec::new();
        for g in grids {
            for bh in 0..g.h / m {
                for bw in 0..g.w / m {
                    for mh in 0..m {
                        for mw in 0..m {
                            out.push(((bh * m + mh) as i32, (bw * m + mw) as i32));
                        }
                    }
                }
            }
        }
        out
    }

    /// Qwen2.5-VL's `get_window_index`: the merge blocks of every image in window order, and
    /// the windows' lengths in patches (empty windows left out).
    fn windows(&self, grids: &[Grid], per_side: usize) -> (Vec<i32>, Vec<usize>) {
        let m = self.cfg.merge as usize;
        let unit = m * m;
        let (mut order, mut lens) = (Vec::new(), Vec::new());
        let mut base = 0;
        for g in grids {
            let (lh, lw) = (g.h / m, g.w / m);
            for wy in 0..lh.div_ceil(per_side) {
                for wx in 0..lw.div_ceil(per_side) {
                    let mut n = 0;
                    for y in wy * per_side..((wy + 1) * per_side).min(lh) {
                        for x in wx * per_side..((wx + 1) * per_side).min(lw) {
                            order.push((base + y * lw + x) as i32);
                            n += 1;
                        }
                    }
                    lens.push(n * unit);
                }
            }
            base += lh * lw;
        }
        (order, lens)
    }

    /// The blocks' output `[patches, width]` in patch order (before the merger) and the
    /// merger's output `[patches / merge^2, out]`.
    fn forward(&self, grids: &[Grid]) -> Res<(Array, Array)> {
        let c = &self.cfg;
        let k = 3 * c.temporal * c.patch * c.patch;
        let pixels: Vec<f32> = grids.iter().flat_map(|g| g.pixels.iter().copied()).collect();
        let n = pixels.len() as i32 / k;
        let unit = c.merge * c.merge;
        let mut x = Array::from_slice(&pixels, &[n, k]).matmul(&self.kernel)?;
        // Rotary angles [n, head_dim]: (row freqs, column freqs), twice.
        let pos: Vec<f32> =
            self.patch_positions(grids).iter().flat_map(|&(r, col)| [r as f32, col as f32]).collect();
        let freqs = Array::from_slice(&pos, &[n, 2, 1]).multiply(&self.inv_freq)?.reshape(&[n, -1])?;
        let emb = ops::concatenate(&[&freqs, &freqs], -1)?;
        let (mut cos, mut sin) = (emb.cos()?, emb.sin()?);
        // Attention segments: per image; Qwen2.5-VL's windows reorder the merge blocks.
        let images: Vec<usize> = grids.iter().map(|g| g.h * g.w).collect();
        let mut window = None;
        if let Some((per_side, _)) = &c.window {
            let (order, lens) = self.windows(grids, *per_side);
            let idx = Array::from_slice(&order, &[order.len() as i32]);
            let regroup = |a: &Array| -> Res<Array> {
                let d = a.shape()[1];
                Ok(a.reshape(&[n / unit, unit, d])?.take_axis(&idx, 0)?.reshape(&[n, d])?)
            };
            x = regroup(&x)?;
            cos = regroup(&cos)?;
            sin = regroup(&sin)?;
            window = Some((order, lens));
        }
        let (nh, hd) = (c.heads, c.head_dim());
        let cos = cos.reshape(&[n, 1, hd])?;
        let sin = sin.reshape(&[n, 1, hd])?;
        let scale = (hd as f32).powf(-0.5);
        for (i, b) in self.blocks.iter().enumerate() {
            let segments = match (&window, &c.window) {
                (Some((_, lens)), Some((_, full))) if !full.contains(&i) => lens,
                _ => &images,
            };
            let h = b.norm1.forward(&x)?;
            let qkv = b.qkv.forward(&h)?.reshape(&[n, 3, nh, hd])?;
            let parts = ops::split_equal(&qkv, 3, 1)?;
            let heads = |a: &Array, rot: bool| -> Res<Array> {
                let a = a.reshape(&[n, nh, hd])?;
                let a = if rot { llama::rotate_half(&a, &cos, &sin)? } else { a };
                Ok(a.transpose_axes(&[1, 0, 2])?.reshape(&[1, nh, n, hd])?)
            };
            let (q, kk, v) = (heads(&parts[0], true)?, heads(&parts[1], true)?, heads(&parts[2], false)?);
            let mut outs = Vec::with_capacity(segments.len());
            let mut at = 0;
            for &len in segments {
                let r = at..at + len as i32;
                let seg = |a: &Array| a.try_index((.., .., r.clone(), ..));
                outs.push(
                    fast::scaled_dot_product_attention(seg(&q)?, seg(&kk)?, seg(&v)?, scale, None, None)
                        .context("vision attention")?,
                );
                at += len as i32;
            }
            let a = ops::concatenate(&outs, 2)?.transpose_axes(&[0, 2, 1, 3])?.reshape(&[n, c.width])?;
            x = x.add(b.proj.forward(&a)?)?;
            x = x.add(b.mlp.forward(&b.norm2.forward(&x)?)?)?;
        }
        let merged = self.ln_q.forward(&x)?.reshape(&[n / unit, unit * c.width])?;
        let h = self.mlp0.forward(&merged)?;
        let gelu = h
            .multiply(
                ops::erf(h.multiply(Array::from_f32(std::f32::consts::FRAC_1_SQRT_2))?)?
                    .add(Array::from_f32(1.0))?,
            )?
            .divide(Array::from_f32(2.0))?;
        let mut out = self.mlp2.forward(&gelu)?;
        if let Some((order, _)) = &window {
            // Back to patch order: the inverse permutation of the window order.
            let mut inverse = vec![0i32; order.len()];
            for (i, &o) in order.iter().enumerate() {
                inverse[o as usize] = i as i32;
            }
            let inv = Array::from_slice(&inverse, &[inverse.len() as i32]);
            out = out.take_axis(&inv, 0)?;
            x = x.reshape(&[n / unit, unit, c.width])?.take_axis(&inv, 0)?.reshape(&[n, c.width])?;
        }
        Ok((x, out))
    }
}

/// A loaded Qwen2-VL / Qwen2.5-VL vision side: processor, tower, merger, the prompt's tokens.
pub(super) struct QwenVl {
    pub processor: Processor,
    tower: Tower,
    /// The id of `<|image_pad|>`, the token each merged feature replaces.
    pub image_token_id: u32,
}

/// The token the chat template writes once per image, expanded to its features' count.
pub(super) const IMAGE_TOKEN: &str = "<|image_pad|>";

/// The text model's configuration, read as mlx-vlm reads it: the top-level keys of
/// `config.json` (mlx-vlm's `ModelConfig.from_dict` copies them over `text_config`), a Qwen2
/// decoder with head size `hidden_size / num_attention_heads`, RoPE base `rope_theta` (1e6 when
/// absent), M-RoPE sections from `rope_scaling.mrope_section` (else transformers 5's
/// `rope_parameters.mrope_section`, which mlx-vlm does not read; [24, 20, 20] when absent), no
/// sliding window, and `lm_head` unless `tie_word_embeddings`. A config without top-level
/// `hidden_size` (transformers 5 writes the text model only in `text_config`, which mlx-vlm
/// 0.7.10 cannot load) is read from `text_config` instead.
pub(super) fn text_config(config: &serde_json::Value) -> Res<llama::LlamaConfig> {
    let mut tc = match (config.get("hidden_size"), config.get("text_config")) {
        (None, Some(t)) => t.clone(),
        _ => config.clone(),
    };
    let obj = tc.as_object_mut().context("config.json (the text model's keys) is not an object")?;
    let section = |k: &str| obj.get(k).and_then(|r| r.get("mrope_section"));
    let sections = match section("rope_scaling").or_else(|| section("rope_parameters")) {
        None => [24, 20, 20],
        Some(s) => {
            let v: Vec<usize> = s
                .as_array()
                .and_then(|a| a.iter().map(|x| x.as_u64().map(|v| v as usize)).collect())
                .context("config.json: rope_scaling.mrope_section is not a list of integers")?;
            <[usize; 3]>::try_from(v.as_slice()).map_err(|_| {
                anyhow!("config.json: rope_scaling.mrope_section has {} entries, M-RoPE needs 3", v.len())
            })?
        }
    };
    obj.insert("model_type".into(), "qwen2".into());
    for k in ["head_dim", "rope_scaling", "rope_parameters", "use_sliding_window", "layer_types"] {
        obj.remove(k);
    }
    if !obj.contains_key("rope_theta") {
        obj.insert("rope_theta".into(), 1_000_000.0.into());
    }
    let mut cfg = llama::LlamaConfig::from_hf(&tc).context("config.json (the text model's keys)")?;
    if sections.iter().sum::<usize>() * 2 > cfg.head_dim as usize {
        return Err(anyhow!(
            "config.json: rope_scaling.mrope_section {sections:?} rotates more than the head size {} holds",
            cfg.head_dim
        ));
    }
    cfg.mrope = Some(sections);
    Ok(cfg)
}

/// Maps the tensor names of a Qwen2-VL / Qwen2.5-VL checkpoint, mlx-vlm's or Hugging Face's,
/// onto the ones this module and [`llama::Llama`] read: `vision_tower.*` for the vision side,
/// `model.*` and `lm_head.*` for the text model.
pub(super) fn rename(tensors: HashMap<String, Array>) -> HashMap<String, Array> {
    tensors
        .into_iter()
        .map(|(k, v)| {
            let k = match k.strip_prefix("model.") {
                Some(r) if r.starts_with("visual.") || r.starts_with("language_model.") => r.to_string(),
                _ => k,
            };
            let k = if let Some(r) = k.strip_prefix("visual.") {
                format!("vision_tower.{r}")
            } else if let Some(r) = k.strip_prefix("language_model.") {
                match r.strip_prefix("model.") {
                    Some(rest) => format!("model.{rest}"),
                    None if r.starts_with("lm_head.") => r.to_string(),
                    None => format!("model.{r}"),
                }
            } else {
                k
            };
            (k, v)
        })
        .collect()
}

impl QwenVl {
    /// Loads the vision tower and merger from `src` (already renamed by [`rename`]), with
    /// `config` the checkpoint's `config.json` and `dir` its directory (for
    /// `preprocessor_config.json`). Errors name the file or tensor at fault.
    pub fn load(
        dir: &Path,
        config: &serde_json::Value,
        src: &mut Source,
        format: WeightFormat,
    ) -> Res<QwenVl> {
        let mt = config.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
        let family =
            Family::of(mt).with_context(|| format!("config.json: model_type '{mt}' is not Qwen2-VL"))?;
        let pp = read_json_file(dir, "preprocessor_config.json")?.with_context(|| {
            format!("{}/preprocessor_config.json is missing (the image processor)", dir.display())
        })?;
        let processor = Processor::from_config(&pp)?;
        let vcfg = VisionConfig::from_json(
            family,
            config.get("vision_config").context("config.json: no vision_config")?,
        )?;
        if (processor.patch, processor.temporal, processor.merge)
            != (vcfg.patch as u32, vcfg.temporal as u32, vcfg.merge as u32)
        {
            return Err(anyhow!(
                "preprocessor_config.json: patch {} / temporal {} / merge {} differ from the vision config's {} / {} / {}",
                processor.patch,
                processor.temporal,
                processor.merge,
                vcfg.patch,
                vcfg.temporal,
                vcfg.merge
            ));
        }
        let image_token_id =
            config.get("image_token_id").and_then(|v| v.as_u64()).context("config.json: no image_token_id")?
                as u32;
        let tower = Tower::load(src, vcfg, family, format)?;
        Ok(QwenVl { processor, tower, image_token_id })
    }

    /// Every array the vision side holds.
    pub fn arrays(&self) -> Vec<&Array> {
        self.tower.arrays()
    }

    /// The width of the merged features (the text model's hidden size).
    pub fn out_features(&self) -> i32 {
        self.tower.cfg.out
    }

    /// Image tokens of one grid: `h * w / merge^2`.
    pub fn tokens(&self, g: &Grid) -> usize {
        g.h * g.w / (self.processor.merge * self.processor.merge) as usize
    }

    /// `prompt` (rendered by the chat template, one [`IMAGE_TOKEN`] per image) with each image
    /// token repeated as many times as its image has features. Errors when the counts differ.
    pub fn expand(&self, prompt: &str, grids: &[Grid]) -> Res<String> {
        let parts: Vec<&str> = prompt.split(IMAGE_TOKEN).collect();
        if parts.len() != grids.len() + 1 {
            return Err(anyhow!(
                "the prompt has {} {IMAGE_TOKEN} tokens for {} images (is {IMAGE_TOKEN} written in a text part?)",
                parts.len() - 1,
                grids.len()
            ));
        }
        let mut s = parts[0].to_string();
        for (g, rest) in grids.iter().zip(&parts[1..]) {
            s.push_str(&IMAGE_TOKEN.repeat(self.tokens(g)));
            s.push_str(rest);
        }
        Ok(s)
    }

    /// The vision blocks' output (`[patches, width]`, patch order) and the merged features
    /// (`[image tokens, out]`) of every image, in order.
    pub fn encode(&self, grids: &[Grid]) -> Res<(Array, Array)> {
        self.tower.forward(grids)
    }

    /// mlx-vlm's `get_rope_index` for a prompt whose images (in order) are `grids`: text
    /// tokens advance all three axes together; an image's tokens sit at (0, row, column) of
    /// its merged grid, shifted past the text before it; the text after an image starts one
    /// past the largest position so far. Errors when the image tokens do not match the grids.
    pub fn positions(&self, ids: &[u32], grids: &[Grid]) -> Res<llama::MropePositions> {
        let m = self.processor.merge as usize;
        let mut axes: [Vec<i32>; 3] = Default::default();
        let mut next = 0i32;
        let mut st = 0usize;
        let push_text = |axes: &mut [Vec<i32>; 3], next: &mut i32, len: usize| {
            for a in axes.iter_mut() {
                a.extend(*next..*next + len as i32);
            }
            *next += len as i32;
        };
        for g in grids {
            let ed = ids[st..]
                .iter()
                .position(|&i| i == self.image_token_id)
                .map(|p| st + p)
                .context("fewer image tokens in the prompt than images")?;
            push_text(&mut axes, &mut next, ed - st);
            let (lh, lw) = (g.h / m, g.w / m);
            let n = lh * lw;
            if ids.len() < ed + n || ids[ed..ed + n].iter().any(|&i| i != self.image_token_id) {
                return Err(anyhow!("an image's {n} tokens are not together in the prompt"));
            }
            for y in 0..lh {
                for x in 0..lw {
                    axes[0].push(next);
                    axes[1].push(next + y as i32);
                    axes[2].push(next + x as i32);
                }
            }
            next += lh.max(lw) as i32;
            st = ed + n;
        }
        push_text(&mut axes, &mut next, ids.len() - st);
        Ok(llama::MropePositions { axes, delta: next - ids.len() as i32 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn smart_resize_follows_the_reference_arithmetic() {
        // Python: round(40 / 16) == 2 (half to even), round(56 / 16) == 4 (3.5 -> 4).
        assert_eq!(round_half_even(2.5), 2.0);
        assert_eq!(round_half_even(3.5), 4.0);
        assert_eq!(round_half_even(2.4), 2.0);
        // 1000x30 into 1024 pixels at factor 8: beta = sqrt(30000 / 1024).
        assert_eq!(smart_resize(30, 1000, 8, 256, 1024).unwrap(), (8, 184));
        assert_eq!(smart_resize(40, 50, 8, 256, 1024).unwrap(), (24, 32));
        assert!(smart_resize(1, 300, 8, 256, 1024).unwrap_err().to_string().contains("aspect ratio"));
    }

    #[test]
    fn malformed_settings_are_errors_naming_the_field() {
        let text = |rope: serde_json::Value| {
            let c = serde_json::json!({"model_type": "qwen2_vl", "hidden_size": 48, "num_attention_heads": 4,
                "num_hidden_layers": 2, "rope_scaling": rope});
            text_config(&c).map(|c| c.mrope).map_err(|e| format!("{e:#}"))
        };
        assert_eq!(
            text(serde_json::json!({"type": "mrope", "mrope_section": [1, 2, 3]})),
            Ok(Some([1, 2, 3]))
        );
        let params = serde_json::json!({"model_type": "qwen2_vl", "hidden_size": 48, "num_attention_heads": 4,
            "num_hidden_layers": 2, "rope_parameters": {"rope_type": "default", "mrope_section": [3, 2, 1]}});
        assert_eq!(text_config(&params).unwrap().mrope, Some([3, 2, 1]));
        assert!(text(serde_json::json!({"mrope_section": [2, 2]})).unwrap_err().contains("has 2 entries"));
        assert!(text(serde_json::json!({"mrope_section": [4, 4, 4]})).unwrap_err().contains("rotates more"));
        assert!(text(serde_json::json!({"mrope_section": "x"})).unwrap_err().contains("mrope_section"));
        let nested = serde_json::json!({"model_type": "qwen2_vl", "text_config": {"hidden_size": 40,
            "num_attention_heads": 5, "num_hidden_layers": 1, "rope_scaling": {"mrope_section": [2, 1, 1]}}});
        let c = text_config(&nested).unwrap();
        assert_eq!((c.hidden, c.head_dim, c.mrope), (40, 8, Some([2, 1, 1])));
        let pp = |v: serde_json::Value| Processor::from_config(&v).map_err(|e| format!("{e:#}"));
        assert!(
            pp(serde_json::json!({"min_pixels": 10, "max_pixels": 5})).unwrap_err().contains("min_pixels")
        );
        assert!(pp(serde_json::json!({"patch_size": 0})).unwrap_err().contains("patch_size"));
        assert!(pp(serde_json::json!({"image_std": [1, 0, 1]})).unwrap_err().contains("image_std"));
        let p = pp(serde_json::json!({"size": {"shortest_edge": 100, "longest_edge": 1000}})).unwrap();
        assert_eq!((p.patch, p.min_pixels, p.max_pixels), (14, 100, 1000));
        let v = |v: serde_json::Value| {
            VisionConfig::from_json(Family::Qwen25Vl, &v).map_err(|e| format!("{e:#}"))
        };
        assert!(v(serde_json::json!({"hidden_size": 30, "num_heads": 4})).unwrap_err().contains("head size"));
        assert!(v(serde_json::json!({"window_size": 8})).unwrap_err().contains("window_size"));
        assert!(
            v(serde_json::json!({"fullatt_block_indexes": "all"}))
                .unwrap_err()
                .contains("fullatt_block_indexes")
        );
    }

    #[test]
    fn hugging_face_names_map_onto_mlx_vlm_names() {
        let names = [
            ("visual.blocks.0.attn.qkv.weight", "vision_tower.blocks.0.attn.qkv.weight"),
            ("model.visual.merger.mlp.0.weight", "vision_tower.merger.mlp.0.weight"),
            ("vision_tower.patch_embed.proj.weight", "vision_tower.patch_embed.proj.weight"),
            ("model.layers.0.self_attn.q_proj.bias", "model.layers.0.self_attn.q_proj.bias"),
            ("model.language_model.layers.1.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"),
            ("language_model.model.embed_tokens.weight", "model.embed_tokens.weight"),
            ("language_model.lm_head.weight", "lm_head.weight"),
            ("lm_head.weight", "lm_head.weight"),
        ];
        let tensors = names.iter().map(|(k, _)| (k.to_string(), Array::from_f32(0.0))).collect();
        let mut got: Vec<String> = rename(tensors).into_keys().collect();
        got.sort();
        let mut want: Vec<String> = names.iter().map(|(_, v)| v.to_string()).collect();
        want.sort();
        want.dedup();
        assert_eq!(got, want);
    }

    #[test]
    fn the_catalogue_bound_holds_for_every_size() {
        let p = Processor {
            patch: 14,
            temporal: 2,
            merge: 2,
            min_pixels: 56 * 56,
            max_pixels: 28 * 28 * 256,
            rescale: None,
            normalize: None,
        };
        let config = serde_json::json!({"model_type": "qwen2_vl"});
        let dir = std::env::temp_dir().join(format!("modelpool-qwen-bound-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("preprocessor_config.json"),
            r#"{"patch_size": 14, "merge_size": 2, "min_pixels": 3136, "max_pixels": 200704}"#,
        )
        .unwrap();
        let bound = crate::catalog::image_tokens_of_dir(&dir, &config).unwrap() as u64;
        let mut worst = 0;
        for w in (1..4000).step_by(7) {
            for h in (1..4000).step_by(13) {
                if let Ok(n) = tokens_of(&p, w, h) {
                    worst = worst.max(n + 2);
                }
            }
        }
        assert!(worst <= bound, "{worst} tokens against a bound of {bound}");
        assert!(worst * 2 > bound, "the bound {bound} is loose against {worst}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The fixtures of `scripts/make-vlm-fixtures.py`: tiny random Qwen2-VL and Qwen2.5-VL
    /// checkpoints checked stage by stage against mlx-vlm 0.7.10 (tests/fixtures/vlm/qwen2_vl,
    /// tests/fixtures/vlm/qwen2_5_vl).
    mod against_mlx_vlm {
        use mlx_rs::{Array, Dtype};

        use super::super::*;
        use crate::backend::Prompt;
        use crate::backend::mlx::vision::fixtures::{
            case as load_case, cases as load_cases, host, max_diff, root,
        };
        use crate::backend::mlx::{sampling, vision, worker};

        fn ints(a: &Array) -> Vec<i32> {
            a.as_dtype(Dtype::Int32).unwrap().to_vec_exact::<i32>().unwrap()
        }

        /// Every stage of every case of one family's fixture; returns the largest difference
        /// per stage.
        fn check_family(family: &str) -> Vec<(&'static str, f32)> {
            let dir = root().join(family).join("model");
            let config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
            let (model, tok, wrapped) = vision::load_dir(&dir, &config, WeightFormat::F32).unwrap();
            let vision::Vision::Qwen(vision) = &wrapped else { panic!("{family} loads as Qwen") };
            let cases = load_cases(family);
            let mut worst: Vec<(&'static str, f32)> =
                ["pixel_values", "vision_embeddings", "merger_output", "inputs_embeds", "logits"]
                    .into_iter()
                    .map(|s| (s, 0.0))
                    .collect();
            let mut note = |stage: &str, d: f32, limit: f32, name: &str| {
                assert!(d <= limit, "{family} {name}: {stage} differ by {d}");
                let w = worst.iter_mut().find(|(s, _)| *s == stage).unwrap();
                w.1 = w.1.max(d);
            };
            let mut checked = 0;
            for case in cases["cases"].as_array().unwrap() {
                let name = case["name"].as_str().unwrap();
                let (r, images, msg) = load_case(family, case);
                assert_eq!(
                    tok.chat.render_parts(std::slice::from_ref(&msg), true).unwrap(),
                    case["prompt"].as_str().unwrap(),
                    "{family} {name}: rendered prompt"
                );

                // Preprocessing: the grids (t, h, w) and pixel values.
                let grids: Vec<Grid> =
                    images.iter().map(|i| vision.processor.preprocess(i).unwrap()).collect();
                let thw: Vec<Vec<u64>> = grids.iter().map(|g| vec![1, g.h as u64, g.w as u64]).collect();
                let want_thw: Vec<Vec<u64>> = case["grid_thw"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|g| g.as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).collect())
                    .collect();
                assert_eq!(thw, want_thw, "{family} {name}: grid_thw");
                if !images.is_empty() {
                    let got_thw: Vec<i32> = thw.iter().flatten().map(|&x| x as i32).collect();
                    assert_eq!(got_thw, ints(&r["image_grid_thw"]), "{family} {name}: image_grid_thw tensor");
                    let px: Vec<f32> = grids.iter().flat_map(|g| g.pixels.iter().copied()).collect();
                    let got = Array::from_slice(&px, &[px.len() as i32]);
                    note("pixel_values", max_diff("pixel_values", &got, &r["pixel_values"]), 1e-6, name);
                    let (vis, merged) = vision.encode(&grids).unwrap();
                    note(
                        "vision_embeddings",
                        max_diff("vision_embeddings", &vis, &r["vision_embeddings"]),
                        1e-4,
                        name,
                    );
                    note(
                        "merger_output",
                        max_diff("merger_output", &merged, &r["merger_output"]),
                        1e-4,
                        name,
                    );
                }

                // The whole prompt path the server runs: ids, merged embeddings, M-RoPE
                // positions, logits, greedy.
                let p = worker::prepare(&model, &tok, Some(&wrapped), &Prompt::Chat(vec![msg])).unwrap();
                let want_ids: Vec<u32> = ints(&r["input_ids"]).iter().map(|&v| v as u32).collect();
                assert_eq!(p.ids, want_ids, "{family} {name}: input ids");
                let n_img = p.ids.iter().filter(|&&i| i == vision.image_token_id).count() as u64;
                assert_eq!(n_img, case["n_image_tokens"].as_u64().unwrap(), "{family} {name}: image tokens");
                let t = p.ids.len();
                let want_pos = ints(&r["position_ids"]);
                match &p.positions {
                    Some(pos) => {
                        assert_eq!(r["position_ids"].shape(), [3, 1, t as i32], "{family} {name}");
                        let got: Vec<i32> = pos.axes.iter().flatten().copied().collect();
                        assert_eq!(got, want_pos, "{family} {name}: position ids");
                        let max = want_pos.iter().max().unwrap();
                        assert_eq!(pos.delta, max + 1 - t as i32, "{family} {name}: rope delta");
                    }
                    None => {
                        assert!(images.is_empty(), "{family} {name}: positions for images");
                        assert_eq!(
                            want_pos,
                            (0..t as i32).collect::<Vec<_>>(),
                            "{family} {name}: text positions"
                        );
                    }
                }
                let embeds = p.embeds.clone().unwrap_or_else(|| model.embed(&p.ids).unwrap());
                note("inputs_embeds", max_diff("inputs_embeds", &embeds, &r["inputs_embeds"]), 1e-4, name);
                let mut cache = llama::KvCache::new(model.cfg.n_layers);
                let mut logits =
                    worker::prefill_embeds(&model, &embeds, p.positions.as_ref(), &mut cache).unwrap();
                note("logits", max_diff("logits", &logits, &r["logits"]), 1e-4, name);
                let want_greedy: Vec<u32> = ints(&r["greedy_ids"]).iter().map(|&v| v as u32).collect();
                let margins = host(&r["top2_margin"]);
                assert_eq!(want_greedy.len(), 8, "{family} {name}");
                for (step, (&want, &margin)) in want_greedy.iter().zip(&margins).enumerate() {
                    if margin < 1e-3 {
                        break; // ambiguous argmax: later steps may legitimately differ
                    }
                    let id = sampling::argmax(&host(&logits));
                    assert_eq!(id, want, "{family} {name}: greedy step {step}");
                    logits = model.forward(&[id], &mut cache).unwrap();
                }
                checked += 1;
            }
            assert_eq!(checked, 9, "{family}");
            worst
        }

        /// A temporary directory holding every file of `src` but its safetensors.
        fn copy_but_weights(src: &std::path::Path, tag: &str) -> std::path::PathBuf {
            let dir = std::env::temp_dir().join(format!("modelpool-{tag}-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            for e in std::fs::read_dir(src).unwrap() {
                let p = e.unwrap().path();
                if p.extension().is_none_or(|x| x != "safetensors") {
                    std::fs::copy(&p, dir.join(p.file_name().unwrap())).unwrap();
                }
            }
            dir
        }

        /// The fixture's checkpoint rewritten in Hugging Face's layout (transformers 4 names for
        /// Qwen2-VL, transformers 5 names for Qwen2.5-VL; patch kernel `[out, in, t, kh, kw]`)
        /// gives mlx-vlm's logits and merger output too.
        #[test]
        fn hugging_face_layout_gives_the_same_model() {
            for (family, vis, text) in
                [("qwen2_vl", "visual.", "model."), ("qwen2_5_vl", "model.visual.", "model.language_model.")]
            {
                let src = root().join(family).join("model");
                let dir = copy_but_weights(&src, &format!("hf-{family}"));
                let tensors = Array::load_safetensors(src.join("model.safetensors")).unwrap();
                let hf: Vec<(String, Array)> = tensors
                    .into_iter()
                    .map(|(k, v)| {
                        let v = if k.ends_with("patch_embed.proj.weight") {
                            v.transpose_axes(&[0, 4, 1, 2, 3]).unwrap()
                        } else {
                            v
                        };
                        let k = if let Some(r) = k.strip_prefix("vision_tower.") {
                            format!("{vis}{r}")
                        } else if let Some(r) = k.strip_prefix("language_model.model.") {
                            format!("{text}{r}")
                        } else {
                            k.strip_prefix("language_model.").unwrap_or(&k).to_string()
                        };
                        (k, v)
                    })
                    .collect();
                Array::save_safetensors(hf, None, dir.join("model.safetensors")).unwrap();
                let config: serde_json::Value =
                    serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
                let (model, tok, wrapped) = vision::load_dir(&dir, &config, WeightFormat::F32).unwrap();
                let vision::Vision::Qwen(vision) = &wrapped else { panic!("{family} loads as Qwen") };
                let cases = load_cases(family);
                let case =
                    cases["cases"].as_array().unwrap().iter().find(|c| c["name"] == "two_images").unwrap();
                let (r, images, msg) = load_case(family, case);
                let grids: Vec<Grid> =
                    images.iter().map(|i| vision.processor.preprocess(i).unwrap()).collect();
                let (_, merged) = vision.encode(&grids).unwrap();
                let d = max_diff("merger_output", &merged, &r["merger_output"]);
                assert!(d <= 1e-4, "{family}: merger output differs by {d}");
                let p = worker::prepare(&model, &tok, Some(&wrapped), &Prompt::Chat(vec![msg])).unwrap();
                let mut cache = llama::KvCache::new(model.cfg.n_layers);
                let logits = worker::prefill_embeds(
                    &model,
                    p.embeds.as_ref().unwrap(),
                    p.positions.as_ref(),
                    &mut cache,
                )
                .unwrap();
                let d = max_diff("logits", &logits, &r["logits"]);
                assert!(d <= 1e-4, "{family}: logits differ by {d}");
                std::fs::remove_dir_all(&dir).unwrap();
            }
        }

        /// The Qwen2-VL checkpoint with its merger's linear layers MLX-quantized (8 bits, groups
        /// of 32: the only layers whose inputs, 160, are a multiple of a group) loads with the
        /// weights kept packed and dequantized; both give the same merger output, close to
        /// mlx-vlm's float one.
        #[test]
        fn a_quantized_merger_loads_packed_and_dequantized() {
            let src = root().join("qwen2_vl/model");
            let dir = copy_but_weights(&src, "q8-qwen2_vl");
            let mut tensors = Array::load_safetensors(src.join("model.safetensors")).unwrap();
            for m in ["vision_tower.merger.mlp.0", "vision_tower.merger.mlp.2"] {
                let w = tensors.remove(&format!("{m}.weight")).unwrap();
                let (q, scales, biases) = ops::quantize(&w, 32, 8).unwrap();
                tensors.insert(format!("{m}.weight"), q);
                tensors.insert(format!("{m}.scales"), scales);
                tensors.insert(format!("{m}.biases"), biases);
            }
            Array::save_safetensors(tensors, None, dir.join("model.safetensors")).unwrap();
            let mut config: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
            config["quantization"] = serde_json::json!({"group_size": 32, "bits": 8});
            std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
            let cases = load_cases("qwen2_vl");
            let case = cases["cases"].as_array().unwrap().iter().find(|c| c["name"] == "two_images").unwrap();
            let (r, images, _) = load_case("qwen2_vl", case);
            let mut outs = Vec::new();
            for format in [WeightFormat::Quantized, WeightFormat::F32] {
                let (_, _, wrapped) = vision::load_dir(&dir, &config, format).unwrap();
                let vision::Vision::Qwen(vision) = &wrapped else { panic!("loads as Qwen") };
                let grids: Vec<Grid> =
                    images.iter().map(|i| vision.processor.preprocess(i).unwrap()).collect();
                outs.push(vision.encode(&grids).unwrap().1);
            }
            let d = max_diff("packed against dequantized", &outs[0], &outs[1]);
            assert!(d <= 1e-4, "packed and dequantized mergers differ by {d}");
            let d = max_diff("8-bit against float", &outs[0], &r["merger_output"]);
            assert!(d > 0.0 && d <= 0.05, "the 8-bit merger differs from mlx-vlm's float one by {d}");
            std::fs::remove_dir_all(&dir).unwrap();
        }

        #[test]
        fn every_qwen2_vl_stage_matches_mlx_vlm_for_every_image_size() {
            let worst = check_family("qwen2_vl");
            eprintln!("qwen2_vl max abs differences: {worst:?}");
        }

        #[test]
        fn every_qwen2_5_vl_stage_matches_mlx_vlm_for_every_image_size() {
            let worst = check_family("qwen2_5_vl");
            eprintln!("qwen2_5_vl max abs differences: {worst:?}");
        }
    }
}
