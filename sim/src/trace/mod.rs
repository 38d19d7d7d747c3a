//! Trace files: the documented CSV and JSONL formats (`csv.rs`, `jsonl.rs`, sharing the record
//! checks of `build.rs`), the CSV writer (`write.rs`) and the writer of libCacheSim's binary
//! `oracleGeneral` format (`libcachesim.rs`).
//!
//! A trace is a time-ordered list of operations (requests and admin events) over a catalogue of
//! models. Parsing interns model ids into dense indices, so the replay loop works on plain
//! integers. See `docs/sim.md` for the format; in short, CSV with a header naming any of:
//!
//! | column | required | meaning |
//! |---|---|---|
//! | `time` | yes | arrival, seconds since the start of the trace (decimal, up to ns) |
//! | `model` | yes (except `set_limit`) | model id |
//! | `op` | no | `request` (default), `preload` (load and pin), `pin`, `unpin`, `unload`, `set_limit` |
//! | `type` | no | `text-gen` (default), `vision`, `embeddings` |
//! | `size_bytes` | no | the model's real size in bytes (else the name estimator decides) |
//! | `input_tokens`, `output_tokens` | no | service time = tokens x per-token times |
//! | `duration` | no | service time in seconds (instead of tokens) |
//! | `limit` | `set_limit` only | new memory limit (`16GB`, `512MiB`, or bytes) |
//! | `max_models` | no (`set_limit`) | new maximum number of models |
//!
//! Empty fields are absent. Lines starting with `#` and blank lines are ignored. JSONL uses the
//! same names as keys, one object per line.

use std::fmt;
use std::io;
use std::path::Path;

use modelpool::{ModelId, ModelType, Nanos};

mod build;
mod csv;
mod jsonl;
mod libcachesim;
mod write;

pub use csv::parse_csv;
pub use jsonl::parse_jsonl;
pub use libcachesim::{ExportError, OracleExport};

/// Nanoseconds per second.
pub const NS: u64 = 1_000_000_000;

/// A model named by a trace. Its index in [`Trace::models`] is the id used by [`Op::model`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelDef {
    /// Model id, as a client would send it.
    pub id: ModelId,
    /// Kind of inference.
    pub model_type: ModelType,
    /// Real size in bytes, if the trace gives it.
    pub size: Option<u64>,
    /// KV cache bytes per token, if known (not a trace column: `drive` takes it from the
    /// server's catalogue); else the engine's rule decides, as it does for the server.
    pub kv_bytes_per_token: Option<u64>,
}

/// What an [`Op`] does. Names (the `op` column) are snake case; an empty `op` is a request.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    strum::IntoStaticStr,
    strum::VariantArray,
    strum::EnumCount,
)]
#[strum(serialize_all = "snake_case")]
#[repr(u8)]
pub enum OpKind {
    /// An inference request: holds a lease for its service time.
    #[default]
    Request,
    /// Load (if needed) and pin the model.
    Preload,
    /// Pin a resident or loading model.
    Pin,
    /// Unpin the model.
    Unpin,
    /// Unload the model (refused when pinned or busy, as the admin API does without `force`).
    Unload,
    /// Change the memory limit and/or max models.
    SetLimit,
}

modelpool::name_table!(OpKind, ParseOpKindError, "op");

impl OpKind {
    /// The kind named by an `op` field (empty: a request).
    fn parse(s: &[u8]) -> Option<OpKind> {
        if s.is_empty() {
            return Some(OpKind::Request);
        }
        modelpool::names::parse_by_name(std::str::from_utf8(s).ok()?)
    }
}

/// Flag in [`Op::arg`] of a request: the low bits are a duration in ns, not tokens.
const DURATION_FLAG: u64 = 1 << 63;

/// One operation, 24 bytes. For requests `arg` encodes the service (see [`Op::service`]);
/// for `set_limit`, `arg` is the new limit in bytes (0: unchanged) and `model` the new max models
/// (0: unchanged).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Op {
    /// Arrival time.
    pub at: Nanos,
    /// Operation argument (see the type docs).
    pub arg: u64,
    /// Model index into [`Trace::models`] (or max models for `set_limit`).
    pub model: u32,
    /// What it does.
    pub kind: OpKind,
}

