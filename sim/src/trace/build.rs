//! Record checks and model interning shared by the CSV and JSONL front ends, and the exact
//! number parsers they use.

use std::collections::HashMap;
use std::sync::Arc;

use modelpool::{MemoryLimit, ModelType, Nanos};
use rustc_hash::FxBuildHasher;

use super::{DURATION_FLAG, ModelDef, NS, Op, OpKind, Service, Trace, TraceError};

/// One record's fields, already split, before semantic checks.
#[derive(Default)]
pub(super) struct Fields<'a> {
    pub(super) time: Option<Nanos>,
    pub(super) model: Option<&'a str>,
    pub(super) op: OpKind,
    pub(super) model_type: Option<ModelType>,
    pub(super) size: Option<u64>,
    pub(super) input_tokens: Option<u32>,
    pub(super) output_tokens: Option<u32>,
    pub(super) duration: Option<Nanos>,
    pub(super) limit: Option<u64>,
    pub(super) max_models: Option<u32>,
}

/// Interns models and checks each record's meaning (shared by the CSV and JSONL front ends).
pub(super) struct Builder<'f> {
    file: &'f str,
    pub(super) trace: Trace,
    index: HashMap<Box<str>, u32, FxBuildHasher>,
    /// Line where each model's type and size were first given.
    defined_at: Vec<(usize, usize)>,
    last_model: u32,
    sorted: bool,
}

impl<'f> Builder<'f> {
    pub(super) fn new(file: &'f str) -> Self {
        Builder {
            file,
            trace: Trace::default(),
            index: HashMap::default(),
            defined_at: Vec::new(),
            last_model: u32::MAX,
            sorted: true,
        }
    }

    fn err(&self, line: usize, field: &str, message: impl Into<String>) -> TraceError {
        TraceError::Parse {
            file: self.file.to_string(),
            line,
            field: field.to_string(),
            message: message.into(),
        }
    }

    #[inline]
    fn intern(&mut self, id: &str, line: usize) -> Result<u32, TraceError> {
        if self.last_model != u32::MAX && *self.trace.models[self.last_model as usize].id == *id {
            return Ok(self.last_model);
        }
        let m = match self.index.get(id) {
            Some(&m) => m,
            None => {
                if id.trim() != id || id.is_empty() {
                    return Err(self.err(
                        line,
                        "model",
                        format!("model id '{id}' is empty or has surrounding spaces"),
                    ));
                }
                let m = u32::try_from(self.trace.models.len())
                    .ok()
                    .filter(|&m| m < u32::MAX)
                    .ok_or_else(|| self.err(line, "model", "too many distinct models"))?;
                self.trace.models.push(ModelDef {
                    id: Arc::from(id),
                    model_type: ModelType::TextGen,
                    size: None,
                    kv_bytes_per_token: None,
                });
                self.defined_at.push((0, 0));
                self.index.insert(id.into(), m);
                m
            }
        };
        self.last_model = m;
        Ok(m)
    }

