//! Hugging Face / MLX safetensors directories read without loading weights: which files hold
//! the weights (single file, or shards named by `model.safetensors.index.json`), each file's
//! tensor table from its header (names, dtypes, shapes; a truncated file is refused), and the
//! MLX affine quantization in `config.json` (`quantization`: `group_size`, `bits`, and the
//! per-module overrides mlx-lm writes for mixed recipes). Shared by the catalogue's size hints
//! and the MLX backend's loader, so both follow one rule.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};

/// One tensor of a safetensors header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetensorsTensor {
    /// Tensor name, e.g. `model.layers.0.self_attn.q_proj.weight`.
    pub name: String,
    /// The header's dtype name (`F32`, `BF16`, `F16`, `U32`, ...).
    pub dtype: String,
    /// Shape.
    pub shape: Vec<u64>,
}

impl SafetensorsTensor {
    /// Number of elements.
    pub fn elements(&self) -> u64 {
        self.shape.iter().product()
    }
}

/// The weight files of a safetensors model directory, in a stable order:
/// - with `model.safetensors.index.json`: the distinct files its `weight_map` names, each of
///   which must exist (error naming the missing shard and the index);
/// - else `model.safetensors` if present;
/// - else every `*.safetensors` in the directory, sorted by name.
///
/// Errors (a message naming the file) when the index is not JSON, has no `weight_map`, names a
/// missing file, or when the directory holds no safetensors file at all.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, String> {
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).map_err(|e| format!("{}: {e}", index.display()))?;
        let v: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", index.display()))?;
        let map = v
            .get("weight_map")
            .and_then(|m| m.as_object())
            .ok_or_else(|| format!("{}: no \"weight_map\" object", index.display()))?;
        let mut files = BTreeSet::new();
        for (tensor, file) in map {
            let file = file
                .as_str()
                .ok_or_else(|| format!("{}: weight_map[{tensor:?}] is not a file name", index.display()))?;
            files.insert(file.to_string());
        }
        let mut out = Vec::with_capacity(files.len());
        for f in files {
            let p = dir.join(&f);
            if !p.is_file() {
                return Err(format!(
                    "shard {f} listed in {} is missing from {}",
                    index.display(),
                    dir.display()
                ));
            }
            out.push(p);
        }
        return Ok(out);
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let mut all: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    all.sort();
    if all.is_empty() {
        return Err(format!("{} holds no .safetensors file", dir.display()));
    }
    Ok(all)
}

