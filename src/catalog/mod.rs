//! A model catalogue built from a models directory (what `scripts/fetch-models.sh` fills).
//!
//! Layout, one model per entry of the directory, sorted by name:
//! - `<id>.gguf`: a text-gen model in one GGUF file;
//! - `<id>/` holding exactly one `*.gguf`: a text-gen model (the spec's path is that file);
//! - `<id>/config.json` (+ `model.safetensors`, `tokenizer.json`): a Hugging Face directory.
//!   BERT-family configs (`model_type` `bert`, or a `Bert*` architecture) are `embeddings`
//!   models, configs with a `vision_config` are `vision` models, anything else `text-gen`.
//!
//! Entries that match none of these (other files, empty directories) are skipped with a log
//! line. This module reads only file names and `config.json`; it never loads weights and works
//! without the `mlx` feature.

use std::path::{Path, PathBuf};

use crate::estimate::{Estimate, EstimateSource, FileEstimator, SizeEstimator, weight_bytes_on_disk};
use crate::types::{ModelSpec, ModelType};

mod gguf;
mod safetensors;

use gguf::{GGML_Q4_0, GGML_Q4_1, GGML_Q8_0};
pub use gguf::{GgufTensorInfo, gguf_tensors, read_gguf_tensors};
pub(crate) use gguf::{is_gguf, single_gguf};
pub use safetensors::{
    MlxQuantization, QuantParams, SafetensorsTensor, mlx_dir_resident_bytes, read_config, safetensors_files,
    safetensors_header,
};

/// Why a models directory could not be scanned.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// The directory (or an entry in it) could not be read.
    #[error("cannot read models directory {path}: {source}")]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A model's `config.json` is not valid JSON.
    #[error("invalid {path}: {source}")]
    Config {
        /// The config file.
        path: PathBuf,
        /// The parse error.
        source: serde_json::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CatalogError + '_ {
    move |source| CatalogError::Io { path: path.to_path_buf(), source }
}

/// The model type a Hugging Face `config.json` describes.
pub fn model_type_of_config(config: &serde_json::Value) -> ModelType {
    let model_type = config.get("model_type").and_then(|v| v.as_str()).unwrap_or("");
    let bert_arch = config
        .get("architectures")
        .and_then(|v| v.as_array())
        .is_some_and(|a| a.iter().filter_map(|x| x.as_str()).any(|x| x.starts_with("Bert")));
    if model_type == "bert" || bert_arch {
        ModelType::Embeddings
    } else if config.get("vision_config").is_some() {
        ModelType::Vision
    } else {
        ModelType::TextGen
    }
}

/// The model type of a model directory: from its `config.json` (see [`model_type_of_config`]) and
/// layout, with hints from the id. A sentence-transformers layout (`modules.json`,
/// `sentence_bert_config.json`) or an encoder architecture (BERT, XLM-R, Nomic) means embeddings;
/// `vision_config` means vision; otherwise text-gen.
fn infer_dir_type(dir: &Path, id: &str, config: Option<&serde_json::Value>) -> ModelType {
    if let Some(c) = config {
        let t = model_type_of_config(c);
        if t != ModelType::TextGen {
            return t;
        }
        let arch = c.get("architectures").map(|a| a.to_string().to_ascii_lowercase()).unwrap_or_default();
        if ["xlmroberta", "nomicbert", "robertamodel"].iter().any(|k| arch.contains(k)) {
            return ModelType::Embeddings;
        }
    }
    let lower = id.to_ascii_lowercase();
    if dir.join("modules.json").exists()
        || dir.join("sentence_bert_config.json").exists()
        || ["embed", "sentence-transformers", "-e5-", "bge-", "minilm"].iter().any(|k| lower.contains(k))
    {
        return ModelType::Embeddings;
    }
    ModelType::TextGen
}

/// Type of a bare GGUF model (GGUF files here are decoders unless the name says embeddings).
fn gguf_type(id: &str) -> ModelType {
    if id.to_ascii_lowercase().contains("embed") { ModelType::Embeddings } else { ModelType::TextGen }
}

/// Deepest directory level searched below the models directory.
const SCAN_DEPTH: usize = 3;