    pub(super) fn push(&mut self, line: usize, f: Fields<'_>) -> Result<(), TraceError> {
        let at = f.time.ok_or_else(|| self.err(line, "time", "missing (every record needs a time)"))?;
        if let Some(last) = self.trace.ops.last()
            && at < last.at
        {
            self.sorted = false;
        }
        if f.op == OpKind::SetLimit {
            if f.limit.is_none() && f.max_models.is_none() {
                return Err(self.err(line, "limit", "set_limit needs `limit` or `max_models`"));
            }
            if f.max_models == Some(0) {
                return Err(self.err(line, "max_models", "must be at least 1"));
            }
            self.trace.ops.push(Op {
                at,
                arg: f.limit.unwrap_or(0),
                model: f.max_models.unwrap_or(0),
                kind: OpKind::SetLimit,
            });
            return Ok(());
        }
        if f.limit.is_some() {
            return Err(self.err(line, "limit", "only allowed with op set_limit"));
        }
        if f.max_models.is_some() {
            return Err(self.err(line, "max_models", "only allowed with op set_limit"));
        }
        let id = f.model.ok_or_else(|| self.err(line, "model", "missing (every request names a model)"))?;
        let m = self.intern(id, line)?;
        if let Some(t) = f.model_type {
            let (type_line, _) = self.defined_at[m as usize];
            let def = &mut self.trace.models[m as usize];
            if type_line == 0 {
                def.model_type = t;
                self.defined_at[m as usize].0 = line;
            } else if def.model_type != t {
                let msg = format!(
                    "'{t}' conflicts with '{}' given for {} at line {type_line}",
                    def.model_type, def.id
                );
                return Err(self.err(line, "type", msg));
            }
        }
        if let Some(s) = f.size {
            let (_, size_line) = self.defined_at[m as usize];
            let def = &mut self.trace.models[m as usize];
            if size_line == 0 {
                def.size = Some(s);
                self.defined_at[m as usize].1 = line;
            } else if def.size != Some(s) {
                let msg = format!(
                    "{s} conflicts with {} given for {} at line {size_line}",
                    def.size.unwrap_or(0),
                    def.id
                );
                return Err(self.err(line, "size_bytes", msg));
            }
        }
        let has_tokens = f.input_tokens.is_some() || f.output_tokens.is_some();
        if f.op != OpKind::Request {
            if has_tokens {
                return Err(self.err(line, "input_tokens", "only allowed on requests"));
            }
            if f.duration.is_some() {
                return Err(self.err(line, "duration", "only allowed on requests"));
            }
            self.trace.ops.push(Op { at, arg: 0, model: m, kind: f.op });
            return Ok(());
        }
        let service = match (has_tokens, f.duration) {
            (true, Some(_)) => {
                return Err(self.err(line, "duration", "give tokens or a duration, not both"));
            }
            (false, Some(d)) => {
                if d >= DURATION_FLAG {
                    return Err(self.err(line, "duration", "too long"));
                }
                Service::Duration(d)
            }
            (_, None) => {
                Service::Tokens { input: f.input_tokens.unwrap_or(0), output: f.output_tokens.unwrap_or(0) }
            }
        };
        self.trace.ops.push(Op::request(at, m, service));
        Ok(())
    }

    pub(super) fn finish(mut self) -> Trace {
        if !self.sorted {
            self.trace.ops.sort_by_key(|o| o.at);
        }
        self.trace
    }
}

/// Parse decimal seconds (`12`, `12.5`, `0.000000001`) into nanoseconds, exactly.
pub(super) fn parse_secs(s: &[u8]) -> Result<Nanos, &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    let (int, frac) = match memchr::memchr(b'.', s) {
        Some(p) => (&s[..p], &s[p + 1..]),
        None => (s, &s[..0]),
    };
    if int.is_empty() && frac.is_empty() {
        return Err("not a number of seconds");
    }
    let mut secs: u64 = 0;
    for &b in int {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return Err("not a non-negative decimal number of seconds");
        }
        secs = secs.checked_mul(10).and_then(|v| v.checked_add(u64::from(d))).ok_or("too large")?;
    }
    let mut ns: u64 = 0;
    let mut scale = NS;
    for (i, &b) in frac.iter().enumerate() {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return Err("not a non-negative decimal number of seconds");
        }
        if i < 9 {
            scale /= 10;
            ns += u64::from(d) * scale;
        }
    }
    secs.checked_mul(NS).and_then(|v| v.checked_add(ns)).ok_or("too large")
}

pub(super) fn parse_uint(s: &[u8]) -> Result<u64, &'static str> {
    if s.is_empty() {
        return Err("empty");
    }
    let mut v: u64 = 0;
    for &b in s {
        let d = b.wrapping_sub(b'0');
        if d > 9 {
            return Err("not a non-negative integer");
        }
        v = v.checked_mul(10).and_then(|v| v.checked_add(u64::from(d))).ok_or("too large")?;
    }
    Ok(v)
}

pub(super) fn parse_limit(s: &str) -> Result<u64, String> {
    if let Ok(b) = parse_uint(s.as_bytes()) {
        return if b == 0 { Err("must be greater than zero".into()) } else { Ok(b) };
    }
    match s.parse::<MemoryLimit>() {
        Ok(MemoryLimit::Bytes(b)) => Ok(b),
        Ok(MemoryLimit::Fraction(_)) => {
            Err("a trace needs an absolute limit (e.g. 16GB), not a fraction".into())
        }
        Err(e) => Err(e.to_string()),
    }
}
