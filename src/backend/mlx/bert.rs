//! A BERT sentence-embedding model (sentence-transformers layout, e.g. all-MiniLM-L6-v2):
//! BERT encoder -> mean pooling over the attention mask -> L2 normalisation.
//!
//! Loaded from a Hugging Face directory: `config.json`, `model.safetensors` (tensor names with or
//! without a `bert.` prefix), `tokenizer.json`. The shipped tokenizer pads every input to 128
//! and truncates at 128; we turn padding off (batches are padded here, and padding is masked)
//! and truncate at `max_seq_length` from `sentence_bert_config.json` (256 for MiniLM), as
//! sentence-transformers does.

use std::collections::HashMap;
use std::path::Path;

use mlx_rs::fast;
use mlx_rs::ops::{self};
use mlx_rs::{Array, Dtype};
use tokenizers::{Tokenizer, TruncationParams};

use anyhow::{Context, anyhow};

use super::Res;

#[derive(Debug, Clone, PartialEq)]
struct BertConfig {
    hidden: i32,
    layers: usize,
    heads: i32,
    max_positions: usize,
    eps: f32,
}

struct Linear {
    w: Array,
    b: Array,
}

impl Linear {
    fn forward(&self, x: &Array) -> Res<Array> {
        ops::addmm(&self.b, x, self.w.t(), 1.0, 1.0).context("linear")
    }
}

struct Norm {
    w: Array,
    b: Array,
}

struct Layer {
    qkv: Linear,
    attn_out: Linear,
    attn_norm: Norm,
    inter: Linear,
    out: Linear,
    out_norm: Norm,
}

/// The loaded encoder and its tokenizer.
pub(super) struct Bert {
    cfg: BertConfig,
    word: Array,
    position: Array,
    token_type0: Array,
    emb_norm: Norm,
    layers: Vec<Layer>,
    pub tokenizer: Tokenizer,
}

/// Inputs per forward pass; larger requests are split into batches of this size.
pub(super) const MAX_BATCH: usize = 32;

fn read_json(path: &Path) -> Res<serde_json::Value> {
    let text = std::fs::read_to_string(path).with_context(|| path.display().to_string())?;
    serde_json::from_str(&text).with_context(|| path.display().to_string())
}

impl Bert {
    pub fn load(dir: &Path) -> Res<Bert> {
        let config = read_json(&dir.join("config.json"))?;
        let int = |k: &str| -> Res<i64> {
            config
                .get(k)
                .and_then(|v| v.as_i64())
                .with_context(|| format!("config.json has no integer '{k}'"))
        };
        if let Some(act) = config.get("hidden_act").and_then(|v| v.as_str())
            && act != "gelu"
        {
            return Err(anyhow!("unsupported hidden_act '{act}' (gelu only)"));
        }
        let cfg = BertConfig {
            hidden: int("hidden_size")? as i32,
            layers: int("num_hidden_layers")? as usize,
            heads: int("num_attention_heads")? as i32,
            max_positions: int("max_position_embeddings")? as usize,
            eps: config.get("layer_norm_eps").and_then(|v| v.as_f64()).unwrap_or(1e-12) as f32,
        };
        if cfg.heads <= 0 || cfg.hidden % cfg.heads != 0 {
            return Err(anyhow!("hidden_size is not a multiple of num_attention_heads"));
        }
        let st = dir.join("model.safetensors");
        if !st.is_file() {
            return Err(anyhow!("{} not found", st.display()));
        }
        let mut t: HashMap<String, Array> = Array::load_safetensors(&st).context("model.safetensors")?;
        let mut names = NameTaker { map: &mut t };
        let word = names.take("embeddings.word_embeddings.weight")?;
        let position = names.take("embeddings.position_embeddings.weight")?;
        let token_type = names.take("embeddings.token_type_embeddings.weight")?;
        let emb_norm = names.norm("embeddings.LayerNorm")?;
        let mut layers = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("encoder.layer.{i}");
            let q = names.linear(&format!("{p}.attention.self.query"))?;
            let k = names.linear(&format!("{p}.attention.self.key"))?;
            let v = names.linear(&format!("{p}.attention.self.value"))?;
            let qkv = Linear {
                w: ops::concatenate(&[q.w, k.w, v.w], 0).context("fuse qkv")?,
                b: ops::concatenate(&[q.b, k.b, v.b], 0).context("fuse qkv")?,
            };
            layers.push(Layer {
                qkv,
                attn_out: names.linear(&format!("{p}.attention.output.dense"))?,
                attn_norm: names.norm(&format!("{p}.attention.output.LayerNorm"))?,
                inter: names.linear(&format!("{p}.intermediate.dense"))?,
                out: names.linear(&format!("{p}.output.dense"))?,
                out_norm: names.norm(&format!("{p}.output.LayerNorm"))?,
            });
        }
        // Whatever is left (the pooler) is not used by sentence-transformers' mean pooling.
        drop(t);
        let token_type0 = token_type.take_axis(Array::from_int(0), 0).context("token type 0")?;