/// The Hugging Face cache's repository folder name for a model id: `models--org--name` ->
/// `org/name` (`models--name` -> `name`); `None` for other names (datasets, spaces, anything
/// else).
pub fn hf_cache_model_id(folder: &str) -> Option<String> {
    let rest = folder.strip_prefix("models--")?;
    (!rest.is_empty()).then(|| rest.replacen("--", "/", 1))
}

/// The snapshot a Hugging Face cache repository folder serves, offline: the revision named in
/// `refs/main` when that snapshot exists; else the only snapshot; else the most recently
/// modified one. `None` when there is no snapshot. Files in a snapshot are usually symlinks
/// into `blobs/`, which every reader here follows.
pub fn hf_cache_snapshot(repo: &Path) -> Option<PathBuf> {
    let snapshots = repo.join("snapshots");
    if let Ok(rev) = std::fs::read_to_string(repo.join("refs").join("main")) {
        let snap = snapshots.join(rev.trim());
        if !rev.trim().is_empty() && snap.is_dir() {
            return Some(snap);
        }
    }
    let mut snaps: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&snapshots)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .map(|p| (std::fs::metadata(&p).and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH), p))
        .collect();
    snaps.sort();
    snaps.pop().map(|(_, p)| p)
}

fn sorted_entries(d: &Path) -> Result<Vec<PathBuf>, CatalogError> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(d)
        .map_err(io_err(d))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io_err(d))?;
    v.retain(|p| !p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with('.')));
    v.sort();
    Ok(v)
}

/// The model(s) directory `p` holds under the id `id`, if it is a model directory: a
/// Hugging Face / MLX layout (`config.json` or `*.safetensors`; type from the config), or a
/// directory of GGUF files and no subdirectory (one file: the model `id`; several, as in LM
/// Studio or a GGUF repository: `id/<file stem>` each). Empty when it is neither.
fn models_in_dir(p: &Path, id: &str) -> Result<Vec<ModelSpec>, CatalogError> {
    let entries = sorted_entries(p)?;
    let config = p.join("config.json");
    let has_safetensors = entries
        .iter()
        .any(|e| e.is_file() && e.extension().and_then(|x| x.to_str()).is_some_and(|x| x == "safetensors"));
    if config.is_file() || has_safetensors {
        let value = if config.is_file() {
            let text = std::fs::read_to_string(&config).map_err(io_err(&config))?;
            Some(
                serde_json::from_str::<serde_json::Value>(&text)
                    .map_err(|source| CatalogError::Config { path: config.clone(), source })?,
            )
        } else {
            None
        };
        let t = infer_dir_type(p, id, value.as_ref());
        let mut spec = ModelSpec::new(id).with_type(t).with_path(p);
        if t != ModelType::Embeddings {
            spec.kv_bytes_per_token = value.as_ref().and_then(kv_bytes_per_token_of_config);
        }
        if t == ModelType::Vision {
            spec.image_tokens = value.as_ref().and_then(|c| image_tokens_of_dir(p, c));
        }
        return Ok(vec![spec]);
    }
    let ggufs: Vec<&PathBuf> = entries.iter().filter(|e| is_gguf(e)).collect();
    if ggufs.is_empty() || entries.iter().any(|e| e.is_dir()) {
        return Ok(Vec::new());
    }
    if let [one] = ggufs.as_slice() {
        return Ok(vec![ModelSpec::new(id).with_type(gguf_type(id)).with_path(one)]);
    }
    Ok(ggufs
        .iter()
        .map(|g| {
            let stem = g.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
            let id = format!("{id}/{stem}");
            let t = gguf_type(&id);
            ModelSpec::new(id).with_type(t).with_path(g)
        })
        .collect())
}

