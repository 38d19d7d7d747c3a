//! The writer of libCacheSim's `oracleGeneral` binary trace format, so the same trace can be
//! replayed by libCacheSim (`scripts/libcachesim-compare.sh`).
//!
//! One 24-byte little-endian record per request:
//!
//! | bytes | field | here |
//! |---|---|---|
//! | 0-3 | `clock_time: u32` | arrival, whole seconds (saturating) |
//! | 4-11 | `obj_id: u64` | model index + 1 |
//! | 12-15 | `obj_size: u32` | model size / [`OracleExport::unit_bytes`] |
//! | 16-23 | `next_access_vtime: i64` | index of the model's next request, `i64::MAX` if none |
//!
//! `obj_size` is 32 bits and models are gigabytes, so sizes are written in a unit: the greatest
//! common divisor of the requested models' sizes. Every size is then an exact multiple, and a
//! byte capacity of `k` units in libCacheSim decides exactly as a memory limit of
//! `k x unit_bytes` does here.

use std::io::{self, Write};

use super::{NS, OpKind, Trace};

/// What [`Trace::write_oracle_general`] wrote, and the numbers a comparison needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct OracleExport {
    /// Records written: one per request.
    pub requests: u64,
    /// Distinct models requested.
    pub models: u64,
    /// Bytes per size unit in the file (the gcd of the requested models' sizes).
    pub unit_bytes: u64,
    /// Working set: the sum of the sizes of the distinct models requested, bytes.
    pub working_set_bytes: u64,
}

/// Why a trace cannot be written as `oracleGeneral`.
#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    /// The format has only requests.
    #[error("operation {index} is `{kind}`: the oracleGeneral format holds requests only")]
    NotARequest {
        /// Index of the operation in the trace.
        index: usize,
        /// Its kind.
        kind: &'static str,
    },
    /// A requested model has no size in the trace.
    #[error("model '{0}' has no size_bytes in the trace: oracleGeneral needs every size")]
    NoSize(String),
    /// A size does not fit in 32 bits even in the common unit.
    #[error("model '{model}' is {units} units of {unit} bytes: more than a u32 holds")]
    TooLarge {
        /// The model.
        model: String,
        /// Its size in units.
        units: u64,
        /// The unit, bytes.
        unit: u64,
    },
    /// Writing failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

impl Trace {
    /// Write the trace's requests as libCacheSim `oracleGeneral` records (see the module docs).
    /// Refuses traces with admin operations (libCacheSim has no pins or limit changes) and
    /// requested models without a size, rather than approximating them.
    pub fn write_oracle_general<W: Write>(&self, mut w: W) -> Result<OracleExport, ExportError> {
        let mut requested = vec![false; self.models.len()];
        for (index, op) in self.ops.iter().enumerate() {
            if op.kind != OpKind::Request {
                return Err(ExportError::NotARequest { index, kind: op.kind.as_str() });
            }
            requested[op.model as usize] = true;
        }
        let (mut unit, mut wss, mut models) = (0u64, 0u64, 0u64);
        for (m, _) in self.models.iter().zip(&requested).filter(|(_, r)| **r) {
            let size = m.size.ok_or_else(|| ExportError::NoSize(m.id.to_string()))?.max(1);
            unit = gcd(unit, size);
            wss = wss.saturating_add(size);
            models += 1;
        }
        let mut units = vec![0u32; self.models.len()];
        for (i, m) in self.models.iter().enumerate().filter(|(i, _)| requested[*i]) {
            let u = m.size.unwrap_or(1).max(1) / unit;
            units[i] = u32::try_from(u).map_err(|_| ExportError::TooLarge {
                model: m.id.to_string(),
                units: u,
                unit,
            })?;
        }
        // Next use of each request, by a backward pass.
        let mut next = vec![i64::MAX; self.ops.len()];
        let mut seen = vec![i64::MAX; self.models.len()];
        for (i, op) in self.ops.iter().enumerate().rev() {
            next[i] = std::mem::replace(&mut seen[op.model as usize], i as i64);
        }
        let mut rec = [0u8; 24];
        for (op, &nx) in self.ops.iter().zip(&next) {
            rec[0..4].copy_from_slice(&u32::try_from(op.at / NS).unwrap_or(u32::MAX).to_le_bytes());
            rec[4..12].copy_from_slice(&(u64::from(op.model) + 1).to_le_bytes());
            rec[12..16].copy_from_slice(&units[op.model as usize].to_le_bytes());
            rec[16..24].copy_from_slice(&nx.to_le_bytes());
            w.write_all(&rec)?;
        }
        w.flush()?;
        Ok(OracleExport {
            requests: self.ops.len() as u64,
            models,
            unit_bytes: unit.max(1),
            working_set_bytes: wss,
        })
    }
}

#[cfg(test)]
mod tests {
    use crate::trace::parse_csv;

    #[test]
    fn records_sizes_in_the_common_unit_and_next_uses() {
        let t = parse_csv(b"time,model,size_bytes\n0,a,6000\n1.5,b,4000\n2,a,\n3,c,2000\n", "t.csv").unwrap();
        let mut out = Vec::new();
        let e = t.write_oracle_general(&mut out).unwrap();
        assert_eq!((e.requests, e.models, e.unit_bytes, e.working_set_bytes), (4, 3, 2000, 12000));
        assert_eq!(out.len(), 4 * 24);
        let rec = |i: usize| {
            let r = &out[i * 24..(i + 1) * 24];
            (
                u32::from_le_bytes(r[0..4].try_into().unwrap()),
                u64::from_le_bytes(r[4..12].try_into().unwrap()),
                u32::from_le_bytes(r[12..16].try_into().unwrap()),
                i64::from_le_bytes(r[16..24].try_into().unwrap()),
            )
        };
        assert_eq!(rec(0), (0, 1, 3, 2));
        assert_eq!(rec(1), (1, 2, 2, i64::MAX));
        assert_eq!(rec(2), (2, 1, 3, i64::MAX));
        assert_eq!(rec(3), (3, 3, 1, i64::MAX));
    }

    #[test]
    fn refuses_admin_operations_and_missing_sizes() {
        let t = parse_csv(b"time,model,op,size_bytes\n0,a,preload,10\n", "t.csv").unwrap();
        let e = t.write_oracle_general(Vec::new()).unwrap_err().to_string();
        assert!(e.contains("`preload`"), "{e}");
        let t = parse_csv(b"time,model\n0,a-7b\n", "t.csv").unwrap();
        let e = t.write_oracle_general(Vec::new()).unwrap_err().to_string();
        assert!(e.contains("no size_bytes"), "{e}");
    }
}