        let mut tokenizer = Tokenizer::from_file(dir.join("tokenizer.json"))
            .map_err(anyhow::Error::from_boxed)
            .context("tokenizer.json")?;
        let max_len = std::fs::read_to_string(dir.join("sentence_bert_config.json"))
            .ok()
            .and_then(|s| serde_json::from_str::<serde_json::Value>(&s).ok())
            .and_then(|v| v.get("max_seq_length").and_then(|m| m.as_u64()))
            .map_or(cfg.max_positions, |m| m as usize)
            .min(cfg.max_positions);
        tokenizer.with_padding(None);
        tokenizer
            .with_truncation(Some(TruncationParams { max_length: max_len, ..Default::default() }))
            .map_err(anyhow::Error::from_boxed)
            .context("truncation")?;

        let bert = Bert { cfg, word, position, token_type0, emb_norm, layers, tokenizer };
        super::llama::eval_all(bert.arrays())?;
        Ok(bert)
    }

    /// Every array the model holds.
    pub fn arrays(&self) -> Vec<&Array> {
        let mut v = vec![&self.word, &self.position, &self.token_type0, &self.emb_norm.w, &self.emb_norm.b];
        for l in &self.layers {
            for lin in [&l.qkv, &l.attn_out, &l.inter, &l.out] {
                v.push(&lin.w);
                v.push(&lin.b);
            }
            for n in [&l.attn_norm, &l.out_norm] {
                v.push(&n.w);
                v.push(&n.b);
            }
        }
        v
    }

    /// Embeds `texts`: unit-length vectors in input order, and each text's token count.
    pub fn embed(&self, texts: &[String]) -> Res<(Vec<Vec<f32>>, Vec<u32>)> {
        let encs = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(anyhow::Error::from_boxed)
            .context("tokenizing")?;
        let ids: Vec<Vec<u32>> = encs.iter().map(|e| e.get_ids().to_vec()).collect();
        let tokens = ids.iter().map(|i| i.len() as u32).collect();
        // Batch similar lengths together to waste little on padding.
        let mut order: Vec<usize> = (0..ids.len()).collect();
        order.sort_by_key(|&i| ids[i].len());
        let mut out = vec![Vec::new(); ids.len()];
        for chunk in order.chunks(MAX_BATCH) {
            let batch: Vec<&[u32]> = chunk.iter().map(|&i| ids[i].as_slice()).collect();
            let vecs = self.forward(&batch)?;
            for (&i, v) in chunk.iter().zip(vecs) {
                out[i] = v;
            }
        }
        Ok((out, tokens))
    }

    fn forward(&self, batch: &[&[u32]]) -> Res<Vec<Vec<f32>>> {
        let b = batch.len() as i32;
        let t = batch.iter().map(|s| s.len()).max().unwrap_or(0).max(1) as i32;
        let mut ids = vec![0i32; (b * t) as usize];
        let mut mask = vec![0f32; (b * t) as usize];
        for (r, s) in batch.iter().enumerate() {
            for (c, &id) in s.iter().enumerate() {
                ids[r * t as usize + c] = id as i32;
                mask[r * t as usize + c] = 1.0;
            }
        }
        let ids = Array::from_slice(&ids, &[b, t]);
        let mask = Array::from_slice(&mask, &[b, t]);
        let cfg = &self.cfg;
        let (h, nh) = (cfg.hidden, cfg.heads);
        let hd = h / nh;

        let pos = self.position.try_slice_rows(t)?;
        let x = self
            .word
            .take_axis(&ids, 0)
            .context("embedding lookup")?
            .add(&pos)
            .context("add")?
            .add(&self.token_type0)
            .context("add")?;
        let mut x = layer_norm(&x, &self.emb_norm, cfg.eps)?;
        // Additive mask over keys: 0 where real, -inf-ish where padding. [b, 1, 1, t]
        let neg = mask
            .subtract(Array::from_f32(1.0))
            .context("mask")?
            .multiply(Array::from_f32(1e9))
            .context("mask")?
            .reshape(&[b, 1, 1, t])
            .context("mask")?;
        let scale = 1.0 / (hd as f32).sqrt();
        for l in &self.layers {
            let qkv = l.qkv.forward(&x)?;
            let split = |i: i32| -> Res<Array> {
                use mlx_rs::ops::indexing::TryIndexOp;
                qkv.try_index((.., .., i * h..(i + 1) * h))
                    .context("split qkv")?
                    .reshape(&[b, t, nh, hd])
                    .context("reshape")?
                    .transpose_axes(&[0, 2, 1, 3])
                    .context("transpose")
            };
            let (q, k, v) = (split(0)?, split(1)?, split(2)?);
            let a = fast::scaled_dot_product_attention(&q, &k, &v, scale, &neg, None)
                .context("attention")?
                .transpose_axes(&[0, 2, 1, 3])
                .context("transpose")?
                .reshape(&[b, t, h])
                .context("reshape")?;
            let a = l.attn_out.forward(&a)?.add(&x).context("residual")?;
            x = layer_norm(&a, &l.attn_norm, cfg.eps)?;
            let i = mlx_rs::nn::gelu(l.inter.forward(&x)?).context("gelu")?;
            let o = l.out.forward(&i)?.add(&x).context("residual")?;
            x = layer_norm(&o, &l.out_norm, cfg.eps)?;
        }
        // Mean over real tokens, then L2 normalise.
        let m = mask.reshape(&[b, t, 1]).context("mask")?;
        let summed = x.multiply(&m).context("pool")?.sum_axis(1, false).context("pool")?;
        let count =
            ops::maximum(m.sum_axis(1, false).context("pool")?, Array::from_f32(1e-9)).context("pool")?;
        let mean = summed.divide(&count).context("pool")?;
        let norm = ops::maximum(
            mean.square().context("norm")?.sum_axis(-1, true).context("norm")?.sqrt().context("norm")?,
            Array::from_f32(1e-12),
        )
        .context("norm")?;
        let unit = mean.divide(&norm).context("norm")?;
        let flat = unit.to_vec_exact::<f32>().context("reading embeddings")?;
        Ok(flat.chunks(h as usize).map(<[f32]>::to_vec).collect())
    }
}

