//! Trace files: the documented CSV and JSONL formats, a fast parser, and a CSV writer.
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

use std::collections::HashMap;
use std::fmt;
use std::hash::{BuildHasherDefault, Hasher};
use std::io::{self, Write};
use std::path::Path;
use std::sync::Arc;

use modelpool::{MemoryLimit, ModelId, ModelType, Nanos};
use serde::Deserialize;

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
}

/// What an [`Op`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
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

impl OpKind {
    /// The name used in the `op` column.
    pub fn as_str(self) -> &'static str {
        match self {
            OpKind::Request => "request",
            OpKind::Preload => "preload",
            OpKind::Pin => "pin",
            OpKind::Unpin => "unpin",
            OpKind::Unload => "unload",
            OpKind::SetLimit => "set_limit",
        }
    }

    fn parse(s: &[u8]) -> Option<OpKind> {
        Some(match s {
            b"" | b"request" => OpKind::Request,
            b"preload" => OpKind::Preload,
            b"pin" => OpKind::Pin,
            b"unpin" => OpKind::Unpin,
            b"unload" => OpKind::Unload,
            b"set_limit" => OpKind::SetLimit,
            _ => return None,
        })
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

    /// Write the trace as CSV with the full header (the generator's output format).
    pub fn write_csv<W: Write>(&self, mut w: W, comments: &[String]) -> io::Result<()> {
        for c in comments {
            for line in c.lines() {
                writeln!(w, "# {line}")?;
            }
        }
        writeln!(w, "time,model,op,type,size_bytes,input_tokens,output_tokens,duration,limit,max_models")?;
        let mut defined = vec![false; self.models.len()];
        let mut buf = String::with_capacity(128);
        for op in &self.ops {
            buf.clear();
            push_secs(&mut buf, op.at);
            buf.push(',');
            if op.kind == OpKind::SetLimit {
                buf.push_str(",set_limit,,,,,,");
                if op.arg != 0 {
                    push_u64(&mut buf, op.arg);
                }
                buf.push(',');
                if op.model != 0 {
                    push_u64(&mut buf, u64::from(op.model));
                }
            } else {
                let m = &self.models[op.model as usize];
                buf.push_str(&m.id);
                buf.push(',');
                if op.kind != OpKind::Request {
                    buf.push_str(op.kind.as_str());
                }
                buf.push(',');
                // Type and size on the first line of each model only.
                let first = !std::mem::replace(&mut defined[op.model as usize], true);
                if first && m.model_type != ModelType::TextGen {
                    buf.push_str(m.model_type.as_str());
                }
                buf.push(',');
                if let (true, Some(s)) = (first, m.size) {
                    push_u64(&mut buf, s);
                }
                buf.push(',');
                if op.kind == OpKind::Request {
                    match op.service() {
                        Service::Tokens { input, output } => {
                            push_u64(&mut buf, u64::from(input));
                            buf.push(',');
                            push_u64(&mut buf, u64::from(output));
                            buf.push(',');
                        }
                        Service::Duration(ns) => {
                            buf.push_str(",,");
                            push_secs(&mut buf, ns);
                        }
                    }
                } else {
                    buf.push_str(",,");
                }
                buf.push_str(",,");
            }
            buf.push('\n');
            w.write_all(buf.as_bytes())?;
        }
        w.flush()
    }
}

fn push_u64(buf: &mut String, v: u64) {
    use std::fmt::Write as _;
    let _ = write!(buf, "{v}");
}

