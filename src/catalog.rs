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

use crate::types::{ModelSpec, ModelType};

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

fn is_gguf(p: &Path) -> bool {
    p.is_file() && p.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
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

/// Scans `dir` and returns one spec per model found, sorted by id. Ids are the entry names
/// (for a bare `.gguf` file, its stem). Specs carry no size hint: the pool's estimator measures
/// the files, and a load replaces the estimate with measured bytes.
///
/// Errors only when `dir` itself or a `config.json` cannot be read; unrecognised entries are
/// skipped.
pub fn scan_models_dir(dir: &Path) -> Result<Vec<ModelSpec>, CatalogError> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io_err(dir))?
        .map(|e| e.map(|e| e.path()))
        .collect::<Result<_, _>>()
        .map_err(io_err(dir))?;
    entries.sort();
    let mut specs = Vec::new();
    for path in entries {
        let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if name.starts_with('.') {
            continue;
        }
        if is_gguf(&path) {
            let id = path.file_stem().and_then(|s| s.to_str()).unwrap_or(name);
            specs.push(ModelSpec::new(id).with_path(&path));
            continue;
        }
        if !path.is_dir() {
            continue;
        }
        let config = path.join("config.json");
        if config.is_file() {
            let text = std::fs::read_to_string(&config).map_err(io_err(&config))?;
            let value: serde_json::Value = serde_json::from_str(&text)
                .map_err(|source| CatalogError::Config { path: config.clone(), source })?;
            specs.push(ModelSpec::new(name).with_type(model_type_of_config(&value)).with_path(&path));
            continue;
        }
        let mut ggufs: Vec<PathBuf> = std::fs::read_dir(&path)
            .map_err(io_err(&path))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_gguf(p))
            .collect();
        ggufs.sort();
        match ggufs.len() {
            1 => specs.push(ModelSpec::new(name).with_path(ggufs.remove(0))),
            0 => tracing::info!(path = %path.display(), "no model files; skipped"),
            n => tracing::warn!(
                path = %path.display(),
                files = n,
                "several .gguf files in one model directory; skipped (keep one per directory)"
            ),
        }
    }
    specs.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(specs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("modelpool-catalog-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn scans_gguf_dirs_files_and_hf_configs() {
        let d = tmpdir("scan");
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
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn missing_dir_and_bad_config_are_errors() {
        let d = tmpdir("bad");
        let err = scan_models_dir(&d.join("nope")).unwrap_err();
        assert!(matches!(err, CatalogError::Io { .. }), "{err}");
        std::fs::create_dir_all(d.join("m")).unwrap();
        std::fs::write(d.join("m/config.json"), b"{not json").unwrap();
        let err = scan_models_dir(&d).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
        std::fs::remove_dir_all(&d).unwrap();
    }
}