fn layer_norm(x: &Array, n: &Norm, eps: f32) -> Res<Array> {
    fast::layer_norm(x, &n.w, &n.b, eps).context("layer_norm")
}

/// First `t` rows of a 2-D array.
trait SliceRows {
    fn try_slice_rows(&self, t: i32) -> Res<Array>;
}

impl SliceRows for Array {
    fn try_slice_rows(&self, t: i32) -> Res<Array> {
        use mlx_rs::ops::indexing::TryIndexOp;
        self.try_index(0..t).context("slice rows")
    }
}

struct NameTaker<'a> {
    map: &'a mut HashMap<String, Array>,
}

impl NameTaker<'_> {
    fn take(&mut self, name: &str) -> Res<Array> {
        self.map
            .remove(name)
            .or_else(|| self.map.remove(&format!("bert.{name}")))
            .with_context(|| format!("model.safetensors has no tensor {name}"))?
            .as_dtype(Dtype::Float32)
            .with_context(|| name.to_string())
    }

    fn linear(&mut self, p: &str) -> Res<Linear> {
        Ok(Linear { w: self.take(&format!("{p}.weight"))?, b: self.take(&format!("{p}.bias"))? })
    }

    fn norm(&mut self, p: &str) -> Res<Norm> {
        Ok(Norm { w: self.take(&format!("{p}.weight"))?, b: self.take(&format!("{p}.bias"))? })
    }
}