/// How long a request holds its model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Service {
    /// Tokens in and out; the replay multiplies by its per-token times.
    Tokens {
        /// Prompt tokens.
        input: u32,
        /// Generated tokens.
        output: u32,
    },
    /// A fixed duration.
    Duration(Nanos),
}

impl Op {
    /// A request with a service.
    pub fn request(at: Nanos, model: u32, service: Service) -> Op {
        let arg = match service {
            Service::Tokens { input, output } => (u64::from(input) << 32) | u64::from(output),
            Service::Duration(ns) => DURATION_FLAG | ns.min(DURATION_FLAG - 1),
        };
        Op { at, arg, model, kind: OpKind::Request }
    }

    /// The service of a request (meaningless for other kinds).
    #[inline]
    pub fn service(&self) -> Service {
        if self.arg & DURATION_FLAG != 0 {
            Service::Duration(self.arg & !DURATION_FLAG)
        } else {
            Service::Tokens { input: (self.arg >> 32) as u32, output: self.arg as u32 }
        }
    }
}

/// A parsed trace: models and time-ordered operations.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Trace {
    /// Models in order of first appearance.
    pub models: Vec<ModelDef>,
    /// Operations sorted by time (stable: equal times keep file order).
    pub ops: Vec<Op>,
}

impl Trace {
    /// Number of request operations.
    pub fn requests(&self) -> u64 {
        self.ops.iter().filter(|o| o.kind == OpKind::Request).count() as u64
    }

    /// Time of the last operation.
    pub fn duration(&self) -> Nanos {
        self.ops.last().map_or(0, |o| o.at)
    }

    /// Parse a trace file; `.jsonl`/`.ndjson` files (or content starting with `{`) are JSONL,
    /// anything else CSV.
    pub fn from_path(path: &Path) -> Result<Trace, TraceError> {
        let name = path.display().to_string();
        let bytes = std::fs::read(path).map_err(|e| TraceError::Io { file: name.clone(), source: e })?;
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
        let first = bytes.iter().copied().find(|b| !b.is_ascii_whitespace()).unwrap_or(b'#');
        if ext == "jsonl" || ext == "ndjson" || first == b'{' {
            parse_jsonl(&bytes, &name)
        } else {
            parse_csv(&bytes, &name)
        }
    }
}

