//! Memory limits as users write them (`75%`, `0.75`, `16GB`, `16GiB`, `512MB`) and their
//! resolution to bytes against the machine's total memory.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A memory limit: a fraction of total system memory, or absolute bytes.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryLimit {
    /// Fraction of total system memory, in (0, 1].
    Fraction(f64),
    /// Absolute bytes, > 0.
    Bytes(u64),
}

/// A memory limit string that does not parse; the message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid memory limit '{input}': {reason} (expected e.g. 75%, 0.75, 16GB, 16GiB or 512MB)")]
pub struct LimitError {
    /// The rejected input.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl FromStr for MemoryLimit {
    type Err = LimitError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| LimitError { input: s.to_string(), reason };
        let t = s.trim();
        if t.is_empty() {
            return Err(err("empty"));
        }
        if let Some(pct) = t.strip_suffix('%') {
            let v: f64 = pct.trim().parse().map_err(|_| err("not a number before '%'"))?;
            return fraction(v / 100.0).map_err(err);
        }
        let split =
            t.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let v: f64 = num.parse().map_err(|_| err("not a number"))?;
        if !v.is_finite() {
            return Err(err("not a finite number"));
        }
        let unit = unit.trim().to_ascii_lowercase();
        if unit.is_empty() {
            // A bare number: a fraction if at most 1, otherwise ambiguous.
            if v <= 1.0 {
                return fraction(v).map_err(err);
            }
            return Err(err("a bare number must be a fraction in (0, 1]; add a unit for bytes"));
        }
        let mult: f64 = match unit.as_str() {
            "b" => 1.0,
            "k" | "kb" => 1e3,
            "m" | "mb" => 1e6,
            "g" | "gb" => 1e9,
            "t" | "tb" => 1e12,
            "kib" => 1024.0,
            "mib" => 1024.0 * 1024.0,
            "gib" => 1024.0 * 1024.0 * 1024.0,
            "tib" => 1024.0f64.powi(4),
            _ => return Err(err("unknown unit")),
        };
        let bytes = v * mult;
        if bytes < 1.0 {
            return Err(err("must be greater than zero"));
        }
        if bytes >= u64::MAX as f64 {
            return Err(err("too large"));
        }
        Ok(MemoryLimit::Bytes(bytes.round() as u64))
    }
}

fn fraction(v: f64) -> Result<MemoryLimit, &'static str> {
    if !v.is_finite() || v <= 0.0 {
        Err("must be greater than zero")
    } else if v > 1.0 {
        Err("cannot exceed 100% of system memory")
    } else {
        Ok(MemoryLimit::Fraction(v))
    }
}

impl fmt::Display for MemoryLimit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemoryLimit::Fraction(v) => write!(f, "{}%", v * 100.0),
            MemoryLimit::Bytes(b) => write!(f, "{:.3}GB", *b as f64 / 1e9),
        }
    }
}

/// Where total system memory comes from; tests use [`FixedMemory`].
pub trait SystemMemory {
    /// Total physical memory in bytes.
    fn total_bytes(&self) -> u64;
}

/// Reads total memory from the operating system with `sysinfo`.
#[derive(Debug, Default, Clone, Copy)]
pub struct SysinfoMemory;

impl SystemMemory for SysinfoMemory {
    fn total_bytes(&self) -> u64 {
        match sysinfo::System::new() {
            Ok(mut sys) => {
                sys.refresh_memory();
                sys.total_memory()
            }
            // No readable memory information: a zero total makes percentage limits reject every
            // load with a clear message instead of guessing a size.
            Err(e) => {
                tracing::error!(error = %e, "cannot read total system memory");
                0
            }
        }
    }
}

/// A fixed total, for tests and simulations.
#[derive(Debug, Clone, Copy)]
pub struct FixedMemory(pub u64);

impl SystemMemory for FixedMemory {
    fn total_bytes(&self) -> u64 {
        self.0
    }
}

impl MemoryLimit {
    /// The limit in bytes on a machine with `mem`'s total memory (at least 1 byte).
    pub fn resolve(&self, mem: &dyn SystemMemory) -> u64 {
        match *self {
            MemoryLimit::Bytes(b) => b,
            MemoryLimit::Fraction(f) => ((mem.total_bytes() as f64) * f).floor().max(1.0) as u64,
        }
    }
}