/// KV cache bytes per token of context for a decoder's `config.json` as the MLX backend holds
/// it (f32 keys and values: `num_hidden_layers x num_key_value_heads x head_dim x 2 x 4`, with
/// the usual defaults: KV heads = attention heads, head dim = hidden size / heads; a
/// multimodal config's `text_config` is read when the top level has no layers). `None` when
/// the config lacks the fields.
pub fn kv_bytes_per_token_of_config(config: &serde_json::Value) -> Option<u64> {
    let c = match config.get("num_hidden_layers") {
        Some(_) => config,
        None => config.get("text_config")?,
    };
    let int = |k: &str| c.get(k).and_then(serde_json::Value::as_u64).filter(|&v| v > 0);
    let layers = int("num_hidden_layers")?;
    let heads = int("num_attention_heads")?;
    let kv_heads = int("num_key_value_heads").unwrap_or(heads);
    let head_dim = int("head_dim").or_else(|| Some(int("hidden_size")? / heads))?;
    layers.checked_mul(kv_heads)?.checked_mul(head_dim)?.checked_mul(2 * 4)
}

/// The most prompt tokens one image can become in a vision-language directory (`config` its
/// `config.json`), for the families the MLX backend serves. `None` for other families or when
/// the settings are missing or invalid.
///
/// Idefics3 / SmolVLM: with image splitting, `(ceil(size / tile))^2` tiles plus the global
/// view, else one; `image_seq_len` image tokens per tile (from the vision config: `(image_size
/// / patch_size / scale_factor)^2`) plus the markers around each tile (3) and the image (4). An
/// upper bound: the longest edge always reaches `size.longest_edge`, the other one at most.
///
/// Qwen2-VL / Qwen2.5-VL: `smart_resize` to multiples of `f = patch_size * merge_size` gives
/// at most `max_pixels / f^2` tokens, except where an edge is held at `f` (then the other is at
/// most `sqrt(200 * max_pixels)`, the aspect ratio being at most 200) or `min_pixels` rounds
/// up (at most `min / f^2 + 14.2 sqrt(min) / f + 1`); plus `<|vision_start|>` and
/// `<|vision_end|>`. Settings as mlx-vlm reads them (`min_pixels` / `max_pixels`, else
/// `size.shortest_edge` / `size.longest_edge`, else 56 * 56 and 14 * 14 * 4 * 1280).
pub fn image_tokens_of_dir(dir: &Path, config: &serde_json::Value) -> Option<u32> {
    let mt = config.get("model_type")?.as_str()?;
    if mt != "idefics3" && mt != "qwen2_vl" && mt != "qwen2_5_vl" {
        return None;
    }
    let pp: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("preprocessor_config.json")).ok()?).ok()?;
    if mt != "idefics3" {
        let int = |k: &str| pp.get(k).and_then(|v| v.as_u64());
        let size = |k: &str| pp.get("size").and_then(|s| s.get(k)?.as_u64());
        let min = int("min_pixels").or_else(|| size("shortest_edge")).unwrap_or(56 * 56) as f64;
        let max = int("max_pixels").or_else(|| size("longest_edge")).unwrap_or(14 * 14 * 4 * 1280) as f64;
        let f = (int("patch_size").unwrap_or(14) * int("merge_size").unwrap_or(2)) as f64;
        if f <= 0.0 {
            return None;
        }
        let tokens =
            (max / (f * f)).max((200.0 * max).sqrt() / f).max(min / (f * f) + 14.2 * min.sqrt() / f + 1.0);
        return u32::try_from(tokens.ceil() as u64 + 2).ok();
    }
    let edge =
        |k: &str, d: u64| pp.get(k).map_or(Some(d), |v| v.get("longest_edge")?.as_u64()).filter(|&e| e > 0);
    let (size, tile) = (edge("size", 4 * 364)?, edge("max_image_size", 364)?);
    let v = config.get("vision_config")?;
    let patch = v.get("patch_size")?.as_u64().filter(|&p| p > 0)?;
    let side = v.get("image_size").and_then(|x| x.as_u64()).unwrap_or(224) / patch;
    let scale = config.get("scale_factor").and_then(|x| x.as_u64()).unwrap_or(2).max(1);
    let seq = (side / scale).pow(2);
    let split = pp.get("do_image_splitting").and_then(|x| x.as_bool()).unwrap_or(true);
    let tiles = if split { size.div_ceil(tile).pow(2) + 1 } else { 1 };
    u32::try_from(tiles * (seq + 3) + 4).ok()
}

