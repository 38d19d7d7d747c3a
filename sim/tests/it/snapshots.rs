//! One YAML snapshot per trace in `traces/`: a summary of the decision log (what was loaded,
//! evicted and refused, and the first decisions in order) and the report, under the default
//! configuration. A change in evictions or 503s shows up in review as a snapshot diff.

use std::collections::BTreeMap;

use modelpool::Event;
use modelpool::log::LogMode;
use modelpool_sim::report::fmt_bytes;
use modelpool_sim::{Report, SimConfig, Trace, run};
use serde::Serialize;

#[derive(Default, Serialize)]
struct PerModel {
    loads: u64,
    evictions: BTreeMap<&'static str, u64>,
    rejections: BTreeMap<&'static str, u64>,
    unloads: u64,
}

#[derive(Serialize)]
struct Decisions {
    /// Events by kind (hits and joins are not logged in `Decisions` mode).
    counts: BTreeMap<&'static str, u64>,
    per_model: BTreeMap<String, PerModel>,
    /// The first decisions, in order.
    first: Vec<String>,
}

#[derive(Serialize)]
struct Snapshot {
    decisions: Decisions,
    report: Report,
}

fn secs(ns: u64) -> String {
    format!("{:.3}", ns as f64 / 1e9)
}

fn summarize(events: &[Event]) -> Decisions {
    let mut counts = BTreeMap::new();
    let mut per_model: BTreeMap<String, PerModel> = BTreeMap::new();
    let mut first = Vec::new();
    for e in events {
        let (kind, line) = match e {
            Event::Hit { .. } => ("hit", None),
            Event::Join { .. } => ("join", None),
            Event::Load { at, model, estimate, .. } => {
                per_model.entry(model.to_string()).or_default().loads += 1;
                ("load", Some(format!("{} load {model} ({})", secs(*at), fmt_bytes(*estimate))))
            }
            Event::Loaded { at, model, secs: s, .. } => {
                ("loaded", Some(format!("{} loaded {model} in {s:.3} s", secs(*at))))
            }
            Event::LoadFailed { at, model, .. } => {
                ("load_failed", Some(format!("{} load failed {model}", secs(*at))))
            }
            Event::Evict { at, model, reason, for_model, .. } => {
                *per_model
                    .entry(model.to_string())
                    .or_default()
                    .evictions
                    .entry(reason.as_str())
                    .or_default() += 1;
                let why = for_model.as_ref().map_or(String::new(), |m| format!(" for {m}"));
                ("evict", Some(format!("{} evict {model} ({}){why}", secs(*at), reason.as_str())))
            }
            Event::PreloadCancelled { at, model, for_model, .. } => (
                "preload_cancelled",
                Some(format!("{} preload of {model} cancelled for {for_model}", secs(*at))),
            ),
            Event::Reject { at, model, code, need, available, retry_after_secs } => {
                *per_model
                    .entry(model.to_string())
                    .or_default()
                    .rejections
                    .entry(code.as_str())
                    .or_default() += 1;
                let retry = retry_after_secs.map_or("-".to_string(), |s| format!("{s} s"));
                (
                    "reject",
                    Some(format!(
                        "{} reject {model} {} (need {}, available {}, retry {retry})",
                        secs(*at),
                        code.as_str(),
                        fmt_bytes(*need),
                        fmt_bytes(*available)
                    )),
                )
            }
            Event::Unload { at, model, .. } => {
                per_model.entry(model.to_string()).or_default().unloads += 1;
                ("unload", Some(format!("{} unload {model}", secs(*at))))
            }
            Event::Pin { at, model } => ("pin", Some(format!("{} pin {model}", secs(*at)))),
            Event::Unpin { at, model } => ("unpin", Some(format!("{} unpin {model}", secs(*at)))),
            Event::LimitChanged { at, limit, max_models } => {
                ("limit_changed", Some(format!("{} limit {} max {max_models}", secs(*at), fmt_bytes(*limit))))
            }
            Event::Queued { at, model, .. } => ("queued", Some(format!("{} queued {model}", secs(*at)))),
        };
        *counts.entry(kind).or_default() += 1;
        if let Some(l) = line
            && first.len() < 40
        {
            first.push(l);
        }
    }
    Decisions { counts, per_model, first }
}

#[test]
fn traces() {
    let cfg = SimConfig { log: LogMode::Decisions, ..SimConfig::default() };
    insta::glob!("../../../traces", "*.{csv,jsonl}", |path| {
        let trace = Trace::from_path(path).expect("committed traces parse");
        let out = run(&trace, &cfg).expect("default config is valid");
        let snap = Snapshot { decisions: summarize(&out.events), report: out.report };
        let mut settings = insta::Settings::clone_current();
        settings.set_info(&cfg);
        settings.set_prepend_module_to_snapshot(false);
        settings.bind(|| insta::assert_yaml_snapshot!(snap));
    });
}
