//! Same trace + config + seed: the same report and decision log, bit for bit; a sweep's result
//! does not depend on how many threads ran it.

use modelpool::log::LogMode;
use modelpool_sim::generate::{Arrivals, GenConfig, generate};
use modelpool_sim::sweep::{Target, sweep};
use modelpool_sim::{PolicyChoice, SimConfig};

use crate::common::{GB, replay};

#[test]
fn two_replays_are_identical() {
    let t = generate(&GenConfig {
        seed: 9,
        requests: 5000,
        models: 16,
        arrivals: Arrivals::Gamma(0.4),
        rate: 1.0,
        ..GenConfig::default()
    })
    .unwrap();
    for p in PolicyChoice::ALL {
        let cfg = SimConfig {
            policy: p,
            log: LogMode::Decisions,
            retries: 2,
            load_failure_rate: 0.02,
            unload_secs: 0.2,
            ..SimConfig::default()
        };
        let (a, b) = (replay(&t, &cfg), replay(&t, &cfg));
        assert_eq!(a.report, b.report, "{p}");
        assert_eq!(a.events, b.events, "{p}");
        assert_eq!(serde_json::to_string(&a.report).unwrap(), serde_json::to_string(&b.report).unwrap());
        // A different seed changes which loads fail.
        let c = replay(&t, &SimConfig { seed: 2, ..cfg.clone() });
        assert_ne!(a.events, c.events, "{p}: the seed must matter");
    }
}

#[test]
fn sweep_result_does_not_depend_on_threads() {
    let t = generate(&GenConfig { seed: 4, requests: 3000, ..GenConfig::default() }).unwrap();
    let limits = [8 * GB, 16 * GB, 32 * GB];
    let base = SimConfig { max_models: 6, ..SimConfig::default() };
    let one = sweep(&t, &base, &limits, &PolicyChoice::ALL, Target::default(), 1, &|| {}).unwrap();
    let two = sweep(&t, &base, &limits, &PolicyChoice::ALL, Target::default(), 3, &|| {}).unwrap();
    assert_eq!(one.to_csv(), two.to_csv());
    assert_eq!(one.to_svg("t"), two.to_svg("t"));
    assert_eq!(one.cells.len(), 3 * PolicyChoice::ALL.len());
    // Offline baselines carry no gap; online ones do.
    for c in &one.cells {
        assert_eq!(c.gap_object.is_none(), c.policy.is_offline());
    }
    // A recommended limit meets the target there and at every larger limit.
    if let Some((l, p)) = one.recommended {
        assert!(!p.is_offline());
        assert!(one.cells.iter().filter(|c| c.policy == p && c.limit >= l).all(|c| c.meets_target));
    }
}

/// The generator reproduces the committed traces byte for byte (comments aside): its output is
/// pinned to ChaCha8 and its own samplers, not to a distribution crate's version.
#[test]
fn generator_reproduces_committed_traces() {
    let cases = [
        (
            "chat-zipf.csv",
            GenConfig { seed: 1, requests: 4000, models: 12, zipf: 1.1, rate: 0.2, ..GenConfig::default() },
        ),
        (
            "bursty-onoff.csv",
            GenConfig {
                seed: 2,
                requests: 3000,
                models: 16,
                zipf: 0.9,
                rate: 0.5,
                arrivals: Arrivals::OnOff { on: 60.0, off: 240.0 },
                sticky: 0.3,
                ..GenConfig::default()
            },
        ),
        (
            "diurnal-gamma.csv",
            GenConfig {
                seed: 3,
                requests: 4000,
                models: 24,
                zipf: 1.0,
                rate: 0.3,
                arrivals: Arrivals::Gamma(0.3),
                diurnal: 0.8,
                period: 3600.0,
                pin: vec!["qwen2.5-0.5b-instruct-4bit".into()],
                ..GenConfig::default()
            },
        ),
        (
            "multi-tenant.csv",
            GenConfig {
                seed: 15,
                requests: 20_000,
                models: 30,
                zipf: 1.1,
                rate: 5.5,
                arrivals: Arrivals::Gamma(0.5),
                diurnal: 0.6,
                period: 3600.0,
                sessions: 40.0,
                think: 5.0,
                jobs: 12,
                phase: true,
                ..GenConfig::default()
            },
        ),
    ];
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../traces");
    for (file, cfg) in cases {
        let mut out = Vec::new();
        generate(&cfg).unwrap().write_csv(&mut out, &[]).unwrap();
        let committed = std::fs::read_to_string(root.join(file)).unwrap();
        let body: String =
            committed.lines().filter(|l| !l.starts_with('#')).map(|l| format!("{l}\n")).collect();
        assert!(String::from_utf8(out).unwrap() == body, "{file}: the generator's output changed");
    }
}

/// Instant mode serves each request in one core call (`PoolState::serve_instant`); a recorded
/// replay takes the generic path (admit, reclaimed, load_finished, release). Both must decide
/// the same, event for event: committed traces (with admin operations) and a generated one, every
/// policy, limits from too small for the largest model to roomy, model-slot evictions, and names
/// only (measured sizes above the estimate: overcommit evictions).
#[test]
fn instant_fast_path_equals_the_generic_path() {
    use modelpool_sim::{Trace, run_recorded};
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../traces/");
    let mut traces: Vec<(String, Trace)> = ["chat-zipf.csv", "admin-ops.jsonl", "bursty-onoff.csv"]
        .iter()
        .map(|f| (f.to_string(), Trace::from_path(std::path::Path::new(&format!("{dir}{f}"))).unwrap()))
        .collect();
    let synthetic =
        generate(&GenConfig { seed: 3, requests: 4000, models: 30, rate: 20.0, ..GenConfig::default() });
    let synthetic = synthetic.unwrap();
    // Sizes above what the names say: with names only, loads measure more than they reserved.
    let mut heavier = synthetic.clone();
    for m in &mut heavier.models {
        m.size = m.size.map(|b| b / 2 * 3);
    }
    traces.push(("generated".into(), synthetic));
    traces.push(("generated, sizes x1.5".into(), heavier));
    let mut overcommits = 0;
    for (name, t) in &traces {
        for p in PolicyChoice::ALL {
            for (limit, max_models, names) in
                [(3 * GB, 1000, false), (20 * GB, 1000, false), (60 * GB, 3, false), (24 * GB, 6, true)]
            {
                let cfg = SimConfig {
                    log: LogMode::Full,
                    estimate_from_names: names,
                    ..SimConfig::instant(limit, max_models, p)
                };
                let fast = replay(t, &cfg);
                let (generic, _) = run_recorded(t, &cfg).unwrap();
                let what = format!("{name}, {p}, {limit} bytes, {max_models} models, names {names}");
                assert_eq!(fast.report, generic.report, "{what}");
                assert_eq!(fast.events, generic.events, "{what}");
                overcommits += fast.report.evictions.get("overcommit").copied().unwrap_or(0);
            }
        }
    }
    assert!(overcommits > 0, "the overcommit path must be exercised");
}