/// The longest sequence a decoder's `config.json` allows, as the MLX backend serves it:
/// `max_position_embeddings` (sliding-window layers attend to their window at any length, so a
/// window does not cap it); a multimodal config's `text_config` when the top level has none.
/// `None` without `max_position_embeddings`.
pub fn context_of_config(config: &serde_json::Value) -> Option<u32> {
    let c = match config.get("max_position_embeddings") {
        Some(_) => config,
        None => config.get("text_config")?,
    };
    let context = c.get("max_position_embeddings").and_then(serde_json::Value::as_u64).filter(|&v| v > 0)?;
    Some(u32::try_from(context).unwrap_or(u32::MAX))
}

/// Scans `dir` and returns one spec per model found, sorted by id. Ids are paths relative to
/// `dir` with `/` separators, so `org/name` layouts (LM Studio's `publisher/name` folders) keep
/// their `org/`.
/// - A Hugging Face cache repository folder `models--org--name` (as in
///   `~/.cache/huggingface/hub`) is the model `org/name`, served from the snapshot
///   [`hf_cache_snapshot`] picks (`refs/main`); `datasets--*` and `spaces--*` are skipped.
/// - A directory with `config.json` or `*.safetensors` is one model (a Hugging Face / MLX
///   layout; its subdirectories are not searched); its type comes from the config and layout.
/// - A directory of `.gguf` files and no subdirectory: with one file, one model named after the
///   directory whose path is the file (the layout `scripts/fetch-models.sh` writes); with
///   several, one model per file, `<dir>/<file stem>`.
/// - Any other `.gguf` file is one model named after its path without the extension.
/// - Other directories are searched, down to three levels; hidden entries are skipped.
///
/// Specs carry no size hint: the pool's estimator sizes them (for the MLX backend,
/// [`MlxFileEstimator`] from the headers) and a load replaces the estimate with measured
/// bytes. Errors when `dir` or a subdirectory cannot be read or a `config.json` is not JSON,
/// naming the path.
pub fn scan_models_dir(dir: &Path) -> Result<Vec<ModelSpec>, CatalogError> {
    fn walk(root: &Path, d: &Path, depth: usize, out: &mut Vec<ModelSpec>) -> Result<(), CatalogError> {
        let id_of = |p: &Path| p.strip_prefix(root).unwrap_or(p).to_string_lossy().replace('\\', "/");
        for p in sorted_entries(d)? {
            if is_gguf(&p) {
                let id = id_of(&p.with_extension(""));
                let t = gguf_type(&id);
                out.push(ModelSpec::new(id).with_type(t).with_path(&p));
                continue;
            }
            if !p.is_dir() {
                continue;
            }
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            if ["datasets--", "spaces--"].iter().any(|k| name.starts_with(k)) {
                continue;
            }
            if let Some(id) = hf_cache_model_id(&name) {
                if let Some(snap) = hf_cache_snapshot(&p) {
                    out.extend(models_in_dir(&snap, &id)?);
                }
                continue;
            }
            let found = models_in_dir(&p, &id_of(&p))?;
            if !found.is_empty() {
                out.extend(found);
            } else if depth < SCAN_DEPTH {
                walk(root, &p, depth + 1, out)?;
            }
        }
        Ok(())
    }
    let mut specs = Vec::new();
    walk(dir, dir, 1, &mut specs)?;
    specs.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(specs)
}

