//! The CSV front end: a memchr line and field splitter over the documented columns.

use super::build::{Builder, Fields, parse_limit, parse_secs, parse_uint};
use super::{OpKind, Trace, TraceError};

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
                                "unknown op '{}' (expected {})",
                                show(field),
                                modelpool::names::names::<OpKind>()
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
