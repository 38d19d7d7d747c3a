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
    assert_eq!(one.cells.len(), 15);
    // Offline baselines carry no gap; online ones do.
    for c in &one.cells {
        assert_eq!(c.gap_object.is_none(), c.policy.is_offline());
    }
}
