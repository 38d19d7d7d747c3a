//! The vision side of a vision-language directory, one type for the families served:
//! Idefics3 / SmolVLM ([`idefics3`]) and Qwen2-VL / Qwen2.5-VL ([`qwen2_vl`]). It loads the
//! directory (decoder, tokenizer, vision tower), expands a chat prompt's image tokens, and
//! gives the prompt's input embeddings with the image features merged in (and, for Qwen, the
//! M-RoPE positions).

use std::path::Path;

use anyhow::{Context, anyhow};
use mlx_rs::{Array, Dtype, ops};

use super::idefics3::{self, Idefics3};
use super::qwen2_vl::{self, QwenVl};
use super::{Res, llama, text};
use crate::backend::Image;

/// A loaded vision side.
pub(super) enum Vision {
    Idefics3(Box<Idefics3>),
    Qwen(Box<QwenVl>),
}

/// A chat's images, preprocessed for their family, waiting for the vision tower.
pub(super) enum Pending {
    Tiles(Vec<idefics3::Tiles>),
    Grids(Vec<qwen2_vl::Grid>),
}

impl Pending {
    fn is_empty(&self) -> bool {
        match self {
            Pending::Tiles(t) => t.is_empty(),
            Pending::Grids(g) => g.is_empty(),
        }
    }
}

/// The families a `vision` directory may be, for error messages.
const SERVED: &str = "idefics3 (SmolVLM, Idefics3), qwen2_vl (Qwen2-VL), qwen2_5_vl (Qwen2.5-VL)";

/// Loads a vision-language directory: its decoder, tokenizer and vision side, checked against
/// each other (the features' width is the decoder's). Errors name the directory and what is
/// wrong; a `model_type` of another family names the served ones.
pub(super) fn load_dir(
    dir: &Path,
    config: &serde_json::Value,
    format: llama::WeightFormat,
) -> Res<(llama::Llama, text::TextTokenizer, Vision)> {
    let at = || dir.display().to_string();
    let mt = config.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let qwen = qwen2_vl::Family::of(mt).is_some();
    let cfg = match mt {
        "idefics3" => idefics3::text_config(config),
        _ if qwen => qwen2_vl::text_config(config),
        _ => Err(anyhow!("config.json: vision-language model_type '{mt}' is not served (served: {SERVED})")),
    }
    .with_context(at)?;
    let tok = text::TextTokenizer::from_hf_vlm_dir(dir, config).with_context(at)?;
    let mut src = llama::Source::hf(dir, config)?;
    if let llama::Source::Hf { tensors, .. } = &mut src {
        let t = std::mem::take(tensors);
        *tensors = if qwen { qwen2_vl::rename(t) } else { idefics3::rename_hf_vlm(t) };
    }
    let vision = if qwen {
        Vision::Qwen(Box::new(QwenVl::load(dir, config, &mut src, format).with_context(at)?))
    } else {
        Vision::Idefics3(Box::new(Idefics3::load(dir, config, &mut src, format).with_context(at)?))
    };
    let model = llama::Llama::load(&mut src, cfg, format).with_context(at)?;
    if vision.out_features() != model.cfg.hidden {
        return Err(anyhow!(
            "{}: the vision side gives {} features, the text model takes {}",
            at(),
            vision.out_features(),
            model.cfg.hidden
        ));
    }
    Ok((model, tok, vision))
}

impl Vision {
    /// Every array the vision side holds.
    pub fn arrays(&self) -> Vec<&Array> {
        match self {
            Vision::Idefics3(v) => v.arrays(),
            Vision::Qwen(v) => v.arrays(),
        }
    }

    /// The width of the image features (the text model's hidden size).
    pub fn out_features(&self) -> i32 {
        match self {
            Vision::Idefics3(v) => v.out_features(),
            Vision::Qwen(v) => v.out_features(),
        }
    }

    /// Preprocesses `images` (in the prompt's order) and expands their image tokens in
    /// `rendered` (the chat template's output, one image token per image). Errors on an image
    /// the processor refuses or when the counts differ.
    pub fn prompt(&self, rendered: &str, images: &[&Image]) -> Res<(String, Pending)> {
        match self {
            Vision::Idefics3(v) => {
                let tiles: Vec<idefics3::Tiles> = images.iter().map(|i| v.processor.preprocess(i)).collect();
                Ok((v.expand(rendered, &tiles)?, Pending::Tiles(tiles)))
            }
            Vision::Qwen(v) => {
                let grids = images.iter().map(|i| v.processor.preprocess(i)).collect::<Res<Vec<_>>>()?;
                Ok((v.expand(rendered, &grids)?, Pending::Grids(grids)))
            }
        }
    }

