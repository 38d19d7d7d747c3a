//! Fuzzing the trace parsers (CSV and JSONL) on the stable toolchain: proptest with a fixed
//! ChaCha seed over byte and line mutations of the committed traces and over lines built from
//! the formats' own tokens. A trace that parses is also replayed, and every request must end
//! in exactly one outcome. `MODELPOOL_FUZZ_CASES` cases per target (default 2000); the long
//! run is `MODELPOOL_FUZZ_CASES=1000000 cargo test --release -p modelpool-sim --test it fuzz:: -- --nocapture`.

use std::time::Instant;

use modelpool_sim::trace::{parse_csv, parse_jsonl};
use modelpool_sim::{SimConfig, run};
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};

use crate::common::assert_accounted;

fn cases() -> u32 {
    std::env::var("MODELPOOL_FUZZ_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000)
}

fn runner() -> TestRunner {
    let config = Config { cases: cases(), failure_persistence: None, ..Config::default() };
    TestRunner::new_with_rng(config, TestRng::from_seed(RngAlgorithm::ChaCha, &[11u8; 32]))
}

/// The first `n` lines of a committed trace.
fn head(file: &str, n: usize) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../traces").join(file);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    text.lines().take(n).collect::<Vec<_>>().join("\n") + "\n"
}

/// One edit of a trace: a byte changed, inserted or removed, a line dropped or duplicated, or
/// a field replaced with an odd value.
#[derive(Debug, Clone)]
enum Edit {
    Byte(usize, u8),
    Insert(usize, u8),
    Remove(usize),
    DropLine(usize),
    DupLine(usize),
    Field(usize, usize, String),
}

fn edit() -> impl Strategy<Value = Edit> {
    let odd = prop_oneof![
        Just(String::new()),
        Just("-1".to_string()),
        Just("1e308".to_string()),
        Just("NaN".to_string()),
        Just("18446744073709551616".to_string()),
        Just("0".to_string()),
        Just("preload".to_string()),
        Just("unpin".to_string()),
        Just("limit".to_string()),
        Just("150%".to_string()),
        Just("embeddings".to_string()),
        Just("\"".to_string()),
        "[ -~]{0,10}",
    ];
    prop_oneof![
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Byte(p, b)),
        (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Edit::Insert(p, b)),
        any::<usize>().prop_map(Edit::Remove),
        any::<usize>().prop_map(Edit::DropLine),
        any::<usize>().prop_map(Edit::DupLine),
        (any::<usize>(), 0usize..10, odd).prop_map(|(l, f, v)| Edit::Field(l, f, v)),
    ]
}

fn apply(seed: &str, edits: &[Edit], sep: char) -> Vec<u8> {
    let mut lines: Vec<String> = seed.lines().map(str::to_string).collect();
    for e in edits {
        let n = lines.len().max(1);
        match e {
            Edit::DropLine(l) if !lines.is_empty() => {
                lines.remove(l % n);
            }
            Edit::DupLine(l) if !lines.is_empty() => lines.insert(l % n, lines[l % n].clone()),
            Edit::Field(l, f, v) if !lines.is_empty() => {
                let line = &mut lines[l % n];
                let mut fields: Vec<String> = line.split(sep).map(str::to_string).collect();
                let i = f % fields.len();
                // JSONL (`"key": value`): replace the value; CSV: the whole column.
                fields[i] = match fields[i].split_once(':') {
                    Some((k, _)) if k.contains('"') => format!("{k}: {v}"),
                    _ => v.clone(),
                };
                *line = fields.join(&sep.to_string());
            }
            _ => {}
        }
    }
    let mut out = lines.join("\n").into_bytes();
    out.push(b'\n');
    for e in edits {
        let n = out.len().max(1);
        match *e {
            Edit::Byte(p, b) if !out.is_empty() => out[p % n] = b,
            Edit::Insert(p, b) => out.insert(p % (out.len() + 1), b),
            Edit::Remove(p) if !out.is_empty() => {
                out.remove(p % n);
            }
            _ => {}
        }
    }
    out
}

fn check(
    name: &str,
    seed: &str,
    sep: char,
    parse: fn(&[u8], &str) -> Result<modelpool_sim::Trace, modelpool_sim::TraceError>,
) {
    let start = Instant::now();
    let cfg = SimConfig::default();
    // (parsed, replayed) over the run.
    let counts = std::cell::Cell::new((0u64, 0u64));
    let result = runner().run(&prop::collection::vec(edit(), 1..6), |edits| {
        let bytes = apply(seed, &edits, sep);
        match parse(&bytes, "fuzz") {
            Ok(trace) => {
                let (p, r) = counts.get();
                if let Ok(outcome) = run(&trace, &cfg) {
                    assert_accounted(&outcome);
                    counts.set((p + 1, r + 1));
                } else {
                    counts.set((p + 1, r));
                }
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
        Ok(())
    });
    let (parsed, replayed) = counts.get();
    match result {
        Ok(()) => println!(
            "fuzz {name}: {} cases, 0 failures ({parsed} parsed, {replayed} replayed), {:.1}s",
            cases(),
            start.elapsed().as_secs_f64()
        ),
        Err(e) => panic!("fuzz {name}: {e}"),
    }
}

#[test]
fn csv_traces() {
    check("trace csv", &head("chat-zipf.csv", 40), ',', parse_csv);
}

#[test]
fn jsonl_traces() {
    check("trace jsonl", &head("admin-ops.jsonl", 40), ',', parse_jsonl);
}