/// Bytes the MLX backend will hold for `spec` once loaded, computed from the files without
/// loading them, or `None` when the layout is not one it serves. For a GGUF decoder this reads
/// the tensor table from the file header: with `dequantize` every tensor is held as f32; without,
/// Q4_0/Q4_1 stay 4-bit and Q8_0 8-bit (group 32, f32 scales and biases) and the rest f32. For a
/// Hugging Face / MLX safetensors directory it is computed from the safetensors headers and the
/// config's quantization ([`mlx_dir_resident_bytes`]: floats as f32; quantized weights unpacked
/// to f32 with `dequantize`, else kept packed). Use it as the spec's size hint so that the pool
/// reserves the real size on the first load (a dequantized GGUF is about 5.5x its file).
pub fn mlx_resident_estimate(spec: &ModelSpec, dequantize: bool) -> Option<u64> {
    let path = spec.path.as_ref()?;
    let gguf = if is_gguf(path) {
        Some(path.clone())
    } else if path.is_dir() && !path.join("config.json").is_file() {
        single_gguf(path)
    } else {
        None
    };
    if let Some(g) = gguf {
        let tensors = gguf_tensors(&g).ok()?;
        return Some(
            tensors
                .iter()
                .map(|t| {
                    let bytes_per_1k = match (dequantize, t.ggml_type) {
                        (false, GGML_Q4_0 | GGML_Q4_1) => 750,
                        (false, GGML_Q8_0) => 1250,
                        _ => 4000,
                    };
                    t.elements * bytes_per_1k / 1000
                })
                .sum(),
        );
    }
    if path.is_dir() && path.join("config.json").is_file() {
        return mlx_dir_resident_bytes(path, dequantize).ok();
    }
    None
}

/// Sizes models as the MLX backend will hold them, from their files
/// ([`mlx_resident_estimate`]: a dequantized GGUF is about 5.5x its file); anything it cannot
/// read is sized by `FileEstimator::default()` (weight files x 1.25, else the name).
#[derive(Debug, Clone)]
pub struct MlxFileEstimator {
    /// Whether the backend dequantizes GGUF weights to f32 (its CPU default).
    pub dequantize: bool,
    fallback: FileEstimator,
}

impl MlxFileEstimator {
    /// An estimator for a backend that does (or does not) dequantize GGUF weights.
    pub fn new(dequantize: bool) -> Self {
        MlxFileEstimator { dequantize, fallback: FileEstimator::default() }
    }
}