/// The tensor table of one safetensors file, read from its header only. Errors (naming the
/// file) when the header is malformed or the file is shorter or longer than the header's data
/// (a truncated download).
pub fn safetensors_header(path: &Path) -> Result<Vec<SafetensorsTensor>, String> {
    let fail = |m: String| format!("{}: {m}", path.display());
    let mut f = std::fs::File::open(path).map_err(|e| fail(e.to_string()))?;
    let file_len = f.metadata().map_err(|e| fail(e.to_string()))?.len();
    let mut n = [0u8; 8];
    f.read_exact(&mut n).map_err(|_| fail("not a safetensors file (shorter than its header)".into()))?;
    let n = u64::from_le_bytes(n);
    if n > 100_000_000 || 8 + n > file_len {
        return Err(fail(format!("header length {n} does not fit a {file_len}-byte file (truncated?)")));
    }
    let mut header = vec![0u8; n as usize];
    f.read_exact(&mut header).map_err(|e| fail(e.to_string()))?;
    let meta: ::safetensors::tensor::Metadata =
        serde_json::from_slice(&header).map_err(|e| fail(format!("invalid safetensors header: {e}")))?;
    let data = file_len - 8 - n;
    if meta.data_len() as u64 != data {
        return Err(fail(format!(
            "the header describes {} bytes of tensor data but the file holds {data} (truncated?)",
            meta.data_len()
        )));
    }
    let mut out: Vec<SafetensorsTensor> = meta
        .tensors()
        .into_iter()
        .map(|(name, info)| SafetensorsTensor {
            name,
            dtype: format!("{:?}", info.dtype),
            shape: info.shape.iter().map(|&d| d as u64).collect(),
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Group size and bit width of one MLX affine-quantized linear (or embedding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantParams {
    /// Elements per group sharing one scale and bias.
    pub group_size: u32,
    /// Bits per element (2, 3, 4, 5, 6 or 8).
    pub bits: u32,
}

/// The `quantization` block of an MLX `config.json`: defaults plus per-module overrides
/// (`"model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6}`, or `false` for a module
/// left unquantized), as mlx-lm writes them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MlxQuantization {
    /// The block's `group_size` / `bits`; `None` when the config has no quantization block.
    pub default: Option<QuantParams>,
    /// Per-module entries, by module path (without `.weight`); `None` = not quantized.
    pub overrides: BTreeMap<String, Option<QuantParams>>,
}

const BITS: [u32; 6] = [2, 3, 4, 5, 6, 8];

fn params(v: &serde_json::Value, what: &str) -> Result<QuantParams, String> {
    let get = |k: &str| {
        v.get(k).and_then(|x| x.as_u64()).ok_or_else(|| format!("config.json: {what} has no integer \"{k}\""))
    };
    let p = QuantParams { group_size: get("group_size")? as u32, bits: get("bits")? as u32 };
    if !BITS.contains(&p.bits) || ![32, 64, 128].contains(&p.group_size) {
        return Err(format!(
            "config.json: {what}: bits {} / group_size {} unsupported (bits 2, 3, 4, 5, 6, 8; group 32, 64, 128)",
            p.bits, p.group_size
        ));
    }
    if let Some(mode) = v.get("mode").and_then(|m| m.as_str())
        && mode != "affine"
    {
        return Err(format!("config.json: {what}: quantization mode \"{mode}\" unsupported (only affine)"));
    }
    Ok(p)
}

impl MlxQuantization {
    /// Reads `quantization` (or, failing that, an MLX-style `quantization_config` with
    /// `group_size` and `bits`) from a parsed `config.json`. Errors name the field.
    pub fn from_config(config: &serde_json::Value) -> Result<Self, String> {
        let block = match config.get("quantization") {
            Some(b) => b,
            None => match config.get("quantization_config") {
                Some(b) if b.get("bits").is_some() && b.get("quant_method").is_none() => b,
                Some(b) => {
                    let method = b.get("quant_method").and_then(|m| m.as_str()).unwrap_or("?");
                    return Err(format!(
                        "config.json: quantization_config with quant_method \"{method}\" is not MLX affine quantization (convert it with mlx_lm.convert)"
                    ));
                }
                None => return Ok(Self::default()),
            },
        };
        let obj = block.as_object().ok_or("config.json: \"quantization\" is not an object")?;
        let default = params(block, "\"quantization\"")?;
        let mut overrides = BTreeMap::new();
        for (k, v) in obj {
            match v {
                serde_json::Value::Object(_) => {
                    overrides.insert(k.clone(), Some(params(v, &format!("quantization[{k:?}]"))?));
                }
                serde_json::Value::Bool(false) => {
                    overrides.insert(k.clone(), None);
                }
                _ => {}
            }
        }
        Ok(MlxQuantization { default: Some(default), overrides })
    }

    /// The parameters of `module` (a path without `.weight`): its override if it has one,
    /// else the default; `None` when it is not quantized.
    pub fn for_module(&self, module: &str) -> Option<QuantParams> {
        match self.overrides.get(module) {
            Some(p) => *p,
            None => self.default,
        }
    }
}

/// Reads and parses `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<serde_json::Value, String> {
    let p = dir.join("config.json");
    let text = std::fs::read_to_string(&p).map_err(|e| format!("{}: {e}", p.display()))?;
    serde_json::from_str(&text).map_err(|e| format!("{}: invalid JSON: {e}", p.display()))
}

/// Bytes the MLX backend holds for a safetensors directory, from the headers alone. Every
/// float tensor is held as f32. An affine-quantized `weight` (packed `U32` with sibling
/// `scales` and `biases`) is, with `dequantize`, held as f32 at its unpacked size
/// (`rows x packed x 32 / bits`) and its scales and biases are dropped; without, it stays
/// packed and its scales and biases are held as f32. Errors name the file or tensor.
pub fn mlx_dir_resident_bytes(dir: &Path, dequantize: bool) -> Result<u64, String> {
    let quant = MlxQuantization::from_config(&read_config(dir)?)?;
    let mut tensors = BTreeMap::new();
    for f in safetensors_files(dir)? {
        for t in safetensors_header(&f)? {
            tensors.insert(t.name.clone(), t);
        }
    }
    let mut total = 0u64;
    for t in tensors.values() {
        let (module, leaf) = t.name.rsplit_once('.').unwrap_or(("", t.name.as_str()));
        let packed = |m: &str| {
            tensors.get(&format!("{m}.weight")).is_some_and(|w| w.dtype == "U32")
                && tensors.contains_key(&format!("{m}.scales"))
        };
        total += match leaf {
            "scales" | "biases" if packed(module) => {
                if dequantize {
                    0
                } else {
                    t.elements() * 4
                }
            }
            "weight" if packed(module) => {
                if dequantize {
                    let p = quant.for_module(module).ok_or_else(|| {
                        format!(
                            "{}: quantized tensor {} but config.json has no quantization for it",
                            dir.display(),
                            t.name
                        )
                    })?;
                    t.elements() * 32 / p.bits as u64 * 4
                } else {
                    t.elements() * 4
                }
            }
            _ => t.elements() * 4,
        };
    }
    Ok(total)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Writes a safetensors file with the given (name, dtype, shape, element bytes) tensors.
    pub(crate) fn write_st(path: &Path, tensors: &[(&str, &str, Vec<u64>, u64)]) {
        let mut header = serde_json::Map::new();
        let mut off = 0u64;
        for (name, dtype, shape, esize) in tensors {
            let len = shape.iter().product::<u64>() * esize;
            header.insert(
                name.to_string(),
                serde_json::json!({"dtype": dtype, "shape": shape, "data_offsets": [off, off + len]}),
            );
            off += len;
        }
        let h = serde_json::to_vec(&serde_json::Value::Object(header)).unwrap();
        let mut b = (h.len() as u64).to_le_bytes().to_vec();
        b.extend(h);
        b.extend(vec![0u8; off as usize]);
        std::fs::write(path, b).unwrap();
    }

    #[test]
    fn quantization_overrides_and_errors() {
        let c = serde_json::json!({"quantization": {"group_size": 64, "bits": 4, "mode": "affine",
            "model.layers.0.mlp.down_proj": {"group_size": 64, "bits": 6},
            "lm_head": false}});
        let q = MlxQuantization::from_config(&c).unwrap();
        assert_eq!(
            q.for_module("model.layers.1.mlp.down_proj"),
            Some(QuantParams { group_size: 64, bits: 4 })
        );
        assert_eq!(
            q.for_module("model.layers.0.mlp.down_proj"),
            Some(QuantParams { group_size: 64, bits: 6 })
        );
        assert_eq!(q.for_module("lm_head"), None);
        assert_eq!(MlxQuantization::from_config(&serde_json::json!({})).unwrap().for_module("x"), None);
        let bad = serde_json::json!({"quantization": {"group_size": 64, "bits": 7}});
        assert!(MlxQuantization::from_config(&bad).unwrap_err().contains("bits 7"));
        let gptq = serde_json::json!({"quantization_config": {"quant_method": "gptq", "bits": 4}});
        assert!(MlxQuantization::from_config(&gptq).unwrap_err().contains("gptq"));
    }

    #[test]
    fn headers_shards_and_resident_bytes() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path();
        std::fs::write(d.join("config.json"), r#"{"quantization": {"group_size": 64, "bits": 4}}"#).unwrap();
        // A 4-bit [128, 256] linear: packed [128, 32] u32, scales/biases [128, 4] bf16.
        write_st(
            &d.join("model-00001-of-00002.safetensors"),
            &[("l.weight", "U32", vec![128, 32], 4), ("l.scales", "BF16", vec![128, 4], 2)],
        );
        write_st(
            &d.join("model-00002-of-00002.safetensors"),
            &[("l.biases", "BF16", vec![128, 4], 2), ("norm.weight", "BF16", vec![256], 2)],
        );
        let index = serde_json::json!({"weight_map": {
            "l.weight": "model-00001-of-00002.safetensors", "l.scales": "model-00001-of-00002.safetensors",
            "l.biases": "model-00002-of-00002.safetensors", "norm.weight": "model-00002-of-00002.safetensors"}});
        std::fs::write(d.join("model.safetensors.index.json"), index.to_string()).unwrap();
        assert_eq!(safetensors_files(d).unwrap().len(), 2);
        let t = safetensors_header(&d.join("model-00001-of-00002.safetensors")).unwrap();
        assert_eq!(
            t[1],
            SafetensorsTensor { name: "l.weight".into(), dtype: "U32".into(), shape: vec![128, 32] }
        );
        assert_eq!(mlx_dir_resident_bytes(d, true).unwrap(), 128 * 256 * 4 + 256 * 4);
        assert_eq!(mlx_dir_resident_bytes(d, false).unwrap(), 128 * 32 * 4 + 2 * 128 * 4 * 4 + 256 * 4);

        // A truncated shard, and a shard missing from the index.
        let p = d.join("model-00002-of-00002.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 3]).unwrap();
        let e = safetensors_header(&p).unwrap_err();
        assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("truncated"), "{e}");
        std::fs::remove_file(&p).unwrap();
        let e = safetensors_files(d).unwrap_err();
        assert!(e.contains("shard model-00002-of-00002.safetensors listed in"), "{e}");
    }
}
