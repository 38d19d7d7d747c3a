//! Sizes and memory limits as users write them, and their resolution to bytes.
//!
//! [`ByteSize`] is the one parser of sizes (`16GB`, `16GiB`, `512MB`, `1.5 GB`): the server's
//! flags and config file use it for `max_body` and model sizes, and [`MemoryLimit`] builds on it,
//! adding shares of system memory (`75%`, `0.75`) that [`MemoryLimit::resolve`] turns into bytes
//! against the machine's total.
//!
//! The unit table is hand-written rather than taken from the `bytesize` crate: `bytesize` 2.x
//! truncates fractional bytes (`4.1GB` gives 4 099 999 999), saturates instead of refusing
//! sizes past `u64::MAX`, and reads a bare number as bytes, where here a bare number is a share
//! of memory (limits) or refused as ambiguous (sizes).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// A positive byte count written as a number and a unit: decimal `KB MB GB TB` (and `K M G T`,
/// powers of 1000), binary `KiB MiB GiB TiB` (powers of 1024) or `B`; units are
/// case-insensitive and may follow a space (`1.5 GB`). Fractional bytes round to the nearest.
///
/// Parsing refuses, with a [`SizeError`] saying why: an empty string, a bare number (no unit),
/// a percentage, a number that is negative, zero, not finite or that rounds below one byte, an
/// unknown unit, and sizes of 2^64 bytes or more. `Display` writes the largest unit that divides
/// the count exactly (`4MiB`, `16GB`, `1234B`), which parses back to the same count.
/// In config files it is a string, read with the same parser.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct ByteSize(pub u64);

/// A size string that does not parse; the message says what is accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid size '{input}': {reason} (expected e.g. 512MB, 16GB or 16GiB)")]
pub struct SizeError {
    /// The rejected input, as given.
    pub input: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

/// Units by lowercase name, decimal then binary.
const UNITS: [(&str, u64); 13] = [
    ("b", 1),
    ("k", 1_000),
    ("kb", 1_000),
    ("m", 1_000_000),
    ("mb", 1_000_000),
    ("g", 1_000_000_000),
    ("gb", 1_000_000_000),
    ("t", 1_000_000_000_000),
    ("tb", 1_000_000_000_000),
    ("kib", 1 << 10),
    ("mib", 1 << 20),
    ("gib", 1 << 30),
    ("tib", 1 << 40),
];

/// Units `Display` may write, largest first.
const DISPLAY_UNITS: [(&str, u64); 8] = [
    ("TiB", 1 << 40),
    ("TB", 1_000_000_000_000),
    ("GiB", 1 << 30),
    ("GB", 1_000_000_000),
    ("MiB", 1 << 20),
    ("MB", 1_000_000),
    ("KiB", 1 << 10),
    ("KB", 1_000),
];

/// Splits `t` (trimmed) into its leading number and the trimmed rest.
fn split_number(t: &str) -> Result<(f64, &str), &'static str> {
    let split =
        t.find(|c: char| !(c.is_ascii_digit() || c == '.' || c == '-' || c == '+')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let v: f64 = num.parse().map_err(|_| "not a number")?;
    if !v.is_finite() {
        return Err("not a finite number");
    }
    Ok((v, unit.trim()))
}

impl ByteSize {
    /// `v` units of `unit` (a name from the unit table, any case), rounded to whole bytes.
    fn from_parts(v: f64, unit: &str) -> Result<Self, &'static str> {
        let unit = unit.to_ascii_lowercase();
        let mult = UNITS.iter().find(|(name, _)| *name == unit).ok_or("unknown unit")?.1;
        let bytes = v * mult as f64;
        if bytes < 1.0 {
            return Err("must be greater than zero");
        }
        if bytes >= u64::MAX as f64 {
            return Err("too large");
        }
        Ok(ByteSize(bytes.round() as u64))
    }
}

impl FromStr for ByteSize {
    type Err = SizeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| SizeError { input: s.to_string(), reason };
        let t = s.trim();
        if t.is_empty() {
            return Err(err("empty"));
        }
        if t.ends_with('%') {
            return Err(err("a share of memory is not a size here; give bytes with a unit"));
        }
        let (v, unit) = split_number(t).map_err(err)?;
        if unit.is_empty() {
            return Err(err("a bare number is ambiguous; add a unit"));
        }
        ByteSize::from_parts(v, unit).map_err(err)
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        match DISPLAY_UNITS.iter().find(|(_, m)| b != 0 && b.is_multiple_of(*m)) {
            Some((name, m)) => write!(f, "{}{name}", b / m),
            None => write!(f, "{b}B"),
        }
    }
}

