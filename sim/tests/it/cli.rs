//! The `modelpool-sim` binary: reports, files it writes, and how it fails on bad input.

use std::path::{Path, PathBuf};
use std::process::Command;

use modelpool_sim::{SimConfig, Trace, run};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_modelpool-sim"))
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A path for `name` in this test binary's own temporary directory (removed when the binary
/// exits; tests use distinct names).
fn tmp(name: &str) -> PathBuf {
    static DIR: std::sync::LazyLock<tempfile::TempDir> =
        std::sync::LazyLock::new(|| tempfile::tempdir().expect("a temporary directory"));
    DIR.path().join(name)
}

#[test]
fn replay_json_is_the_library_report_and_events_are_written() {
    let trace = root().join("traces/admin-ops.jsonl");
    let events = tmp("events.jsonl");
    let out = bin().arg("replay").arg(&trace).arg("--json").arg("--events").arg(&events).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let lib = run(&Trace::from_path(&trace).unwrap(), &SimConfig::default()).unwrap().report;
    assert_eq!(json, serde_json::to_value(&lib).unwrap());
    // One JSON event per line; the 70B model's refusal is there with its code.
    let text = std::fs::read_to_string(&events).unwrap();
    let evs: Vec<serde_json::Value> = text.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert!(evs.iter().any(|e| e["event"] == "reject"
        && e["model"] == "llama-3.3-70b-instruct-4bit"
        && e["code"] == "model_too_large"));
    assert!(evs.iter().all(|e| e["event"] != "hit"), "hits are not decisions");
}

#[test]
fn text_report_has_the_timing_line_json_does_not() {
    let trace = root().join("traces/chat-zipf.csv");
    let out = bin().arg("replay").arg(&trace).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("  hits             2173 (54.33%)"), "{text}");
    assert!(text.contains("  queue            11 waited (timeout 60.00 s)"), "{text}");
    // Requests' KV caches are in the ledger by default (the rule's rate for each model).
    assert!(text.contains("  kv cache         peak 2.0 GB, mean 102 MB"), "{text}");
    assert!(text.lines().last().unwrap().starts_with("timing: "), "{text}");
    let out = bin().arg("replay").arg(&trace).arg("--json").output().unwrap();
    assert!(!String::from_utf8(out.stdout).unwrap().contains("timing"));
}

#[test]
fn sweep_writes_csv_and_svg_and_recommends() {
    let (csv, svg) = (tmp("s.csv"), tmp("s.svg"));
    let out = bin()
        .args(["sweep", "--limits", "10GB..40GB:4", "--policies", "lru,gdsf,belady", "--max-models", "12"])
        .arg(root().join("traces/chat-zipf.csv"))
        .arg("--csv")
        .arg(&csv)
        .arg("--svg")
        .arg(&svg)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("recommendation: "), "{text}");
    let csv = std::fs::read_to_string(&csv).unwrap();
    assert_eq!(csv.lines().count(), 1 + 4 * 3);
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<polyline").count(), 3 * 3, "3 panels x 3 policies");
}

#[test]
fn bad_input_fails_with_one_line_naming_file_line_and_field() {
    let bad = tmp("bad.csv");
    std::fs::write(&bad, "time,model,input_tokens\n0,a,1\n1,b,many\n").unwrap();
    let out = bin().arg("replay").arg(&bad).env("RUST_BACKTRACE", "1").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(
        err,
        format!(
            "modelpool-sim: {}:3: field `input_tokens`: 'many': not a non-negative integer\n",
            bad.display()
        )
    );
    for args in [
        &["--memory-limit", "75%"][..],
        &["--memory-limit", "lots"],
        &["--policy", "fifo"],
        &["--max-models", "0"],
    ] {
        let out = bin().arg("replay").arg(root().join("traces/chat-zipf.csv")).args(args).output().unwrap();
        assert!(!out.status.success(), "{args:?}");
        assert!(!out.stderr.is_empty());
    }
    let out = bin().args(["replay", "/nonexistent/trace.csv"]).output().unwrap();
    assert!(
        String::from_utf8(out.stderr)
            .unwrap()
            .starts_with("modelpool-sim: cannot read /nonexistent/trace.csv: ")
    );
}

#[test]
fn gen_writes_the_committed_trace() {
    let out = tmp("gen.csv");
    let st = bin()
        .args([
            "gen",
            "--seed",
            "1",
            "--requests",
            "4000",
            "--models",
            "12",
            "--zipf",
            "1.1",
            "--rate",
            "0.2",
            "-o",
        ])
        .arg(&out)
        .status()
        .unwrap();
    assert!(st.success());
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(root().join("traces/chat-zipf.csv")).unwrap());
}
