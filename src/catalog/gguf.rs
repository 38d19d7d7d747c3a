//! GGUF files: recognising them and reading their tensor table.
//!
//! The header reader is hand-written on purpose (the design review agrees): about a hundred
//! lines, tested, dependency-free and available without the `mlx` feature, where the only crate
//! that reads GGUF headers (`candle-core`) would pull a whole tensor library into the catalogue.

use std::path::{Path, PathBuf};

use super::{CatalogError, io_err};

/// Whether `p` is a GGUF file: an existing file whose extension is `gguf`, in any case. The
/// one rule for the catalogue, the estimators and the MLX backend.
pub(crate) fn is_gguf(p: &Path) -> bool {
    p.is_file() && p.extension().and_then(|e| e.to_str()).is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
}

/// The GGUF file of a directory that holds exactly one (by [`is_gguf`]), else `None`.
pub(crate) fn single_gguf(dir: &Path) -> Option<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| is_gguf(p))
        .collect();
    (found.len() == 1).then(|| found.remove(0))
}

pub(super) const GGML_Q4_0: u32 = 2;
pub(super) const GGML_Q4_1: u32 = 3;
pub(super) const GGML_Q8_0: u32 = 8;

/// One entry of a GGUF file's tensor table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// Tensor name (`blk.0.attn_q.weight`, ...).
    pub name: String,
    /// Number of elements (product of the dimensions).
    pub elements: u64,
    /// The ggml type id (0 F32, 1 F16, 2 Q4_0, 3 Q4_1, 8 Q8_0, ...).
    pub ggml_type: u32,
}

/// Reads the tensor table of a GGUF (v2/v3) file: the header only, not the data. Metadata
/// values are skipped. Errors on a file that is not GGUF or is truncated.
pub fn gguf_tensors(path: &Path) -> Result<Vec<GgufTensorInfo>, CatalogError> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    read_gguf_tensors(std::io::BufReader::new(file), path)
}

/// [`gguf_tensors`] over any reader (`path` names it in errors). Never panics and allocates
/// at most a bounded amount whatever the bytes: counts, lengths and ranks are checked before
/// use, sizes multiply with overflow checks (fuzzed in tests/it/fuzz.rs).
pub fn read_gguf_tensors(
    mut r: impl std::io::Read,
    path: &Path,
) -> Result<Vec<GgufTensorInfo>, CatalogError> {
    use std::io::Read;
    let bad = |m: &str| CatalogError::Io {
        path: path.to_path_buf(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string()),
    };
    fn read_u32(r: &mut impl Read, path: &Path) -> Result<u32, CatalogError> {
        let mut b = [0u8; 4];
        r.read_exact(&mut b).map_err(io_err(path))?;
        Ok(u32::from_le_bytes(b))
    }
    fn read_u64(r: &mut impl Read, path: &Path) -> Result<u64, CatalogError> {
        let mut b = [0u8; 8];
        r.read_exact(&mut b).map_err(io_err(path))?;
        Ok(u64::from_le_bytes(b))
    }
    let mut magic = [0u8; 4];
    r.read_exact(&mut magic).map_err(io_err(path))?;
    if &magic != b"GGUF" {
        return Err(bad("not a GGUF file"));
    }
    let version = read_u32(&mut r, path)?;
    if !(2..=3).contains(&version) {
        return Err(bad("unsupported GGUF version"));
    }
    let n_tensors = read_u64(&mut r, path)?;
    let n_kv = read_u64(&mut r, path)?;
    if n_tensors > 1_000_000 || n_kv > 1_000_000 {
        return Err(bad("implausible GGUF header counts"));
    }
    fn skip(r: &mut impl Read, n: u64, path: &Path) -> Result<(), CatalogError> {
        let copied = std::io::copy(&mut r.take(n), &mut std::io::sink()).map_err(io_err(path))?;
        if copied == n { Ok(()) } else { Err(io_err(path)(std::io::ErrorKind::UnexpectedEof.into())) }
    }
    fn scalar_size(t: u32) -> Option<u64> {
        match t {
            0 | 1 | 7 => Some(1),
            2 | 3 => Some(2),
            4..=6 => Some(4),
            10..=12 => Some(8),
            _ => None,
        }
    }
    for _ in 0..n_kv {
        let key_len = read_u64(&mut r, path)?;
        skip(&mut r, key_len, path)?;
        let t = read_u32(&mut r, path)?;
        match t {
            8 => {
                let n = read_u64(&mut r, path)?;
                skip(&mut r, n, path)?;
            }
            9 => {
                let et = read_u32(&mut r, path)?;
                let count = read_u64(&mut r, path)?;
                if et == 8 {
                    for _ in 0..count {
                        let n = read_u64(&mut r, path)?;
                        skip(&mut r, n, path)?;
                    }
                } else {
                    let size = scalar_size(et).ok_or_else(|| bad("bad GGUF array type"))?;
                    let bytes =
                        size.checked_mul(count).ok_or_else(|| bad("implausible GGUF array length"))?;
                    skip(&mut r, bytes, path)?;
                }
            }
            _ => {
                let size = scalar_size(t).ok_or_else(|| bad("bad GGUF value type"))?;
                skip(&mut r, size, path)?;
            }
        }
    }
    // Capacity grows with what is really read, not with the header's claim.
    let mut out = Vec::with_capacity(n_tensors.min(4096) as usize);
    for _ in 0..n_tensors {
        let name_len = read_u64(&mut r, path)?;
        if name_len > 4096 {
            return Err(bad("implausible GGUF tensor name"));
        }
        let mut name = vec![0u8; name_len as usize];
        r.read_exact(&mut name).map_err(io_err(path))?;
        let n_dims = read_u32(&mut r, path)?;
        if n_dims > 8 {
            return Err(bad("implausible GGUF tensor rank"));
        }
        let mut elements = 1u64;
        for _ in 0..n_dims {
            elements = elements.saturating_mul(read_u64(&mut r, path)?);
        }
        let ggml_type = read_u32(&mut r, path)?;
        let _offset = read_u64(&mut r, path)?;
        out.push(GgufTensorInfo { name: String::from_utf8_lossy(&name).into_owned(), elements, ggml_type });
    }
    Ok(out)
}