    /// The input embeddings of `ids` (`[ids.len(), hidden]`, not evaluated) with the features
    /// of `pending` in place of the image tokens, and the M-RoPE positions of a Qwen prompt;
    /// `None` embeddings when there are no images.
    pub fn embed(
        &self,
        model: &llama::Llama,
        ids: &[u32],
        pending: &Pending,
    ) -> Res<(Option<Array>, Option<llama::MropePositions>)> {
        if pending.is_empty() {
            return Ok((None, None));
        }
        let text = model.embed(ids)?;
        match (self, pending) {
            (Vision::Idefics3(v), Pending::Tiles(t)) => {
                Ok((Some(merge(&text, ids, v.image_token_id, &v.features(t)?)?), None))
            }
            (Vision::Qwen(v), Pending::Grids(g)) => {
                let positions = v.positions(ids, g)?;
                let (_, features) = v.encode(g)?;
                Ok((Some(merge(&text, ids, v.image_token_id, &features)?), Some(positions)))
            }
            _ => Err(anyhow!("images preprocessed for another family")),
        }
    }
}

/// `text` (`[t, hidden]`, the prompt's token embeddings) with the rows at the image token's
/// positions in `ids` replaced, in order, by the rows of `features`. Errors when the counts
/// differ.
pub(super) fn merge(text: &Array, ids: &[u32], image_token: u32, features: &Array) -> Res<Array> {
    let t = ids.len() as i32;
    let n_img = ids.iter().filter(|&&i| i == image_token).count() as i32;
    if features.shape()[0] != n_img {
        return Err(anyhow!(
            "image features and image tokens do not match: {} features, {n_img} tokens",
            features.shape()[0]
        ));
    }
    let mut k = 0;
    let idx: Vec<i32> = ids
        .iter()
        .enumerate()
        .map(|(i, &id)| {
            if id == image_token {
                k += 1;
                t + k - 1
            } else {
                i as i32
            }
        })
        .collect();
    let all = ops::concatenate(&[text.as_dtype(Dtype::Float32)?, features.as_dtype(Dtype::Float32)?], 0)?;
    Ok(all.take_axis(Array::from_slice(&idx, &[t]), 0)?)
}

/// Shared by the families' stage-by-stage tests: the fixtures of
/// `scripts/make-vlm-fixtures.py` (tests/fixtures/vlm).
#[cfg(test)]
pub(super) mod fixtures {
    use std::collections::HashMap;
    use std::path::PathBuf;

    use mlx_rs::{Array, Dtype};

    use crate::backend::{ChatMessage, ContentPiece, Image};

    pub fn root() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm")
    }

    fn png(name: &str) -> Image {
        let img = image::open(root().join("images").join(name)).unwrap().to_rgb8();
        Image::new(img.width(), img.height(), img.into_raw()).unwrap()
    }

    pub fn host(a: &Array) -> Vec<f32> {
        a.as_dtype(Dtype::Float32).unwrap().to_vec_exact::<f32>().unwrap()
    }

    /// Largest absolute difference, after checking the element counts agree.
    pub fn max_diff(what: &str, got: &Array, want: &Array) -> f32 {
        let (g, w) = (host(got), host(want));
        assert_eq!(g.len(), w.len(), "{what}: {:?} against {:?}", got.shape(), want.shape());
        g.iter().zip(&w).map(|(a, b)| (a - b).abs()).fold(0.0, f32::max)
    }

    /// `family`'s `cases.json`.
    pub fn cases(family: &str) -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(root().join(family).join("cases.json")).unwrap())
            .unwrap()
    }

    /// One case of `family`: its reference tensors, its images, and its user message as the
    /// server builds it (the client's order: images first, then the question, as the
    /// fixture's messages).
    pub fn case(family: &str, case: &serde_json::Value) -> (HashMap<String, Array>, Vec<Image>, ChatMessage) {
        let r = Array::load_safetensors(root().join(family).join(case["ref"].as_str().unwrap())).unwrap();
        let images: Vec<Image> =
            case["images"].as_array().unwrap().iter().map(|f| png(f.as_str().unwrap())).collect();
        let mut pieces: Vec<ContentPiece> = images.iter().cloned().map(ContentPiece::Image).collect();
        let question =
            case["messages"][0]["content"].as_array().unwrap().last().unwrap()["text"].as_str().unwrap();
        pieces.push(ContentPiece::Text(question.into()));
        let msg = ChatMessage {
            pieces: if images.is_empty() { Vec::new() } else { pieces },
            ..ChatMessage::text("user", question)
        };
        (r, images, msg)
    }
}