impl SizeEstimator for MlxFileEstimator {
    fn estimate(&self, spec: &ModelSpec) -> Estimate {
        if spec.size_hint.is_none()
            && let Some(bytes) = mlx_resident_estimate(spec, self.dequantize)
            && bytes > 0
        {
            let on_disk = spec
                .path
                .as_deref()
                .and_then(|p| weight_bytes_on_disk(p).ok())
                .filter(|&b| b > 0)
                .unwrap_or(bytes);
            let factor = (bytes as f64 / on_disk as f64 * 1000.0).round() / 1000.0;
            return Estimate { bytes, source: EstimateSource::Files { bytes_on_disk: on_disk, factor } };
        }
        self.fallback.estimate(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory, removed when the returned guard drops.
    fn tmpdir() -> (tempfile::TempDir, PathBuf) {
        let t = tempfile::tempdir().unwrap();
        let p = t.path().to_path_buf();
        (t, p)
    }

    #[test]
    fn context_comes_from_the_config_whatever_its_sliding_window() {
        let ctx = |v: serde_json::Value| context_of_config(&v);
        assert_eq!(
            ctx(serde_json::json!({"model_type": "llama", "max_position_embeddings": 8192})),
            Some(8192)
        );
        let mistral = serde_json::json!({"model_type": "mistral", "max_position_embeddings": 32768, "sliding_window": 4096});
        assert_eq!(ctx(mistral), Some(32768), "sliding-window attention serves past the window");
        let qwen = serde_json::json!({"model_type": "qwen2", "max_position_embeddings": 32768, "sliding_window": 4096, "use_sliding_window": true});
        assert_eq!(ctx(qwen), Some(32768));
        let vlm =
            serde_json::json!({"model_type": "qwen2_vl", "text_config": {"max_position_embeddings": 4096}});
        assert_eq!(ctx(vlm), Some(4096));
        assert_eq!(ctx(serde_json::json!({"model_type": "llama"})), None);
    }

    #[test]
    fn scans_gguf_dirs_files_and_hf_configs() {
        let (_tmp, d) = tmpdir();
        std::fs::create_dir_all(d.join("smollm2-135m-instruct")).unwrap();
        std::fs::write(d.join("smollm2-135m-instruct/SmolLM2.Q4_1.gguf"), b"GGUF").unwrap();
        std::fs::create_dir_all(d.join("all-minilm-l6-v2")).unwrap();
        std::fs::write(
            d.join("all-minilm-l6-v2/config.json"),
            r#"{"architectures":["BertModel"],"model_type":"bert"}"#,
        )
        .unwrap();
        std::fs::create_dir_all(d.join("llava")).unwrap();
        std::fs::write(d.join("llava/config.json"), r#"{"model_type":"llava","vision_config":{}}"#).unwrap();
        std::fs::write(d.join("tiny.gguf"), b"GGUF").unwrap();
        std::fs::write(d.join("README.txt"), b"x").unwrap();
        std::fs::create_dir_all(d.join("empty")).unwrap();

        let specs = scan_models_dir(&d).unwrap();
        let got: Vec<(String, ModelType, PathBuf)> =
            specs.iter().map(|s| (s.id.to_string(), s.model_type, s.path.clone().unwrap())).collect();
        assert_eq!(
            got,
            vec![
                ("all-minilm-l6-v2".into(), ModelType::Embeddings, d.join("all-minilm-l6-v2")),
                ("llava".into(), ModelType::Vision, d.join("llava")),
                (
                    "smollm2-135m-instruct".into(),
                    ModelType::TextGen,
                    d.join("smollm2-135m-instruct/SmolLM2.Q4_1.gguf")
                ),
                ("tiny".into(), ModelType::TextGen, d.join("tiny.gguf")),
            ]
        );
        assert!(specs.iter().all(|s| s.size_hint.is_none()));
    }

    /// A hand-built GGUF v3 header: two metadata entries (a string and a string array), then
    /// a Q4_1 tensor and an F32 tensor.
    #[test]
    fn gguf_header_and_resident_estimates() {
        fn s(out: &mut Vec<u8>, v: &str) {
            out.extend((v.len() as u64).to_le_bytes());
            out.extend(v.as_bytes());
        }
        let mut b = b"GGUF".to_vec();
        b.extend(3u32.to_le_bytes());
        b.extend(2u64.to_le_bytes()); // tensors
        b.extend(2u64.to_le_bytes()); // kv
        s(&mut b, "general.architecture");
        b.extend(8u32.to_le_bytes());
        s(&mut b, "llama");
        s(&mut b, "tokenizer.ggml.tokens");
        b.extend(9u32.to_le_bytes());
        b.extend(8u32.to_le_bytes());
        b.extend(2u64.to_le_bytes());
        s(&mut b, "a");
        s(&mut b, "bc");
        for (name, dims, ty) in
            [("blk.0.attn_q.weight", [64u64, 32], 3u32), ("output_norm.weight", [64, 1], 0)]
        {
            s(&mut b, name);
            b.extend(2u32.to_le_bytes());
            for d in dims {
                b.extend(d.to_le_bytes());
            }
            b.extend(ty.to_le_bytes());
            b.extend(0u64.to_le_bytes());
        }
        let (_tmp, d) = tmpdir();
        let p = d.join("m.gguf");
        std::fs::write(&p, &b).unwrap();
        let t = gguf_tensors(&p).unwrap();
        assert_eq!(
            t,
            vec![
                GgufTensorInfo { name: "blk.0.attn_q.weight".into(), elements: 2048, ggml_type: 3 },
                GgufTensorInfo { name: "output_norm.weight".into(), elements: 64, ggml_type: 0 },
            ]
        );
        let spec = ModelSpec::new("m").with_path(&p);
        assert_eq!(mlx_resident_estimate(&spec, true), Some((2048 + 64) * 4));
        assert_eq!(mlx_resident_estimate(&spec, false), Some(2048 * 3 / 4 + 64 * 4));
        // The server's estimator for the MLX backend: tensor-table bytes, explained as files x factor.
        let e = MlxFileEstimator::new(true).estimate(&spec);
        let on_disk = b.len() as u64;
        assert_eq!(e.bytes, (2048 + 64) * 4);
        let factor = ((2048.0 + 64.0) * 4.0 / on_disk as f64 * 1000.0).round() / 1000.0;
        assert_eq!(e.source, EstimateSource::Files { bytes_on_disk: on_disk, factor });
        // A size hint wins; an unreadable layout falls back to the name.
        assert_eq!(MlxFileEstimator::new(true).estimate(&spec.clone().with_size(7)).bytes, 7);
        let nothing = ModelSpec::new("llama-3-8b").with_path(d.join("missing.gguf"));
        assert_eq!(MlxFileEstimator::new(true).estimate(&nothing).bytes, 5 * crate::types::GB);
        std::fs::write(&p, &b[..b.len() - 5]).unwrap();
        assert!(gguf_tensors(&p).is_err(), "truncated header");
        std::fs::write(&p, b"NOPE....").unwrap();
        assert!(gguf_tensors(&p).is_err());
    }

    /// A Hugging Face cache (blobs behind symlinks, `refs/main`, two revisions, a dataset to
    /// skip) and an LM Studio tree (`publisher/name` folders with an MLX directory and with
    /// several GGUF files), scanned together: ids as users write them, types from the configs,
    /// the snapshot `refs/main` names, size hints from the safetensors headers.
    #[test]
    fn hugging_face_cache_and_lm_studio_layouts() {
        use crate::catalog::safetensors::tests::write_st;
        let (_tmp, d) = tmpdir();
        let hub = d.join("hub");
        let repo = hub.join("models--mlx-community--Tiny-4bit");
        std::fs::create_dir_all(repo.join("blobs")).unwrap();
        std::fs::create_dir_all(repo.join("refs")).unwrap();
        // 4-bit [64, 128] linear (packed [64, 16] u32, scales/biases [64, 2] bf16) + bf16 norm.
        write_st(
            &repo.join("blobs/aaa"),
            &[
                ("l.weight", "U32", vec![64, 16], 4),
                ("l.scales", "BF16", vec![64, 2], 2),
                ("l.biases", "BF16", vec![64, 2], 2),
                ("norm.weight", "BF16", vec![128], 2),
            ],
        );
        std::fs::write(
            repo.join("blobs/ccc"),
            r#"{"model_type":"llama","quantization":{"group_size":64,"bits":4}}"#,
        )
        .unwrap();
        std::fs::write(repo.join("blobs/vvv"), r#"{"model_type":"llava","vision_config":{}}"#).unwrap();
        for (rev, config) in [("old111", "vvv"), ("new222", "ccc")] {
            let snap = repo.join("snapshots").join(rev);
            std::fs::create_dir_all(&snap).unwrap();
            std::os::unix::fs::symlink(format!("../../blobs/{config}"), snap.join("config.json")).unwrap();
            std::os::unix::fs::symlink("../../blobs/aaa", snap.join("model.safetensors")).unwrap();
        }
        std::fs::write(repo.join("refs/main"), "new222\n").unwrap();
        let emb = hub.join("models--sentence-transformers--all-MiniLM-L6-v2/snapshots/r1");
        std::fs::create_dir_all(&emb).unwrap();
        std::fs::write(emb.join("config.json"), r#"{"model_type":"bert"}"#).unwrap();
        std::fs::create_dir_all(hub.join("datasets--org--data/snapshots/r")).unwrap();
        std::fs::write(hub.join("datasets--org--data/snapshots/r/config.json"), "{}").unwrap();
        std::fs::create_dir_all(hub.join(".locks")).unwrap();

        let lms = d.join("lmstudio");
        std::fs::create_dir_all(lms.join("lmstudio-community/Qwen-GGUF")).unwrap();
        for q in ["Qwen-Q4_K_M.gguf", "Qwen-Q8_0.gguf"] {
            std::fs::write(lms.join("lmstudio-community/Qwen-GGUF").join(q), b"GGUF").unwrap();
        }
        std::fs::create_dir_all(lms.join("mlx-community/Phi-8bit")).unwrap();
        std::fs::write(lms.join("mlx-community/Phi-8bit/config.json"), r#"{"model_type":"phi3"}"#).unwrap();

        let got = |root: &Path| -> Vec<(String, ModelType, PathBuf)> {
            scan_models_dir(root)
                .unwrap()
                .into_iter()
                .map(|s| (s.id.to_string(), s.model_type, s.path.clone().unwrap()))
                .collect()
        };
        let snap = repo.join("snapshots/new222");
        assert_eq!(
            got(&hub),
            vec![
                ("mlx-community/Tiny-4bit".into(), ModelType::TextGen, snap.clone()),
                ("sentence-transformers/all-MiniLM-L6-v2".into(), ModelType::Embeddings, emb.clone()),
            ]
        );
        assert_eq!(
            got(&lms),
            vec![
                (
                    "lmstudio-community/Qwen-GGUF/Qwen-Q4_K_M".into(),
                    ModelType::TextGen,
                    lms.join("lmstudio-community/Qwen-GGUF/Qwen-Q4_K_M.gguf")
                ),
                (
                    "lmstudio-community/Qwen-GGUF/Qwen-Q8_0".into(),
                    ModelType::TextGen,
                    lms.join("lmstudio-community/Qwen-GGUF/Qwen-Q8_0.gguf")
                ),
                ("mlx-community/Phi-8bit".into(), ModelType::TextGen, lms.join("mlx-community/Phi-8bit")),
            ]
        );
        // The parent of hub/ finds the same cache models (ids keep no `hub/` prefix).
        assert!(got(&d).iter().any(|(id, _, p)| id == "mlx-community/Tiny-4bit" && *p == snap));
        // Without refs/main the newest snapshot is served.
        std::fs::remove_file(repo.join("refs/main")).unwrap();
        assert!(hf_cache_snapshot(&repo).is_some());
        std::fs::write(repo.join("refs/main"), "new222").unwrap();
        // Size hints from the headers behind the symlinks: f32 when dequantized, packed otherwise.
        let spec = ModelSpec::new("mlx-community/Tiny-4bit").with_path(&snap);
        assert_eq!(mlx_resident_estimate(&spec, true), Some(64 * 128 * 4 + 128 * 4));
        assert_eq!(mlx_resident_estimate(&spec, false), Some(64 * 16 * 4 + 2 * 64 * 2 * 4 + 128 * 4));
        assert_eq!(hf_cache_model_id("models--gpt2").as_deref(), Some("gpt2"));
        assert_eq!(hf_cache_model_id("datasets--a--b"), None);
    }

    #[test]
    fn missing_dir_and_bad_config_are_errors() {
        let (_tmp, d) = tmpdir();
        let err = scan_models_dir(&d.join("nope")).unwrap_err();
        assert!(matches!(err, CatalogError::Io { .. }), "{err}");
        std::fs::create_dir_all(d.join("m")).unwrap();
        std::fs::write(d.join("m/config.json"), b"{not json").unwrap();
        let err = scan_models_dir(&d).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
    }

    /// The committed tiny Idefics3 checkpoint (tests/fixtures/vlm): tile 32, longest edge 96,
    /// 4 image tokens per tile, so at most 3 x 3 + 1 tiles: 10 x (4 + 3) + 4 = 74 tokens, which
    /// bounds every fixture case (at most 40 image tokens per image there).
    #[test]
    fn an_idefics3_directory_is_vision_with_an_image_token_bound() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm/idefics3");
        let specs = scan_models_dir(&dir).unwrap();
        let spec = specs.iter().find(|s| &*s.id == "model").expect("the checkpoint is catalogued");
        assert_eq!(spec.model_type, ModelType::Vision);
        assert_eq!(spec.image_tokens, Some(74));
        let text_only = serde_json::json!({"model_type": "llama"});
        assert_eq!(image_tokens_of_dir(&dir.join("model"), &text_only), None);
    }

    /// The committed tiny Qwen2-VL / Qwen2.5-VL checkpoints: patch 4, merge 2, max_pixels
    /// 8 * 8 * 16, so 16 tokens at most except along an edge held at 8 pixels: sqrt(200 * 1024)
    /// / 8 = 56.6, hence 57 + 2 (the fixtures' 1000x30 image takes 23).
    #[test]
    fn a_qwen2_vl_directory_is_vision_with_an_image_token_bound() {
        for family in ["qwen2_vl", "qwen2_5_vl"] {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vlm").join(family);
            let specs = scan_models_dir(&dir).unwrap();
            let spec = specs.iter().find(|s| &*s.id == "model").expect("the checkpoint is catalogued");
            assert_eq!(spec.model_type, ModelType::Vision, "{family}");
            assert_eq!(spec.image_tokens, Some(59), "{family}");
        }
    }
}