/// A trace that cannot be used. Every parse error names the file, the 1-based line and the field.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    /// The file could not be read.
    #[error("cannot read {file}")]
    Io {
        /// File name.
        file: String,
        /// The I/O error.
        source: io::Error,
    },
    /// A line is malformed.
    #[error("{file}:{line}: field `{field}`: {message}")]
    Parse {
        /// File name.
        file: String,
        /// 1-based line number.
        line: usize,
        /// The field (column or key) at fault.
        field: String,
        /// What is wrong.
        message: String,
    },
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Service::Tokens { input, output } => write!(f, "{input}+{output} tokens"),
            Service::Duration(ns) => write!(f, "{:.3}s", *ns as f64 / NS as f64),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::build::parse_secs;
    use super::*;

    fn csv(s: &str) -> Result<Trace, TraceError> {
        parse_csv(s.as_bytes(), "t.csv")
    }

    #[test]
    fn seconds_parse_exactly() {
        assert_eq!(parse_secs(b"0"), Ok(0));
        assert_eq!(parse_secs(b"1.5"), Ok(1_500_000_000));
        assert_eq!(parse_secs(b".000000001"), Ok(1));
        assert_eq!(parse_secs(b"2.0000000019"), Ok(2_000_000_001));
        assert!(parse_secs(b"-1").is_err());
        assert!(parse_secs(b"1e3").is_err());
        assert!(parse_secs(b".").is_err());
    }

    #[test]
    fn csv_roundtrip_through_writer() {
        let t = csv("# c\ntime,model,type,size_bytes,input_tokens,output_tokens,duration,op,limit\n\
                     0,a-7b,,,10,20,,,\n\
                     0.5,e,embeddings,1000,,,0.25,,\n\
                     1,a-7b,,,,,,preload,\n\
                     2,,,,,,,set_limit,16GB\n")
        .unwrap();
        assert_eq!(t.models.len(), 2);
        assert_eq!(t.models[1].model_type, ModelType::Embeddings);
        assert_eq!(t.models[1].size, Some(1000));
        assert_eq!(t.ops[1].service(), Service::Duration(250_000_000));
        assert_eq!(t.ops[0].service(), Service::Tokens { input: 10, output: 20 });
        assert_eq!(t.ops[3].arg, 16_000_000_000);
        let mut out = Vec::new();
        t.write_csv(&mut out, &[]).unwrap();
        let back = csv(std::str::from_utf8(&out).unwrap()).unwrap();
        assert_eq!(back, t);
    }

    #[test]
    fn errors_name_line_and_field() {
        let e = csv("time,model\n0,a\nx,b\n").unwrap_err().to_string();
        assert_eq!(e, "t.csv:3: field `time`: 'x': not a non-negative decimal number of seconds");
        let e = csv("time,model,sz\n").unwrap_err().to_string();
        assert!(e.starts_with("t.csv:1: field `sz`: unknown column"), "{e}");
        let e = csv("time,model,size_bytes\n0,a,5\n1,a,6\n").unwrap_err().to_string();
        assert_eq!(e, "t.csv:3: field `size_bytes`: 6 conflicts with 5 given for a at line 2");
        let e = csv("time,model\n0,a,b\n").unwrap_err().to_string();
        assert!(e.contains("field `#3`"), "{e}");
        let e = csv("time,model,op\n0,a,boot\n").unwrap_err().to_string();
        assert!(e.starts_with("t.csv:2: field `op`: unknown op 'boot'"), "{e}");
        let e = csv("time,model,input_tokens,duration\n0,a,3,1\n").unwrap_err().to_string();
        assert!(e.contains("field `duration`: give tokens or a duration"), "{e}");
        let e = csv("time,model\n0,\n").unwrap_err().to_string();
        assert!(e.starts_with("t.csv:2: field `model`: missing"), "{e}");
        let e = csv("time,model,input_tokens\n0,a,99999999999\n").unwrap_err().to_string();
        assert!(e.contains("field `input_tokens`"), "{e}");
        assert!(csv("").is_err());
    }

    #[test]
    fn unsorted_input_is_sorted_stably() {
        let t = csv("time,model\n2,a\n1,b\n1,c\n").unwrap();
        let order: Vec<u32> = t.ops.iter().map(|o| o.model).collect();
        assert_eq!(order, vec![1, 2, 0]);
    }

    #[test]
    fn jsonl_matches_csv() {
        let j = parse_jsonl(
            br#"{"time": 0, "model": "a-7b", "input_tokens": 10, "output_tokens": 20}
{"time": 0.5, "model": "e", "type": "embeddings", "size_bytes": 1000, "duration": 0.25}

{"time": 2, "op": "set_limit", "limit": "16GB"}
"#,
            "t.jsonl",
        )
        .unwrap();
        let c = csv("time,model,type,size_bytes,input_tokens,output_tokens,duration,op,limit\n\
                     0,a-7b,,,10,20,,,\n0.5,e,embeddings,1000,,,0.25,,\n2,,,,,,,set_limit,16GB\n")
        .unwrap();
        assert_eq!(j, c);
        let e = parse_jsonl(b"{\"time\": 1, \"modle\": \"a\"}\n", "t.jsonl").unwrap_err().to_string();
        assert!(e.starts_with("t.jsonl:1: field `modle`"), "{e}");
        let e = parse_jsonl(b"{\"time\": -1, \"model\": \"a\"}\n", "t.jsonl").unwrap_err().to_string();
        assert!(e.starts_with("t.jsonl:1: field `time`"), "{e}");
    }
}
