//! The CSV writer (the generator's output format, read back by `csv.rs`).
//!
//! Hand-written rather than the `csv` crate: the reader is a fast unquoted splitter, so the
//! writer emits exactly what it reads (model ids with commas or quotes are refused by the
//! parser and never reach here).

use std::io::{self, Write};

use modelpool::{ModelType, Nanos};

use super::{NS, OpKind, Service, Trace};

impl Trace {
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