impl From<ByteSize> for u64 {
    fn from(b: ByteSize) -> u64 {
        b.0
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// A memory limit: a fraction of total system memory, or absolute bytes.
///
/// Parsed from `75%` or `0.75` (a share in (0, 1]: a bare number is a share, never bytes) or a
/// [`ByteSize`] (`16GB`, `16GiB`, `512MB`). Zero, negative, not finite, over 100% and unknown
/// units are refused with a [`LimitError`].
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
    /// The rejected input, as given.
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
        let (v, unit) = split_number(t).map_err(err)?;
        if unit.is_empty() {
            // A bare number: a fraction if at most 1, otherwise ambiguous.
            if v <= 1.0 {
                return fraction(v).map_err(err);
            }
            return Err(err("a bare number must be a fraction in (0, 1]; add a unit for bytes"));
        }
        ByteSize::from_parts(v, unit).map(|b| MemoryLimit::Bytes(b.0)).map_err(err)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_decimal_binary_and_round_to_whole_bytes() {
        let ok = [
            ("16GB", 16_000_000_000),
            ("16gb", 16_000_000_000),
            ("16GiB", 16 << 30),
            ("512MB", 512_000_000),
            ("4MiB", 4 << 20),
            (" 1.5 GB ", 1_500_000_000),
            ("4.1GB", 4_100_000_000),
            ("2k", 2_000),
            ("1B", 1),
            ("0.5KiB", 512),
        ];
        for (s, want) in ok {
            assert_eq!(s.parse::<ByteSize>(), Ok(ByteSize(want)), "{s}");
        }
    }

    #[test]
    fn sizes_refuse_what_is_not_a_positive_size_and_say_why() {
        let bad = [
            ("", "empty"),
            ("12", "bare number"),
            ("0.5", "bare number"),
            ("50%", "share of memory"),
            ("0GB", "greater than zero"),
            ("0.1B", "greater than zero"),
            ("-1GB", "greater than zero"),
            ("16XB", "unknown unit"),
            ("GB", "not a number"),
            ("nan GB", "not a number"),
            ("20000000TB", "too large"),
        ];
        for (s, why) in bad {
            let e = s.parse::<ByteSize>().unwrap_err();
            assert_eq!(e.input, s);
            let msg = e.to_string();
            assert!(msg.starts_with(&format!("invalid size '{s}'")) && msg.contains(why), "{s}: {msg}");
        }
    }

    #[test]
    fn sizes_display_exactly_and_parse_back() {
        for (b, shown) in [
            (4 << 20, "4MiB"),
            (16_000_000_000, "16GB"),
            (1_500_000_000, "1500MB"),
            (1234, "1234B"),
            (3 << 40, "3TiB"),
        ] {
            assert_eq!(ByteSize(b).to_string(), shown);
            assert_eq!(shown.parse::<ByteSize>(), Ok(ByteSize(b)));
        }
    }

    #[test]
    fn sizes_read_from_config_strings_with_the_same_parser() {
        #[derive(Deserialize)]
        struct F {
            size: ByteSize,
        }
        let f: F = toml::from_str(r#"size = "5GB""#).unwrap();
        assert_eq!(f.size, ByteSize(5_000_000_000));
        let e = toml::from_str::<F>(r#"size = "5%""#).err().unwrap().to_string();
        assert!(e.contains("invalid size '5%'"), "{e}");
        assert_eq!(serde_json::to_string(&ByteSize(4 << 20)).unwrap(), r#""4MiB""#);
    }

    #[test]
    fn limits_take_shares_or_sizes() {
        assert_eq!("16GiB".parse::<MemoryLimit>(), Ok(MemoryLimit::Bytes(16 << 30)));
        assert_eq!("0.5".parse::<MemoryLimit>(), Ok(MemoryLimit::Fraction(0.5)));
        let e = "16XB".parse::<MemoryLimit>().unwrap_err().to_string();
        assert!(e.starts_with("invalid memory limit '16XB': unknown unit"), "{e}");
    }
}
