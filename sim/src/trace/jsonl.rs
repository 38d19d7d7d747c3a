//! The JSONL front end: one object per line, the CSV column names as keys.

use serde::Deserialize;

use modelpool::Nanos;

use super::build::{Builder, Fields, parse_limit, parse_secs};
use super::{OpKind, Trace, TraceError};

/// A JSONL record: the CSV columns as keys.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct JsonRecord {
    time: Option<serde_json::Number>,
    model: Option<String>,
    op: Option<String>,
    #[serde(rename = "type")]
    model_type: Option<String>,
    size_bytes: Option<u64>,
    input_tokens: Option<u32>,
    output_tokens: Option<u32>,
    duration: Option<serde_json::Number>,
    limit: Option<serde_json::Value>,
    max_models: Option<u32>,
}

/// Parse JSONL trace bytes (one object per line, CSV column names as keys).
pub fn parse_jsonl(bytes: &[u8], file: &str) -> Result<Trace, TraceError> {
    let mut b = Builder::new(file);
    let err = |line: usize, field: &str, message: String| TraceError::Parse {
        file: file.to_string(),
        line,
        field: field.to_string(),
        message,
    };
    for (i, raw) in bytes.split(|&c| c == b'\n').enumerate() {
        let line_no = i + 1;
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) || raw.first() == Some(&b'#') {
            continue;
        }
        let rec: JsonRecord = serde_json::from_slice(raw).map_err(|e| {
            let msg = e.to_string();
            // serde names unknown or mistyped keys in its message; point at them if it does.
            let field = msg
                .split('`')
                .nth(1)
                .filter(|f| !f.is_empty() && msg.contains("field"))
                .unwrap_or("record")
                .to_string();
            err(line_no, &field, msg)
        })?;
        let secs = |n: &serde_json::Number, field: &str| -> Result<Nanos, TraceError> {
            let s = n.to_string();
            parse_secs(s.as_bytes())
                .or_else(|m| {
                    // Exponent notation from a float: go through f64.
                    match n.as_f64() {
                        Some(v) if (0.0..1.8e10).contains(&v) => Ok((v * 1e9).round() as u64),
                        _ => Err(m),
                    }
                })
                .map_err(|m| err(line_no, field, format!("'{s}': {m}")))
        };
        let mut f = Fields {
            time: rec.time.as_ref().map(|n| secs(n, "time")).transpose()?,
            model: rec.model.as_deref(),
            size: rec.size_bytes,
            input_tokens: rec.input_tokens,
            output_tokens: rec.output_tokens,
            duration: rec.duration.as_ref().map(|n| secs(n, "duration")).transpose()?,
            max_models: rec.max_models,
            ..Fields::default()
        };
        if f.size == Some(0) {
            return Err(err(line_no, "size_bytes", "must be greater than zero".into()));
        }
        if let Some(op) = &rec.op {
            f.op = OpKind::parse(op.as_bytes()).ok_or_else(|| {
                err(
                    line_no,
                    "op",
                    format!("unknown op '{op}' (expected {})", modelpool::names::names::<OpKind>()),
                )
            })?;
        }
        if let Some(t) = &rec.model_type {
            f.model_type =
                Some(t.parse().map_err(|e: modelpool::types::ParseModelTypeError| {
                    err(line_no, "type", e.to_string())
                })?);
        }
        if let Some(l) = &rec.limit {
            let s = match l {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(n) => n.to_string(),
                other => {
                    return Err(err(line_no, "limit", format!("expected a string or number, got {other}")));
                }
            };
            f.limit = Some(parse_limit(s.trim()).map_err(|m| err(line_no, "limit", format!("'{s}': {m}")))?);
        }
        b.push(line_no, f)?;
    }
    Ok(b.finish())
}
