//! The predictive policy and predictive preload in the simulator: preloads are ordinary loads
//! in the decision log (with the predicted distance as their reason), take only free room, are
//! all accounted (useful, wasted or unused at the end), and help on structured traffic.

use modelpool::log::LogMode;
use modelpool::{Event, PolicyKind};
use modelpool_sim::generate::{Arrivals, GenConfig, generate};
use modelpool_sim::{PolicyChoice, SimConfig, Trace, run};

use crate::common::{GB, assert_accounted, csv};

const PREDICTIVE: PolicyChoice = PolicyChoice::Online(PolicyKind::Predictive);

/// Two periodic jobs (every 100 s and every 150 s) on two 6 GB models and a busy 6 GB chat model
/// (every 10 s), with a 30 s keep-alive: the jobs' models expire between runs, which leaves the
/// room a preload can bring them back into before their next run.
fn periodic() -> Trace {
    let mut t = String::from("time,model,op,type,size_bytes,input_tokens,output_tokens,duration\n");
    let mut rows: Vec<(u64, &str)> = Vec::new();
    for k in 0..12u64 {
        rows.push((k * 100 + 5, "job-a"));
    }
    for k in 0..8u64 {
        rows.push((k * 150 + 55, "job-b"));
    }
    for k in 0..120u64 {
        rows.push((k * 10, "chat"));
    }
    rows.sort();
    let mut seen = std::collections::BTreeSet::new();
    for (at, m) in rows {
        let size = if seen.insert(m) { (6 * GB).to_string() } else { String::new() };
        t.push_str(&format!("{at},{m},,,{size},,,1\n"));
    }
    csv(&t)
}

fn cfg(preload: bool) -> SimConfig {
    SimConfig {
        limit: 24 * GB,
        max_models: 4,
        policy: PREDICTIVE,
        idle_ttl_secs: Some(30.0),
        preload_horizon_secs: preload.then_some(20.0),
        log: LogMode::Decisions,
        kv_cache: false,
        ..SimConfig::default()
    }
}

fn line(e: &Event) -> Option<String> {
    let s = |at: &u64| format!("{:.3}", *at as f64 / 1e9);
    Some(match e {
        Event::Load { at, model, predicted_in_secs: Some(p), .. } => {
            format!("{} preload {model} (next request predicted in {p:.1} s)", s(at))
        }
        Event::Load { at, model, .. } => format!("{} load {model}", s(at)),
        Event::Loaded { at, model, .. } => format!("{} loaded {model}", s(at)),
        Event::Evict { at, model, reason, for_model, .. } => {
            format!("{} evict {model} ({reason}) for {}", s(at), for_model.as_deref().unwrap_or("-"))
        }
        Event::Unload { at, model, .. } => format!("{} unload {model}", s(at)),
        Event::Reject { at, model, code, .. } => format!("{} reject {model} {code}", s(at)),
        _ => return None,
    })
}

#[test]
fn preloads_are_loads_with_a_reason_and_evict_nothing() {
    let t = periodic();
    let out = run(&t, &cfg(true)).unwrap();
    assert_accounted(&out);
    let p = out.report.predictive_preload.expect("preload on");
    assert!(p.started > 0 && p.useful > 0, "{p:?}");
    assert_eq!(p.useful + p.wasted + p.unused_at_end, p.started);
    // No eviction is ever made for a preloaded model at the time it is preloaded.
    let preloads: Vec<(u64, String)> = out
        .events
        .iter()
        .filter_map(|e| match e {
            Event::Load { at, model, predicted_in_secs: Some(_), .. } => Some((*at, model.to_string())),
            _ => None,
        })
        .collect();
    assert_eq!(preloads.len() as u64, p.started);
    for e in &out.events {
        if let Event::Evict { at, for_model: Some(f), .. } = e {
            assert!(!preloads.contains(&(*at, f.to_string())), "a preload evicted for {f} at {at}");
        }
    }
    // Preloaded models are never pinned: they leave when room is needed.
    assert!(!out.events.iter().any(|e| matches!(e, Event::Pin { .. })));
    // Without preload the same replay has no predicted loads and added latency is higher.
    let base = run(&t, &cfg(false)).unwrap();
    assert!(base.report.predictive_preload.is_none());
    assert!(p.latency_saved_secs > 0.0);
    assert!(out.report.added_latency.mean < base.report.added_latency.mean);
    let lines: Vec<String> = out.events.iter().filter_map(line).take(60).collect();
    let mut settings = insta::Settings::clone_current();
    settings.set_info(&cfg(true));
    settings.bind(|| insta::assert_yaml_snapshot!("periodic_with_preload", (lines, p)));
}

#[test]
fn preload_needs_a_predicting_policy() {
    let t = periodic();
    let out = run(&t, &SimConfig { policy: PolicyChoice::LRU, ..cfg(true) }).unwrap();
    assert_eq!(out.report.predictive_preload.unwrap().started, 0);
}