/// Seconds with up to 9 decimals, trailing zeros trimmed (exact for any `Nanos`).
fn push_secs(buf: &mut String, ns: Nanos) {
    use std::fmt::Write as _;
    let (s, frac) = (ns / NS, ns % NS);
    if frac == 0 {
        let _ = write!(buf, "{s}");
    } else {
        let mut digits = format!("{frac:09}");
        while digits.ends_with('0') {
            digits.pop();
        }
        let _ = write!(buf, "{s}.{digits}");
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

/// FNV-1a: fast and deterministic for short model ids.
#[derive(Default)]
struct Fnv(u64);

impl Hasher for Fnv {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut h = if self.0 == 0 { 0xcbf2_9ce4_8422_2325 } else { self.0 };
        for &b in bytes {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        self.0 = h;
    }
}

/// One record's fields, already split, before semantic checks.
#[derive(Default)]
struct Fields<'a> {
    time: Option<Nanos>,
    model: Option<&'a str>,
    op: OpKind,
    model_type: Option<ModelType>,
    size: Option<u64>,
    input_tokens: Option<u32>,
    output_tokens: Option<u32>,
    duration: Option<Nanos>,
    limit: Option<u64>,
    max_models: Option<u32>,
}

/// Interns models and checks each record's meaning (shared by the CSV and JSONL front ends).
struct Builder<'f> {
    file: &'f str,
    trace: Trace,
    index: HashMap<Box<str>, u32, BuildHasherDefault<Fnv>>,
    /// Line where each model's type and size were first given.
    defined_at: Vec<(usize, usize)>,
    last_model: u32,
    sorted: bool,
}

impl<'f> Builder<'f> {
    fn new(file: &'f str) -> Self {
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
                });
                self.defined_at.push((0, 0));
                self.index.insert(id.into(), m);
                m
            }
        };
        self.last_model = m;
        Ok(m)
    }

    fn push(&mut self, line: usize, f: Fields<'_>) -> Result<(), TraceError> {
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

    fn finish(mut self) -> Trace {
        if !self.sorted {
            self.trace.ops.sort_by_key(|o| o.at);
        }
        self.trace
    }
}

/// Parse decimal seconds (`12`, `12.5`, `0.000000001`) into nanoseconds, exactly.
fn parse_secs(s: &[u8]) -> Result<Nanos, &'static str> {
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

fn parse_uint(s: &[u8]) -> Result<u64, &'static str> {
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

fn parse_limit(s: &str) -> Result<u64, String> {
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

#[derive(Clone, Copy, PartialEq, Eq)]
enum Col {
    Time,
    Model,
    Op,
    Type,
    Size,
    Input,
    Output,
    Duration,
    Limit,
    MaxModels,
}

const COLUMNS: [(&str, Col); 10] = [
    ("time", Col::Time),
    ("model", Col::Model),
    ("op", Col::Op),
    ("type", Col::Type),
    ("size_bytes", Col::Size),
    ("input_tokens", Col::Input),
    ("output_tokens", Col::Output),
    ("duration", Col::Duration),
    ("limit", Col::Limit),
    ("max_models", Col::MaxModels),
];

fn col_name(c: Col) -> &'static str {
    COLUMNS.iter().find(|(_, k)| *k == c).map_or("?", |(n, _)| n)
}

/// Parse CSV trace bytes (see the module docs). `file` names the source in errors.
pub fn parse_csv(bytes: &[u8], file: &str) -> Result<Trace, TraceError> {
    let mut b = Builder::new(file);
    // Rough capacity: ~40 bytes per line.
    b.trace.ops.reserve(bytes.len() / 40);
    let mut cols: Vec<Col> = Vec::new();
    let mut pos = 0usize;
    let mut line_no = 0usize;
    while pos < bytes.len() {
        line_no += 1;
        let end = memchr::memchr(b'\n', &bytes[pos..]).map_or(bytes.len(), |i| pos + i);
        let mut line = &bytes[pos..end];
        pos = end + 1;
        if let [rest @ .., b'\r'] = line {
            line = rest;
        }
        if line.is_empty() || line[0] == b'#' {
            continue;
        }
        if cols.is_empty() {
            cols = parse_header(line, file, line_no)?;
            continue;
        }
        let f = parse_csv_line(line, &cols, file, line_no)?;
        b.push(line_no, f)?;
    }
    if cols.is_empty() {
        return Err(TraceError::Parse {
            file: file.to_string(),
            line: line_no.max(1),
            field: "header".into(),
            message: "no header line (expected e.g. `time,model,input_tokens,output_tokens`)".into(),
        });
    }
    Ok(b.finish())
}