/// On the committed multi-tenant trace (sessions, jobs, per-model phases), as a plain cache:
/// predictive misses less than LRU, GDSF and LFU and is within 20% of size-and-cost-aware
/// Belady; preload lowers its misses further.
#[test]
fn predictive_beats_the_online_policies_on_structured_traffic() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../traces/multi-tenant.csv");
    let t = Trace::from_path(std::path::Path::new(path)).unwrap();
    let miss = |policy, preload: bool| {
        let c = SimConfig::instant(64 * GB, 1000, policy);
        let c = SimConfig { preload_horizon_secs: preload.then_some(60.0), ..c };
        run(&t, &c).unwrap().report.miss_ratio.object
    };
    let pred = miss(PREDICTIVE, false);
    for p in [PolicyChoice::LRU, PolicyChoice::GDSF, PolicyChoice::LFU] {
        assert!(pred < miss(p, false), "{p}: {} vs predictive {pred}", miss(p, false));
    }
    let bound = miss(PolicyChoice::BeladyCost, false);
    assert!(pred <= bound * 1.2, "predictive {pred}, belady-cost {bound}");
    assert!(miss(PREDICTIVE, true) < pred);
}

/// With no structure (Poisson arrivals, uniform popularity) predictive stays within 2% of LRU.
#[test]
fn without_structure_predictive_is_no_worse_than_lru() {
    let t = generate(&GenConfig {
        seed: 9,
        requests: 20_000,
        models: 20,
        zipf: 0.0,
        rate: 5.0,
        arrivals: Arrivals::Poisson,
        ..GenConfig::default()
    })
    .unwrap();
    let miss = |policy| run(&t, &SimConfig::instant(40 * GB, 1000, policy)).unwrap().report.miss_ratio.object;
    let (lru, pred) = (miss(PolicyChoice::LRU), miss(PREDICTIVE));
    assert!(pred <= lru * 1.02, "predictive {pred}, lru {lru}");
}

/// A job every 100 s (expiring 30 s after each run), a chat request at 390 s that stays busy
/// for 9 s, and one 7 GB request at 391 s, in 10 GB: the chat request's admission preloads the
/// job (due at 405 s), and at 391 s only cancelling that preload mid-load makes room.
fn cancel_trace() -> Trace {
    let mut t = String::from("time,model,op,type,size_bytes,input_tokens,output_tokens,duration\n");
    for k in 0..4u64 {
        let size = if k == 0 { (2 * GB).to_string() } else { String::new() };
        t.push_str(&format!("{},job,,,{size},,,1\n", k * 100 + 5));
    }
    t.push_str(&format!("390,chat,,,{},,,9\n", 2 * GB));
    t.push_str(&format!("391,big,,,{},,,1\n", 7 * GB));
    t.push_str("405,job,,,,,,1\n");
    csv(&t)
}

#[test]
fn a_request_needing_a_loading_preloads_room_cancels_it_instead_of_waiting() {
    let t = cancel_trace();
    let c = SimConfig { limit: 10 * GB, preload_horizon_secs: Some(20.0), ..cfg(true) };
    let (out, rec) = modelpool_sim::run_recorded(&t, &c).unwrap();
    assert_accounted(&out);
    let p = out.report.predictive_preload.unwrap();
    assert_eq!(p.cancelled, 1, "{p:?}");
    assert!(p.wasted >= p.cancelled);
    assert_eq!(p.useful + p.wasted + p.unused_at_end, p.started);
    let cancels: Vec<(u64, String, String)> = out
        .events
        .iter()
        .filter_map(|e| match e {
            Event::PreloadCancelled { at, model, for_model, .. } => {
                Some((*at / 1_000_000_000, model.to_string(), for_model.to_string()))
            }
            _ => None,
        })
        .collect();
    assert_eq!(cancels, [(391, "job".to_string(), "big".to_string())]);
    // The big request started its own load at once and waited only for it.
    let big = t.ops.iter().position(|o| o.at == 391_000_000_000).unwrap();
    assert_eq!(rec.outcomes[big], modelpool_sim::RequestOutcome::Load);
    let loaded_at = out.events.iter().find_map(|e| match e {
        Event::Loaded { at, model, .. } if model.as_ref() == "big" => Some(*at),
        _ => None,
    });
    let own_load = (c.load_latency_secs + 7.0 * GB as f64 / c.load_bandwidth) * 1e9;
    assert_eq!(loaded_at, Some(391_000_000_000 + own_load.round() as u64));
    // The job's next run loads it again (the cancelled load left nothing behind).
    let job = t.ops.iter().position(|o| o.at == 405_000_000_000).unwrap();
    assert!(matches!(
        rec.outcomes[job],
        modelpool_sim::RequestOutcome::Load | modelpool_sim::RequestOutcome::Queued
    ));
}