fn parse_header(line: &[u8], file: &str, line_no: usize) -> Result<Vec<Col>, TraceError> {
    let err = |field: &str, message: String| TraceError::Parse {
        file: file.to_string(),
        line: line_no,
        field: field.to_string(),
        message,
    };
    let text = std::str::from_utf8(line).map_err(|_| err("header", "header is not valid UTF-8".into()))?;
    let mut cols = Vec::new();
    for (i, name) in text.split(',').enumerate() {
        let name = name.trim();
        if name.is_empty() {
            return Err(err(&format!("#{}", i + 1), "empty column name in the header".into()));
        }
        let Some(&(_, c)) = COLUMNS.iter().find(|(n, _)| *n == name) else {
            let known: Vec<&str> = COLUMNS.iter().map(|(n, _)| *n).collect();
            return Err(err(name, format!("unknown column (known: {})", known.join(", "))));
        };
        if cols.contains(&c) {
            return Err(err(name, "column given twice".into()));
        }
        cols.push(c);
    }
    for need in [Col::Time, Col::Model] {
        if !cols.contains(&need) {
            return Err(err(col_name(need), "required column missing from header".into()));
        }
    }
    Ok(cols)
}

#[inline]
fn parse_csv_line<'a>(
    line: &'a [u8],
    cols: &[Col],
    file: &str,
    line_no: usize,
) -> Result<Fields<'a>, TraceError> {
    let err = |c: Col, message: String| TraceError::Parse {
        file: file.to_string(),
        line: line_no,
        field: col_name(c).to_string(),
        message,
    };
    let mut f = Fields::default();
    let mut rest = line;
    let mut n = 0usize;
    loop {
        let (field, more) = match memchr::memchr(b',', rest) {
            Some(i) => (&rest[..i], Some(&rest[i + 1..])),
            None => (rest, None),
        };
        let Some(&c) = cols.get(n) else {
            return Err(TraceError::Parse {
                file: file.to_string(),
                line: line_no,
                field: format!("#{}", n + 1),
                message: format!("more fields than the {} header columns", cols.len()),
            });
        };
        n += 1;
        if !field.is_empty() {
            let text = |field: &'a [u8]| -> Result<&'a str, TraceError> {
                std::str::from_utf8(field).map_err(|_| err(c, "not valid UTF-8".into()))
            };
            let show = |field: &[u8]| String::from_utf8_lossy(field).into_owned();
            match c {
                Col::Time => {
                    f.time = Some(parse_secs(field).map_err(|m| err(c, format!("'{}': {m}", show(field))))?)
                }
                Col::Model => {
                    let t = text(field)?;
                    if t.starts_with('"') {
                        return Err(err(c, "quoted fields are not supported".into()));
                    }
                    f.model = Some(t)
                }
                Col::Op => {
                    f.op = OpKind::parse(field).ok_or_else(|| {
                        err(
                            c,
                            format!(
                                "unknown op '{}' (expected request, preload, pin, unpin, unload, set_limit)",
                                show(field)
                            ),
                        )
                    })?
                }
                Col::Type => {
                    f.model_type = Some(
                        text(field)?
                            .parse()
                            .map_err(|e: modelpool::types::ParseModelTypeError| err(c, e.to_string()))?,
                    )
                }
                Col::Size => {
                    let v = parse_uint(field).map_err(|m| err(c, format!("'{}': {m}", show(field))))?;
                    if v == 0 {
                        return Err(err(c, "must be greater than zero".into()));
                    }
                    f.size = Some(v)
                }
                Col::Input | Col::Output | Col::MaxModels => {
                    let v = parse_uint(field).map_err(|m| err(c, format!("'{}': {m}", show(field))))?;
                    let v = u32::try_from(v).map_err(|_| err(c, format!("'{}': too large", show(field))))?;
                    match c {
                        Col::Input => f.input_tokens = Some(v),
                        Col::Output => f.output_tokens = Some(v),
                        _ => f.max_models = Some(v),
                    }
                }
                Col::Duration => {
                    f.duration =
                        Some(parse_secs(field).map_err(|m| err(c, format!("'{}': {m}", show(field))))?)
                }
                Col::Limit => {
                    f.limit = Some(
                        parse_limit(text(field)?.trim())
                            .map_err(|m| err(c, format!("'{}': {m}", show(field))))?,
                    )
                }
            }
        }
        match more {
            Some(r) => rest = r,
            None => break,
        }
    }
    Ok(f)
}

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
                    format!("unknown op '{op}' (expected request, preload, pin, unpin, unload, set_limit)"),
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
